//! Business ids of the shipped participants (products, customers). Orders use
//! [`crate::types::GlobalId`]: an order id is its saga's global transaction id.

use crate::types::string_id;

string_id!(
    /// A product whose stock the stock participant keeps (`ProductID`).
    ProductId, "ProductID");
string_id!(
    /// A customer whose balance the payment participant keeps (`CustomerID`).
    CustomerId, "CustomerID");

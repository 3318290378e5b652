//! JSON bodies (`Content`) of the shipped saga's messages and the SubIDs they
//! travel under. Field names follow the Go seed (`OrderID`, `CustomerID`, ...).
//! Replies of stock and payment keep the seed's bare `"1"` / `"0"`.

use super::ids::{CustomerId, ProductId};
use crate::types::{GlobalId, ID_LEN_MAX, SubId};
use serde::{Deserialize, Serialize};

/// Longest order id: leaves room for the longest SubID suffix below.
pub const ORDER_ID_LEN_MAX: usize = ID_LEN_MAX - 32;

/// `sale-order.created` and `sale-order.stock.release`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderBody {
    #[serde(rename = "OrderID")]
    pub order_id: GlobalId,
    #[serde(rename = "CustomerID")]
    pub customer_id: CustomerId,
    #[serde(rename = "ProductID")]
    pub product_id: ProductId,
    #[serde(rename = "Quantity")]
    pub quantity: u64,
    #[serde(rename = "Price")]
    pub price: u64,
    #[serde(rename = "Amount")]
    pub amount: u64,
}

/// `sale-order.payment.requested` and `sale-order.payment.cancel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentBody {
    #[serde(rename = "OrderID")]
    pub order_id: GlobalId,
    #[serde(rename = "CustomerID")]
    pub customer_id: CustomerId,
    #[serde(rename = "Amount")]
    pub amount: u64,
}

/// `sale-order.stock.released`: `restocked` is 0 for a null compensation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedBody {
    #[serde(rename = "OrderID")]
    pub order_id: GlobalId,
    #[serde(rename = "Restocked")]
    pub restocked: u64,
}

/// `sale-order.payment.cancelled`: `refunded` is 0 for a null compensation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelledBody {
    #[serde(rename = "OrderID")]
    pub order_id: GlobalId,
    #[serde(rename = "Refunded")]
    pub refunded: u64,
}

/// Serializes a body; our bodies hold only strings and integers, so this cannot fail.
pub(crate) fn to_json<T: Serialize>(body: &T) -> String {
    serde_json::to_string(body).expect("message bodies serialize")
}

/// The SubID of step `step` of order `order` (`<order>.<step>`, like the seed's
/// `<order>.outbound`). Order ids are bounded by [`ORDER_ID_LEN_MAX`], so it is valid.
pub(crate) fn sub_id(order: &GlobalId, step: &str) -> SubId {
    SubId::new(format!("{order}.{step}")).expect("order ids leave room for the step suffix")
}

/// The SubID of attempt `attempt` (1-based) of a compensation step: the first
/// is `<order>.<step>`, a re-send `<order>.<step>.<attempt>`. A re-send needs a
/// new SubID because the broker dedups by (GlobalID, SubID).
pub fn attempt_sub_id(order: &GlobalId, step: &str, attempt: u32) -> SubId {
    if attempt <= 1 {
        sub_id(order, step)
    } else {
        sub_id(order, &format!("{step}.{attempt}"))
    }
}

/// Which attempt of compensation `step` a received SubID is (1 for anything
/// that is not `<order>.<step>.<n>`, such as another publisher's SubID).
pub fn attempt_of(order: &GlobalId, step: &str, received: &SubId) -> u32 {
    received
        .as_str()
        .strip_prefix(order.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_prefix(step))
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n >= 2)
        .unwrap_or(1)
}

/// The SubID suffixes, one per message of the flow (`<order>.<step>`; a re-sent
/// compensation `<order>.<step>.<attempt>`).
pub mod step {
    pub const CREATED: &str = "created";
    pub const OUTBOUND: &str = "outbound";
    pub const PAYMENT_REQUESTED: &str = "payment-requested";
    pub const PAYMENT: &str = "payment";
    pub const RELEASE: &str = "release";
    pub const RELEASED: &str = "released";
    pub const PAYMENT_CANCEL: &str = "payment-cancel";
    pub const PAYMENT_CANCELLED: &str = "payment-cancelled";
}

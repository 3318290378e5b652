//! Business ids of the shipped participants (products, customers). Orders use
//! [`crate::types::GlobalId`]: an order id is its saga's global transaction id.

use crate::types::{ID_LEN_MAX, IdError};
use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! business_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates: non-empty, at most [`ID_LEN_MAX`] bytes, no control characters.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if s.is_empty() {
                    return Err(IdError::Empty { field: $field });
                }
                if s.len() > ID_LEN_MAX {
                    return Err(IdError::TooLong { field: $field, len: s.len() });
                }
                if s.chars().any(char::is_control) {
                    return Err(IdError::ControlChar { field: $field });
                }
                Ok($name(s))
            }

            /// For literals known to be valid (tests, scenarios); panics otherwise.
            pub fn lit(s: &str) -> Self {
                Self::new(s).expect("valid id literal")
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

business_id!(
    /// A product whose stock the stock participant keeps (`ProductID`).
    ProductId, "ProductID");
business_id!(
    /// A customer whose balance the payment participant keeps (`CustomerID`).
    CustomerId, "CustomerID");

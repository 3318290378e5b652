//! Topic names and service names of the shipped saga, in one place so that the
//! participants, scenarios, simulator and docs cannot drift apart.

use crate::types::{ClientId, Topic};

/// order -> stock: an order was created (order JSON); stock deducts or refuses.
pub const SALE_ORDER_CREATED: &str = "sale-order.created";
/// stock -> order: `"1"` deducted, `"0"` refused (the seed's topic and contents).
pub const STOCK_OUTBOUND: &str = "sale-order.stock.outbound";
/// order -> stock: compensate the deduction (order JSON).
pub const STOCK_RELEASE: &str = "sale-order.stock.release";
/// stock -> order: the release is done (restocked, or recorded as a null compensation).
pub const STOCK_RELEASED: &str = "sale-order.stock.released";
/// order -> payment: charge the customer (payment JSON).
pub const PAYMENT_REQUESTED: &str = "sale-order.payment.requested";
/// payment -> order: `"1"` charged, `"0"` refused.
pub const PAYMENT_RESULT: &str = "sale-order.payment.result";
/// order -> payment: compensate the charge (payment JSON).
pub const PAYMENT_CANCEL: &str = "sale-order.payment.cancel";
/// payment -> order: the cancel is done (refunded, or recorded as a null compensation).
pub const PAYMENT_CANCELLED: &str = "sale-order.payment.cancelled";

/// Every topic of the shipped saga, in flow order.
pub const ALL: [&str; 8] = [
    SALE_ORDER_CREATED,
    STOCK_OUTBOUND,
    PAYMENT_REQUESTED,
    PAYMENT_RESULT,
    STOCK_RELEASE,
    STOCK_RELEASED,
    PAYMENT_CANCEL,
    PAYMENT_CANCELLED,
];

/// Client (and sender) ids of the shipped services.
pub const ORDER_SERVICE: &str = "order-service";
pub const STOCK_SERVICE: &str = "stock-service";
pub const PAYMENT_SERVICE: &str = "payment-service";

/// A topic constant as a [`Topic`]; every constant here is a valid id.
pub fn topic(name: &str) -> Topic {
    Topic::lit(name)
}

/// A service name constant as a [`ClientId`].
pub fn client(name: &str) -> ClientId {
    ClientId::lit(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_constant_is_a_valid_topic() {
        for t in super::ALL {
            assert!(crate::types::Topic::new(t).is_ok(), "{t}");
        }
    }
}

//! The payment participant: charges a customer's balance for
//! `sale-order.payment.requested` and answers `"1"` / `"0"` on
//! `sale-order.payment.result`; refunds on `sale-order.payment.cancel` (the
//! compensation, sent when an order times out after asking for payment) and
//! confirms on `sale-order.payment.cancelled`.
//!
//! **Invariants:** per order, at most one charge and at most one refund, and a
//! refund returns exactly the charge; a cancel that finds no charge is recorded
//! as a null compensation, so a charge request arriving after it (hanging) is
//! refused. Money is conserved: `balance + charged - refunded == initial`.

use super::content::{CancelledBody, PaymentBody, attempt_of, attempt_sub_id, step, sub_id, to_json};
use super::ids::CustomerId;
use super::participant::{Decision, Outgoing, Participant};
use super::topics;
use crate::types::{GlobalId, Message, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Orders the payment participant keeps a per-order entry for; past it a new
/// charge is refused (`"0"`) and a cancel for an unknown order answered not-ok.
pub const PAYMENT_ORDERS_MAX: usize = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargeRefusal {
    /// Balance too small (or the customer is unknown).
    Insufficient,
    /// The order's cancel came first (hanging): never charge after it.
    AfterCancel,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Charge {
    NotSeen,
    Charged {
        customer: CustomerId,
        amount: u64,
    },
    Refused {
        customer: CustomerId,
        amount: u64,
        reason: ChargeRefusal,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refund {
    NotSeen,
    Refunded {
        customer: CustomerId,
        amount: u64,
    },
    /// Cancelled before (or without) a charge: nothing to give back.
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentOrder {
    pub charge: Charge,
    pub refund: Refund,
}

impl PaymentOrder {
    /// Money this order holds now (charged and not refunded).
    pub fn held(&self) -> u64 {
        match (&self.charge, &self.refund) {
            (Charge::Charged { amount, .. }, Refund::NotSeen) => *amount,
            _ => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentChange {
    Charge {
        order: GlobalId,
        customer: CustomerId,
        amount: u64,
    },
    Refuse {
        order: GlobalId,
        customer: CustomerId,
        amount: u64,
        reason: ChargeRefusal,
    },
    /// Give back the order's charge (the amount is the charged one).
    Refund {
        order: GlobalId,
    },
    NullCancel {
        order: GlobalId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    balances: BTreeMap<CustomerId, u64>,
    orders: BTreeMap<GlobalId, PaymentOrder>,
    orders_max: usize,
}

impl Payment {
    pub fn new(balances: BTreeMap<CustomerId, u64>) -> Payment {
        Payment {
            balances,
            orders: BTreeMap::new(),
            orders_max: PAYMENT_ORDERS_MAX,
        }
    }

    pub fn with_orders_max(mut self, orders_max: usize) -> Payment {
        self.orders_max = orders_max;
        self
    }

    pub fn balances(&self) -> &BTreeMap<CustomerId, u64> {
        &self.balances
    }

    pub fn balance(&self, customer: &CustomerId) -> u64 {
        self.balances.get(customer).copied().unwrap_or(0)
    }

    /// What payment did per order (charge and refund).
    pub fn orders(&self) -> &BTreeMap<GlobalId, PaymentOrder> {
        &self.orders
    }

    pub fn order(&self, order: &GlobalId) -> Option<&PaymentOrder> {
        self.orders.get(order)
    }

    /// Money of `customer` held by orders (charged, not refunded).
    pub fn held(&self, customer: &CustomerId) -> u64 {
        self.orders
            .values()
            .filter(|o| matches!(&o.charge, Charge::Charged { customer: c, .. } if c == customer))
            .map(PaymentOrder::held)
            .sum()
    }

    fn entry(&self, order: &GlobalId) -> PaymentOrder {
        self.orders.get(order).cloned().unwrap_or(PaymentOrder {
            charge: Charge::NotSeen,
            refund: Refund::NotSeen,
        })
    }

    fn result(order: &GlobalId, ok: bool) -> Outgoing {
        Outgoing {
            topic: Topic::lit(topics::PAYMENT_RESULT),
            global_id: order.clone(),
            sub_id: sub_id(order, step::PAYMENT),
            content: if ok { "1" } else { "0" }.to_string(),
        }
    }

    /// The confirmation of attempt `attempt` of the order's cancel.
    fn cancelled(order: &GlobalId, refunded: u64, attempt: u32) -> Outgoing {
        let body = CancelledBody {
            order_id: order.clone(),
            refunded,
        };
        Outgoing {
            topic: Topic::lit(topics::PAYMENT_CANCELLED),
            global_id: order.clone(),
            sub_id: attempt_sub_id(order, step::PAYMENT_CANCELLED, attempt),
            content: to_json(&body),
        }
    }

    fn on_requested(&self, message: &Message) -> Decision<PaymentChange> {
        let body: PaymentBody = match serde_json::from_str(&message.content) {
            Ok(b) => b,
            Err(e) => return Decision::Refuse(format!("undecodable payment request: {e}")),
        };
        let order = message.global_id.clone();
        let known = self.orders.get(&order);
        if let Some(o) = known
            && o.charge != Charge::NotSeen
        {
            return Decision::Ignore;
        }
        let (customer, amount) = (body.customer_id, body.amount);
        let refuse = |reason| {
            let change = PaymentChange::Refuse {
                order: order.clone(),
                customer: customer.clone(),
                amount,
                reason,
            };
            Decision::change_and_publish(change, Self::result(&order, false))
        };
        if known.is_some_and(|o| o.refund != Refund::NotSeen) {
            return refuse(ChargeRefusal::AfterCancel);
        }
        if known.is_none() && self.orders.len() >= self.orders_max {
            return Decision::Commit {
                change: None,
                publish: vec![Self::result(&order, false)],
            };
        }
        if self.balance(&customer) >= amount {
            let change = PaymentChange::Charge {
                order: order.clone(),
                customer,
                amount,
            };
            Decision::change_and_publish(change, Self::result(&order, true))
        } else {
            refuse(ChargeRefusal::Insufficient)
        }
    }

    fn on_cancel(&self, message: &Message) -> Decision<PaymentChange> {
        let order = message.global_id.clone();
        let attempt = attempt_of(&order, step::PAYMENT_CANCEL, &message.sub_id);
        match self.orders.get(&order) {
            // Cancelled before: a re-sent cancel (its confirmation may have been
            // lost, e.g. dead-lettered) is confirmed again, without a second refund.
            Some(PaymentOrder {
                refund: Refund::Refunded { amount, .. },
                ..
            }) => Decision::Commit {
                change: None,
                publish: vec![Self::cancelled(&order, *amount, attempt)],
            },
            Some(PaymentOrder {
                refund: Refund::Null, ..
            }) => Decision::Commit {
                change: None,
                publish: vec![Self::cancelled(&order, 0, attempt)],
            },
            Some(PaymentOrder {
                charge: Charge::Charged { amount, .. },
                ..
            }) => Decision::change_and_publish(
                PaymentChange::Refund { order: order.clone() },
                Self::cancelled(&order, *amount, attempt),
            ),
            Some(_) => Decision::change_and_publish(
                PaymentChange::NullCancel { order: order.clone() },
                Self::cancelled(&order, 0, attempt),
            ),
            None if self.orders.len() >= self.orders_max => {
                Decision::Refuse("payment keeps PAYMENT_ORDERS_MAX orders; cannot record a null cancel".to_string())
            }
            None => Decision::change_and_publish(
                PaymentChange::NullCancel { order: order.clone() },
                Self::cancelled(&order, 0, attempt),
            ),
        }
    }
}

impl Participant for Payment {
    type Change = PaymentChange;

    fn topics(&self) -> Vec<Topic> {
        vec![
            Topic::lit(topics::PAYMENT_REQUESTED),
            Topic::lit(topics::PAYMENT_CANCEL),
        ]
    }

    fn on_message(&self, _now: Time, message: &Message) -> Decision<PaymentChange> {
        match message.topic.as_str() {
            topics::PAYMENT_REQUESTED => self.on_requested(message),
            topics::PAYMENT_CANCEL => self.on_cancel(message),
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &PaymentChange) {
        match change {
            PaymentChange::Charge {
                order,
                customer,
                amount,
            } => {
                let balance = self.balances.get_mut(customer).expect("charged a known customer");
                *balance = balance.checked_sub(*amount).expect("charged at most the balance");
                let mut entry = self.entry(order);
                assert_eq!(entry.charge, Charge::NotSeen, "charged once per order");
                entry.charge = Charge::Charged {
                    customer: customer.clone(),
                    amount: *amount,
                };
                self.orders.insert(order.clone(), entry);
            }
            PaymentChange::Refuse {
                order,
                customer,
                amount,
                reason,
            } => {
                let mut entry = self.entry(order);
                entry.charge = Charge::Refused {
                    customer: customer.clone(),
                    amount: *amount,
                    reason: reason.clone(),
                };
                self.orders.insert(order.clone(), entry);
            }
            PaymentChange::Refund { order } => {
                let mut entry = self.entry(order);
                let Charge::Charged { customer, amount } = entry.charge.clone() else {
                    panic!("refund of order {order} without a charge")
                };
                assert_eq!(entry.refund, Refund::NotSeen, "refunded once per order");
                let balance = self.balances.entry(customer.clone()).or_insert(0);
                *balance = balance.checked_add(amount).expect("balance fits u64");
                entry.refund = Refund::Refunded { customer, amount };
                self.orders.insert(order.clone(), entry);
            }
            PaymentChange::NullCancel { order } => {
                let mut entry = self.entry(order);
                assert_eq!(entry.refund, Refund::NotSeen, "cancelled once per order");
                entry.refund = Refund::Null;
                self.orders.insert(order.clone(), entry);
            }
        }
    }
}

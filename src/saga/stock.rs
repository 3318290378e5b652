//! The stock participant: deducts stock for `sale-order.created` and answers
//! `"1"` / `"0"` on `sale-order.stock.outbound`; restocks on
//! `sale-order.stock.release` (the compensation) and confirms on
//! `sale-order.stock.released`.
//!
//! **Invariants:** per order, at most one deduction and at most one release;
//! a release restocks exactly what was deducted, and a release that finds no
//! deduction is recorded as a null compensation so that a deduction arriving
//! after it (hanging) is refused — DTM's sub-transaction barrier. Stock is
//! conserved: `level + held == initial` for every product.

use super::content::{OrderBody, ReleasedBody, attempt_of, attempt_sub_id, step, sub_id, to_json};
use super::ids::ProductId;
use super::participant::{Decision, Outgoing, Participant};
use super::topics;
use crate::types::{GlobalId, Message, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Orders the stock participant keeps a per-order entry for. When reached, a
/// new order's deduction is refused (`"0"`) and a release for an unknown order
/// is answered not-ok (the broker retries, then dead-letters it).
pub const STOCK_ORDERS_MAX: usize = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// Not enough stock (or the product is unknown).
    Insufficient,
    /// The order's release came first (hanging): never deduct after it.
    AfterRelease,
}

/// What stock did with an order's deduction request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deduction {
    /// `sale-order.created` not (yet) seen.
    NotSeen,
    Deducted {
        product: ProductId,
        quantity: u64,
    },
    Refused {
        product: ProductId,
        quantity: u64,
        reason: RefuseReason,
    },
}

/// What stock did with an order's release (compensation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Release {
    NotSeen,
    /// The deduction was given back.
    Restocked {
        product: ProductId,
        quantity: u64,
    },
    /// Released before (or without) a deduction: nothing to give back.
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockOrder {
    pub deduction: Deduction,
    pub release: Release,
}

impl StockOrder {
    /// Units this order holds now (deducted and not given back).
    pub fn held(&self) -> u64 {
        match (&self.deduction, &self.release) {
            (Deduction::Deducted { quantity, .. }, Release::NotSeen) => *quantity,
            _ => 0,
        }
    }
}

/// The committed changes of the stock participant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StockChange {
    Deduct {
        order: GlobalId,
        product: ProductId,
        quantity: u64,
    },
    Refuse {
        order: GlobalId,
        product: ProductId,
        quantity: u64,
        reason: RefuseReason,
    },
    /// Give back the order's deduction (the quantity is the deducted one).
    Restock {
        order: GlobalId,
    },
    NullRelease {
        order: GlobalId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stock {
    levels: BTreeMap<ProductId, u64>,
    orders: BTreeMap<GlobalId, StockOrder>,
    orders_max: usize,
}

impl Stock {
    pub fn new(levels: BTreeMap<ProductId, u64>) -> Stock {
        Stock {
            levels,
            orders: BTreeMap::new(),
            orders_max: STOCK_ORDERS_MAX,
        }
    }

    /// With a smaller per-order bound (tests of the "full" answer).
    pub fn with_orders_max(mut self, orders_max: usize) -> Stock {
        self.orders_max = orders_max;
        self
    }

    /// Units on the shelf per product.
    pub fn levels(&self) -> &BTreeMap<ProductId, u64> {
        &self.levels
    }

    pub fn level(&self, product: &ProductId) -> u64 {
        self.levels.get(product).copied().unwrap_or(0)
    }

    /// What stock did per order (deduction and release).
    pub fn orders(&self) -> &BTreeMap<GlobalId, StockOrder> {
        &self.orders
    }

    pub fn order(&self, order: &GlobalId) -> Option<&StockOrder> {
        self.orders.get(order)
    }

    /// Units of `product` held by orders (deducted, not released).
    pub fn held(&self, product: &ProductId) -> u64 {
        self.orders
            .values()
            .filter(|o| matches!(&o.deduction, Deduction::Deducted { product: p, .. } if p == product))
            .map(StockOrder::held)
            .sum()
    }

    fn entry(&self, order: &GlobalId) -> StockOrder {
        self.orders.get(order).cloned().unwrap_or(StockOrder {
            deduction: Deduction::NotSeen,
            release: Release::NotSeen,
        })
    }

    fn outbound(order: &GlobalId, ok: bool) -> Outgoing {
        Outgoing {
            topic: Topic::lit(topics::STOCK_OUTBOUND),
            global_id: order.clone(),
            sub_id: sub_id(order, step::OUTBOUND),
            content: if ok { "1" } else { "0" }.to_string(),
        }
    }

    /// The confirmation of attempt `attempt` of the order's release.
    fn released(order: &GlobalId, restocked: u64, attempt: u32) -> Outgoing {
        let body = ReleasedBody {
            order_id: order.clone(),
            restocked,
        };
        Outgoing {
            topic: Topic::lit(topics::STOCK_RELEASED),
            global_id: order.clone(),
            sub_id: attempt_sub_id(order, step::RELEASED, attempt),
            content: to_json(&body),
        }
    }

    fn on_created(&self, message: &Message) -> Decision<StockChange> {
        let body: OrderBody = match serde_json::from_str(&message.content) {
            Ok(b) => b,
            Err(e) => return Decision::Refuse(format!("undecodable order: {e}")),
        };
        let order = message.global_id.clone();
        let known = self.orders.get(&order);
        if let Some(o) = known
            && o.deduction != Deduction::NotSeen
        {
            // Decided before under another key: the reply is already in the outbox
            // (and the broker dedups by the same (GlobalID, SubID)).
            return Decision::Ignore;
        }
        let (product, quantity) = (body.product_id, body.quantity);
        let refuse = |reason| {
            let change = StockChange::Refuse {
                order: order.clone(),
                product: product.clone(),
                quantity,
                reason,
            };
            Decision::change_and_publish(change, Self::outbound(&order, false))
        };
        match known.map(|o| &o.release) {
            Some(Release::Null | Release::Restocked { .. }) => return refuse(RefuseReason::AfterRelease),
            Some(Release::NotSeen) | None => {}
        }
        if known.is_none() && self.orders.len() >= self.orders_max {
            // No room to remember this order: refuse it without an entry, so
            // there is nothing to compensate. The "0" goes out all the same.
            return Decision::Commit {
                change: None,
                publish: vec![Self::outbound(&order, false)],
            };
        }
        if quantity > 0 && self.level(&product) >= quantity {
            let change = StockChange::Deduct {
                order: order.clone(),
                product,
                quantity,
            };
            Decision::change_and_publish(change, Self::outbound(&order, true))
        } else {
            refuse(RefuseReason::Insufficient)
        }
    }

    fn on_release(&self, message: &Message) -> Decision<StockChange> {
        let order = message.global_id.clone();
        let attempt = attempt_of(&order, step::RELEASE, &message.sub_id);
        let entry = self.orders.get(&order);
        match entry {
            // Released before: a re-sent release (its confirmation may have been
            // lost, e.g. dead-lettered) is confirmed again, without a second effect.
            Some(StockOrder {
                release: Release::Restocked { quantity, .. },
                ..
            }) => Decision::Commit {
                change: None,
                publish: vec![Self::released(&order, *quantity, attempt)],
            },
            Some(StockOrder {
                release: Release::Null, ..
            }) => Decision::Commit {
                change: None,
                publish: vec![Self::released(&order, 0, attempt)],
            },
            Some(StockOrder {
                deduction: Deduction::Deducted { quantity, .. },
                ..
            }) => Decision::change_and_publish(
                StockChange::Restock { order: order.clone() },
                Self::released(&order, *quantity, attempt),
            ),
            Some(_) => Decision::change_and_publish(
                StockChange::NullRelease { order: order.clone() },
                Self::released(&order, 0, attempt),
            ),
            None if self.orders.len() >= self.orders_max => {
                Decision::Refuse("stock keeps STOCK_ORDERS_MAX orders; cannot record a null release".to_string())
            }
            None => Decision::change_and_publish(
                StockChange::NullRelease { order: order.clone() },
                Self::released(&order, 0, attempt),
            ),
        }
    }
}

impl Participant for Stock {
    type Change = StockChange;

    fn topics(&self) -> Vec<Topic> {
        vec![
            Topic::lit(topics::SALE_ORDER_CREATED),
            Topic::lit(topics::STOCK_RELEASE),
        ]
    }

    fn on_message(&self, _now: Time, message: &Message) -> Decision<StockChange> {
        match message.topic.as_str() {
            topics::SALE_ORDER_CREATED => self.on_created(message),
            topics::STOCK_RELEASE => self.on_release(message),
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &StockChange) {
        match change {
            StockChange::Deduct {
                order,
                product,
                quantity,
            } => {
                let level = self.levels.get_mut(product).expect("deducted from a known product");
                *level = level.checked_sub(*quantity).expect("deducted at most the level");
                let mut entry = self.entry(order);
                assert_eq!(entry.deduction, Deduction::NotSeen, "deducted once per order");
                entry.deduction = Deduction::Deducted {
                    product: product.clone(),
                    quantity: *quantity,
                };
                self.orders.insert(order.clone(), entry);
            }
            StockChange::Refuse {
                order,
                product,
                quantity,
                reason,
            } => {
                let mut entry = self.entry(order);
                entry.deduction = Deduction::Refused {
                    product: product.clone(),
                    quantity: *quantity,
                    reason: reason.clone(),
                };
                self.orders.insert(order.clone(), entry);
            }
            StockChange::Restock { order } => {
                let mut entry = self.entry(order);
                let Deduction::Deducted { product, quantity } = entry.deduction.clone() else {
                    panic!("restock of order {order} without a deduction")
                };
                assert_eq!(entry.release, Release::NotSeen, "released once per order");
                let level = self.levels.entry(product.clone()).or_insert(0);
                *level = level.checked_add(quantity).expect("stock level fits u64");
                entry.release = Release::Restocked { product, quantity };
                self.orders.insert(order.clone(), entry);
            }
            StockChange::NullRelease { order } => {
                let mut entry = self.entry(order);
                assert_eq!(entry.release, Release::NotSeen, "released once per order");
                entry.release = Release::Null;
                self.orders.insert(order.clone(), entry);
            }
        }
    }
}

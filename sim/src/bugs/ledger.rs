//! Business-logic mistakes: stock and payment participants written the way a
//! team might write them, each with one guard left out, hosted by the shipped
//! [`sagamq::saga::ParticipantHost`]. Their state is a ledger (units or money
//! taken and given back per order, summed), so an effect applied twice is
//! representable and the checker can see it, where the shipped participants
//! cannot even express it.
//!
//! **Invariant:** with every guard on, [`LedgerStock`] decides exactly as the
//! shipped stock does (the `correct_ledger_stock_passes` test holds it to that).

use crate::participants::{Observed, by_name};
use crate::view::{PaymentEffects, StockEffects, View};
use sagamq::saga::{
    CancelledBody, CustomerId, Decision, OrderBody, Outgoing, Participant, PaymentBody, ProductId, ReleasedBody,
    attempt_of, attempt_sub_id, topics,
};
use sagamq::{GlobalId, Message, SubId, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Orders a ledger participant keeps an entry for; past it new work is refused
/// (answered not-ok: the broker retries, then dead-letters it).
pub const LEDGER_ORDERS_MAX: usize = 1_000_000;

/// A reply under `<order>.<step>` (attempt 1) or `<order>.<step>.<attempt>`,
/// as the shipped participants name theirs.
fn reply(topic: &str, order: &GlobalId, step: &str, attempt: u32, content: String) -> Outgoing {
    Outgoing {
        topic: Topic::lit(topic),
        global_id: order.clone(),
        sub_id: attempt_sub_id(order, step, attempt),
        content,
    }
}

fn json<T: Serialize>(body: &T) -> String {
    serde_json::to_string(body).expect("bodies serialize")
}

/// Which of stock's guards are in place (all true: the shipped behaviour).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StockGuards {
    /// A release for an order never deducted is recorded as a null compensation
    /// (gives back nothing). Without it, the release restocks the order's quantity.
    pub null_compensation: bool,
    /// A deduction arriving after the order's release is refused. Without it, it deducts.
    pub hanging: bool,
    /// A second release of the same order is ignored. Without it, it restocks again.
    pub release_once: bool,
}

impl StockGuards {
    pub const ALL: StockGuards = StockGuards {
        null_compensation: true,
        hanging: true,
        release_once: true,
    };
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StockEntry {
    pub product: Option<ProductId>,
    pub deducted: u64,
    pub restocked: u64,
    /// The deduction was decided (deducted or refused).
    pub decided: bool,
    /// A release was handled (restocked or null).
    pub released: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerStockChange {
    Deduct {
        order: GlobalId,
        product: ProductId,
        quantity: u64,
    },
    Refuse {
        order: GlobalId,
    },
    Restock {
        order: GlobalId,
        product: ProductId,
        quantity: u64,
    },
    NullRelease {
        order: GlobalId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerStock {
    guards: StockGuards,
    levels: BTreeMap<ProductId, u64>,
    orders: BTreeMap<GlobalId, StockEntry>,
}

impl LedgerStock {
    pub fn new(levels: BTreeMap<ProductId, u64>, guards: StockGuards) -> LedgerStock {
        LedgerStock {
            guards,
            levels,
            orders: BTreeMap::new(),
        }
    }

    fn outbound(order: &GlobalId, ok: bool) -> Outgoing {
        let content = if ok { "1" } else { "0" }.to_string();
        reply(topics::STOCK_OUTBOUND, order, "outbound", 1, content)
    }

    /// The confirmation of attempt `attempt` of the order's release.
    fn released(order: &GlobalId, restocked: u64, attempt: u32) -> Outgoing {
        let body = ReleasedBody {
            order_id: order.clone(),
            restocked,
        };
        reply(topics::STOCK_RELEASED, order, "released", attempt, json(&body))
    }

    fn on_created(&self, body: OrderBody) -> Decision<LedgerStockChange> {
        let order = body.order_id;
        let entry = self.orders.get(&order);
        if entry.is_some_and(|e| e.decided) {
            return Decision::Ignore;
        }
        if entry.is_none() && self.orders.len() >= LEDGER_ORDERS_MAX {
            return Decision::Refuse("LEDGER_ORDERS_MAX reached".to_string());
        }
        let refuse = Decision::change_and_publish(
            LedgerStockChange::Refuse { order: order.clone() },
            Self::outbound(&order, false),
        );
        if self.guards.hanging && entry.is_some_and(|e| e.released) {
            return refuse;
        }
        let level = self.levels.get(&body.product_id).copied().unwrap_or(0);
        if body.quantity > 0 && level >= body.quantity {
            let change = LedgerStockChange::Deduct {
                order: order.clone(),
                product: body.product_id,
                quantity: body.quantity,
            };
            Decision::change_and_publish(change, Self::outbound(&order, true))
        } else {
            refuse
        }
    }

    fn on_release(&self, body: OrderBody, sub_id: &SubId) -> Decision<LedgerStockChange> {
        let order = body.order_id;
        let attempt = attempt_of(&order, "release", sub_id);
        let entry = self.orders.get(&order);
        if self.guards.release_once
            && let Some(e) = entry.filter(|e| e.released)
        {
            // A re-sent release: confirmed again, nothing given back twice.
            return Decision::Commit {
                change: None,
                publish: vec![Self::released(&order, e.restocked, attempt)],
            };
        }
        if entry.is_none() && self.orders.len() >= LEDGER_ORDERS_MAX {
            return Decision::Refuse("LEDGER_ORDERS_MAX reached".to_string());
        }
        let (product, quantity) = match entry {
            Some(StockEntry {
                product: Some(product),
                deducted,
                ..
            }) if *deducted > 0 => (product.clone(), *deducted),
            _ if self.guards.null_compensation => {
                let change = LedgerStockChange::NullRelease { order: order.clone() };
                return Decision::change_and_publish(change, Self::released(&order, 0, attempt));
            }
            // Assumes the deduction happened: gives back what the release names.
            _ => (body.product_id, body.quantity),
        };
        let change = LedgerStockChange::Restock {
            order: order.clone(),
            product,
            quantity,
        };
        Decision::change_and_publish(change, Self::released(&order, quantity, attempt))
    }
}

impl Participant for LedgerStock {
    type Change = LedgerStockChange;

    fn topics(&self) -> Vec<Topic> {
        vec![
            Topic::lit(topics::SALE_ORDER_CREATED),
            Topic::lit(topics::STOCK_RELEASE),
        ]
    }

    fn on_message(&self, _now: Time, message: &Message) -> Decision<LedgerStockChange> {
        let body: OrderBody = match serde_json::from_str(&message.content) {
            Ok(b) => b,
            Err(e) => return Decision::Refuse(format!("undecodable order: {e}")),
        };
        match message.topic.as_str() {
            topics::SALE_ORDER_CREATED => self.on_created(body),
            topics::STOCK_RELEASE => self.on_release(body, &message.sub_id),
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &LedgerStockChange) {
        match change {
            LedgerStockChange::Deduct {
                order,
                product,
                quantity,
            } => {
                let level = self.levels.entry(product.clone()).or_insert(0);
                *level = level.saturating_sub(*quantity);
                let e = self.orders.entry(order.clone()).or_default();
                e.product = Some(product.clone());
                e.deducted += quantity;
                e.decided = true;
            }
            LedgerStockChange::Refuse { order } => {
                self.orders.entry(order.clone()).or_default().decided = true;
            }
            LedgerStockChange::Restock {
                order,
                product,
                quantity,
            } => {
                let level = self.levels.entry(product.clone()).or_insert(0);
                *level = level.saturating_add(*quantity);
                let e = self.orders.entry(order.clone()).or_default();
                e.product.get_or_insert_with(|| product.clone());
                e.restocked += quantity;
                e.released = true;
            }
            LedgerStockChange::NullRelease { order } => {
                self.orders.entry(order.clone()).or_default().released = true;
            }
        }
    }
}

impl Observed for LedgerStock {
    fn view(&self, initial: &LedgerStock) -> View {
        View::Stock {
            initial: by_name(&initial.levels),
            level: by_name(&self.levels),
            orders: self
                .orders
                .iter()
                .filter_map(|(id, e)| {
                    let product = e.product.as_ref()?;
                    let effects = StockEffects {
                        product: product.to_string(),
                        deducted: e.deducted,
                        restocked: e.restocked,
                    };
                    Some((id.to_string(), effects))
                })
                .collect(),
            reported_held: None,
        }
    }
    fn reflects(&self, message: &Message) -> bool {
        let entry = self.orders.get(&message.global_id);
        match message.topic.as_str() {
            topics::SALE_ORDER_CREATED => entry.is_some_and(|e| e.decided),
            topics::STOCK_RELEASE => entry.is_some_and(|e| e.released),
            _ => true,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PaymentEntry {
    pub customer: Option<CustomerId>,
    pub charged: u64,
    pub refunded: u64,
    /// A cancel was handled (refunded or null).
    pub cancelled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerPaymentChange {
    Charge {
        order: GlobalId,
        customer: CustomerId,
        amount: u64,
    },
    Refuse {
        order: GlobalId,
    },
    Refund {
        order: GlobalId,
        amount: u64,
    },
    NullCancel {
        order: GlobalId,
    },
}

/// A payment service whose charge handler keeps no per-order "already charged"
/// record: it charges for every request it is handed and relies on its inbox
/// to never hand it the same request twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerPayment {
    balances: BTreeMap<CustomerId, u64>,
    orders: BTreeMap<GlobalId, PaymentEntry>,
}

impl LedgerPayment {
    pub fn new(balances: BTreeMap<CustomerId, u64>) -> LedgerPayment {
        LedgerPayment {
            balances,
            orders: BTreeMap::new(),
        }
    }

    fn result(order: &GlobalId, ok: bool) -> Outgoing {
        let content = if ok { "1" } else { "0" }.to_string();
        reply(topics::PAYMENT_RESULT, order, "payment", 1, content)
    }

    fn on_requested(&self, body: PaymentBody) -> Decision<LedgerPaymentChange> {
        let order = body.order_id;
        let entry = self.orders.get(&order);
        if entry.is_none() && self.orders.len() >= LEDGER_ORDERS_MAX {
            return Decision::Refuse("LEDGER_ORDERS_MAX reached".to_string());
        }
        let refuse = Decision::change_and_publish(
            LedgerPaymentChange::Refuse { order: order.clone() },
            Self::result(&order, false),
        );
        if entry.is_some_and(|e| e.cancelled) {
            return refuse;
        }
        if self.balances.get(&body.customer_id).copied().unwrap_or(0) >= body.amount {
            let change = LedgerPaymentChange::Charge {
                order: order.clone(),
                customer: body.customer_id,
                amount: body.amount,
            };
            Decision::change_and_publish(change, Self::result(&order, true))
        } else {
            refuse
        }
    }

    /// The confirmation of attempt `attempt` of the order's cancel.
    fn cancelled(order: &GlobalId, refunded: u64, attempt: u32) -> Outgoing {
        let body = CancelledBody {
            order_id: order.clone(),
            refunded,
        };
        reply(
            topics::PAYMENT_CANCELLED,
            order,
            "payment-cancelled",
            attempt,
            json(&body),
        )
    }

    fn on_cancel(&self, body: PaymentBody, sub_id: &SubId) -> Decision<LedgerPaymentChange> {
        let order = body.order_id;
        let attempt = attempt_of(&order, "payment-cancel", sub_id);
        let entry = self.orders.get(&order);
        if let Some(e) = entry.filter(|e| e.cancelled) {
            // A re-sent cancel: confirmed again, nothing refunded twice.
            return Decision::Commit {
                change: None,
                publish: vec![Self::cancelled(&order, e.refunded, attempt)],
            };
        }
        if entry.is_none() && self.orders.len() >= LEDGER_ORDERS_MAX {
            return Decision::Refuse("LEDGER_ORDERS_MAX reached".to_string());
        }
        let held = entry.map_or(0, |e| e.charged.saturating_sub(e.refunded));
        let change = if held > 0 {
            LedgerPaymentChange::Refund {
                order: order.clone(),
                amount: held,
            }
        } else {
            LedgerPaymentChange::NullCancel { order: order.clone() }
        };
        Decision::change_and_publish(change, Self::cancelled(&order, held, attempt))
    }
}

impl Participant for LedgerPayment {
    type Change = LedgerPaymentChange;

    fn topics(&self) -> Vec<Topic> {
        vec![
            Topic::lit(topics::PAYMENT_REQUESTED),
            Topic::lit(topics::PAYMENT_CANCEL),
        ]
    }

    fn on_message(&self, _now: Time, message: &Message) -> Decision<LedgerPaymentChange> {
        let body: PaymentBody = match serde_json::from_str(&message.content) {
            Ok(b) => b,
            Err(e) => return Decision::Refuse(format!("undecodable payment request: {e}")),
        };
        match message.topic.as_str() {
            topics::PAYMENT_REQUESTED => self.on_requested(body),
            topics::PAYMENT_CANCEL => self.on_cancel(body, &message.sub_id),
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &LedgerPaymentChange) {
        match change {
            LedgerPaymentChange::Charge {
                order,
                customer,
                amount,
            } => {
                let balance = self.balances.entry(customer.clone()).or_insert(0);
                *balance = balance.saturating_sub(*amount);
                let e = self.orders.entry(order.clone()).or_default();
                e.customer = Some(customer.clone());
                e.charged += amount;
            }
            LedgerPaymentChange::Refuse { order } => {
                self.orders.entry(order.clone()).or_default();
            }
            LedgerPaymentChange::Refund { order, amount } => {
                let e = self.orders.entry(order.clone()).or_default();
                if let Some(c) = &e.customer {
                    let balance = self.balances.entry(c.clone()).or_insert(0);
                    *balance = balance.saturating_add(*amount);
                }
                e.refunded += amount;
                e.cancelled = true;
            }
            LedgerPaymentChange::NullCancel { order } => {
                self.orders.entry(order.clone()).or_default().cancelled = true;
            }
        }
    }
}

impl Observed for LedgerPayment {
    fn view(&self, initial: &LedgerPayment) -> View {
        View::Payment {
            initial: by_name(&initial.balances),
            balance: by_name(&self.balances),
            orders: self
                .orders
                .iter()
                .filter_map(|(id, e)| {
                    let customer = e.customer.as_ref()?;
                    let effects = PaymentEffects {
                        customer: customer.to_string(),
                        charged: e.charged,
                        refunded: e.refunded,
                    };
                    Some((id.to_string(), effects))
                })
                .collect(),
            reported_held: None,
        }
    }
    fn reflects(&self, message: &Message) -> bool {
        let entry = self.orders.get(&message.global_id);
        match message.topic.as_str() {
            topics::PAYMENT_REQUESTED => entry.is_some(),
            topics::PAYMENT_CANCEL => entry.is_some_and(|e| e.cancelled),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamq::rng::Rng;
    use sagamq::saga::stock::Stock;
    use sagamq::{MsgId, SenderId};

    fn message(n: u64, topic: &str, body: &OrderBody) -> Message {
        Message {
            msg_id: MsgId(n),
            global_id: body.order_id.clone(),
            sub_id: SubId::new(format!("{}.{n}", body.order_id)).unwrap(),
            sender_id: SenderId::lit("order-service"),
            create_time: 0,
            topic: Topic::lit(topic),
            content: json(body),
        }
    }

    /// What a decision publishes, or how it declined.
    fn outcome<C>(d: &Decision<C>) -> String {
        match d {
            Decision::Commit { publish, .. } => format!("{publish:?}"),
            Decision::Ignore => "ignore".to_string(),
            Decision::Refuse(_) => "refuse".to_string(),
        }
    }

    /// The first input on which the ledger stock with `guards` decides or
    /// counts differently from the shipped stock, if any.
    fn first_difference(guards: StockGuards) -> Option<String> {
        for seed in 0..200 {
            let mut rng = Rng::new(seed);
            let levels: BTreeMap<ProductId, u64> = [
                (ProductId::lit("p1"), rng.range_inclusive(0, 5)),
                (ProductId::lit("p2"), 3),
            ]
            .into();
            let mut shipped = Stock::new(levels.clone());
            let mut ledger = LedgerStock::new(levels, guards);
            for n in 0..30 {
                let order = rng.range_inclusive(1, 4);
                let body = OrderBody {
                    order_id: GlobalId::new(format!("o{order}")).unwrap(),
                    customer_id: CustomerId::lit("c"),
                    product_id: ProductId::lit(if order.is_multiple_of(2) { "p1" } else { "p2" }),
                    quantity: order,
                    price: 10,
                    amount: 10 * order,
                };
                let topic = if rng.chance(600_000) {
                    topics::SALE_ORDER_CREATED
                } else {
                    topics::STOCK_RELEASE
                };
                let m = message(n, topic, &body);
                let (a, b) = (shipped.on_message(Time::ZERO, &m), ledger.on_message(Time::ZERO, &m));
                if outcome(&a) != outcome(&b) {
                    return Some(format!(
                        "seed {seed} step {n}: {topic} {body:?}: {} vs {}",
                        outcome(&a),
                        outcome(&b)
                    ));
                }
                if let Decision::Commit { change: Some(c), .. } = a {
                    shipped.apply(&c);
                }
                if let Decision::Commit { change: Some(c), .. } = b {
                    ledger.apply(&c);
                }
                if shipped.levels() != &ledger.levels {
                    return Some(format!("seed {seed} step {n}: levels differ"));
                }
            }
        }
        None
    }

    /// With every guard, the ledger stock decides exactly as the shipped stock,
    /// so each planted stock bug differs from the shipped one by its one guard.
    #[test]
    fn correct_ledger_stock_decides_as_the_shipped_stock() {
        assert_eq!(first_difference(StockGuards::ALL), None);
    }

    /// And each missing guard shows in the same comparison (the sequences
    /// above reach every guarded case).
    #[test]
    fn each_missing_guard_changes_a_decision() {
        for guards in [
            StockGuards {
                null_compensation: false,
                ..StockGuards::ALL
            },
            StockGuards {
                hanging: false,
                ..StockGuards::ALL
            },
            StockGuards {
                release_once: false,
                ..StockGuards::ALL
            },
        ] {
            assert!(
                first_difference(guards).is_some(),
                "{guards:?} decided like the shipped stock everywhere"
            );
        }
    }
}

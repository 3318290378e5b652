//! The invariant checker. It watches the world from outside the machines
//! (acknowledged publishes, callbacks sent, callbacks processed) and reads each
//! participant's state through a [`View`], then judges:
//!
//! - **no-lost-publish** (safety): every acknowledged publish reached every
//!   subscriber entitled to it (2xx) or sits in its dead letters; entitled:
//!   subscribed, or expired less than the broker's grace ago, at every receipt;
//! - **dedup** (safety): one `(GlobalID, SubID)` never maps to two message ids;
//! - **effects-at-most-once** (safety): per order, stock deducted at most once (its
//!   quantity or nothing) and given back at most what was deducted (a release
//!   without a deduction must be a null compensation); payment charged at most
//!   once and refunded at most what was charged;
//! - **conservation** (safety): stock and money are conserved (initial = current + held);
//! - **saga-outcome** (safety): a terminal order agrees with the participants' effects;
//! - **recovery** (safety): a node refused to start from its own disk;
//! - **no-lost-effect** (safety, judged once quiescent): every message a participant
//!   answered 2xx is reflected in its state (it would not act on it again): a 2xx
//!   that a crash then took back is a lost delivery, even when a deadline later
//!   papers over its consequences;
//! - **no-lost-reply** (liveness, judged once quiescent): every request stock or
//!   payment answered 2xx (`created`, `payment.requested`, `release`, `cancel`)
//!   has its reply published: a reply lost after the commit is caught even when
//!   the order's deadline and re-sends later paper over it;
//! - **liveness**: after healing, every order terminal and every delivery settled in time.

use crate::plan::NODES;
use crate::scenario::Scenario;
use crate::world::{BROKER, CUSTOM, ORDER, PAYMENT, RunConfig, STOCK, Slot};
use sagamq::{ClientId, Message, MessageKey, MsgId, Time, Topic};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Safety,
    Liveness,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Safety => "safety",
            Kind::Liveness => "liveness",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: Kind,
    pub invariant: &'static str,
    pub detail: String,
    pub at_ms: u64,
}

impl Violation {
    pub fn safety(invariant: &'static str, detail: String, at_ms: u64) -> Violation {
        Violation {
            kind: Kind::Safety,
            invariant,
            detail,
            at_ms,
        }
    }
    pub fn liveness(invariant: &'static str, detail: String, at_ms: u64) -> Violation {
        Violation {
            kind: Kind::Liveness,
            invariant,
            detail,
            at_ms,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} invariant `{}` violated at t={}ms: {}",
            self.kind.as_str(),
            self.invariant,
            self.at_ms,
            self.detail
        )
    }
}

/// Where an order stands, as the checker needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderPhase {
    InProgress,
    /// `seed` scenario success: stock deducted, saga ends here.
    StockOutboundDone,
    StockOutboundFailed,
    Completed,
    Compensated,
}

/// A participant's state, read by the checker.
#[derive(Clone, Debug)]
pub enum View {
    Order {
        orders: BTreeMap<String, (OrderPhase, String)>,
    },
    Stock {
        initial: BTreeMap<String, u64>,
        level: BTreeMap<String, u64>,
        /// order -> what stock did for it (only orders with an effect).
        orders: BTreeMap<String, StockEffects>,
    },
    Payment {
        initial: BTreeMap<String, u64>,
        balance: BTreeMap<String, u64>,
        /// order -> what payment did for it (only orders with an effect).
        orders: BTreeMap<String, PaymentEffects>,
    },
    /// A user's participant: its own invariant's verdict and a copy of its state.
    Custom {
        client: String,
        problem: Option<String>,
        state: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    },
}

impl View {
    /// The state of a custom participant of type `P` (see [`crate::custom`]).
    pub fn custom_state<P: 'static>(&self) -> Option<&P> {
        match self {
            View::Custom { state, .. } => state.downcast_ref::<P>(),
            _ => None,
        }
    }
}

/// Units stock took from and gave back to the shelf for one order, summed over
/// every time it did so: a participant that applies an effect twice shows it
/// here (the shipped one cannot, by construction, and reports 0 or the quantity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StockEffects {
    pub product: String,
    pub deducted: u64,
    pub restocked: u64,
}

impl StockEffects {
    pub fn held(&self) -> u64 {
        self.deducted.saturating_sub(self.restocked)
    }
}

/// Money payment took from and gave back to a customer for one order, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PaymentEffects {
    pub customer: String,
    pub charged: u64,
    pub refunded: u64,
}

impl PaymentEffects {
    pub fn held(&self) -> u64 {
        self.charged.saturating_sub(self.refunded)
    }
}

#[derive(Debug)]
struct Acked {
    msg_id: MsgId,
    topic: Topic,
    entitled: BTreeSet<ClientId>,
}

#[derive(Debug)]
pub struct Checker {
    acked: BTreeMap<MessageKey, Acked>,
    /// Confirmed subscriptions: topic -> client -> expiry (broker clock).
    subscribers: BTreeMap<Topic, BTreeMap<ClientId, Time>>,
    /// Per published key, the subscribers live at every receipt of it.
    owed: BTreeMap<MessageKey, BTreeSet<ClientId>>,
    processed: BTreeSet<(ClientId, MessageKey)>,
    /// The node each subscriber runs on (learned from its 2xx answers).
    client_nodes: BTreeMap<ClientId, usize>,
    callback_ids: BTreeMap<MessageKey, MsgId>,
    /// Each message delivered by callback, by key (for the no-lost-effect judgement).
    messages: BTreeMap<MessageKey, Message>,
    orders_expected: u64,
    /// order -> (quantity, amount) as the workload asks for it.
    order_sizes: BTreeMap<String, (u64, u64)>,
    violations: Vec<Violation>,
}

/// Why a forward effect `done` (of an order sized `size`) and its undo `undone`
/// break effects-at-most-once, if they do: the effect is all or nothing and
/// happens at most once; the undo gives back at most what was taken, and
/// nothing at all when nothing was taken (a null compensation).
fn at_most_once(done: u64, size: u64, undone: u64) -> Option<&'static str> {
    if done > size {
        Some("applied more than once")
    } else if done != 0 && done != size {
        Some("applied partially")
    } else if undone > 0 && done == 0 {
        Some("compensated without the effect: a null compensation must give back nothing")
    } else if undone > done {
        Some("compensated more than once")
    } else if undone != 0 && undone != done {
        Some("compensated partially")
    } else {
        None
    }
}

/// The client id each participant node subscribes as.
pub fn client_of(node: usize, cfg: &RunConfig) -> ClientId {
    use sagamq::saga::topics;
    match node {
        ORDER => ClientId::lit(topics::ORDER_SERVICE),
        STOCK => ClientId::lit(topics::STOCK_SERVICE),
        PAYMENT => ClientId::lit(topics::PAYMENT_SERVICE),
        CUSTOM => cfg
            .custom
            .as_ref()
            .map_or_else(|| ClientId::lit(NODES[node]), |c| c.client_id().clone()),
        _ => ClientId::lit(NODES[node]),
    }
}

impl Checker {
    /// `def` is the run's workload: each order's quantity and amount bound what
    /// stock and payment may take for it.
    pub fn new(scenario: &Scenario, def: &sagamq::saga::scenario::Scenario) -> Checker {
        Checker {
            acked: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            owed: BTreeMap::new(),
            processed: BTreeSet::new(),
            client_nodes: BTreeMap::new(),
            callback_ids: BTreeMap::new(),
            messages: BTreeMap::new(),
            orders_expected: scenario.order_count(),
            order_sizes: def
                .orders
                .iter()
                .map(|o| {
                    let s = &o.spec;
                    (s.order_id.clone(), (s.quantity, s.quantity.saturating_mul(s.price)))
                })
                .collect(),
            violations: Vec::new(),
        }
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    pub fn orders_total(&self) -> u64 {
        self.orders_expected
    }

    /// Records a violation once per invariant (the first occurrence is the informative one).
    pub fn violation(&mut self, v: Violation) {
        if !self.violations.iter().any(|old| old.invariant == v.invariant) {
            self.violations.push(v);
        }
    }

    /// The broker confirmed `client`'s subscription to `topic` until `until`
    /// (broker clock).
    pub fn subscribed(&mut self, client: &ClientId, topic: &Topic, until: Time) {
        let t = self
            .subscribers
            .entry(topic.clone())
            .or_default()
            .entry(client.clone())
            .or_insert(until);
        *t = (*t).max(until);
    }

    /// The broker received a publish of `key` at `now` (its clock). Returns
    /// how many confirmed subscribers of the topic had lapsed (expired; still
    /// owed the message within `grace`).
    ///
    /// A message is owed to the subscribers entitled when the broker stored it.
    /// Which receipt stored it is not always visible (a crash can eat the
    /// reply), so the checker owes it to those live at *every* receipt of its
    /// key: never more than the broker owes, and, without lapses, all of them.
    pub fn publish_received(&mut self, key: &MessageKey, topic: &Topic, now: Time, grace: Duration) -> usize {
        let subs = self.subscribers.get(topic);
        let lapsed = subs.map_or(0, |m| m.values().filter(|until| now >= **until).count());
        let live: BTreeSet<ClientId> = subs
            .iter()
            .flat_map(|m| m.iter())
            .filter(|(_, until)| now < until.plus(grace))
            .map(|(c, _)| c.clone())
            .collect();
        match self.owed.get_mut(key) {
            Some(owed) => owed.retain(|c| live.contains(c)),
            None => {
                self.owed.insert(key.clone(), live);
            }
        }
        lapsed
    }

    pub fn publish_acked(&mut self, key: &MessageKey, msg_id: MsgId, topic: &Topic, at_ms: u64) {
        match self.acked.get(key) {
            Some(old) if old.msg_id != msg_id => {
                let detail = format!("{key} acknowledged as {} and later as {msg_id}", old.msg_id);
                self.violation(Violation::safety("dedup", detail, at_ms));
            }
            Some(_) => {}
            None => {
                let entitled = self.owed.get(key).cloned().unwrap_or_default();
                self.acked.insert(
                    key.clone(),
                    Acked {
                        msg_id,
                        topic: topic.clone(),
                        entitled,
                    },
                );
            }
        }
    }

    pub fn callback_sent(&mut self, _client: &ClientId, message: &Message, at_ms: u64) {
        let key = message.key();
        match self.callback_ids.get(&key) {
            Some(old) if *old != message.msg_id => {
                let detail = format!("{key} delivered as {old} and as {}", message.msg_id);
                self.violation(Violation::safety("dedup", detail, at_ms));
            }
            Some(_) => {}
            None => {
                self.callback_ids.insert(key.clone(), message.msg_id);
                self.messages.insert(key, message.clone());
            }
        }
    }

    pub fn processed(&mut self, node: usize, client: ClientId, key: &MessageKey) {
        self.client_nodes.insert(client.clone(), node);
        self.processed.insert((client, key.clone()));
    }

    fn views(slots: &[Slot]) -> Vec<View> {
        slots
            .iter()
            .filter_map(|s| {
                if let Slot::Participant(p) = s {
                    Some(p.view())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Effects at most once, conservation and outcome consistency, judged on the current states.
    pub fn safety(&mut self, slots: &[Slot], at_ms: u64) {
        let views = Self::views(slots);
        let mut held_orders = BTreeSet::new();
        let mut charged_orders = BTreeSet::new();
        for v in &views {
            match v {
                View::Stock { initial, level, orders } => {
                    for (id, e) in orders {
                        let quantity = self.order_sizes.get(id).map_or(0, |(q, _)| *q);
                        if let Some(wrong) = at_most_once(e.deducted, quantity, e.restocked) {
                            let detail = format!(
                                "order {id}: stock deducted {} and restocked {} units of {} for an order of {quantity} ({wrong})",
                                e.deducted, e.restocked, e.product
                            );
                            self.violation(Violation::safety("effects-at-most-once", detail, at_ms));
                        }
                    }
                    for (product, start) in initial {
                        let now = level.get(product).copied().unwrap_or(0);
                        let out: u64 = orders
                            .values()
                            .filter(|e| &e.product == product)
                            .map(StockEffects::held)
                            .sum();
                        if now + out != *start {
                            let detail = format!(
                                "stock of {product}: initial {start} != level {now} + held {out} (an effect was lost or invented)"
                            );
                            self.violation(Violation::safety("conservation", detail, at_ms));
                        }
                    }
                    held_orders.extend(orders.iter().filter(|(_, e)| e.held() > 0).map(|(id, _)| id.clone()));
                }
                View::Payment {
                    initial,
                    balance,
                    orders,
                } => {
                    for (id, e) in orders {
                        let amount = self.order_sizes.get(id).map_or(0, |(_, a)| *a);
                        if let Some(wrong) = at_most_once(e.charged, amount, e.refunded) {
                            let detail = format!(
                                "order {id}: payment charged {} and refunded {} to {} for an order of {amount} ({wrong})",
                                e.charged, e.refunded, e.customer
                            );
                            self.violation(Violation::safety("effects-at-most-once", detail, at_ms));
                        }
                    }
                    for (customer, start) in initial {
                        let now = balance.get(customer).copied().unwrap_or(0);
                        let out: u64 = orders
                            .values()
                            .filter(|e| &e.customer == customer)
                            .map(PaymentEffects::held)
                            .sum();
                        if now + out != *start {
                            let detail = format!(
                                "balance of {customer}: initial {start} != balance {now} + charged {out} (an effect was lost or invented)"
                            );
                            self.violation(Violation::safety("conservation", detail, at_ms));
                        }
                    }
                    charged_orders.extend(orders.iter().filter(|(_, e)| e.held() > 0).map(|(id, _)| id.clone()));
                }
                View::Custom {
                    client,
                    problem: Some(problem),
                    ..
                } => {
                    let detail = format!("{client}: {problem}");
                    self.violation(Violation::safety("custom-invariant", detail, at_ms));
                }
                View::Order { .. } | View::Custom { .. } => {}
            }
        }
        let stock_up = slots.get(STOCK).is_some_and(|s| matches!(s, Slot::Participant(_)));
        let payment_up = slots.get(PAYMENT).is_some_and(|s| matches!(s, Slot::Participant(_)));
        for v in &views {
            let View::Order { orders } = v else { continue };
            for (id, (phase, state)) in orders {
                let held = held_orders.contains(id);
                let charged = charged_orders.contains(id);
                let wrong = match phase {
                    OrderPhase::InProgress => None,
                    OrderPhase::StockOutboundDone => (stock_up && !held).then_some("holds no stock"),
                    OrderPhase::Completed => {
                        if stock_up && !held {
                            Some("holds no stock")
                        } else if payment_up && !charged {
                            Some("was never charged")
                        } else {
                            None
                        }
                    }
                    OrderPhase::StockOutboundFailed | OrderPhase::Compensated => {
                        if stock_up && held {
                            Some("still holds stock")
                        } else if payment_up && charged {
                            Some("is still charged")
                        } else {
                            None
                        }
                    }
                };
                if let Some(wrong) = wrong {
                    let detail = format!("order {id} is {state} but {wrong}");
                    self.violation(Violation::safety("saga-outcome", detail, at_ms));
                }
            }
        }
    }

    /// Everything settled: all orders terminal, no delivery pending anywhere.
    pub fn quiescent(&self, slots: &[Slot]) -> bool {
        self.unsettled(slots).is_empty()
    }

    /// What is still unfinished (empty when quiescent), for the liveness report.
    fn unsettled(&self, slots: &[Slot]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            match slot {
                Slot::Down => out.push(format!("{} is down", NODES[i])),
                Slot::Absent => {}
                Slot::Broker(b) => {
                    for (client, st) in b.stats().subscribers {
                        if st.pending + st.in_flight > 0 {
                            out.push(format!(
                                "broker still has {} undelivered for {client}",
                                st.pending + st.in_flight
                            ));
                        }
                    }
                }
                Slot::Participant(p) => {
                    if !p.settled() {
                        out.push(format!(
                            "{} has unacknowledged outbox entries or unanswered work",
                            NODES[i]
                        ));
                    }
                    if let View::Order { orders } = p.view() {
                        let open: Vec<_> = orders
                            .iter()
                            .filter(|(_, (ph, _))| *ph == OrderPhase::InProgress)
                            .map(|(id, _)| id)
                            .collect();
                        if !open.is_empty() {
                            out.push(format!("{} orders not terminal (first: {})", open.len(), open[0]));
                        }
                        if (orders.len() as u64) < self.orders_expected {
                            out.push(format!(
                                "only {} of {} orders created",
                                orders.len(),
                                self.orders_expected
                            ));
                        }
                    }
                }
                Slot::Workload(w) => {
                    if !w.all_answered() {
                        out.push("workload still waiting for create-order answers".to_string());
                    }
                }
            }
        }
        out
    }

    /// Called once at the end of the heal phase.
    pub fn liveness(&mut self, slots: &[Slot], at_ms: u64) {
        let unsettled = self.unsettled(slots);
        if !unsettled.is_empty() {
            let detail = format!("not settled {at_ms}ms into the run: {}", unsettled.join("; "));
            self.violation(Violation::liveness("liveness", detail, at_ms));
            return;
        }
        // Quiescent: every acknowledged publish must have reached each entitled subscriber.
        let Some(Slot::Broker(broker)) = slots.get(BROKER) else {
            return;
        };
        let mut dead: BTreeMap<ClientId, BTreeSet<MsgId>> = BTreeMap::new();
        let mut lost = Vec::new();
        for (key, acked) in &self.acked {
            for client in &acked.entitled {
                if self.processed.contains(&(client.clone(), key.clone())) {
                    continue;
                }
                let dl = dead
                    .entry(client.clone())
                    .or_insert_with(|| broker.dead_letters(client).iter().map(|m| m.msg_id).collect());
                if !dl.contains(&acked.msg_id) {
                    let detail = format!(
                        "{key} ({}, topic {}) was acknowledged but {client} never processed it and it is not a dead letter",
                        acked.msg_id, acked.topic
                    );
                    lost.push(Violation::safety("no-lost-publish", detail, at_ms));
                }
            }
        }
        for v in lost {
            self.violation(v);
        }
        // Quiescent: every 2xx a participant gave is still reflected in its state.
        let mut forgotten = Vec::new();
        for (client, key) in &self.processed {
            let Some(&node) = self.client_nodes.get(client) else {
                continue;
            };
            let (Some(Slot::Participant(p)), Some(message)) = (slots.get(node), self.messages.get(key)) else {
                continue;
            };
            if !p.reflects(message) {
                let detail = format!(
                    "{client} answered 2xx for {key} ({}, topic {}) but its state does not reflect it: the effect was lost after the acknowledgement",
                    message.msg_id, message.topic
                );
                forgotten.push(Violation::safety("no-lost-effect", detail, at_ms));
            }
        }
        for v in forgotten {
            self.violation(v);
        }
        if let Some(v) = self.lost_reply(at_ms) {
            self.violation(v);
        }
    }

    /// The first request stock or payment answered 2xx whose reply was never
    /// published (acknowledged by the broker), if any.
    fn lost_reply(&self, at_ms: u64) -> Option<Violation> {
        use sagamq::saga::topics as t;
        const REPLIES: [(&str, &str, &str); 4] = [
            (t::STOCK_SERVICE, t::SALE_ORDER_CREATED, t::STOCK_OUTBOUND),
            (t::STOCK_SERVICE, t::STOCK_RELEASE, t::STOCK_RELEASED),
            (t::PAYMENT_SERVICE, t::PAYMENT_REQUESTED, t::PAYMENT_RESULT),
            (t::PAYMENT_SERVICE, t::PAYMENT_CANCEL, t::PAYMENT_CANCELLED),
        ];
        let published: BTreeSet<(&str, &str)> = self
            .acked
            .iter()
            .map(|(key, a)| (key.global_id.as_str(), a.topic.as_str()))
            .collect();
        self.processed.iter().find_map(|(client, key)| {
            let message = self.messages.get(key)?;
            let &(_, _, reply) = REPLIES
                .iter()
                .find(|(c, request, _)| client.as_str() == *c && message.topic.as_str() == *request)?;
            if published.contains(&(key.global_id.as_str(), reply)) {
                return None;
            }
            let detail = format!(
                "{client} answered 2xx for {key} (topic {}) but never published its reply on {reply}: the reply was lost after the commit",
                message.topic
            );
            Some(Violation::liveness("no-lost-reply", detail, at_ms))
        })
    }
}

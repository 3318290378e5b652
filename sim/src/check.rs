//! The invariant checker: a pure function of the run's history (see
//! [`crate::history`]) and of the participants' views at the points where it
//! judges state. It never touches the world, madsim or a machine.
//!
//! It judges **outcomes** as well as contradictions. Safety (any time):
//!
//! - **dedup**: one `(GlobalID, SubID)` maps to one message id *and* one message
//!   id to one key; a repeated publish is answered with the original id;
//! - **fidelity**: every callback carries the topic, content, sender and
//!   create time published under its key (a key published twice with different
//!   content keeps its first stored version), and nothing never published is delivered;
//! - **one-answer**: a participant never publishes one key with two contents
//!   (a redelivery must not change a decision);
//! - **entitlement**: a callback goes only to a client whose subscription to
//!   the topic was live (or within the broker's grace) when the message was stored;
//! - **delivery-order**: per subscriber, first attempts follow `(CreateTime, MsgID)`
//!   among the messages already stored for it and never attempted;
//! - **redelivery**: once the broker received a 2xx for a message, it sends it
//!   again only after a crash of its own or a redrive;
//! - **dead-letter**: a dead letter is preceded by `attempts_max` attempts on the wire;
//! - **request-content**: the order's requests name the order's product, customer,
//!   quantity and amount;
//! - **decision**: stock deducts only what it has and refuses only what it lacks
//!   (or an order whose release it already saw); payment alike, against a shadow
//!   ledger kept from the replies themselves;
//! - **effects-at-most-once** / **conservation** / **saga-outcome**: on the views,
//!   per order, of the right product and customer;
//! - **saga-progress**: an order that gives up at its deadline was waiting for
//!   something: some message of it was still queued, unanswered or unsent.
//!
//! Liveness (once the faults heal): **progress** (a subscriber with queued
//! messages gets an attempt within the callback timeout plus the backoff cap),
//! **liveness** (everything settles within the bound), **no-lost-publish**,
//! **no-lost-request** (every committed publish acknowledged), **no-lost-reply**,
//! **no-lost-effect**, and terminal states justified by the messages the order heard.
//!
//! Every judgement also counts what it saw ([`Checker::coverage`]), so a sweep
//! can prove that it reached the paths that matter.

use crate::history::Event;
use crate::topology::{NODES, ORDER, PAYMENT, STOCK};
pub use crate::view::{OrderPhase, PaymentEffects, StockEffects, View};
use sagamq::broker::{BrokerConfig, BrokerError, Reply};
use sagamq::saga::order::OrderFlow;
use sagamq::saga::{CancelledBody, OrderBody, PaymentBody, ReleasedBody, attempt_of, step, topics as t};
use sagamq::{ClientId, GlobalId, Message, MessageKey, MsgId, PublishRequest, Time, Topic};
use serde::Serialize;
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

/// The named paths a sweep must reach ([`Checker::coverage`]); the default
/// test sweep fails if one of them stays at zero.
pub const COVERAGE: [&str; 32] = [
    "stock_refused",
    "payment_refused",
    "hanging_refused",
    "null_compensation",
    "deadline_cancel",
    "resent_compensation",
    "duplicate_publish",
    "dedup_after_recovery",
    "dedup_after_compaction",
    "dedup_of_settled",
    "redelivered",
    "dead_letter",
    "redrive",
    "compaction",
    "recovery_broker",
    "recovery_participant",
    "torn_tail_truncated",
    // A broker recovered a torn log read in chunks (the real driver's
    // streaming path: a frame or a scan split across two chunks).
    "torn_tail_read_in_chunks",
    "backpressure_refused",
    "delivery_paused",
    "lapsed_beyond_grace",
    "dedup_probe",
    // The bounds the oracle judges were reached: a retry whose backoff was
    // judged, a callback that filled a subscriber's window, a message stored
    // into the last free place of a subscriber's queue.
    "retry_backoff_judged",
    // A participant host's publish retry judged against its backoff floor.
    "host_retry_judged",
    // A participant host refused a delivery or a command at one of its
    // bounds (the refusal judged justified by the recount).
    "host_refused_at_bound",
    // The broker refused a request as too many waiting for fsync, and the
    // driver's count of requests not yet answered reached the bound.
    "unsynced_refusal_judged",
    // An order's deadline came and was judged after the order's timer step
    // (`order-deadline`).
    "deadline_judged",
    // A broker compaction judged against its documented trigger.
    "compaction_trigger_judged",
    "window_filled",
    "queue_filled",
    // The recovered broker at the heal went through a whole subscription
    // lifecycle (subscribe, deliver, settle, unsubscribe, dedup of settled).
    "lifecycle_probe",
    // The recovered broker, given a bound of a few settled keys, forgot the
    // oldest ones first (in replay and live), and only those.
    "dedup_bound_probe",
];

/// A per-subscriber account in the spirit of Jepsen's total-queue checker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Account {
    /// Acknowledged, owed, never processed and not a dead letter (judged once quiescent).
    pub lost: u64,
    /// Processed (2xx) more than once: allowed (at-least-once), counted.
    pub duplicated: u64,
    /// Delivered but never published, or to a client never entitled.
    pub unexpected: u64,
    /// First attempts out of `(CreateTime, MsgID)` order.
    pub out_of_order: u64,
}

impl Account {
    pub fn add(&mut self, other: &Account) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.unexpected += other.unexpected;
        self.out_of_order += other.out_of_order;
    }
}

/// What the workload asks of one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderFacts {
    pub customer: String,
    pub product: String,
    pub quantity: u64,
    pub price: u64,
    pub amount: u64,
}

/// What the checker is told before the run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub flow: OrderFlow,
    pub orders: BTreeMap<String, OrderFacts>,
    pub stock: BTreeMap<String, u64>,
    pub balances: BTreeMap<String, u64>,
    pub attempts_max: u32,
    pub grace: Duration,
    /// The longest a subscriber with queued messages may legitimately wait
    /// for the next attempt: one callback timeout plus the backoff cap.
    pub dispatch_gap_max: Duration,
    /// The broker's retry backoff: after the n-th failed attempt it waits at
    /// least half of `initial * 2^(n-1)` capped at `max` (equal jitter).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// The broker's window: at most this many callbacks outstanding per
    /// subscriber, each for at most `callback_timeout` of the broker's clock.
    pub inflight_max: usize,
    pub callback_timeout: Duration,
    /// The broker stores a message only while each subscriber entitled to it
    /// has fewer than this many queued (`QueueFull` otherwise).
    pub pending_max: usize,
    /// ... and while it holds fewer than this many live messages
    /// (`TooManyMessages` otherwise), and while fewer than this many
    /// replies wait for their records to be durable
    /// (`TooManyUnsyncedPublishes` otherwise).
    pub messages_max: usize,
    pub unsynced_max: usize,
}

impl Spec {
    pub fn new(def: &sagamq::saga::scenario::Scenario, broker: &BrokerConfig) -> Spec {
        Spec {
            flow: def.flow,
            orders: def
                .orders
                .iter()
                .map(|o| {
                    let s = &o.spec;
                    let facts = OrderFacts {
                        customer: s.customer_id.clone(),
                        product: s.product_id.clone(),
                        quantity: s.quantity,
                        price: s.price,
                        amount: s.quantity.saturating_mul(s.price),
                    };
                    (s.order_id.clone(), facts)
                })
                .collect(),
            stock: def.stock.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            balances: def.balances.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            attempts_max: broker.attempts_max,
            grace: broker.subscription_grace,
            dispatch_gap_max: broker.callback_timeout + broker.retry_backoff_max,
            backoff_initial: broker.retry_backoff_initial,
            backoff_max: broker.retry_backoff_max,
            inflight_max: broker.inflight_per_subscriber_max,
            callback_timeout: broker.callback_timeout,
            pending_max: broker.pending_per_subscriber_max,
            messages_max: broker.messages_max,
            unsynced_max: broker.publishes_unsynced_max,
        }
    }
}

/// The broker's state as the checker needs it at a judgement point.
#[derive(Clone, Debug, Default)]
pub struct BrokerSnapshot {
    /// The broker's clock.
    pub now: Time,
    /// Per subscriber: messages queued (pending, backing off or in flight).
    pub queued: BTreeMap<ClientId, usize>,
    /// Per subscriber: its dead letters.
    pub dead: BTreeMap<ClientId, Vec<MsgId>>,
    /// Requests waiting in the broker's inbox: while it is saturated, its
    /// timers wait behind them and the progress bound does not apply.
    pub backlog: usize,
}

/// What a broker's log must carry across a restart, summarised: messages
/// live, subscriptions, remembered dedup keys, and per subscriber the messages
/// it is still owed and its dead letters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableState {
    pub messages_live: usize,
    pub subscriptions: usize,
    pub dedup_settled: usize,
    pub owed: BTreeMap<ClientId, usize>,
    pub dead: BTreeMap<ClientId, Vec<MsgId>>,
}

impl DurableState {
    pub fn of(b: &sagamq::broker::Broker) -> DurableState {
        let stats = b.stats();
        DurableState {
            messages_live: stats.messages_live,
            subscriptions: stats.subscriptions,
            dedup_settled: stats.dedup_settled,
            owed: stats
                .subscribers
                .iter()
                .map(|(c, st)| (c.clone(), st.pending + st.in_flight))
                .collect(),
            dead: stats
                .subscribers
                .keys()
                .map(|c| (c.clone(), b.dead_letters(c).iter().map(|m| m.msg_id).collect()))
                .collect(),
        }
    }

    /// The stats audit: what the broker reports about its own log and dedup
    /// memory (`/stats` shows it to operators; compaction decides on it) must
    /// match a recount of what it wrote: `log_len` bytes holding `log_records`
    /// records, and no more settled keys remembered than the bound. None when
    /// it does; else what differs.
    pub fn audit(b: &sagamq::broker::Broker, settled_max: usize, log_len: u64, log_records: u64) -> Option<String> {
        let stats = b.stats();
        let mut out = Vec::new();
        if stats.log_bytes != log_len {
            out.push(format!(
                "it reports {} log bytes, its log holds {log_len}",
                stats.log_bytes
            ));
        }
        if stats.log_records != log_records {
            out.push(format!(
                "it reports {} log records, its log holds {log_records}",
                stats.log_records
            ));
        }
        let max = settled_max;
        if stats.dedup_settled > max {
            out.push(format!(
                "it reports {} settled dedup keys remembered, above the bound {max}",
                stats.dedup_settled
            ));
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// Recovery equivalence: the broker recovered from what the live one
    /// wrote must hold the same state. None when it does; else what differs.
    pub fn differs(&self, recovered: &DurableState) -> Option<String> {
        let mut out = Vec::new();
        if self.messages_live != recovered.messages_live {
            out.push(format!(
                "{} messages live, {} after recovery",
                self.messages_live, recovered.messages_live
            ));
        }
        if self.subscriptions != recovered.subscriptions {
            out.push(format!(
                "{} subscriptions, {} after recovery",
                self.subscriptions, recovered.subscriptions
            ));
        }
        if self.dedup_settled != recovered.dedup_settled {
            out.push(format!(
                "{} settled dedup keys, {} after recovery",
                self.dedup_settled, recovered.dedup_settled
            ));
        }
        if self.owed != recovered.owed {
            out.push(format!("owed {:?}, {:?} after recovery", self.owed, recovered.owed));
        }
        if self.dead != recovered.dead {
            out.push(format!(
                "dead letters {:?}, {:?} after recovery",
                self.dead, recovered.dead
            ));
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

/// The world at a judgement point: who is down, the broker, the participants.
pub struct Snapshot<'a> {
    pub at_ms: u64,
    pub down: Vec<usize>,
    /// None while the broker is down.
    pub broker: Option<BrokerSnapshot>,
    /// Each running participant's node and view.
    pub views: Vec<(usize, View)>,
    /// Running participants with outbox entries not yet acknowledged, or work unanswered.
    pub unsettled: Vec<usize>,
    /// The workload still waits for create-order answers.
    pub workload_waiting: bool,
    /// Whether the participant on `node` already reflects `message` (None: not running).
    pub reflects: &'a dyn Fn(usize, &Message) -> Option<bool>,
    /// Whether the log of the participant on `node` holds a record that
    /// consumed `key` (None: unknown). Asked only of a message that is not
    /// reflected, to tell "not idempotent" (recorded, yet deciding it again
    /// commits a change) from "effect lost" (no record).
    pub recorded: Option<&'a Recorded<'a>>,
}

/// A node as messages name it: the custom node by the client id it was seen
/// as (as in the trace), any other by its name.
fn node_name(client_nodes: &BTreeMap<ClientId, usize>, node: usize) -> String {
    if node == crate::topology::CUSTOM
        && let Some((client, _)) = client_nodes.iter().find(|(_, n)| **n == node)
    {
        return client.to_string();
    }
    NODES[node].to_string()
}

/// See [`Snapshot::recorded`]: (node, key) -> whether its log consumed the key.
pub type Recorded<'a> = dyn Fn(usize, &MessageKey) -> Option<bool> + 'a;

#[derive(Debug)]
struct Ack {
    msg_id: MsgId,
    incarnation: u64,
    compactions: u64,
    entitled: BTreeSet<ClientId>,
}

#[derive(Debug)]
struct KeyState {
    /// Every distinct version received under this key (the first is stored).
    versions: Vec<PublishRequest>,
    /// Each receipt (up to 64): its place in the history and the broker's
    /// clock then. History order says what came before what; the clock says
    /// what was live (a broker's clock may step back across a restart).
    receipts: Vec<(u64, Time)>,
    /// Subscribers live at every receipt (the checker's lower bound of who is owed).
    owed: BTreeSet<ClientId>,
    ack: Option<Ack>,
    /// Content of the first emission by a participant.
    emitted: Option<String>,
    /// The message as first delivered.
    delivered: Option<Message>,
    /// Per subscriber owed it, the fewest messages the checker knew queued
    /// for it at any receipt before the key was acknowledged: the broker
    /// stored it at one of them, so that count must be below the bound.
    min_queued: Vec<(ClientId, usize)>,
    /// The fewest messages the checker knew live at any of those receipts.
    min_live: usize,
    /// The fewest publishes received and not yet answered at any of them.
    min_waiting: usize,
    /// Subscribers whose queue certainly holds this message ([`Pair::queued`]).
    queued_for: u32,
}

impl KeyState {
    /// A key not received yet (a participant may emit it first).
    fn unseen() -> KeyState {
        KeyState {
            versions: Vec::new(),
            receipts: Vec::new(),
            owed: BTreeSet::new(),
            ack: None,
            emitted: None,
            delivered: None,
            min_queued: Vec::new(),
            min_live: usize::MAX,
            min_waiting: usize::MAX,
            queued_for: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Sub {
    /// Requests received by the broker: (place in the history, its clock,
    /// requested expiry).
    requests: Vec<(u64, Time, Time)>,
    /// Latest confirmed expiry (broker clock).
    until: Option<Time>,
}

/// One (subscriber, message) pair.
#[derive(Debug, Default)]
struct Pair {
    /// Attempts since the last redrive.
    attempts: u32,
    attempted: bool,
    processed: u32,
    /// The broker incarnation that received a 2xx for it (redelivery needs a crash or redrive).
    acked_in: Option<u64>,
    /// Redrives so far: a late 2xx for an attempt made before the latest
    /// redrive answers a delivery the broker no longer knows.
    redrives: u32,
    /// The latest attempt on the wire: (broker incarnation, redrives before
    /// it, its attempt number, the broker's clock when it was sent).
    last_sent: Option<(u64, u32, u32, Time)>,
    /// Counted in [`Checker::queued`].
    queued: bool,
}

/// Retries on the wire: within one broker incarnation and between redrives,
/// a callback's attempts are numbered 1, 2, 3, ... and attempt n+1 leaves no
/// sooner than the backoff floor after attempt n (whose failure came after
/// it was sent). A restart or a redrive starts the count again.
fn retry_violation(
    pair: &Pair,
    cb: &sagamq::broker::Callback,
    now: Time,
    incarnation: u64,
    floor: Duration,
    at_ms: u64,
) -> Option<Violation> {
    let (client, id) = (&cb.client, cb.message.msg_id);
    let Some((inc, redrives, attempt, sent)) = pair.last_sent else {
        return (cb.attempt != 1).then(|| {
            let detail = format!(
                "{client} got message {id} as attempt {} before any attempt 1",
                cb.attempt
            );
            Violation::safety("retry", detail, at_ms)
        });
    };
    if inc == incarnation && redrives != pair.redrives && cb.attempt != 1 {
        // A redrive starts the count again (attempts are not persisted).
        let detail = format!(
            "{client} got message {id} as attempt {} right after a redrive moved it back (attempts start over)",
            cb.attempt
        );
        return Some(Violation::safety("retry", detail, at_ms));
    }
    if inc != incarnation {
        // A restart starts the count again; in a cluster a takeover of
        // another partition counts as a restart here, and there the count
        // goes on.
        return (cb.attempt != 1 && cb.attempt != attempt + 1).then(|| {
            let detail = format!(
                "{client} got message {id} as attempt {} after attempt {attempt} and a broker restart",
                cb.attempt
            );
            Violation::safety("retry", detail, at_ms)
        });
    }
    if redrives != pair.redrives {
        return None;
    }
    if cb.attempt != attempt + 1 {
        let detail = format!(
            "{client} got message {id} as attempt {} right after attempt {attempt} of the same broker incarnation",
            cb.attempt
        );
        return Some(Violation::safety("retry", detail, at_ms));
    }
    let waited = Duration::from_nanos(now.0.saturating_sub(sent.0));
    (waited < floor).then(|| {
        let detail = format!(
            "{client} got attempt {} of message {id} {}ms after attempt {attempt}: the backoff after it is at least {}ms",
            cb.attempt,
            waited.as_millis(),
            floor.as_millis()
        );
        Violation::safety("retry", detail, at_ms)
    })
}

/// One order's story as the messages tell it.
#[derive(Debug, Default)]
struct Story {
    /// Messages of this order not yet settled: committed and not acknowledged, or
    /// acknowledged and owed to a subscriber that has not processed them.
    open: u32,
    quiet_since_ms: Option<u64>,
    heard_stock: Option<bool>,
    heard_payment: Option<bool>,
    heard_released: bool,
    heard_cancelled: bool,
    payment_requested: bool,
    compensating: bool,
    /// A message of this order found a subscriber of its topic lapsed beyond
    /// the grace: it is owed nothing, so the order may wait for nothing.
    lost_to_lapse: bool,
    /// What stock and payment did for it, as their replies tell.
    stock: Side,
    money: Side,
}

/// One participant's part in an order, as its replies and deliveries tell it.
#[derive(Debug, Default)]
struct Side {
    /// It received the compensation (a release, a cancel) of this order.
    saw_undo: bool,
    /// It answered the forward request with "1" (deducted, charged).
    taken: bool,
    /// It confirmed giving back what it took.
    given_back: bool,
}

/// The two shadow ledgers the checker keeps from the replies: stock by
/// product, money by customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ledger {
    Stock,
    Money,
}

impl Ledger {
    fn who(self) -> &'static str {
        match self {
            Ledger::Stock => "stock",
            Ledger::Money => "payment",
        }
    }
    fn took(self) -> &'static str {
        match self {
            Ledger::Stock => "deducted",
            Ledger::Money => "charged",
        }
    }
    fn undo(self) -> &'static str {
        match self {
            Ledger::Stock => "release",
            Ledger::Money => "cancel",
        }
    }
    /// The coverage path a justified refusal counts as.
    fn refusal(self, saw_undo: bool) -> &'static str {
        match (self, saw_undo) {
            (Ledger::Stock, true) => "hanging_refused",
            (Ledger::Stock, false) => "stock_refused",
            (Ledger::Money, _) => "payment_refused",
        }
    }
}

/// How long an order may sit with nothing in flight before giving up is a stall
/// (a participant turns a processed message into its next publish within one
/// disk sync; 100 ms leaves room for group commits and scheduling).
const STALL_MS: u64 = 100;

#[derive(Debug)]
pub struct Checker {
    spec: Spec,
    keys: BTreeMap<MessageKey, KeyState>,
    msg_keys: BTreeMap<MsgId, MessageKey>,
    /// Per topic, per subscriber (nested: a publish looks up its topic's subscribers).
    subs: BTreeMap<Topic, BTreeMap<ClientId, Sub>>,
    /// Per subscriber, per key (nested so a lookup borrows instead of cloning both).
    pairs: BTreeMap<ClientId, BTreeMap<MessageKey, Pair>>,
    /// Per subscriber, the attempts the broker may still count as in flight:
    /// (delivery, its message, broker incarnation, its deadline on the
    /// broker's clock). A lower bound of the broker's count: an attempt
    /// leaves at its answer or its deadline, whichever the checker sees
    /// first, and with every other attempt of its message at a 2xx to any
    /// of them (the broker then settles the message for that subscriber).
    in_flight: BTreeMap<ClientId, Vec<(sagamq::broker::DeliveryId, MessageKey, u64, Time)>>,
    /// Per subscriber, messages the broker certainly holds queued for it (a
    /// lower bound): stored with the subscriber owed, not yet answered 2xx
    /// or processed by it, and with fewer than `attempts_max` attempts since
    /// the last redrive (so not dead-lettered).
    queued: BTreeMap<ClientId, usize>,
    /// Messages certainly live: queued for at least one subscriber.
    live: usize,
    /// Publishes the broker received in this incarnation and has not
    /// answered yet (a lower bound of the replies it holds until durable).
    unanswered: usize,
    /// Each attempt: its pair, the broker incarnation and the pair's redrive count when sent.
    deliveries: BTreeMap<sagamq::broker::DeliveryId, (ClientId, MessageKey, u64, u32)>,
    /// Per subscriber: stored, owed, never attempted: (order scope, CreateTime, MsgID) -> topic.
    unattempted: BTreeMap<ClientId, BTreeMap<(u32, i64, MsgId), Topic>>,
    /// Delivery order holds within one broker core: the whole broker (None),
    /// or in a cluster each partition of these (see [`Checker::order_within_partitions`]).
    order_partitions: Option<sagamq::cluster::Partitions>,
    /// Committed publishes not yet acknowledged.
    unacked: BTreeSet<MessageKey>,
    stories: BTreeMap<GlobalId, Story>,
    shadow_stock: BTreeMap<String, u64>,
    shadow_balance: BTreeMap<String, u64>,
    client_nodes: BTreeMap<ClientId, usize>,
    down: BTreeSet<usize>,
    last_boot_ms: u64,
    broker_boot_ms: u64,
    incarnation: u64,
    compactions: u64,
    last_callback_ms: BTreeMap<ClientId, u64>,
    waiting_since_ms: BTreeMap<ClientId, u64>,
    healed_ms: Option<u64>,
    quiescent_ms: Option<u64>,
    /// Events observed so far: each event's place in the history.
    seq: u64,
    coverage: BTreeMap<&'static str, u64>,
    account: Account,
    violations: Vec<Violation>,
}

fn yes_no(content: &str) -> Option<bool> {
    match content {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

fn same_message(p: &PublishRequest, m: &Message) -> bool {
    p.topic == m.topic && p.content == m.content && p.sender_id == m.sender_id && p.create_time == m.create_time
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

impl Checker {
    pub fn new(spec: Spec) -> Checker {
        Checker {
            shadow_stock: spec.stock.clone(),
            shadow_balance: spec.balances.clone(),
            spec,
            keys: BTreeMap::new(),
            msg_keys: BTreeMap::new(),
            subs: BTreeMap::new(),
            pairs: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            queued: BTreeMap::new(),
            live: 0,
            unanswered: 0,
            deliveries: BTreeMap::new(),
            unattempted: BTreeMap::new(),
            order_partitions: None,
            unacked: BTreeSet::new(),
            stories: BTreeMap::new(),
            client_nodes: BTreeMap::new(),
            down: BTreeSet::new(),
            last_boot_ms: 0,
            broker_boot_ms: 0,
            incarnation: 0,
            compactions: 0,
            last_callback_ms: BTreeMap::new(),
            waiting_since_ms: BTreeMap::new(),
            healed_ms: None,
            quiescent_ms: None,
            seq: 0,
            coverage: COVERAGE.iter().map(|k| (*k, 0)).collect(),
            account: Account::default(),
            violations: Vec::new(),
        }
    }

    /// A cluster's checker: per-subscriber delivery order is judged within
    /// each partition (a `GlobalID`'s partition), since each partition is one
    /// broker core and the cluster promises no order across them. Every other
    /// invariant is judged as for one broker.
    pub fn order_within_partitions(mut self, partitions: sagamq::cluster::Partitions) -> Checker {
        self.order_partitions = Some(partitions);
        self
    }

    /// The delivery-order scope of a key: its partition in a cluster, else 0.
    fn order_scope(&self, key: &MessageKey) -> u32 {
        self.order_partitions.map_or(0, |p| p.of(&key.global_id).0)
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// How often each named path happened (see [`COVERAGE`]).
    pub fn coverage(&self) -> &BTreeMap<&'static str, u64> {
        &self.coverage
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    /// Simulated time from healing to quiescence, once reached.
    pub fn quiescence_ms(&self) -> Option<u64> {
        Some(self.quiescent_ms?.saturating_sub(self.healed_ms?))
    }

    /// Counts a path the world reached (a probe it ran).
    pub fn count(&mut self, path: &'static str) {
        self.covered(path);
    }

    fn covered(&mut self, path: &'static str) {
        *self.coverage.entry(path).or_default() += 1;
    }

    /// **Invariant `compaction-trigger`:** the broker compacted a log that
    /// held `written` records before this call (recounted from the disk)
    /// and `replaced` with the call's batch, into a snapshot of `kept`
    /// records: the batch added at least one record, and the garbage
    /// (`replaced - kept`) exceeded both `min` and the live records, as the
    /// trigger documents (compacting earlier costs a snapshot per few
    /// records; the trigger's arithmetic passed every sweep before).
    pub fn compaction_judged(&mut self, written: u64, replaced: u64, kept: u64, min: u64, at_ms: u64) {
        let garbage = replaced.saturating_sub(kept);
        let detail = if replaced <= written {
            format!(
                "a compaction reports {replaced} records replaced, but the log already held {written} before the batch"
            )
        } else if garbage <= min.max(kept) {
            format!(
                "the broker compacted {replaced} records into {kept}: {garbage} records of garbage, not more than max(compact_garbage_records_min {min}, live {kept})"
            )
        } else {
            self.covered("compaction_trigger_judged");
            return;
        };
        self.violation(Violation::safety("compaction-trigger", detail, at_ms));
    }

    /// The broker refused a request as `TooManyUnsyncedPublishes` while
    /// `waiting` requests (every one handed to its incarnation and not yet
    /// answered, counted by the driver) waited for fsync: justified only at
    /// the bound. (The other side, a request taken past the bound, is judged
    /// at its acknowledgement from the history.)
    pub fn unsynced_refusal(&mut self, waiting: usize, at_ms: u64) {
        if waiting >= self.spec.unsynced_max {
            self.covered("unsynced_refusal_judged");
        } else {
            let detail = format!(
                "a request was refused as TooManyUnsyncedPublishes while {waiting} requests waited for fsync (bound {})",
                self.spec.unsynced_max
            );
            self.violation(Violation::safety("queue-bound", detail, at_ms));
        }
    }

    /// `n` more of `path` (a count kept elsewhere, handed over).
    pub fn count_n(&mut self, path: &'static str, n: u64) {
        if n > 0 {
            *self.coverage.entry(path).or_default() += n;
        }
    }

    /// Records a violation once per invariant (the first occurrence is the informative one).
    pub fn violation(&mut self, v: Violation) {
        if !self.violations.iter().any(|old| old.invariant == v.invariant) {
            self.violations.push(v);
        }
    }

    /// Every acknowledged publish (as first received) and the id it was
    /// acknowledged with: what a recovered broker must still answer as a duplicate.
    pub fn acknowledged(&self) -> Vec<(PublishRequest, MsgId)> {
        self.keys
            .values()
            .filter_map(|ks| Some((ks.versions.first()?.clone(), ks.ack.as_ref()?.msg_id)))
            .collect()
    }

    /// Every message `client` answered 2xx (as first delivered): what a
    /// participant recovered from its durable bytes must still reflect.
    pub fn processed_by(&self, client: &ClientId) -> impl Iterator<Item = &Message> + use<'_> {
        self.pairs
            .get(client)
            .into_iter()
            .flatten()
            .filter(|(_, p)| p.processed > 0)
            .filter_map(|(k, _)| self.keys.get(k)?.delivered.as_ref())
    }

    /// Confirmed subscribers of `topic` whose subscription has expired at `now`
    /// (broker clock): still owed new messages within the grace.
    pub fn lapsed(&self, topic: &Topic, now: Time) -> usize {
        self.subs.get(topic).map_or(0, |subs| {
            subs.values().filter(|s| s.until.is_some_and(|u| now >= u)).count()
        })
    }

    fn story(&mut self, key: &MessageKey) -> &mut Story {
        // One search; an id's clone is a reference count.
        self.stories.entry(key.global_id.clone()).or_default()
    }

    /// The (topic, subscriber) subscription record, created on first use.
    fn sub_mut(&mut self, topic: &Topic, client: &ClientId) -> &mut Sub {
        self.subs
            .entry(topic.clone())
            .or_default()
            .entry(client.clone())
            .or_default()
    }

    fn pair(&self, client: &ClientId, key: &MessageKey) -> Option<&Pair> {
        self.pairs.get(client)?.get(key)
    }

    /// The (subscriber, key) pair, created on first use (one search per
    /// level; an id's clone is a reference count).
    fn pair_mut(&mut self, client: &ClientId, key: &MessageKey) -> &mut Pair {
        self.pairs
            .entry(client.clone())
            .or_default()
            .entry(key.clone())
            .or_default()
    }

    /// Every pair in (subscriber, key) order.
    fn all_pairs(&self) -> impl Iterator<Item = (&ClientId, &MessageKey, &Pair)> {
        self.pairs
            .iter()
            .flat_map(|(client, keys)| keys.iter().map(move |(key, pair)| (client, key, pair)))
    }

    /// One more (or one fewer) unsettled message of `key`'s order.
    fn open(&mut self, key: &MessageKey, up: bool, at_ms: u64) {
        let s = self.story(key);
        if up {
            s.open += 1;
            s.quiet_since_ms = None;
        } else {
            s.open = s.open.saturating_sub(1);
            if s.open == 0 {
                s.quiet_since_ms = Some(at_ms);
            }
        }
    }

    /// Takes one event of the history.
    pub fn observe(&mut self, at_ms: u64, event: Event<'_>) {
        self.seq += 1;
        match event {
            Event::SubscribeReceived {
                client,
                topic,
                expire,
                now,
            } => {
                let seq = self.seq;
                let sub = self.sub_mut(topic, client);
                if sub.requests.last().is_none_or(|&(_, n, e)| (n, e) != (now, expire)) {
                    sub.requests.push((seq, now, expire));
                }
            }
            Event::Subscribed { client, topic, until } => {
                let sub = self.sub_mut(topic, client);
                sub.until = Some(sub.until.map_or(until, |u| u.max(until)));
            }
            Event::Emitted { node, publish } => self.emitted(at_ms, node, publish),
            Event::PublishReceived { publish, now } => self.publish_received(publish, now),
            Event::PublishAnswered { key, reply } => self.publish_answered(at_ms, key, reply),
            Event::CallbackSent { callback, now } => self.callback_sent(at_ms, callback, now),
            Event::AnswerReceived { delivery, ok } => self.answer_received(delivery, ok),
            Event::CallbackReceived { node, message } => {
                let key = message.key();
                let topic = message.topic.as_str();
                let story = self.story(&key);
                // What the order heard: a message it received may be in its
                // state even if its 2xx was lost (a crash right after the commit).
                match (node, topic) {
                    (STOCK, t::STOCK_RELEASE) => story.stock.saw_undo = true,
                    (PAYMENT, t::PAYMENT_CANCEL) => story.money.saw_undo = true,
                    (ORDER, t::STOCK_OUTBOUND) => story.heard_stock = story.heard_stock.or(yes_no(&message.content)),
                    (ORDER, t::PAYMENT_RESULT) => {
                        story.heard_payment = story.heard_payment.or(yes_no(&message.content));
                    }
                    (ORDER, t::STOCK_RELEASED) => story.heard_released = true,
                    (ORDER, t::PAYMENT_CANCELLED) => story.heard_cancelled = true,
                    _ => {}
                }
            }
            Event::Processed { node, client, key } => self.processed(at_ms, node, client, key),
            Event::Crashed { node } => {
                self.down.insert(node);
                if node == crate::topology::BROKER {
                    self.incarnation += 1;
                    self.unanswered = 0;
                }
            }
            Event::Booted {
                node,
                records,
                torn_bytes,
            } => {
                self.down.remove(&node);
                self.last_boot_ms = at_ms;
                if node == crate::topology::BROKER {
                    self.broker_boot_ms = at_ms;
                }
                if records > 0 {
                    self.covered(if node == crate::topology::BROKER {
                        "recovery_broker"
                    } else {
                        "recovery_participant"
                    });
                }
                if torn_bytes > 0 {
                    self.covered("torn_tail_truncated");
                }
            }
            Event::Compacted => {
                self.compactions += 1;
                self.covered("compaction");
            }
            Event::Redrive { client, dead, moved } => {
                self.judge_dead_letters(at_ms, client, dead);
                self.redriven(client, moved);
                if !moved.is_empty() {
                    self.covered("redrive");
                }
            }
            Event::Healed => self.healed_ms = Some(at_ms),
        }
    }

    fn emitted(&mut self, at_ms: u64, node: usize, publish: &PublishRequest) {
        let key = publish.key();
        let ks = self.keys.entry(key.clone()).or_insert_with(KeyState::unseen);
        match &ks.emitted {
            Some(first) if *first != publish.content => {
                let detail = format!(
                    "{} published {key} (topic {}) twice with different content: {first:?} then {:?}; a redelivery changed its decision",
                    node_name(&self.client_nodes, node),
                    publish.topic,
                    publish.content
                );
                self.violation(Violation::safety("one-answer", detail, at_ms));
                return;
            }
            Some(_) => return, // a re-send after a recovery or a lost reply
            None => ks.emitted = Some(publish.content.clone()),
        }
        let now_in_flight = ks.ack.is_none() && self.unacked.insert(key.clone());
        // Judge what the emission means before it counts as in flight.
        self.judge_emission(at_ms, node, publish);
        if now_in_flight {
            self.open(&key, true, at_ms);
        }
    }

    /// The meaning of a participant's first publish of a key: the order's
    /// requests carry its facts, stock and payment decide against the shadow ledger.
    fn judge_emission(&mut self, at_ms: u64, node: usize, publish: &PublishRequest) {
        let key = publish.key();
        let order = key.global_id.as_str();
        let Some(facts) = self.spec.orders.get(order).cloned() else {
            return;
        };
        let topic = publish.topic.as_str();
        let content = publish.content.as_str();
        match (node, topic) {
            (ORDER, t::SALE_ORDER_CREATED | t::STOCK_RELEASE) => {
                let ok = serde_json::from_str::<OrderBody>(content).is_ok_and(|b| {
                    b.order_id.as_str() == order
                        && b.customer_id.as_str() == facts.customer
                        && b.product_id.as_str() == facts.product
                        && b.quantity == facts.quantity
                        && b.price == facts.price
                        && b.amount == facts.amount
                });
                if !ok {
                    let detail = format!(
                        "order published {key} on {topic} with {content} but the order is {} x {} at {} for {}",
                        facts.quantity, facts.product, facts.price, facts.customer
                    );
                    self.violation(Violation::safety("request-content", detail, at_ms));
                }
                if topic == t::STOCK_RELEASE {
                    self.compensation(at_ms, &key, step::RELEASE);
                }
            }
            (ORDER, t::PAYMENT_REQUESTED | t::PAYMENT_CANCEL) => {
                let ok = serde_json::from_str::<PaymentBody>(content).is_ok_and(|b| {
                    b.order_id.as_str() == order && b.customer_id.as_str() == facts.customer && b.amount == facts.amount
                });
                if !ok {
                    let detail = format!(
                        "order published {key} on {topic} with {content} but the order charges {} to {}",
                        facts.amount, facts.customer
                    );
                    self.violation(Violation::safety("request-content", detail, at_ms));
                }
                if topic == t::PAYMENT_REQUESTED {
                    self.story(&key).payment_requested = true;
                } else {
                    self.compensation(at_ms, &key, step::PAYMENT_CANCEL);
                }
            }
            (STOCK, t::STOCK_OUTBOUND) => {
                self.decision(at_ms, Ledger::Stock, &key, &facts.product, facts.quantity, content);
            }
            (STOCK, t::STOCK_RELEASED) => {
                let back = serde_json::from_str::<ReleasedBody>(content).map(|b| b.restocked).ok();
                self.given_back(
                    at_ms,
                    Ledger::Stock,
                    &key,
                    &facts.product,
                    facts.quantity,
                    back,
                    content,
                );
            }
            (PAYMENT, t::PAYMENT_RESULT) => {
                self.decision(at_ms, Ledger::Money, &key, &facts.customer, facts.amount, content);
            }
            (PAYMENT, t::PAYMENT_CANCELLED) => {
                let back = serde_json::from_str::<CancelledBody>(content).map(|b| b.refunded).ok();
                self.given_back(at_ms, Ledger::Money, &key, &facts.customer, facts.amount, back, content);
            }
            _ => {}
        }
    }

    fn ledger(&mut self, ledger: Ledger) -> &mut BTreeMap<String, u64> {
        match ledger {
            Ledger::Stock => &mut self.shadow_stock,
            Ledger::Money => &mut self.shadow_balance,
        }
    }

    fn side(&mut self, ledger: Ledger, key: &MessageKey) -> &mut Side {
        let story = self.story(key);
        match ledger {
            Ledger::Stock => &mut story.stock,
            Ledger::Money => &mut story.money,
        }
    }

    /// A forward decision ("1" took `need` from `account`, "0" refused),
    /// judged against the shadow ledger: a yes needs enough, a no needs a
    /// shortfall or the order's compensation seen first (the hanging guard).
    fn decision(&mut self, at_ms: u64, ledger: Ledger, key: &MessageKey, account: &str, need: u64, content: &str) {
        let (who, order) = (ledger.who(), key.global_id.to_string());
        let have = self.ledger(ledger).get(account).copied().unwrap_or(0);
        let saw_undo = self.side(ledger, key).saw_undo;
        let wrong = match yes_no(content) {
            Some(true) if have < need => Some(format!(
                "{who} {} {need} from {account} for {order} with only {have} there",
                ledger.took()
            )),
            Some(true) => {
                self.side(ledger, key).taken = true;
                self.ledger(ledger).insert(account.to_string(), have - need);
                None
            }
            Some(false) if saw_undo || have < need => {
                self.covered(ledger.refusal(saw_undo));
                None
            }
            Some(false) => Some(format!(
                "{who} refused {order} ({need} from {account}) with {have} there and no {} of it seen",
                ledger.undo()
            )),
            None => Some(format!(
                "{who} answered {order} with {content:?}, neither \"1\" nor \"0\""
            )),
        };
        if let Some(detail) = wrong {
            self.violation(Violation::safety("decision", detail, at_ms));
        }
    }

    /// A compensation's confirmation: it gives back nothing (a null
    /// compensation, or a re-confirmation) or exactly what was taken.
    #[allow(clippy::too_many_arguments)] // the ledger's two sides and the content, for the report
    fn given_back(
        &mut self,
        at_ms: u64,
        ledger: Ledger,
        key: &MessageKey,
        account: &str,
        need: u64,
        back: Option<u64>,
        content: &str,
    ) {
        let side = self.side(ledger, key);
        let (taken, already) = (side.taken, side.given_back);
        match back {
            Some(0) => {
                if !taken {
                    self.covered("null_compensation");
                }
            }
            Some(n) if n == need && taken => {
                if !already {
                    self.side(ledger, key).given_back = true;
                    *self.ledger(ledger).entry(account.to_string()).or_default() += n;
                }
            }
            _ => {
                let detail = format!(
                    "{} confirmed the {} of {} with {content} but had {} (order of {need})",
                    ledger.who(),
                    ledger.undo(),
                    key.global_id,
                    if taken {
                        ledger.took().to_string()
                    } else {
                        format!("{} nothing", ledger.took())
                    }
                );
                self.violation(Violation::safety("decision", detail, at_ms));
            }
        }
    }

    /// The order publishes a compensation step: a re-send, a reaction to a
    /// refused payment, or its deadline giving up, which must have been waiting
    /// for something.
    fn compensation(&mut self, at_ms: u64, key: &MessageKey, step_name: &str) {
        if attempt_of(&key.global_id, step_name, &key.sub_id) > 1 {
            self.covered("resent_compensation");
            return;
        }
        let nobody_down = self.down.is_empty();
        let last_boot = self.last_boot_ms;
        let story = self.story(key);
        if story.compensating {
            return;
        }
        story.compensating = true;
        if story.heard_payment == Some(false) || story.lost_to_lapse {
            return;
        }
        let quiet = match story.quiet_since_ms {
            Some(since) if story.open == 0 && nobody_down && last_boot <= since => at_ms.saturating_sub(since),
            _ => 0,
        };
        self.covered("deadline_cancel");
        if quiet >= STALL_MS {
            let detail = format!(
                "order {} gave up at its deadline after {quiet}ms in which nothing of it was in flight: every message of it was settled, no participant had an unsent reply; it waited for something nobody was going to send",
                key.global_id
            );
            self.violation(Violation::liveness("saga-progress", detail, at_ms));
        }
    }

    fn publish_received(&mut self, publish: &PublishRequest, now: Time) {
        let grace = self.spec.grace;
        let empty = BTreeMap::new();
        let subs = self.subs.get(&publish.topic).unwrap_or(&empty);
        let live: BTreeSet<ClientId> = subs
            .iter()
            .filter(|(_, s)| s.until.is_some_and(|u| now < u.plus(grace)))
            .map(|(c, _)| c.clone())
            .collect();
        let key = publish.key();
        let lapsed_beyond_grace = subs.values().any(|s| s.until.is_some_and(|u| now >= u.plus(grace)));
        if lapsed_beyond_grace {
            self.story(&key).lost_to_lapse = true;
            self.covered("lapsed_beyond_grace");
        }
        let ks = self.keys.entry(key).or_insert_with(KeyState::unseen);
        // Owed: live at every receipt (the first receipt sets the set).
        if ks.versions.is_empty() {
            ks.owed = live;
        } else {
            ks.owed.retain(|c| live.contains(c));
        }
        if ks.receipts.len() < 64 {
            ks.receipts.push((self.seq, now));
        }
        if ks.ack.is_none() {
            ks.min_live = ks.min_live.min(self.live);
            ks.min_waiting = ks.min_waiting.min(self.unanswered);
            let queued = &self.queued;
            let load = |c: &ClientId| queued.get(c).copied().unwrap_or(0);
            ks.min_queued.retain(|(c, _)| ks.owed.contains(c));
            for c in &ks.owed {
                match ks.min_queued.iter_mut().find(|(m, _)| m == c) {
                    Some((_, n)) => *n = (*n).min(load(c)),
                    None => ks.min_queued.push((c.clone(), load(c))),
                }
            }
        }
        if ks.versions.len() < 64 && !ks.versions.contains(publish) {
            ks.versions.push(publish.clone());
        }
        self.unanswered += 1;
    }

    fn publish_answered(&mut self, at_ms: u64, key: &MessageKey, reply: &Reply) {
        self.unanswered = self.unanswered.saturating_sub(1);
        let (msg_id, duplicate) = match reply {
            Reply::Published { msg_id, duplicate } => (*msg_id, *duplicate),
            Reply::Rejected(
                BrokerError::QueueFull { .. }
                | BrokerError::DeadLettersFull { .. }
                | BrokerError::TooManyMessages
                | BrokerError::TooManyUnsyncedPublishes,
            ) => {
                self.covered("backpressure_refused");
                return;
            }
            _ => return,
        };
        match self.msg_keys.get(&msg_id) {
            Some(other) if other != key => {
                let detail = format!("message id {msg_id} answers both {other} and {key}");
                self.violation(Violation::safety("dedup", detail, at_ms));
                return;
            }
            Some(_) => {}
            None => {
                self.msg_keys.insert(msg_id, key.clone());
            }
        }
        if duplicate {
            self.covered("duplicate_publish");
        }
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        if let Some(ack) = &ks.ack {
            if ack.msg_id != msg_id {
                let detail = format!("{key} acknowledged as {} and later as {msg_id}", ack.msg_id);
                self.violation(Violation::safety("dedup", detail, at_ms));
                return;
            }
            if duplicate {
                let (inc, comp) = (ack.incarnation, ack.compactions);
                let pairs = &self.pairs;
                let settled = ack.entitled.iter().all(|c| {
                    pairs
                        .get(c)
                        .and_then(|keys| keys.get(key))
                        .is_some_and(|p| p.processed > 0)
                });
                if inc < self.incarnation {
                    self.covered("dedup_after_recovery");
                }
                if comp < self.compactions {
                    self.covered("dedup_after_compaction");
                }
                if settled {
                    self.covered("dedup_of_settled");
                }
            }
            return;
        }
        let entitled = ks.owed.clone();
        let create_time = ks.versions.first().map_or(0, |p| p.create_time);
        // With two versions received, which one is stored (and its create
        // time) is unknown until delivery: such a message is not ordered.
        let topic = ks
            .versions
            .first()
            .filter(|_| ks.versions.len() == 1)
            .map(|p| p.topic.clone());
        ks.ack = Some(Ack {
            msg_id,
            incarnation: self.incarnation,
            compactions: self.compactions,
            entitled: entitled.clone(),
        });
        let min_queued = std::mem::take(&mut ks.min_queued);
        let min_live = ks.min_live;
        let min_waiting = ks.min_waiting;
        if self.unacked.remove(key) {
            self.open(key, false, at_ms);
        }
        self.queue_bound(at_ms, key, &min_queued, min_live);
        if !duplicate && min_waiting != usize::MAX && min_waiting >= self.spec.unsynced_max {
            let detail = format!(
                "{key} was stored while at least {min_waiting} publishes waited for their answer (bound {}): it should have been refused as TooManyUnsyncedPublishes",
                self.spec.unsynced_max
            );
            self.violation(Violation::safety("queue-bound", detail, at_ms));
        }
        let scope = self.order_scope(key);
        for client in entitled {
            self.enqueue(&client, key);
            let pair = self.pair_mut(&client, key);
            let (processed, attempted) = (pair.processed, pair.attempted);
            if processed == 0 {
                self.open(key, true, at_ms);
            }
            if !attempted && let Some(topic) = &topic {
                self.unattempted
                    .entry(client)
                    .or_default()
                    .insert((scope, create_time, msg_id), topic.clone());
            }
        }
    }

    /// Whether `client` may receive a message of `topic` stored at one of
    /// `receipts`: some subscription request received before a receipt and
    /// live (or in its grace) on the broker's clock at that receipt.
    fn entitled(&self, client: &ClientId, topic: &Topic, receipts: &[(u64, Time)]) -> bool {
        let Some(sub) = self.subs.get(topic).and_then(|subs| subs.get(client)) else {
            return false;
        };
        sub.requests.iter().any(|&(seq, _, expire)| {
            receipts
                .iter()
                .any(|&(r_seq, now)| seq < r_seq && expire.plus(self.spec.grace) > now)
        })
    }

    fn callback_sent(&mut self, at_ms: u64, cb: &sagamq::broker::Callback, now: Time) {
        let client = &cb.client;
        let message = &cb.message;
        let key = message.key();
        match self.last_callback_ms.get_mut(client) {
            Some(last) => *last = at_ms,
            None => {
                self.last_callback_ms.insert(client.clone(), at_ms);
            }
        }
        self.window(at_ms, cb, now);
        let redrives = self.pair(client, &key).map_or(0, |p| p.redrives);
        self.deliveries
            .insert(cb.delivery, (client.clone(), key.clone(), self.incarnation, redrives));
        let mut found = Vec::new();
        let Some(ks) = self.keys.get(&key) else {
            self.account.unexpected += 1;
            let detail = format!("{client} got {key} ({}) which nobody published", message.msg_id);
            self.violation(Violation::safety("fidelity", detail, at_ms));
            return;
        };
        if let Some(ack) = &ks.ack
            && ack.msg_id != message.msg_id
        {
            let detail = format!(
                "{key} acknowledged as {} but delivered as {}",
                ack.msg_id, message.msg_id
            );
            found.push(Violation::safety("dedup", detail, at_ms));
        }
        match self.msg_keys.get(&message.msg_id) {
            Some(other) if *other != key => {
                let detail = format!(
                    "message id {} delivered for {key} but it answers {other}",
                    message.msg_id
                );
                found.push(Violation::safety("dedup", detail, at_ms));
            }
            Some(_) => {}
            None => {
                self.msg_keys.insert(message.msg_id, key.clone());
            }
        }
        let faithful =
            ks.versions.iter().any(|p| same_message(p, message)) && ks.delivered.as_ref().is_none_or(|d| d == message);
        if !faithful {
            let published = ks
                .versions
                .first()
                .map(|p| format!("{} {:?} from {}", p.topic, p.content, p.sender_id));
            let detail = format!(
                "{client} got {key} as {} {:?} from {} (create time {}) but it was published as {}",
                message.topic,
                message.content,
                message.sender_id,
                message.create_time,
                published.unwrap_or_default()
            );
            found.push(Violation::safety("fidelity", detail, at_ms));
        }
        if !self.entitled(client, &message.topic, &ks.receipts) {
            self.account.unexpected += 1;
            let detail = format!(
                "{client} got {key} on topic {} but had no live subscription to it when the message was stored",
                message.topic
            );
            found.push(Violation::safety("entitlement", detail, at_ms));
        }
        if ks.delivered.is_none() {
            let m = message.clone();
            self.keys.get_mut(&key).expect("present").delivered = Some(m);
        }
        let incarnation = self.incarnation;
        let floor = |n: u32| self.backoff_floor(n);
        let floor = floor(cb.attempt.saturating_sub(1));
        let attempts_max = self.spec.attempts_max;
        let pair = self.pair_mut(client, &key);
        pair.attempts += 1;
        let may_be_dead = pair.attempts >= attempts_max;
        let judged = pair.last_sent.is_some_and(|(inc, redrives, attempt, _)| {
            inc == incarnation && redrives == pair.redrives && cb.attempt == attempt + 1
        });
        if let Some(v) = retry_violation(pair, cb, now, incarnation, floor, at_ms) {
            found.push(v);
        }
        pair.last_sent = Some((incarnation, pair.redrives, cb.attempt, now));
        if pair.acked_in == Some(incarnation) {
            let detail = format!(
                "{client} got {key} again after the broker had received its 2xx, with no broker crash or redrive in between"
            );
            found.push(Violation::safety("redelivery", detail, at_ms));
        }
        let first = !pair.attempted;
        pair.attempted = true;
        for v in found {
            self.violation(v);
        }
        if may_be_dead {
            self.dequeue(client, &key);
        }
        if judged {
            self.covered("retry_backoff_judged");
        }
        if first {
            self.first_attempt(at_ms, client, message, now);
        }
    }

    /// The broker got an answer to `delivery`: its window slot is free (with
    /// every attempt of its message, on a 2xx), and a 2xx settles the message
    /// for its subscriber in this incarnation.
    fn answer_received(&mut self, delivery: sagamq::broker::DeliveryId, ok: bool) {
        let Some((client, key, inc, redrives)) = self.deliveries.get(&delivery).cloned() else {
            return;
        };
        if let Some(flying) = self.in_flight.get_mut(&client) {
            flying.retain(|f| f.0 != delivery && !(ok && f.1 == key));
        }
        if !ok {
            return;
        }
        self.dequeue(&client, &key);
        if inc == self.incarnation {
            let pair = self.pair_mut(&client, &key);
            if pair.redrives == redrives {
                pair.acked_in = Some(inc);
            }
        }
    }

    /// The queue bound: a message stored for a subscriber that already had
    /// `pending_max` messages queued should have been refused (`QueueFull`).
    /// Likewise with `messages_max` messages live (`TooManyMessages`).
    fn queue_bound(&mut self, at_ms: u64, key: &MessageKey, min_queued: &[(ClientId, usize)], min_live: usize) {
        let max = self.spec.pending_max;
        if min_queued.iter().any(|(_, n)| *n + 1 == max) {
            self.covered("queue_filled");
        }
        if let Some((client, n)) = min_queued.iter().find(|(_, n)| *n >= max) {
            let detail = format!(
                "{key} was stored while {client} had at least {n} messages queued (bound {max}): it should have been refused as QueueFull"
            );
            self.violation(Violation::safety("queue-bound", detail, at_ms));
        }
        let max = self.spec.messages_max;
        if min_live != usize::MAX && min_live >= max {
            let detail = format!(
                "{key} was stored while at least {min_live} messages were live (bound {max}): it should have been refused as TooManyMessages"
            );
            self.violation(Violation::safety("queue-bound", detail, at_ms));
        }
    }

    /// `client`'s queue certainly holds `key` now: stored with `client` owed,
    /// not processed, and too few attempts to be a dead letter.
    fn enqueue(&mut self, client: &ClientId, key: &MessageKey) {
        let attempts_max = self.spec.attempts_max;
        let pair = self.pair_mut(client, key);
        if pair.processed > 0 || pair.attempts >= attempts_max || pair.queued {
            return;
        }
        pair.queued = true;
        *self.queued.entry(client.clone()).or_default() += 1;
        if let Some(ks) = self.keys.get_mut(key) {
            ks.queued_for += 1;
            if ks.queued_for == 1 {
                self.live += 1;
            }
        }
    }

    /// `client`'s queue no longer certainly holds `key` (answered, processed
    /// or possibly dead-lettered).
    fn dequeue(&mut self, client: &ClientId, key: &MessageKey) {
        if let Some(pair) = self.pairs.get_mut(client).and_then(|keys| keys.get_mut(key))
            && pair.queued
        {
            pair.queued = false;
            if let Some(n) = self.queued.get_mut(client) {
                *n = n.saturating_sub(1);
            }
            if let Some(ks) = self.keys.get_mut(key) {
                ks.queued_for = ks.queued_for.saturating_sub(1);
                if ks.queued_for == 0 {
                    self.live = self.live.saturating_sub(1);
                }
            }
        }
    }

    /// The window bound: a callback leaves only while fewer than
    /// `inflight_max` attempts to the same subscriber are outstanding.
    fn window(&mut self, at_ms: u64, cb: &sagamq::broker::Callback, now: Time) {
        let incarnation = self.incarnation;
        let flying = match self.in_flight.get_mut(&cb.client) {
            Some(f) => f,
            None => self.in_flight.entry(cb.client.clone()).or_default(),
        };
        // A new attempt of a message also ends its earlier one: the broker
        // retries only after a failure or a deadline.
        let key = cb.message.key();
        flying.retain(|(_, k, inc, deadline)| *inc == incarnation && *deadline > now && *k != key);
        let outstanding = flying.len();
        let deadline = now.plus(self.spec.callback_timeout);
        flying.push((cb.delivery, key, incarnation, deadline));
        if outstanding + 1 == self.spec.inflight_max {
            self.covered("window_filled");
        }
        if outstanding >= self.spec.inflight_max {
            let detail = format!(
                "{} got attempt {} of message {} while {outstanding} earlier attempts were still outstanding (window {})",
                cb.client, cb.attempt, cb.message.msg_id, self.spec.inflight_max
            );
            self.violation(Violation::safety("window", detail, at_ms));
        }
    }

    /// The least wait the broker owes after the `n`-th failed attempt of a
    /// callback (see [`Spec::backoff_initial`]).
    fn backoff_floor(&self, n: u32) -> Duration {
        let full = self
            .spec
            .backoff_initial
            .saturating_mul(1u32 << n.saturating_sub(1).min(31))
            .min(self.spec.backoff_max);
        full - full / 2
    }

    /// Per subscriber, first attempts follow `(CreateTime, MsgID)` among the
    /// messages stored for it, never attempted, whose subscription is live.
    fn first_attempt(&mut self, at_ms: u64, client: &ClientId, message: &Message, now: Time) {
        let scope = self.order_scope(&message.key());
        let this = (scope, message.create_time, message.msg_id);
        let Some(waiting) = self.unattempted.get_mut(client) else {
            return;
        };
        waiting.remove(&this);
        let earlier: Vec<((u32, i64, MsgId), Topic)> = waiting
            .range((scope, i64::MIN, MsgId(0))..this)
            .map(|(k, tp)| (*k, tp.clone()))
            .take(64)
            .collect();
        for ((_, ct, id), topic) in earlier {
            let live = self
                .subs
                .get(&topic)
                .and_then(|subs| subs.get(client))
                .and_then(|s| s.until)
                .is_some_and(|u| now < u);
            if live {
                self.account.out_of_order += 1;
                let detail = format!(
                    "{client} got its first attempt of {} (create time {}) while {id} (create time {ct}, topic {topic}) was stored for it earlier and never attempted",
                    message.msg_id, message.create_time
                );
                self.violation(Violation::safety("delivery-order", detail, at_ms));
                return;
            }
        }
    }

    fn processed(&mut self, at_ms: u64, node: usize, client: &ClientId, key: &MessageKey) {
        self.dequeue(client, key);
        if self.client_nodes.get(client) != Some(&node) {
            self.client_nodes.insert(client.clone(), node);
        }
        let pair = self.pair_mut(client, key);
        pair.processed += 1;
        let first = pair.processed == 1;
        if !first {
            self.account.duplicated += 1;
            self.covered("redelivered");
            return;
        }
        let owed = self
            .keys
            .get(key)
            .and_then(|ks| ks.ack.as_ref())
            .is_some_and(|a| a.entitled.contains(client));
        if owed {
            self.open(key, false, at_ms);
        }
        if node != ORDER {
            return;
        }
        let Some(message) = self.keys.get(key).and_then(|ks| ks.delivered.clone()) else {
            return;
        };
        let story = self.story(key);
        match message.topic.as_str() {
            t::STOCK_OUTBOUND => story.heard_stock = story.heard_stock.or(yes_no(&message.content)),
            t::PAYMENT_RESULT => story.heard_payment = story.heard_payment.or(yes_no(&message.content)),
            t::STOCK_RELEASED => story.heard_released = true,
            t::PAYMENT_CANCELLED => story.heard_cancelled = true,
            _ => {}
        }
    }

    /// Redriven messages start a new attempt budget and may be delivered again.
    fn redriven(&mut self, client: &ClientId, moved: &[MsgId]) {
        for msg_id in moved {
            let Some(key) = self.msg_keys.get(msg_id).cloned() else {
                continue;
            };
            let pair = self.pair_mut(client, &key);
            pair.attempts = 0;
            pair.acked_in = None;
            pair.redrives += 1;
            self.covered("dead_letter");
        }
    }

    fn judge_dead_letters(&mut self, at_ms: u64, client: &ClientId, dead: &[MsgId]) {
        for msg_id in dead {
            let Some(key) = self.msg_keys.get(msg_id).cloned() else {
                continue;
            };
            let attempts = self.pair(client, &key).map_or(0, |p| p.attempts);
            if attempts < self.spec.attempts_max {
                let detail = format!(
                    "{key} ({msg_id}) is a dead letter of {client} after {attempts} attempts on the wire; the budget is {}",
                    self.spec.attempts_max
                );
                self.violation(Violation::safety("dead-letter", detail, at_ms));
            }
        }
    }

    /// Called on a steady tick: a subscriber with queued messages must get an
    /// attempt within one callback timeout plus the backoff cap, unless one of
    /// its subscriptions has lapsed (delivery paused until it renews).
    pub fn progress(&mut self, at_ms: u64, broker: &BrokerSnapshot) {
        // A node takes in about one message per simulated millisecond (the
        // transport's receive gap), so with N messages queued the broker may
        // legitimately take N ms more to come round to any one subscriber.
        let load_ms = broker.queued.values().map(|n| *n as u64).sum::<u64>();
        let gap_max = u64::try_from(self.spec.dispatch_gap_max.as_millis()).unwrap_or(u64::MAX) + STALL_MS + load_ms;
        let mut stalled = None;
        self.waiting_since_ms
            .retain(|c, _| broker.queued.get(c).is_some_and(|n| *n > 0));
        if broker.backlog > 0 {
            // Saturated: the clock of every wait restarts once the inbox drains.
            for (client, n) in &broker.queued {
                if *n > 0 {
                    self.waiting_since_ms.insert(client.clone(), at_ms);
                }
            }
            return;
        }
        for (client, queued) in &broker.queued {
            if *queued == 0 {
                continue;
            }
            let paused = self
                .subs
                .values()
                .filter_map(|subs| subs.get(client))
                .any(|s| s.until.is_none_or(|u| broker.now >= u));
            if paused {
                self.waiting_since_ms.insert(client.clone(), at_ms);
                *self.coverage.entry("delivery_paused").or_default() += 1;
                continue;
            }
            let waiting = *self.waiting_since_ms.entry(client.clone()).or_insert(at_ms);
            let last = self.last_callback_ms.get(client).copied().unwrap_or(0);
            let since = last.max(waiting).max(self.broker_boot_ms);
            if at_ms.saturating_sub(since) > gap_max && stalled.is_none() {
                stalled = Some(format!(
                    "{client} has {queued} messages queued but the broker sent it no callback for {}ms (callback timeout + backoff cap + 100 ms + 1 ms per queued message = {gap_max}ms)",
                    at_ms - since,
                ));
            }
        }
        if let Some(detail) = stalled {
            self.violation(Violation::liveness("progress", detail, at_ms));
        }
    }

    /// Effects at most once and of the right thing, conservation and outcome
    /// consistency, judged on the current states.
    pub fn safety(&mut self, snap: &Snapshot<'_>) {
        let at_ms = snap.at_ms;
        let mut held_orders = BTreeSet::new();
        let mut charged_orders = BTreeSet::new();
        let mut found = Vec::new();
        for (_, v) in &snap.views {
            match v {
                View::Stock {
                    initial,
                    level,
                    orders,
                    reported_held,
                } => {
                    for (id, e) in orders {
                        let facts = self.spec.orders.get(id);
                        let quantity = facts.map_or(0, |f| f.quantity);
                        if let Some(f) = facts
                            && f.product != e.product
                        {
                            found.push(Violation::safety(
                                "effects-at-most-once",
                                format!(
                                    "order {id}: stock took {} of {} but the order is for {}",
                                    e.deducted, e.product, f.product
                                ),
                                at_ms,
                            ));
                        }
                        if let Some(wrong) = at_most_once(e.deducted, quantity, e.restocked) {
                            let detail = format!(
                                "order {id}: stock deducted {} and restocked {} units of {} for an order of {quantity} ({wrong})",
                                e.deducted, e.restocked, e.product
                            );
                            found.push(Violation::safety("effects-at-most-once", detail, at_ms));
                        }
                    }
                    for (product, start) in initial {
                        let now = level.get(product).copied().unwrap_or(0);
                        let out: u64 = orders
                            .values()
                            .filter(|e| &e.product == product)
                            .map(StockEffects::held)
                            .sum();
                        if let Some(reported) = reported_held.as_ref().map(|r| r.get(product).copied().unwrap_or(0))
                            && reported != out
                        {
                            let detail = format!(
                                "stock reports {reported} units of {product} held, its orders' effects hold {out}"
                            );
                            found.push(Violation::safety("conservation", detail, at_ms));
                        }
                        if now + out != *start {
                            let detail = format!(
                                "stock of {product}: initial {start} != level {now} + held {out} (an effect was lost or invented)"
                            );
                            found.push(Violation::safety("conservation", detail, at_ms));
                        }
                    }
                    held_orders.extend(orders.iter().filter(|(_, e)| e.held() > 0).map(|(id, _)| id.clone()));
                }
                View::Payment {
                    initial,
                    balance,
                    orders,
                    reported_held,
                } => {
                    for (id, e) in orders {
                        let facts = self.spec.orders.get(id);
                        let amount = facts.map_or(0, |f| f.amount);
                        if let Some(f) = facts
                            && f.customer != e.customer
                        {
                            found.push(Violation::safety(
                                "effects-at-most-once",
                                format!(
                                    "order {id}: payment charged {} but the order is {}'s",
                                    e.customer, f.customer
                                ),
                                at_ms,
                            ));
                        }
                        if let Some(wrong) = at_most_once(e.charged, amount, e.refunded) {
                            let detail = format!(
                                "order {id}: payment charged {} and refunded {} to {} for an order of {amount} ({wrong})",
                                e.charged, e.refunded, e.customer
                            );
                            found.push(Violation::safety("effects-at-most-once", detail, at_ms));
                        }
                    }
                    for (customer, start) in initial {
                        let now = balance.get(customer).copied().unwrap_or(0);
                        let out: u64 = orders
                            .values()
                            .filter(|e| &e.customer == customer)
                            .map(PaymentEffects::held)
                            .sum();
                        if let Some(reported) = reported_held.as_ref().map(|r| r.get(customer).copied().unwrap_or(0))
                            && reported != out
                        {
                            let detail = format!(
                                "payment reports {reported} of {customer}'s money held, its orders' effects hold {out}"
                            );
                            found.push(Violation::safety("conservation", detail, at_ms));
                        }
                        if now + out != *start {
                            let detail = format!(
                                "balance of {customer}: initial {start} != balance {now} + charged {out} (an effect was lost or invented)"
                            );
                            found.push(Violation::safety("conservation", detail, at_ms));
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
                    found.push(Violation::safety("custom-invariant", detail, at_ms));
                }
                View::Order { .. } | View::Custom { .. } => {}
            }
        }
        let stock_up = snap.views.iter().any(|(n, _)| *n == STOCK);
        let payment_up = snap.views.iter().any(|(n, _)| *n == PAYMENT);
        for (_, v) in &snap.views {
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
                    found.push(Violation::safety("saga-outcome", detail, at_ms));
                }
            }
        }
        for v in found {
            self.violation(v);
        }
    }

    /// What is still unfinished (empty when quiescent), for the liveness report.
    fn unsettled(&self, snap: &Snapshot<'_>, orders_expected: u64) -> Vec<String> {
        let mut out: Vec<String> = snap
            .down
            .iter()
            .map(|n| format!("{} is down", node_name(&self.client_nodes, *n)))
            .collect();
        if let Some(b) = &snap.broker {
            for (client, n) in &b.queued {
                if *n > 0 {
                    out.push(format!("broker still has {n} undelivered for {client}"));
                }
            }
        }
        for n in &snap.unsettled {
            out.push(format!(
                "{} has unacknowledged outbox entries or reports unfinished work",
                node_name(&self.client_nodes, *n)
            ));
        }
        for (_, v) in &snap.views {
            if let View::Order { orders } = v {
                let open: Vec<_> = orders
                    .iter()
                    .filter(|(_, (ph, _))| *ph == OrderPhase::InProgress)
                    .map(|(id, _)| id)
                    .collect();
                if !open.is_empty() {
                    out.push(format!("{} orders not terminal (first: {})", open.len(), open[0]));
                }
                if (orders.len() as u64) < orders_expected {
                    out.push(format!("only {} of {} orders created", orders.len(), orders_expected));
                }
            }
        }
        if snap.workload_waiting {
            out.push("workload still waiting for create-order answers".to_string());
        }
        out
    }

    /// Everything settled: all orders terminal, no delivery pending anywhere.
    pub fn quiescent(&mut self, snap: &Snapshot<'_>) -> bool {
        let quiet = self.unsettled(snap, self.spec.orders.len() as u64).is_empty();
        if quiet && self.quiescent_ms.is_none() && self.healed_ms.is_some() {
            self.quiescent_ms = Some(snap.at_ms);
        }
        quiet
    }

    /// Called once the run is over (quiescent, or the liveness bound passed).
    pub fn liveness(&mut self, snap: &Snapshot<'_>) {
        let at_ms = snap.at_ms;
        let unsettled = self.unsettled(snap, self.spec.orders.len() as u64);
        if !unsettled.is_empty() {
            let detail = format!("not settled {at_ms}ms into the run: {}", unsettled.join("; "));
            self.violation(Violation::liveness("liveness", detail, at_ms));
            return;
        }
        let Some(broker) = &snap.broker else {
            return;
        };
        // Quiescent: every acknowledged publish reached each entitled subscriber.
        let mut found = Vec::new();
        for (key, ks) in &self.keys {
            let Some(ack) = &ks.ack else { continue };
            for client in &ack.entitled {
                if self.pair(client, key).is_some_and(|p| p.processed > 0) {
                    continue;
                }
                let dead = broker.dead.get(client).is_some_and(|d| d.contains(&ack.msg_id));
                if !dead {
                    self.account.lost += 1;
                    let topic = ks.versions.first().map(|p| p.topic.to_string()).unwrap_or_default();
                    let detail = format!(
                        "{key} ({}, topic {topic}) was acknowledged but {client} never processed it and it is not a dead letter",
                        ack.msg_id
                    );
                    found.push(Violation::safety("no-lost-publish", detail, at_ms));
                }
            }
        }
        if let Some(key) = self.unacked.first() {
            let detail = format!("{key} was committed by a participant but the broker never acknowledged it");
            found.push(Violation::liveness("no-lost-request", detail, at_ms));
        }
        // Every 2xx a participant gave is still reflected in its state.
        for (client, key, pair) in self.all_pairs() {
            if pair.processed == 0 {
                continue;
            }
            let (Some(&node), Some(message)) = (
                self.client_nodes.get(client),
                self.keys.get(key).and_then(|k| k.delivered.as_ref()),
            ) else {
                continue;
            };
            if (snap.reflects)(node, message) == Some(false) {
                let recorded = snap.recorded.and_then(|f| f(node, key));
                let why = match recorded {
                    Some(true) => {
                        "its log records the effect, yet deciding the message again (on_message on its final state) would commit another change: the logic is not idempotent for it, and a redelivery the inbox has forgotten would apply it twice"
                    }
                    Some(false) => "no record in its log consumed it: the effect was lost after the acknowledgement",
                    None => {
                        "deciding it again would change its state (the effect was lost after the acknowledgement, or the logic is not idempotent)"
                    }
                };
                let detail = format!(
                    "{client} answered 2xx for {key} ({}, topic {}) but its state does not reflect it: {why}",
                    message.msg_id, message.topic
                );
                found.push(Violation::safety("no-lost-effect", detail, at_ms));
            }
        }
        if let Some(v) = self.lost_reply(at_ms) {
            found.push(v);
        }
        found.extend(self.outcomes_justified(snap));
        for v in found {
            self.violation(v);
        }
        let dead: Vec<(ClientId, Vec<MsgId>)> = broker.dead.iter().map(|(c, d)| (c.clone(), d.clone())).collect();
        for (client, d) in dead {
            self.judge_dead_letters(at_ms, &client, &d);
        }
    }

    /// Each terminal order is explained by what it heard.
    fn outcomes_justified(&self, snap: &Snapshot<'_>) -> Vec<Violation> {
        let mut out = Vec::new();
        for (node, v) in &snap.views {
            let View::Order { orders } = v else { continue };
            if *node != ORDER {
                continue;
            }
            for (id, (phase, state)) in orders {
                let s = self.stories.get(id.as_str());
                let heard_stock = s.and_then(|s| s.heard_stock);
                let heard_payment = s.and_then(|s| s.heard_payment);
                let why = match phase {
                    OrderPhase::InProgress => None,
                    OrderPhase::StockOutboundFailed => {
                        (heard_stock != Some(false)).then_some("never heard a refusal from stock")
                    }
                    OrderPhase::StockOutboundDone => {
                        (heard_stock != Some(true)).then_some("never heard a deduction from stock")
                    }
                    OrderPhase::Completed => {
                        (heard_payment != Some(true)).then_some("never heard a charge from payment")
                    }
                    OrderPhase::Compensated => {
                        let s = s.expect("a compensated order published");
                        if !s.compensating {
                            Some("never published a compensation")
                        } else if !s.heard_released {
                            Some("never heard stock confirm the release")
                        } else if s.payment_requested && s.heard_payment != Some(false) && !s.heard_cancelled {
                            Some("asked for payment but never heard payment confirm the cancel")
                        } else {
                            None
                        }
                    }
                };
                if let Some(why) = why {
                    let detail = format!("order {id} is {state} but {why}");
                    out.push(Violation::safety("saga-outcome", detail, snap.at_ms));
                }
            }
        }
        out
    }

    /// The first request stock or payment answered 2xx whose reply was never
    /// published (acknowledged by the broker), if any.
    fn lost_reply(&self, at_ms: u64) -> Option<Violation> {
        const REPLIES: [(&str, &str, &str); 4] = [
            (t::STOCK_SERVICE, t::SALE_ORDER_CREATED, t::STOCK_OUTBOUND),
            (t::STOCK_SERVICE, t::STOCK_RELEASE, t::STOCK_RELEASED),
            (t::PAYMENT_SERVICE, t::PAYMENT_REQUESTED, t::PAYMENT_RESULT),
            (t::PAYMENT_SERVICE, t::PAYMENT_CANCEL, t::PAYMENT_CANCELLED),
        ];
        let published: BTreeSet<(&str, &str)> = self
            .keys
            .iter()
            .filter(|(_, ks)| ks.ack.is_some())
            .filter_map(|(key, ks)| Some((key.global_id.as_str(), ks.versions.first()?.topic.as_str())))
            .collect();
        self.all_pairs().find_map(|(client, key, pair)| {
            if pair.processed == 0 {
                return None;
            }
            let message = self.keys.get(key)?.delivered.as_ref()?;
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

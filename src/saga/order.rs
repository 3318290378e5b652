//! The order participant: the saga's state machine (choreography).
//!
//! `seed` flow: `Pending` -> `StockOutboundDone` | `StockOutboundFailed`.
//! `saga` flow: `Pending` -> `StockOutboundDone` (payment requested) ->
//! `Completed`, or -> `Compensating` (payment refused: release the stock) ->
//! `Compensated`. In both flows an order still `Pending` (or, in the saga
//! flow, waiting for payment) at its deadline cancels: it publishes a stock
//! release (and a payment cancel if it asked for payment) and ends
//! `Compensated` once every compensation is confirmed. A compensation not
//! confirmed in time is re-sent under a new SubID (`<order>.release.2`, ...):
//! a lost or dead-lettered compensation or confirmation must not leave an
//! order compensating forever.
//!
//! ## Re-sending compensations without feeding the delay
//!
//! A copy the broker acknowledged is stored and will be delivered (or
//! dead-lettered, which an operator may redrive): re-sending it only helps if
//! it is *gone*, never if it is merely *slow*, and every useless copy joins the
//! queue whose delay made it look lost. With a fixed re-send interval (the
//! order deadline, doubling, capped at 8x) that is congestion collapse:
//! `saga:1000` seed 16 re-sent about 300 releases per second for 40 s after
//! healing (6,361 re-sent copies for 955 compensations), and `saga:2000`
//! failed 27 of 50 seeds with thousands of copies still queued. Two rules:
//!
//! 1. **The interval follows the observed delay.** Send `n` is re-sent after
//!    `max(deadline, 2 x the slowest recent confirmation delay) x 2^(n-1)`,
//!    the doubling capped at 8x. Stock and payment echo the attempt in their
//!    confirmation's SubID, so a confirmation of the first or the latest send
//!    measures that send's delay exactly (one in between is no sample: Karn's
//!    rule); the last 64 samples per queue are kept. The due time is checked
//!    again when it comes, with the samples of then, and postponed if the
//!    delay grew. If unconfirmed compensations are `C` and the queue that
//!    carries them drains `mu` per second, the queue holds at least `C`
//!    messages and delays them about `D = C / mu`; one re-send per
//!    compensation per `2D` adds at most `C / 2D = mu / 2`: re-sends take at
//!    most half of the drain, so the queue still shrinks. (That holds once the
//!    samples track the queue; while they lag behind a growing queue, rule 2
//!    bounds the re-sends.)
//! 2. **At most 32 compensations are being re-sent at once**
//!    ([`COMPENSATIONS_RESENDING_MAX`], a congestion window). Rule 1 needs
//!    samples, and under a burst none has arrived yet (in `saga:2000` seed 2
//!    the first confirmation came 30 s after the first release), so an
//!    overdue compensation beyond the window waits, without a timer, until
//!    one in the window is confirmed, then goes out at once (longest waiting
//!    first). Re-sent copies in the queues are therefore at most 32 per
//!    interval, whatever the load; since a window slot frees only on a
//!    confirmation, a window full of copies that are merely slow sends
//!    nothing more.
//!
//! Dead letters still heal: a compensation whose copy was dead-lettered is
//! re-sent once due and given a place in the window, which turns over at the
//! rate confirmations arrive (after healing, one confirmation delay).
//!
//! Measured (`sagamq-sim run --seeds A..B --scenario saga:N --json`, before ->
//! after): `saga:1000` seeds 0..20 fail 1 -> 0 (seed 16), 6.1 -> 3.1
//! deliveries per order, 479 -> 230 s simulated; seed 16 re-sends 6,361
//! compensation copies (for 955 compensations, ~300 per second until the
//! verdict at 64 s) -> 72, none after 6 s, settled at 14.9 s. `saga:2000` seeds
//! 0..50 fail 27 -> 1 with these rules alone (seed 18, where the simulator's
//! workload flooded the order service with create-order calls; its retry now
//! backs off too, and all 50 pass); seed 2 re-sends 5,904 copies -> 64 and
//! settles at 28 s. `saga` (20 orders, seeds 0..2000) and `saga:100` are
//! unchanged (3.6 and 2.55 deliveries per order).
//!
//! **Invariants:** an order is created by a durable command before anything is
//! published for it; each order takes each transition at most once; a
//! `Compensated` order has had every effect it may have caused undone (stock
//! released; payment cancelled whenever payment was requested).

use super::content::{ORDER_ID_LEN_MAX, OrderBody, PaymentBody, attempt_of, attempt_sub_id, step, sub_id, to_json};
use super::ids::{CustomerId, ProductId};
use super::participant::{Decision, Outgoing, Participant};
use super::{Command, OrderSpec, topics};
use crate::types::{GlobalId, Message, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

/// Orders the order participant keeps; past it `CreateOrder` is refused.
pub const ORDERS_MAX: usize = 1_000_000;

/// Which saga the order participant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OrderFlow {
    /// Steps 1–3 (the Go seed): stock only.
    Seed,
    /// Stock, then payment, with compensation.
    Saga,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OrderStatus {
    Pending,
    /// Stock deducted. Terminal in the seed flow; waiting for payment in the saga flow.
    StockOutboundDone,
    /// Stock refused. Terminal.
    StockOutboundFailed,
    /// Paid. Terminal.
    Completed,
    /// Undoing its effects; waiting for the confirmations.
    Compensating,
    /// Every effect undone. Terminal.
    Compensated,
}

impl OrderStatus {
    pub fn is_terminal(self, flow: OrderFlow) -> bool {
        match self {
            OrderStatus::StockOutboundDone => flow == OrderFlow::Seed,
            OrderStatus::StockOutboundFailed | OrderStatus::Completed | OrderStatus::Compensated => true,
            OrderStatus::Pending | OrderStatus::Compensating => false,
        }
    }
}

impl OrderStatus {
    /// The status's name, as `Display` writes it (cheap: checkers read every order often).
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "Pending",
            OrderStatus::StockOutboundDone => "StockOutboundDone",
            OrderStatus::StockOutboundFailed => "StockOutboundFailed",
            OrderStatus::Completed => "Completed",
            OrderStatus::Compensating => "Compensating",
            OrderStatus::Compensated => "Compensated",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompensationReason {
    PaymentRefused,
    /// Heard nothing conclusive within the order's deadline.
    Deadline,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    pub reason: CompensationReason,
    pub release_confirmed: bool,
    /// `None`: no payment cancel needed; `Some(confirmed)` otherwise.
    pub payment_cancel_confirmed: Option<bool>,
    /// Sends so far of the unconfirmed compensations (1: the first).
    pub attempt: u32,
    /// When send 1 and send `attempt` were committed: a confirmation that
    /// names one of them (by its SubID) measures the confirmation delay.
    #[serde(default)]
    pub first_sent_at: Time,
    #[serde(default)]
    pub sent_at: Time,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub customer: CustomerId,
    pub product: ProductId,
    pub quantity: u64,
    pub price: u64,
    pub amount: u64,
    pub status: OrderStatus,
    pub created_at: Time,
    /// While waiting: cancel at this time. While compensating: re-send the
    /// unconfirmed compensations at this time. `None` once terminal.
    pub deadline: Option<Time>,
    pub payment_requested: bool,
    pub compensation: Option<Compensation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderChange {
    Created {
        order: GlobalId,
        customer: CustomerId,
        product: ProductId,
        quantity: u64,
        price: u64,
        amount: u64,
        at: Time,
        deadline: Option<Time>,
    },
    StockAnswered {
        order: GlobalId,
        ok: bool,
    },
    PaymentAnswered {
        order: GlobalId,
        ok: bool,
        /// Refused: when to re-send the release if it is not confirmed by then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resend_at: Option<Time>,
        /// Refused: when the release was first sent (now).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Time>,
    },
    TimedOut {
        order: GlobalId,
        resend_at: Time,
        /// When the compensations were first sent.
        #[serde(default)]
        at: Time,
    },
    /// The unconfirmed compensations went out again as send `attempt` at `at`.
    CompensationResent {
        order: GlobalId,
        attempt: u32,
        next_at: Time,
        #[serde(default)]
        at: Time,
    },
    /// The re-send due now waits until `until`: confirmations were observed
    /// to take longer since it was scheduled (see the module doc).
    ResendPostponed {
        order: GlobalId,
        until: Time,
    },
    /// The re-send due now waits for a place among the compensations being
    /// re-sent ([`COMPENSATIONS_RESENDING_MAX`]).
    ResendQueued {
        order: GlobalId,
    },
    ReleaseConfirmed {
        order: GlobalId,
        /// How long the confirmed send took to be confirmed (nanoseconds), when
        /// the confirmation names the first or the latest send (unambiguous).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay_ns: Option<u64>,
    },
    PaymentCancelConfirmed {
        order: GlobalId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay_ns: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    flow: OrderFlow,
    /// How long an order may wait for stock and payment before it cancels.
    deadline_after: Option<Duration>,
    /// How long a compensation may go unconfirmed before it is re-sent (doubling).
    resend_after: Duration,
    orders: BTreeMap<GlobalId, OrderState>,
    /// Index of `OrderState::deadline` for `next_deadline` (derived in `apply`).
    deadlines: BTreeSet<(Time, GlobalId)>,
    /// The most recent confirmation delays of releases and of payment cancels
    /// (each queue has its own delay), at most [`CONFIRMATION_DELAYS_KEPT`]
    /// each (derived in `apply` from the confirmations' changes).
    delays_release: VecDeque<Duration>,
    delays_cancel: VecDeque<Duration>,
    /// Compensating orders with a re-sent copy outstanding (derived), at most
    /// [`COMPENSATIONS_RESENDING_MAX`].
    resending: BTreeSet<GlobalId>,
    /// Compensating orders whose re-send is due but waits for a place in
    /// `resending`, by due time (derived; their `deadline` is `None`).
    resend_waiting: BTreeSet<(Time, GlobalId)>,
    /// `resend_waiting` by order.
    resend_waiting_due: BTreeMap<GlobalId, Time>,
    orders_max: usize,
}

/// Re-send interval of unconfirmed compensations when the order has no deadline.
pub const COMPENSATION_RESEND_DEFAULT: Duration = Duration::from_secs(10);
/// Re-send intervals double up to this multiple of the first.
const RESEND_BACKOFF_FACTOR_MAX: u32 = 8;
/// A re-send waits at least this multiple of the slowest recent confirmation delay.
pub const RESEND_DELAY_FACTOR: u32 = 2;
/// Confirmation delays remembered for the re-send interval (the most recent).
pub const CONFIRMATION_DELAYS_KEPT: usize = 64;
/// Compensations being re-sent at once (a congestion window for re-sends): an
/// overdue compensation past it waits until one of them is confirmed.
pub const COMPENSATIONS_RESENDING_MAX: usize = 32;

impl Order {
    /// `deadline_after`: how long an order may wait before it cancels (None:
    /// forever). Unconfirmed compensations are re-sent after the same interval
    /// (or [`COMPENSATION_RESEND_DEFAULT`]), doubling per re-send.
    pub fn new(flow: OrderFlow, deadline_after: Option<Duration>) -> Order {
        Order {
            flow,
            deadline_after,
            // Never zero: a re-send due at once would be due again at once.
            resend_after: deadline_after
                .unwrap_or(COMPENSATION_RESEND_DEFAULT)
                .max(Duration::from_millis(1)),
            orders: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            delays_release: VecDeque::new(),
            delays_cancel: VecDeque::new(),
            resending: BTreeSet::new(),
            resend_waiting: BTreeSet::new(),
            resend_waiting_due: BTreeMap::new(),
            orders_max: ORDERS_MAX,
        }
    }

    /// The slowest of the recent confirmation delays, releases and payment
    /// cancels alike (zero before the first).
    pub fn confirmation_delay_slowest(&self) -> Duration {
        self.delays_release
            .iter()
            .chain(&self.delays_cancel)
            .max()
            .copied()
            .unwrap_or(Duration::ZERO)
    }

    /// How long send `attempt` of a compensation waits for its confirmation
    /// before it is re-sent: the larger of the configured interval and
    /// [`RESEND_DELAY_FACTOR`] times the slowest recent confirmation delay,
    /// doubling per send up to [`RESEND_BACKOFF_FACTOR_MAX`] times that.
    pub fn resend_interval(&self, attempt: u32) -> Duration {
        let factor = (1u32 << attempt.saturating_sub(1).min(16)).min(RESEND_BACKOFF_FACTOR_MAX);
        let observed = self.confirmation_delay_slowest().saturating_mul(RESEND_DELAY_FACTOR);
        self.resend_after.max(observed).saturating_mul(factor)
    }

    /// When send `attempt` of a compensation made at `sent` is re-sent if unconfirmed.
    fn resend_at(&self, sent: Time, attempt: u32) -> Time {
        sent.plus(self.resend_interval(attempt))
    }

    pub fn with_orders_max(mut self, orders_max: usize) -> Order {
        self.orders_max = orders_max;
        self
    }

    pub fn flow(&self) -> OrderFlow {
        self.flow
    }

    pub fn orders(&self) -> &BTreeMap<GlobalId, OrderState> {
        &self.orders
    }

    pub fn order(&self, order: &GlobalId) -> Option<&OrderState> {
        self.orders.get(order)
    }

    pub fn status(&self, order: &GlobalId) -> Option<OrderStatus> {
        self.orders.get(order).map(|o| o.status)
    }

    /// Whether every order reached a terminal state.
    pub fn all_terminal(&self) -> bool {
        self.orders.values().all(|o| o.status.is_terminal(self.flow))
    }

    /// Orders per status.
    pub fn counts(&self) -> BTreeMap<OrderStatus, usize> {
        let mut counts = BTreeMap::new();
        for o in self.orders.values() {
            *counts.entry(o.status).or_insert(0) += 1;
        }
        counts
    }

    fn body(order: &GlobalId, o: &OrderState) -> OrderBody {
        OrderBody {
            order_id: order.clone(),
            customer_id: o.customer.clone(),
            product_id: o.product.clone(),
            quantity: o.quantity,
            price: o.price,
            amount: o.amount,
        }
    }

    fn payment_body(order: &GlobalId, o: &OrderState) -> String {
        to_json(&PaymentBody {
            order_id: order.clone(),
            customer_id: o.customer.clone(),
            amount: o.amount,
        })
    }

    fn outgoing(topic: &str, order: &GlobalId, step: &str, content: String) -> Outgoing {
        Outgoing {
            topic: Topic::lit(topic),
            global_id: order.clone(),
            sub_id: sub_id(order, step),
            content,
        }
    }

    fn release(order: &GlobalId, o: &OrderState, attempt: u32) -> Outgoing {
        Outgoing {
            topic: Topic::lit(topics::STOCK_RELEASE),
            global_id: order.clone(),
            sub_id: attempt_sub_id(order, step::RELEASE, attempt),
            content: to_json(&Self::body(order, o)),
        }
    }

    fn payment_cancel(order: &GlobalId, o: &OrderState, attempt: u32) -> Outgoing {
        Outgoing {
            topic: Topic::lit(topics::PAYMENT_CANCEL),
            global_id: order.clone(),
            sub_id: attempt_sub_id(order, step::PAYMENT_CANCEL, attempt),
            content: Self::payment_body(order, o),
        }
    }

    fn create(&self, now: Time, spec: &OrderSpec) -> Decision<OrderChange> {
        let order = match GlobalId::new(spec.order_id.as_str()) {
            Ok(id) if spec.order_id.len() <= ORDER_ID_LEN_MAX => id,
            Ok(_) => return Decision::Refuse(format!("OrderID is longer than {ORDER_ID_LEN_MAX} bytes")),
            Err(e) => return Decision::Refuse(format!("OrderID: {e}")),
        };
        let customer = match CustomerId::new(spec.customer_id.as_str()) {
            Ok(id) => id,
            Err(e) => return Decision::Refuse(e.to_string()),
        };
        let product = match ProductId::new(spec.product_id.as_str()) {
            Ok(id) => id,
            Err(e) => return Decision::Refuse(e.to_string()),
        };
        if spec.quantity == 0 {
            return Decision::Refuse("Quantity must be positive".to_string());
        }
        let Some(amount) = spec.quantity.checked_mul(spec.price) else {
            return Decision::Refuse("Quantity * Price overflows".to_string());
        };
        if let Some(existing) = self.orders.get(&order) {
            let same = existing.customer == customer
                && existing.product == product
                && existing.quantity == spec.quantity
                && existing.price == spec.price;
            return if same {
                Decision::Ignore // the same command again: already committed
            } else {
                Decision::Refuse(format!("OrderID {order} is already used by a different order"))
            };
        }
        if self.orders.len() >= self.orders_max {
            return Decision::Refuse(format!("the order service keeps at most {} orders", self.orders_max));
        }
        let state = OrderState {
            customer: customer.clone(),
            product: product.clone(),
            quantity: spec.quantity,
            price: spec.price,
            amount,
            status: OrderStatus::Pending,
            created_at: now,
            deadline: None,
            payment_requested: false,
            compensation: None,
        };
        let created = Self::outgoing(
            topics::SALE_ORDER_CREATED,
            &order,
            step::CREATED,
            to_json(&Self::body(&order, &state)),
        );
        let change = OrderChange::Created {
            order,
            customer,
            product,
            quantity: spec.quantity,
            price: spec.price,
            amount,
            at: now,
            deadline: self.deadline_after.map(|d| now.plus(d)),
        };
        Decision::change_and_publish(change, created)
    }

    /// How long the send a confirmation answers took to be confirmed, if the
    /// confirmation's SubID names the first or the latest send (stock and
    /// payment echo the attempt: `<order>.released.3` answers
    /// `<order>.release.3`). A confirmation of a send in between is no sample,
    /// as in Karn's rule for TCP: its send time is not kept. A confirmation
    /// under a SubID without an attempt counts as answering the first send,
    /// which can only overstate the delay.
    fn confirmation_delay_ns(
        now: Time,
        order: &GlobalId,
        c: &Compensation,
        reply_step: &str,
        message: &Message,
    ) -> Option<u64> {
        let sent = match attempt_of(order, reply_step, &message.sub_id) {
            1 => c.first_sent_at,
            n if n == c.attempt => c.sent_at,
            _ => return None,
        };
        Some(now.0.saturating_sub(sent.0))
    }

    /// Bookkeeping once `order` is compensated (from `apply`): it leaves the
    /// re-send window or its queue; a place it frees in the window goes to the
    /// longest-waiting re-send, woken at its due time (past: at once).
    fn compensated(&mut self, order: &GlobalId) {
        if let Some(due) = self.resend_waiting_due.remove(order) {
            self.resend_waiting.remove(&(due, order.clone()));
        }
        if self.resending.remove(order)
            && let Some((due, next)) = self.resend_waiting.pop_first()
        {
            self.resend_waiting_due.remove(&next);
            let o = self.orders.get_mut(&next).expect("a waiting re-send of a known order");
            debug_assert_eq!(o.deadline, None);
            o.deadline = Some(due);
            self.deadlines.insert((due, next));
        }
    }

    /// `"1"` / `"0"` replies of stock and payment.
    fn yes_no(content: &str) -> Option<bool> {
        match content.trim() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }
    }

    fn on_stock_outbound(&self, order: &GlobalId, o: &OrderState, content: &str) -> Decision<OrderChange> {
        if o.status != OrderStatus::Pending {
            return Decision::Ignore; // late (after a deadline) or repeated
        }
        let Some(ok) = Self::yes_no(content) else {
            return Decision::Refuse(format!("stock outbound content {content:?} is neither \"1\" nor \"0\""));
        };
        let change = OrderChange::StockAnswered {
            order: order.clone(),
            ok,
        };
        if ok && self.flow == OrderFlow::Saga {
            let request = Self::outgoing(
                topics::PAYMENT_REQUESTED,
                order,
                step::PAYMENT_REQUESTED,
                Self::payment_body(order, o),
            );
            Decision::change_and_publish(change, request)
        } else {
            Decision::change(change)
        }
    }

    fn on_payment_result(&self, now: Time, order: &GlobalId, o: &OrderState, content: &str) -> Decision<OrderChange> {
        if self.flow != OrderFlow::Saga || o.status != OrderStatus::StockOutboundDone {
            return Decision::Ignore;
        }
        let Some(ok) = Self::yes_no(content) else {
            return Decision::Refuse(format!("payment result content {content:?} is neither \"1\" nor \"0\""));
        };
        let change = OrderChange::PaymentAnswered {
            order: order.clone(),
            ok,
            resend_at: (!ok).then(|| self.resend_at(now, 1)),
            at: (!ok).then_some(now),
        };
        if ok {
            Decision::change(change)
        } else {
            Decision::change_and_publish(change, Self::release(order, o, 1))
        }
    }
}

impl Participant for Order {
    type Change = OrderChange;

    fn topics(&self) -> Vec<Topic> {
        let mut t = vec![Topic::lit(topics::STOCK_OUTBOUND), Topic::lit(topics::STOCK_RELEASED)];
        if self.flow == OrderFlow::Saga {
            t.push(Topic::lit(topics::PAYMENT_RESULT));
            t.push(Topic::lit(topics::PAYMENT_CANCELLED));
        }
        t
    }

    fn on_message(&self, now: Time, message: &Message) -> Decision<OrderChange> {
        let order = &message.global_id;
        let Some(o) = self.orders.get(order) else {
            return Decision::Ignore; // not one of ours
        };
        let compensating = o.status == OrderStatus::Compensating;
        let c = o.compensation.as_ref();
        match message.topic.as_str() {
            topics::STOCK_OUTBOUND => self.on_stock_outbound(order, o, &message.content),
            topics::PAYMENT_RESULT => self.on_payment_result(now, order, o, &message.content),
            topics::STOCK_RELEASED if compensating && let Some(c) = c.filter(|c| !c.release_confirmed) => {
                Decision::change(OrderChange::ReleaseConfirmed {
                    order: order.clone(),
                    delay_ns: Self::confirmation_delay_ns(now, order, c, step::RELEASED, message),
                })
            }
            topics::PAYMENT_CANCELLED
                if compensating && let Some(c) = c.filter(|c| c.payment_cancel_confirmed == Some(false)) =>
            {
                Decision::change(OrderChange::PaymentCancelConfirmed {
                    order: order.clone(),
                    delay_ns: Self::confirmation_delay_ns(now, order, c, step::PAYMENT_CANCELLED, message),
                })
            }
            _ => Decision::Ignore,
        }
    }

    fn on_command(&self, now: Time, command: &Command) -> Decision<OrderChange> {
        match command {
            Command::CreateOrder(spec) => self.create(now, spec),
        }
    }

    fn apply(&mut self, change: &OrderChange) {
        let flow = self.flow;
        // Moves `order`'s wake-up (deadline or re-send time) to `at`, index included.
        let reschedule = |deadlines: &mut BTreeSet<(Time, GlobalId)>, order: &GlobalId, o: &mut OrderState, at| {
            if let Some(d) = o.deadline.take() {
                deadlines.remove(&(d, order.clone()));
            }
            if let Some(d) = at {
                deadlines.insert((d, order.clone()));
                o.deadline = Some(d);
            }
        };
        let compensating = |o: &mut OrderState, reason, payment_cancel: bool, at: Time| {
            o.status = OrderStatus::Compensating;
            o.compensation = Some(Compensation {
                reason,
                release_confirmed: false,
                payment_cancel_confirmed: payment_cancel.then_some(false),
                attempt: 1,
                first_sent_at: at,
                sent_at: at,
            });
        };
        let observe = |delays: &mut VecDeque<Duration>, delay_ns: &Option<u64>| {
            if let Some(ns) = delay_ns {
                if delays.len() >= CONFIRMATION_DELAYS_KEPT {
                    delays.pop_front();
                }
                delays.push_back(Duration::from_nanos(*ns));
            }
        };
        match change {
            OrderChange::Created {
                order,
                customer,
                product,
                quantity,
                price,
                amount,
                at,
                deadline,
            } => {
                assert!(!self.orders.contains_key(order), "order {order} created twice");
                let mut state = OrderState {
                    customer: customer.clone(),
                    product: product.clone(),
                    quantity: *quantity,
                    price: *price,
                    amount: *amount,
                    status: OrderStatus::Pending,
                    created_at: *at,
                    deadline: None,
                    payment_requested: false,
                    compensation: None,
                };
                reschedule(&mut self.deadlines, order, &mut state, *deadline);
                self.orders.insert(order.clone(), state);
            }
            OrderChange::StockAnswered { order, ok } => {
                let o = self.orders.get_mut(order).expect("stock answer for a known order");
                assert_eq!(o.status, OrderStatus::Pending);
                if *ok {
                    o.status = OrderStatus::StockOutboundDone;
                    o.payment_requested = flow == OrderFlow::Saga;
                } else {
                    o.status = OrderStatus::StockOutboundFailed;
                }
                if o.status.is_terminal(flow) {
                    reschedule(&mut self.deadlines, order, o, None);
                }
            }
            OrderChange::PaymentAnswered {
                order,
                ok,
                resend_at,
                at,
            } => {
                let o = self.orders.get_mut(order).expect("payment answer for a known order");
                assert_eq!(o.status, OrderStatus::StockOutboundDone);
                if *ok {
                    o.status = OrderStatus::Completed;
                } else {
                    compensating(o, CompensationReason::PaymentRefused, false, at.unwrap_or_default());
                }
                reschedule(&mut self.deadlines, order, o, *resend_at);
            }
            OrderChange::TimedOut { order, resend_at, at } => {
                let o = self.orders.get_mut(order).expect("deadline of a known order");
                assert!(!o.status.is_terminal(flow) && o.status != OrderStatus::Compensating);
                let payment_cancel = o.payment_requested;
                compensating(o, CompensationReason::Deadline, payment_cancel, *at);
                reschedule(&mut self.deadlines, order, o, Some(*resend_at));
            }
            OrderChange::CompensationResent {
                order,
                attempt,
                next_at,
                at,
            } => {
                let o = self.orders.get_mut(order).expect("re-send for a known order");
                let c = o.compensation.as_mut().expect("re-sent while compensating");
                c.attempt = *attempt;
                c.sent_at = *at;
                reschedule(&mut self.deadlines, order, o, Some(*next_at));
                self.resending.insert(order.clone());
                assert!(self.resending.len() <= COMPENSATIONS_RESENDING_MAX);
            }
            OrderChange::ResendQueued { order } => {
                let o = self.orders.get_mut(order).expect("re-send for a known order");
                assert_eq!(o.status, OrderStatus::Compensating, "only a re-send waits");
                let due = o.deadline.expect("a re-send waits only once due");
                reschedule(&mut self.deadlines, order, o, None);
                self.resend_waiting.insert((due, order.clone()));
                self.resend_waiting_due.insert(order.clone(), due);
            }
            OrderChange::ResendPostponed { order, until } => {
                let o = self.orders.get_mut(order).expect("re-send for a known order");
                assert_eq!(o.status, OrderStatus::Compensating, "only a re-send is postponed");
                reschedule(&mut self.deadlines, order, o, Some(*until));
            }
            OrderChange::ReleaseConfirmed { order, delay_ns } => {
                observe(&mut self.delays_release, delay_ns);
                let o = self.orders.get_mut(order).expect("release of a known order");
                let c = o.compensation.as_mut().expect("release confirmed while compensating");
                c.release_confirmed = true;
                if c.payment_cancel_confirmed != Some(false) {
                    o.status = OrderStatus::Compensated;
                    reschedule(&mut self.deadlines, order, o, None);
                    self.compensated(order);
                }
            }
            OrderChange::PaymentCancelConfirmed { order, delay_ns } => {
                observe(&mut self.delays_cancel, delay_ns);
                let o = self.orders.get_mut(order).expect("cancel of a known order");
                let c = o.compensation.as_mut().expect("cancel confirmed while compensating");
                c.payment_cancel_confirmed = Some(true);
                if c.release_confirmed {
                    o.status = OrderStatus::Compensated;
                    reschedule(&mut self.deadlines, order, o, None);
                    self.compensated(order);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Time> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    fn on_deadline(&self, now: Time) -> Decision<OrderChange> {
        let Some((at, order)) = self.deadlines.first() else {
            return Decision::Ignore;
        };
        if *at > now {
            return Decision::Ignore;
        }
        let o = &self.orders[order];
        if let Some(c) = o.compensation.as_ref() {
            // Confirmations got slower since this re-send was scheduled: the
            // latest send is not yet overdue by today's measure, so wait.
            let due = self.resend_at(c.sent_at, c.attempt);
            if due > now {
                return Decision::change(OrderChange::ResendPostponed {
                    order: order.clone(),
                    until: due,
                });
            }
            if !self.resending.contains(order) && self.resending.len() >= COMPENSATIONS_RESENDING_MAX {
                return Decision::change(OrderChange::ResendQueued { order: order.clone() });
            }
            // Compensating and still unconfirmed: send the missing ones again.
            let attempt = c.attempt.saturating_add(1);
            let mut publish = Vec::new();
            if !c.release_confirmed {
                publish.push(Self::release(order, o, attempt));
            }
            if c.payment_cancel_confirmed == Some(false) {
                publish.push(Self::payment_cancel(order, o, attempt));
            }
            return Decision::Commit {
                change: Some(OrderChange::CompensationResent {
                    order: order.clone(),
                    attempt,
                    next_at: self.resend_at(now, attempt),
                    at: now,
                }),
                publish,
            };
        }
        let mut publish = vec![Self::release(order, o, 1)];
        if o.payment_requested {
            publish.push(Self::payment_cancel(order, o, 1));
        }
        Decision::Commit {
            change: Some(OrderChange::TimedOut {
                order: order.clone(),
                resend_at: self.resend_at(now, 1),
                at: now,
            }),
            publish,
        }
    }
}

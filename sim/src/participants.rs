//! Which participant implementation each simulated node runs: the shipped
//! participants, or a planted bug's variant (see `bugs`), and how the checker
//! reads each one's state.

use crate::plan::FaultProfile;
use crate::topology::{client_of, notify_url};
use crate::view::{OrderPhase, PaymentEffects, StockEffects, View};
use sagamq::machine::Machine;
use sagamq::saga::order::{Order, OrderFlow, OrderStatus};
use sagamq::saga::payment::{Charge, Payment, PaymentOrder, Refund};
use sagamq::saga::stock::{Deduction, Release, Stock, StockOrder};
use sagamq::saga::{Decision, HostConfig, Participant, ParticipantHost, ParticipantInput, ParticipantOutput, Replay};
use sagamq::{Message, Time};
use std::time::Duration;

/// A participant as the world drives and the checker reads it.
pub trait SimParticipant: Machine<Input = ParticipantInput, Output = ParticipantOutput> + Send {
    /// The participant's state, for the invariant checker.
    fn view(&self) -> View;
    /// Nothing left to do: no outbox entry waiting for the broker's acknowledgement.
    fn settled(&self) -> bool;
    /// Whether the state already reflects `message` (a redelivery would cause no
    /// new effect). Asked only of messages the participant answered 2xx.
    fn reflects(&self, message: &Message) -> bool;
    /// Every subscription confirmed by the broker (traffic may start).
    fn ready(&self) -> bool;
    /// The latest wake-up the business logic has scheduled (an order's
    /// deadline or compensation re-send), on its own clock; None if none.
    fn latest_timer(&self) -> Option<Time> {
        None
    }
    /// Outbox entries waiting for the broker's acknowledgement.
    fn outbox(&self) -> usize {
        0
    }
    /// The host's counters, for the stats audit ([`crate::audit`]); None
    /// for a participant that is not a plain host (a planted flaw rewrites
    /// its host's inputs and outputs, so the world's recount is not the host's).
    fn stats(&self) -> Option<&sagamq::saga::HostStats> {
        None
    }
    /// The host's gauges (None as for `stats`).
    fn gauges(&self) -> Option<sagamq::saga::HostGauges> {
        None
    }
    /// The host's configuration as the stats audit judges it (None as for `stats`).
    fn terms(&self) -> Option<crate::audit::HostTerms> {
        None
    }
    /// Whether the host has consumed a message with this key (its inbox).
    fn consumed(&self, _key: &sagamq::MessageKey) -> bool {
        false
    }
}

/// For participants idempotent by state (the shipped ones): the state reflects a
/// message iff deciding it again changes no state (it may publish, e.g. confirm
/// a re-sent compensation again). Their decisions ignore `now`.
pub fn decides_nothing<P: Participant>(logic: &P, message: &Message) -> bool {
    decides_nothing_at(logic, Time::ZERO, message)
}

/// Whether deciding `message` again at `now` would commit no change.
pub fn decides_nothing_at<P: Participant>(logic: &P, now: Time, message: &Message) -> bool {
    !matches!(logic.on_message(now, message), Decision::Commit { change: Some(_), .. })
}

/// What the checker needs from a hosted participant's logic; the host supplies
/// the rest of [`SimParticipant`] (one blanket impl below).
pub trait Observed: Participant + Send {
    /// The state for the checker; `initial` is the participant before any record.
    fn view(&self, initial: &Self) -> View;
    /// See [`SimParticipant::reflects`]; by default, idempotent by state.
    fn reflects(&self, message: &Message) -> bool {
        decides_nothing(self, message)
    }
    /// See [`SimParticipant::latest_timer`].
    fn latest_timer(&self) -> Option<Time> {
        None
    }
    /// The participant's own report that it has nothing left to finish (the
    /// order: `all_terminal`, what its users poll); part of `settled`.
    fn done(&self) -> bool {
        true
    }
}

impl<P: Observed> SimParticipant for ParticipantHost<P> {
    fn view(&self) -> View {
        self.logic().view(self.initial())
    }
    fn settled(&self) -> bool {
        self.outbox_len() == 0 && self.logic().done()
    }
    fn reflects(&self, message: &Message) -> bool {
        self.logic().reflects(message)
    }
    fn ready(&self) -> bool {
        self.subscribed()
    }
    fn latest_timer(&self) -> Option<Time> {
        self.logic().latest_timer()
    }
    fn outbox(&self) -> usize {
        self.outbox_len()
    }
    fn stats(&self) -> Option<&sagamq::saga::HostStats> {
        Some(ParticipantHost::stats(self))
    }
    fn gauges(&self) -> Option<sagamq::saga::HostGauges> {
        Some(ParticipantHost::gauges(self))
    }
    /// A shipped participant's logic never refuses a message: a not-ok
    /// answer is judged as a bound's.
    fn terms(&self) -> Option<crate::audit::HostTerms> {
        let config = ParticipantHost::config(self);
        Some(crate::audit::HostTerms::new(config, self.outbox_len(), true))
    }
    fn consumed(&self, key: &sagamq::MessageKey) -> bool {
        ParticipantHost::consumed(self, key)
    }
}

/// A business-id-keyed amount map as the checker reads it.
pub fn by_name<K: ToString>(map: &std::collections::BTreeMap<K, u64>) -> std::collections::BTreeMap<String, u64> {
    map.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

impl Observed for Stock {
    fn view(&self, initial: &Stock) -> View {
        View::Stock {
            initial: by_name(initial.levels()),
            level: by_name(self.levels()),
            orders: self
                .orders()
                .iter()
                .filter_map(|(id, o)| stock_effects(o).map(|e| (id.to_string(), e)))
                .collect(),
            reported_held: Some(initial.levels().keys().map(|p| (p.to_string(), self.held(p))).collect()),
        }
    }
}

/// What the shipped stock did for one order (None: no effect on the shelf).
fn stock_effects(o: &StockOrder) -> Option<StockEffects> {
    let Deduction::Deducted { product, quantity } = &o.deduction else {
        return None;
    };
    let restocked = match &o.release {
        Release::Restocked { quantity, .. } => *quantity,
        Release::NotSeen | Release::Null => 0,
    };
    Some(StockEffects {
        product: product.to_string(),
        deducted: *quantity,
        restocked,
    })
}

impl Observed for Payment {
    fn view(&self, initial: &Payment) -> View {
        View::Payment {
            initial: by_name(initial.balances()),
            balance: by_name(self.balances()),
            orders: self
                .orders()
                .iter()
                .filter_map(|(id, o)| payment_effects(o).map(|e| (id.to_string(), e)))
                .collect(),
            reported_held: Some(
                initial
                    .balances()
                    .keys()
                    .map(|c| (c.to_string(), self.held(c)))
                    .collect(),
            ),
        }
    }
}

/// What the shipped payment did for one order (None: no money moved).
fn payment_effects(o: &PaymentOrder) -> Option<PaymentEffects> {
    let Charge::Charged { customer, amount } = &o.charge else {
        return None;
    };
    let refunded = match &o.refund {
        Refund::Refunded { amount, .. } => *amount,
        Refund::NotSeen | Refund::Null => 0,
    };
    Some(PaymentEffects {
        customer: customer.to_string(),
        charged: *amount,
        refunded,
    })
}

/// How the checker reads an order's status.
pub fn phase(status: OrderStatus, flow: OrderFlow) -> OrderPhase {
    match status {
        OrderStatus::Pending | OrderStatus::Compensating => OrderPhase::InProgress,
        OrderStatus::StockOutboundDone if flow == OrderFlow::Seed => OrderPhase::StockOutboundDone,
        OrderStatus::StockOutboundDone => OrderPhase::InProgress,
        OrderStatus::StockOutboundFailed => OrderPhase::StockOutboundFailed,
        OrderStatus::Completed => OrderPhase::Completed,
        OrderStatus::Compensated => OrderPhase::Compensated,
    }
}

impl Observed for Order {
    fn done(&self) -> bool {
        self.all_terminal()
    }
    fn latest_timer(&self) -> Option<Time> {
        let flow = self.flow();
        self.orders()
            .values()
            .filter(|o| !o.status.is_terminal(flow))
            .filter_map(|o| o.deadline)
            .max()
    }

    fn view(&self, _initial: &Order) -> View {
        let flow = self.flow();
        // Each order's state as its users read it, through `order(id)`: an
        // accessor that loses an order leaves it unfinished here.
        let view = |id: &sagamq::GlobalId| match self.order(id) {
            Some(o) => (phase(o.status, flow), o.status.as_str().to_string()),
            None => (OrderPhase::InProgress, "absent from order()".to_string()),
        };
        View::Order {
            orders: self.orders().keys().map(|id| (id.to_string(), view(id))).collect(),
        }
    }
}

/// The subscription TTL unless the plan draws a short one.
pub const SUBSCRIPTION_TTL_DEFAULT: Duration = Duration::from_secs(30);

/// Host publish retries back off up to this in the simulator (see [`host_config`]).
pub const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(1);

/// The host configuration of node `node` in the simulator.
/// `custom` is the client id of the user's participant, when one runs;
/// `profile` supplies the drawn subscription TTL and inbox bound.
///
/// The host's inbox is bounded and forgets its oldest keys, so participants
/// must stay idempotent per business key (the shipped ones key their state by
/// order). Half the seeds give a node a tiny inbox (see
/// [`crate::plan::FaultProfile::inbox_keys_max`]) so that old redeliveries
/// reach the participant logic and that contract is exercised, not assumed.
pub fn host_config(node: usize, seed: u64, custom: Option<&sagamq::ClientId>, profile: &FaultProfile) -> HostConfig {
    let mut cfg = HostConfig::new(client_of(node, custom), notify_url(node));
    cfg.seed = seed ^ (node as u64).wrapping_mul(0x9E37_79B9);
    cfg.subscription_ttl = profile
        .subscription_ttl_ms
        .map_or(SUBSCRIPTION_TTL_DEFAULT, |ms| Duration::from_millis(u64::from(ms)));
    cfg.subscribe_retry = Duration::from_millis(200);
    cfg.publish_retry_initial = Duration::from_millis(100);
    cfg.publish_retry_max = PUBLISH_RETRY_MAX;
    if let Some(&keys) = u8::try_from(node).ok().and_then(|n| profile.inbox_keys_max.get(&n)) {
        cfg.inbox_keys_max = keys.max(1) as usize;
    }
    if let Some(b) = u8::try_from(node).ok().and_then(|n| profile.host_bounds.get(&n)) {
        cfg.outbox_entries_max = b.outbox_entries_max.max(1) as usize;
        cfg.records_unsynced_max = u64::from(b.records_unsynced_max.max(1));
        cfg.answers_waiting_max = b.answers_waiting_max.max(1) as usize;
    }
    cfg
}

/// A participant built for a node: itself, the valid log length, the records replayed.
pub type Built = Result<(Box<dyn SimParticipant>, u64, u64), String>;

pub fn host<P>(logic: P, config: HostConfig, image: &[u8]) -> Built
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    if image.is_empty() {
        return Ok((Box::new(ParticipantHost::new(logic, config)), 0, 0));
    }
    let (h, report) = ParticipantHost::recover(logic, config, image).map_err(|e| e.to_string())?;
    Ok((Box::new(h), report.valid_len, report.records))
}

/// A node's recoveries, kept to resume: the world recovers the same growing
/// log at every boot and in every disk probe (the heal's, the end's), and a
/// shipped host's JSON records are most of a recovery's cost.
pub trait Recoveries: Send {
    /// The participant recovered from `image`, exactly as [`host`] builds it.
    fn recover(&mut self, image: &[u8]) -> Built;
}

/// [`Recoveries`] of a shipped host: the last replay and the bytes it came
/// from. An image that begins with those bytes has the same records there
/// (frames are judged one after the other), so only the records after them
/// are parsed; any other image is replayed from the start.
pub struct HostRecoveries<P: Participant> {
    fresh: Replay<P>,
    last: Replay<P>,
    bytes: Vec<u8>,
}

impl<P: Participant> HostRecoveries<P> {
    pub fn new(logic: P, config: HostConfig) -> Self {
        let fresh = Replay::new(logic, config);
        HostRecoveries {
            last: fresh.clone(),
            fresh,
            bytes: Vec::new(),
        }
    }
}

impl<P> Recoveries for HostRecoveries<P>
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    fn recover(&mut self, image: &[u8]) -> Built {
        if image.is_empty() {
            return Ok((Box::new(self.fresh.clone().finish().0), 0, 0));
        }
        if !image.starts_with(&self.bytes) {
            self.last = self.fresh.clone();
            self.bytes.clear();
        }
        if let Err(e) = self.last.feed(image) {
            // Part-way: start over next time.
            self.last = self.fresh.clone();
            self.bytes.clear();
            return Err(e.to_string());
        }
        let end = usize::try_from(self.last.end()).expect("a log in memory");
        self.bytes.clear();
        self.bytes.extend_from_slice(&image[..end]);
        let (h, report) = self.last.clone().finish();
        Ok((Box::new(h), report.valid_len, report.records))
    }
}

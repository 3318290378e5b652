//! Workloads the simulator can run (`--scenario seed|saga`) and the workload
//! node: a client that calls the order service's "create order" at scheduled
//! times and retries until the call is answered (the order service dedups by id).

use crate::clock::CLOCK_BASE_NS;
use sagamq::Time;
use sagamq::saga::OrderSpec;
use sagamq::saga::scenario as shipped;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// The Go seed's integration test: 10 units, order 1 (qty 1) done, order 2 (qty 10) failed.
    Seed,
    /// Concurrent orders competing for scarce stock, payments that sometimes fail.
    Saga { orders: u32 },
}

/// Orders per `saga` seed unless `saga:N` says otherwise.
pub const SAGA_ORDERS_DEFAULT: u32 = 20;

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Seed => "seed",
            Scenario::Saga { .. } => "saga",
        }
    }

    /// The shipped scenario definition (initial stock and balances, orders),
    /// drawn from `seed`, with the order deadline of the plan's profile.
    pub fn definition(self, seed: u64, profile: &crate::plan::FaultProfile) -> shipped::Scenario {
        match self {
            Scenario::Seed => shipped::seed(),
            Scenario::Saga { orders } => shipped::saga_with(
                seed,
                &shipped::SagaParams {
                    orders: orders as usize,
                    order_deadline: order_deadline(profile),
                    ..Default::default()
                },
            ),
        }
    }

    pub fn order_count(self) -> u64 {
        match self {
            Scenario::Seed => 2,
            Scenario::Saga { orders } => u64::from(orders),
        }
    }

    pub fn chaos_ms(self) -> u32 {
        match self {
            Scenario::Seed => 2_000,
            Scenario::Saga { .. } => 4_000,
        }
    }

    /// Upper bound on network messages a chaos phase sends, for drawing message faults.
    pub fn messages_estimate(self) -> u32 {
        (self.order_count() as u32) * 40 + 100
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Saga { orders } if *orders != SAGA_ORDERS_DEFAULT => write!(f, "saga:{orders}"),
            _ => f.write_str(self.name()),
        }
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Scenario, String> {
        match s {
            "seed" => Ok(Scenario::Seed),
            "saga" => Ok(Scenario::Saga {
                orders: SAGA_ORDERS_DEFAULT,
            }),
            _ => match s.strip_prefix("saga:").map(str::parse::<u32>) {
                Some(Ok(n)) if (1..=10_000).contains(&n) => Ok(Scenario::Saga { orders: n }),
                _ => Err(format!(
                    "unknown scenario {s:?}: use seed, saga or saga:N (1..=10000 orders)"
                )),
            },
        }
    }
}

/// The saga's order deadline under `profile`: the one it draws (half the
/// seeds: shorter than the faults, so orders time out while their messages
/// are still in flight and the compensations, null compensation, hanging
/// deduction and payment cancel, run under faults; see
/// [`crate::plan::FaultProfile::order_deadline_ms`]), else the shipped
/// default, far beyond any fault.
pub fn order_deadline(profile: &crate::plan::FaultProfile) -> Duration {
    profile.order_deadline_ms.map_or_else(
        || shipped::SagaParams::default().order_deadline,
        |ms| Duration::from_millis(u64::from(ms)),
    )
}

/// How long the workload waits for an answer before calling again (doubling).
const RETRY: Duration = Duration::from_millis(300);
/// The wait doubles per call of the same order up to this multiple: a fixed
/// wait flooded a slow order service with calls (2,000 orders re-called every
/// 300 ms are ~6,700 calls per second against about 1,000 messages per second
/// a node handles, so its subscription confirmations queued behind them and it
/// refused every call: `saga:2000` seed 18).
const RETRY_BACKOFF_FACTOR_MAX: u32 = 16;

/// The client of the order service. Its clock is never skewed and it never crashes.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Orders not yet called, by due time.
    scheduled: VecDeque<(Time, OrderSpec)>,
    /// Called but not answered: next retry time.
    waiting: BTreeMap<String, (Time, OrderSpec)>,
    /// Calls made per waiting order.
    calls: BTreeMap<String, u32>,
    /// `waiting` by retry time, so a wake-up costs O(log n), not a scan of every
    /// waiting order (which made the simulator's cost per order grow with the
    /// order count).
    retries: BTreeSet<(Time, String)>,
    outbox: VecDeque<OrderSpec>,
    refused: u64,
    /// Traffic starts once every service is subscribed (a readiness check, as a
    /// deployment does); order times count from then. None: not yet.
    started_at: Option<Time>,
    last_readiness_check: Time,
}

/// How long the workload waits after call `n` (1-based) of an order before calling again.
fn retry_after(n: u32) -> Duration {
    let factor = (1u32 << n.saturating_sub(1).min(16)).min(RETRY_BACKOFF_FACTOR_MAX);
    RETRY * factor
}

/// How often the workload checks whether the services are ready.
const READINESS_POLL: Duration = Duration::from_millis(10);

impl Workload {
    pub fn new(def: &shipped::Scenario) -> Workload {
        // Offsets from the start of traffic (rebased in `start`).
        let scheduled = def.orders.iter().map(|o| (o.at, o.spec.clone())).collect();
        Workload {
            scheduled,
            waiting: BTreeMap::new(),
            calls: BTreeMap::new(),
            retries: BTreeSet::new(),
            outbox: VecDeque::new(),
            refused: 0,
            started_at: None,
            last_readiness_check: Time(CLOCK_BASE_NS),
        }
    }

    pub fn started(&self) -> bool {
        self.started_at.is_some()
    }

    /// Notes a readiness check at `now`; starts traffic if `ready`.
    pub fn readiness(&mut self, now: Time, ready: bool) {
        self.last_readiness_check = now;
        if ready && self.started_at.is_none() {
            self.started_at = Some(now);
            for (at, _) in &mut self.scheduled {
                *at = Time(now.0 + at.0);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        if self.started_at.is_none() {
            return Some(self.last_readiness_check.plus(READINESS_POLL));
        }
        let next_new = self.scheduled.front().map(|(t, _)| *t);
        let next_retry = self.retries.first().map(|(t, _)| *t);
        match (next_new, next_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Time) {
        if self.started_at.is_none() {
            return;
        }
        // New orders first, then the due retries in order-id order (as before the index).
        let mut due = Vec::new();
        while let Some((at, _)) = self.retries.first()
            && *at <= now
        {
            let (_, id) = self.retries.pop_first().expect("first exists");
            due.push(id);
        }
        due.sort();
        let mut calls = Vec::with_capacity(due.len());
        for id in due {
            let (at, spec) = self.waiting.get_mut(&id).expect("a retry of a waiting order");
            let n = self.calls.entry(id.clone()).or_insert(1);
            *n = n.saturating_add(1);
            *at = now.plus(retry_after(*n));
            self.retries.insert((*at, id));
            calls.push(spec.clone());
        }
        while self.scheduled.front().is_some_and(|(t, _)| *t <= now) {
            let (_, spec) = self.scheduled.pop_front().expect("front exists");
            let at = now.plus(retry_after(1));
            self.calls.insert(spec.order_id.clone(), 1);
            if let Some((old, _)) = self.waiting.insert(spec.order_id.clone(), (at, spec.clone())) {
                self.retries.remove(&(old, spec.order_id.clone()));
            }
            self.retries.insert((at, spec.order_id.clone()));
            self.outbox.push_back(spec);
        }
        self.outbox.extend(calls);
    }

    pub fn poll_output(&mut self) -> Option<OrderSpec> {
        self.outbox.pop_front()
    }

    /// A refusal is transient here (busy, not subscribed yet): the call is retried.
    pub fn answered(&mut self, order_id: &str, refused: Option<String>) {
        if refused.is_some() {
            self.refused += 1;
        } else {
            self.calls.remove(order_id);
            if let Some((at, _)) = self.waiting.remove(order_id) {
                self.retries.remove(&(at, order_id.to_string()));
            }
        }
    }

    pub fn all_answered(&self) -> bool {
        self.scheduled.is_empty() && self.waiting.is_empty()
    }
}

//! Fault plans: faults are data. A plan is a value drawn from the seed (swarm
//! testing: each seed picks which kinds are on and how often), printed,
//! stored as JSON, replayed and shrunk. The world only *consults* the plan; it
//! never rolls dice of its own for faults.
//!
//! Message faults name the n-th event of their kind (n-th message sent, n-th
//! callback answer, ...), so a plan is an explicit list and shrinking is
//! removing entries.

use sagamq::ClientId;
use sagamq::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Every fault kind the simulator injects, in report order.
pub const FAULT_KINDS: [&str; 20] = [
    "drop",
    "ack_lost",
    "duplicate",
    "delay",
    "partition",
    "crash",
    "torn_write",
    "callback_error",
    "clock_skew",
    "dead_letter",
    "slow_operator",
    "subscription_lapse",
    "garbage_tail",
    "bit_flip",
    "pause",
    "one_way",
    "sync_error",
    "disk_full",
    "sync_stall",
    "clock_step",
];

pub use crate::topology::{FAULTY_NODES, NODES};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// The n-th message sent on the network is lost.
    Drop { nth: u32 },
    /// The n-th callback answer (subscriber -> broker) is lost after the subscriber applied it.
    AckLost { nth: u32 },
    /// The n-th message sent is delivered twice.
    Duplicate { nth: u32 },
    /// The n-th message sent is held back `ms` extra (reordering it).
    Delay { nth: u32, ms: u32 },
    /// Cut the link between two nodes (both directions) from `at_ms` for `for_ms`;
    /// `b = None` isolates node `a` from everyone.
    Partition {
        at_ms: u32,
        for_ms: u32,
        a: u8,
        b: Option<u8>,
    },
    /// Kill node `node` at `at_ms`, restart it `down_ms` later. Unsynced writes are lost;
    /// with `torn_keep = Some(k)` the first `k` unsynced bytes survive (a torn write).
    Crash {
        at_ms: u32,
        down_ms: u32,
        node: u8,
        torn_keep: Option<u32>,
        /// After the kept bytes of a torn write, what the file holds beyond
        /// them: blocks the write extended but never filled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<CrashTail>,
    },
    /// A recovery probe: after each crash of `node`, bit `bit` of the byte at
    /// `where_ppm` of its log image is flipped in a *copy*, and the node's own
    /// recovery runs on it. It must refuse (naming the offset), or, when the
    /// flip is in the last record, cut only that record.
    BitFlip { node: u8, where_ppm: u32, bit: u8 },
    /// Node `node` stops for `for_ms` from `at_ms` without crashing (a GC or
    /// a stopped VM): it handles nothing, its timers wait, messages queue.
    Pause { at_ms: u32, for_ms: u32, node: u8 },
    /// The n-th callback a subscriber receives is answered with an error (`hang = false`)
    /// or never answered (`hang = true`), without being processed.
    CallbackError { nth: u32, hang: bool },
    /// Node `node`'s clock runs `offset_ms` ahead (negative: behind) and drifts `drift_ppm`.
    ClockSkew { node: u8, offset_ms: i32, drift_ppm: i32 },
    /// The operator redrives dead letters only after the liveness verdict (a
    /// human answering a page hours later), not when the faults heal: until
    /// then, a dead-lettered message is lost to whoever waits for it.
    SlowOperator,
    /// Messages from `from` to `to` are lost from `at_ms` for `for_ms`; the
    /// other direction works (an asymmetric partition: a half-broken NIC, a
    /// firewall rule on one side). `from` hears `to` but cannot answer it.
    OneWay { at_ms: u32, for_ms: u32, from: u8, to: u8 },
    /// The first disk sync of `node` due at or after `at_ms` fails (EIO). The
    /// bytes it was flushing never reach the disk, though the process still
    /// reads them from its page cache (a later sync does not retry them:
    /// "fsyncgate"). The shipped driver fail-stops: the node dies at once and
    /// restarts after `down_ms`, recovering what is durable.
    SyncError { node: u8, at_ms: u32, down_ms: u32 },
    /// The disk of `node` is full from `at_ms` for `for_ms`: an append fails
    /// (ENOSPC). The shipped driver fail-stops and restarts after 100 ms;
    /// while the disk stays full, the next write fails again.
    DiskFull { node: u8, at_ms: u32, for_ms: u32 },
    /// The disk of `node` stalls from `at_ms` for `for_ms`: a sync in that
    /// window completes only when it ends (a device timing out and retrying).
    SyncStall { node: u8, at_ms: u32, for_ms: u32 },
    /// At the first restart of `node`, its clock is stepped back `back_ms`
    /// (an NTP step after a reboot): times it recorded before the crash lie
    /// in its future.
    ClockStep { node: u8, back_ms: u32 },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Drop { .. } => "drop",
            Fault::AckLost { .. } => "ack_lost",
            Fault::Duplicate { .. } => "duplicate",
            Fault::Delay { .. } => "delay",
            Fault::Partition { .. } => "partition",
            Fault::Crash { .. } => "crash",
            Fault::CallbackError { .. } => "callback_error",
            Fault::ClockSkew { .. } => "clock_skew",
            Fault::BitFlip { .. } => "bit_flip",
            Fault::Pause { .. } => "pause",
            Fault::SlowOperator => "slow_operator",
            Fault::OneWay { .. } => "one_way",
            Fault::SyncError { .. } => "sync_error",
            Fault::DiskFull { .. } => "disk_full",
            Fault::SyncStall { .. } => "sync_stall",
            Fault::ClockStep { .. } => "clock_step",
        }
    }
}

fn node_name(i: u8) -> &'static str {
    NODES.get(usize::from(i)).copied().unwrap_or("?")
}

impl Fault {
    /// The fault's line, naming nodes with `name`.
    fn write(&self, f: &mut fmt::Formatter<'_>, name: &dyn Fn(u8) -> String) -> fmt::Result {
        match self {
            Fault::Drop { nth } => write!(f, "drop message #{nth}"),
            Fault::AckLost { nth } => write!(f, "lose callback answer #{nth}"),
            Fault::Duplicate { nth } => write!(f, "duplicate message #{nth}"),
            Fault::Delay { nth, ms } => write!(f, "delay message #{nth} by {ms}ms"),
            Fault::Partition {
                at_ms,
                for_ms,
                a,
                b: Some(b),
            } => {
                write!(f, "partition {}<->{} at {at_ms}ms for {for_ms}ms", name(*a), name(*b))
            }
            Fault::Partition {
                at_ms,
                for_ms,
                a,
                b: None,
            } => {
                write!(f, "isolate {} at {at_ms}ms for {for_ms}ms", name(*a))
            }
            Fault::Crash {
                at_ms,
                down_ms,
                node,
                torn_keep,
                tail,
            } => {
                write!(f, "crash {} at {at_ms}ms, down {down_ms}ms", name(*node))?;
                if let Some(k) = torn_keep {
                    write!(f, ", torn write keeps {k} unsynced bytes")?;
                }
                match tail {
                    Some(CrashTail::Zeros { len }) => write!(f, " then {len} zero bytes")?,
                    Some(CrashTail::Garbage { len, .. }) => write!(f, " then {len} bytes of garbage")?,
                    None => {}
                }
                Ok(())
            }
            Fault::BitFlip { node, where_ppm, bit } => write!(
                f,
                "probe: at each crash of {}, recovery of a copy with bit {bit} flipped at {:.1}% of its log",
                name(*node),
                f64::from(*where_ppm) / 10_000.0
            ),
            Fault::CallbackError { nth, hang: false } => write!(f, "callback #{nth} answered with an error"),
            Fault::CallbackError { nth, hang: true } => write!(f, "callback #{nth} never answered"),
            Fault::ClockSkew {
                node,
                offset_ms,
                drift_ppm,
            } => {
                write!(f, "clock of {} off by {offset_ms}ms, drift {drift_ppm}ppm", name(*node))
            }
            Fault::SlowOperator => write!(f, "the operator redrives dead letters only after the liveness verdict"),
            Fault::Pause { at_ms, for_ms, node } => {
                write!(f, "pause {} at {at_ms}ms for {for_ms}ms", name(*node))
            }
            Fault::OneWay {
                at_ms,
                for_ms,
                from,
                to,
            } => write!(
                f,
                "one-way partition {}->{} at {at_ms}ms for {for_ms}ms",
                name(*from),
                name(*to)
            ),
            Fault::SyncError { node, at_ms, down_ms } => write!(
                f,
                "disk sync of {} fails (EIO) at or after {at_ms}ms; fail-stop, down {down_ms}ms",
                name(*node)
            ),
            Fault::DiskFull { node, at_ms, for_ms } => {
                write!(f, "disk of {} full at {at_ms}ms for {for_ms}ms", name(*node))
            }
            Fault::SyncStall { node, at_ms, for_ms } => {
                write!(f, "disk of {} stalls syncs at {at_ms}ms for {for_ms}ms", name(*node))
            }
            Fault::ClockStep { node, back_ms } => {
                write!(
                    f,
                    "clock of {} stepped back {back_ms}ms at its first restart",
                    name(*node)
                )
            }
        }
    }

    /// The fault's line with the custom node named by its client id.
    pub fn describe(&self, custom: Option<&ClientId>) -> String {
        Named {
            custom,
            write: &|f, name| self.write(f, name),
        }
        .to_string()
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, &|n| node_name(n).to_string())
    }
}

/// What a torn write leaves beyond its kept bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CrashTail {
    Zeros {
        len: u32,
    },
    /// `len` bytes drawn from `seed` (stale blocks).
    Garbage {
        len: u32,
        seed: u64,
    },
}

impl CrashTail {
    /// The tail's bytes (garbage drawn from its seed).
    pub fn bytes(self) -> Vec<u8> {
        match self {
            CrashTail::Zeros { len } => vec![0; len as usize],
            CrashTail::Garbage { len, seed } => {
                let mut rng = Rng::new(seed);
                (0..len).map(|_| rng.below(256) as u8).collect()
            }
        }
    }
}

/// Per-kind rates a seed draws (swarm testing); zero means the kind is off.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultProfile {
    /// Per message, in parts per million.
    pub drop_ppm: u32,
    pub ack_lost_ppm: u32,
    pub duplicate_ppm: u32,
    pub delay_ppm: u32,
    pub callback_error_ppm: u32,
    /// Counts of scheduled faults.
    pub partitions: u32,
    pub crashes: u32,
    /// Of the crashes, per million that tear the last unsynced write.
    pub torn_ppm: u32,
    pub clock_skew: bool,
    /// The broker's callback attempts per message before it dead-letters it;
    /// `None`: the simulator's default (12, which the faults never exhaust).
    #[serde(default)]
    pub attempts_max: Option<u32>,
    /// The subscription TTL participants ask for (renewing at half of it);
    /// `None`: the simulator's default (30 s, which no fault outlasts). A short
    /// one lets a partition or a crash outlast a subscription.
    #[serde(default)]
    pub subscription_ttl_ms: Option<u32>,
    /// Small broker bounds (BUGGIFY-style; a quarter of the seeds) so that
    /// backpressure refusals and frequent compactions happen; `None`: the
    /// simulator's roomy defaults, which never refuse.
    #[serde(default)]
    pub bounds: Option<Bounds>,
    /// A short subscription grace (half the short-TTL seeds without a custom
    /// participant): a subscriber cut off for longer than TTL + grace is owed
    /// nothing published meanwhile, so the broker's entitlement rule is
    /// exercised; `None`: the simulator's 60 s, which no outage outlasts.
    #[serde(default)]
    pub subscription_grace_ms: Option<u32>,
    /// Participant nodes (by index) whose host inbox remembers only this many
    /// message keys (1-8; half the seeds, per node), so that old redeliveries
    /// reach the participant's logic and its idempotency per business key is
    /// exercised; a node not listed keeps the host's default (100,000). Part of
    /// the plan so a replay prints it and `--plan` carries it; plans written
    /// before it existed parse as "all default".
    #[serde(default)]
    pub inbox_keys_max: BTreeMap<u8, u32>,
    /// Participant nodes (by index) whose host runs with small bounds (a
    /// quarter of the seeds, per node, up to about 100 orders), so that its
    /// backpressure (deliveries answered not-ok, commands refused, deadlines
    /// held back) happens and is judged (`host-bounds`); a node not listed
    /// keeps the host's roomy defaults, which never refuse. Plans written
    /// before it existed parse as "all default".
    #[serde(default)]
    pub host_bounds: BTreeMap<u8, HostBounds>,
    /// The saga's order deadline (half the `saga` seeds: 0.3-3 s, shorter than
    /// the faults, so orders time out while their messages are in flight and
    /// the compensations run under faults); `None`: the shipped default
    /// (20 s, which no fault outlasts; the `seed` scenario's 30 s). Part of the
    /// plan so a replay prints it, `--plan` carries it and a shrink can drop
    /// it; a plan written before it existed parses as "default".
    #[serde(default)]
    pub order_deadline_ms: Option<u32>,
}

/// A participant host's bounds a seed may shrink (see [`FaultProfile::host_bounds`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBounds {
    pub outbox_entries_max: u32,
    pub records_unsynced_max: u32,
    pub answers_waiting_max: u32,
}

impl fmt::Display for HostBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "(outbox<={} unsynced<={} waiting<={})",
            self.outbox_entries_max, self.records_unsynced_max, self.answers_waiting_max
        )
    }
}

/// Broker bounds a seed may shrink (see [`FaultProfile::bounds`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub pending_per_subscriber_max: u32,
    pub messages_max: u32,
    pub publishes_unsynced_max: u32,
    pub inflight_per_subscriber_max: u32,
    pub compact_garbage_records_min: u32,
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queue<={} messages<={} unsynced<={} window={} compact>{}",
            self.pending_per_subscriber_max,
            self.messages_max,
            self.publishes_unsynced_max,
            self.inflight_per_subscriber_max,
            self.compact_garbage_records_min
        )
    }
}

/// A per-node setting as the profile line prints it, `(order:3 payment:8)`
/// (a bounds value in its own parentheses); None when no node has one.
fn per_node<V: fmt::Display>(map: &BTreeMap<u8, V>, name: &dyn Fn(u8) -> String) -> Option<String> {
    let nodes: Vec<String> = map.iter().map(|(n, v)| format!("{}:{v}", name(*n))).collect();
    (!nodes.is_empty()).then(|| format!("({})", nodes.join(" ")))
}

impl FaultProfile {
    /// The profile line, naming nodes with `name` (see [`FaultPlan::describe`]).
    fn write(&self, f: &mut fmt::Formatter<'_>, name: &dyn Fn(u8) -> String) -> fmt::Result {
        let pct = |ppm: u32| format!("{:.1}%", f64::from(ppm) / 10_000.0);
        write!(
            f,
            "drop={} ack_lost={} duplicate={} delay={} callback_error={} partitions={} crashes={} torn={} clock_skew={} attempts_max={} subscription_ttl={}{} bounds={} inbox_keys_max={} order_deadline={}{}",
            pct(self.drop_ppm),
            pct(self.ack_lost_ppm),
            pct(self.duplicate_ppm),
            pct(self.delay_ppm),
            pct(self.callback_error_ppm),
            self.partitions,
            self.crashes,
            pct(self.torn_ppm),
            if self.clock_skew { "on" } else { "off" },
            self.attempts_max
                .map_or_else(|| "default".to_string(), |n| n.to_string()),
            self.subscription_ttl_ms
                .map_or_else(|| "default".to_string(), |ms| format!("{ms}ms")),
            self.subscription_grace_ms
                .map_or_else(String::new, |ms| format!(" subscription_grace={ms}ms")),
            self.bounds.map_or_else(|| "default".to_string(), |b| format!("({b})")),
            per_node(&self.inbox_keys_max, name).unwrap_or_else(|| "default".to_string()),
            self.order_deadline_ms
                .map_or_else(|| "default".to_string(), |ms| format!("{ms}ms")),
            // Only when drawn, so the lines of seeds without them read as before.
            per_node(&self.host_bounds, name).map_or_else(String::new, |nodes| format!(" host_bounds={nodes}")),
        )
    }

    /// The profile line with the custom node named by its client id.
    pub fn describe(&self, custom: Option<&ClientId>) -> String {
        Named {
            custom,
            write: &|f, name| self.write(f, name),
        }
        .to_string()
    }
}

impl fmt::Display for FaultProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, &|n| node_name(n).to_string())
    }
}

/// Writes a plan's text with nodes named by [`crate::topology::display_name`].
struct Named<'a> {
    custom: Option<&'a ClientId>,
    #[allow(clippy::type_complexity)]
    write: &'a dyn Fn(&mut fmt::Formatter<'_>, &dyn Fn(u8) -> String) -> fmt::Result,
}

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |n: u8| match usize::from(n) {
            i if i < NODES.len() => crate::topology::display_name(i, self.custom),
            _ => "?".to_string(),
        };
        (self.write)(f, &name)
    }
}

/// A complete, explicit fault plan for one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultPlan {
    pub profile: FaultProfile,
    pub faults: Vec<Fault>,
}

/// Bounds of the generated plans.
pub struct PlanShape {
    /// Faults are scheduled inside the chaos phase, `0..chaos_ms`.
    pub chaos_ms: u32,
    /// Nodes that may crash, be partitioned or run a skewed clock.
    pub faulty_nodes: Vec<u8>,
    /// Message-fault indices are drawn in `0..messages_max`.
    pub messages_max: u32,
    /// The workload has an order deadline the swarm may shorten (`saga`).
    pub order_deadline: bool,
}

/// Lookup tables built once from a plan, so the world's per-message checks are cheap.
#[derive(Clone, Debug, Default)]
pub struct PlanIndex {
    pub drop: BTreeMap<u32, ()>,
    pub ack_lost: BTreeMap<u32, ()>,
    pub duplicate: BTreeMap<u32, ()>,
    pub delay: BTreeMap<u32, u32>,
    pub callback_error: BTreeMap<u32, bool>,
    /// node -> (where in its log, which bit) of its recovery probe.
    pub bit_flip: BTreeMap<u8, (u32, u8)>,
}

impl FaultPlan {
    /// Draws a profile from the seed, then an explicit plan from the profile.
    pub fn from_seed(seed: u64, shape: &PlanShape) -> FaultPlan {
        let mut rng = Rng::new(seed ^ 0x5A6A_F00D_0000_0000);
        // Swarm: each kind is on with probability 1/2, at a rate drawn per seed.
        let mut rate = |max_ppm: u64| {
            if rng.chance(500_000) {
                rng.range_inclusive(1, max_ppm) as u32
            } else {
                0
            }
        };
        // Drawn apart, so adding them left every other draw of a seed unchanged.
        let mut env = Rng::new(seed ^ 0x0DEA_D1E7_0000_0000);
        // A short retry budget (a quarter of the seeds) makes dead letters happen.
        let attempts_max = env.chance(250_000).then(|| env.range_inclusive(2, 4) as u32);
        let slow_operator = env.chance(500_000);
        let profile = FaultProfile {
            drop_ppm: rate(60_000),
            ack_lost_ppm: rate(60_000),
            duplicate_ppm: rate(60_000),
            delay_ppm: rate(100_000),
            callback_error_ppm: rate(60_000),
            partitions: rate(3),
            crashes: rate(3),
            torn_ppm: rate(1_000_000),
            clock_skew: rng.chance(500_000),
            attempts_max,
            subscription_ttl_ms: None,
            bounds: None,
            subscription_grace_ms: None,
            inbox_keys_max: BTreeMap::new(),
            host_bounds: BTreeMap::new(),
            order_deadline_ms: None,
        };
        // A short TTL (a quarter of the seeds) lets a partition or a crash
        // outlast a subscription. The expiry is the subscriber's clock plus the
        // TTL, judged on the broker's clock, so a TTL must exceed the skew
        // between them: with skewed clocks (up to 2 s apart) the TTL stays above
        // 5 s. (Drawn shorter, every subscription of a skewed node was "in the
        // past" on arrival and the services never started.)
        let mut profile = profile;
        if env.chance(250_000) {
            let (lo, hi) = if profile.clock_skew {
                (5_000, 8_000)
            } else {
                (300, 1_000)
            };
            profile.subscription_ttl_ms = Some(env.range_inclusive(lo, hi) as u32);
        }
        let mut grace = Rng::new(seed ^ 0x06AC_E000_0000_0000);
        let custom = shape.faulty_nodes.contains(&(crate::topology::CUSTOM as u8));
        if profile.subscription_ttl_ms.is_some() && !custom && grace.chance(500_000) {
            profile.subscription_grace_ms = Some(grace.range_inclusive(0, 500) as u32);
        }
        // Small bounds, drawn from a stream of their own so every other draw
        // of a seed is unchanged.
        let mut small = Rng::new(seed ^ 0xB0B0_5EED_0000_0000);
        // Only up to about 100 orders: under a heavier load the world's node
        // loop serves timers only when its inbox is empty, so a saturated
        // broker at a small unsynced bound never sees its fsync complete and
        // refuses forever (a limit of the driver, noted in the README).
        if shape.messages_max <= 4_100 && small.chance(250_000) {
            // Small for the workload: a bound that holds 4-24 messages of a
            // 20-order saga holds proportionally more of a 2,000-order one
            // (the point is refusals, not a broker too small to ever drain).
            let scale = u64::from(shape.messages_max.div_ceil(900).max(1));
            profile.bounds = Some(Bounds {
                pending_per_subscriber_max: (small.range_inclusive(2, 12) * scale) as u32,
                // Dead letters stay live messages until an operator acts: with
                // a short retry budget, room for them on top, or a slow operator
                // turns a handful of dead letters into a broker that refuses all.
                messages_max: ((small.range_inclusive(4, 24) + if profile.attempts_max.is_some() { 16 } else { 0 })
                    * scale) as u32,
                publishes_unsynced_max: (small.range_inclusive(1, 6) * scale) as u32,
                inflight_per_subscriber_max: (small.range_inclusive(1, 4) * scale).min(16) as u32,
                compact_garbage_records_min: small.range_inclusive(4, 32) as u32,
            });
        }
        // The participants' inbox bounds, each from a stream of its own (as
        // they were drawn before they joined the plan, so runs are unchanged).
        let mut participants = vec![crate::topology::ORDER, crate::topology::STOCK, crate::topology::PAYMENT];
        if custom {
            participants.push(crate::topology::CUSTOM);
        }
        for &node in &participants {
            let mut inbox = Rng::new(seed ^ 0x1B0C_5EED_0000_0000 ^ node as u64);
            if inbox.chance(500_000) {
                profile
                    .inbox_keys_max
                    .insert(node as u8, inbox.range_inclusive(1, 8) as u32);
            }
        }
        // The hosts' small bounds, each from a stream of its own (so every
        // other draw is unchanged), under the same load limit as the
        // broker's. The outbox holds at least 2: one decision of the order
        // publishes two messages (a cancellation), and a smaller outbox
        // could never take it (a configuration the host's contract excludes).
        // Never with small broker bounds: a broker full of messages for the
        // order refuses the order's publishes, the order's full outbox makes
        // it refuse those messages, and neither ever drains (a deadlock of
        // bounded buffers in a cycle, which saga:114 found when both were
        // drawn; the README's operations notes size the broker above the
        // participants' outboxes for this reason).
        for &node in &participants {
            let mut host = Rng::new(seed ^ 0x4057_B0D5_0000_0000 ^ node as u64);
            if shape.messages_max <= 4_100 && profile.bounds.is_none() && host.chance(250_000) {
                let mut bounds = HostBounds {
                    outbox_entries_max: host.range_inclusive(2, 8) as u32,
                    records_unsynced_max: host.range_inclusive(1, 6) as u32,
                    answers_waiting_max: host.range_inclusive(1, 3) as u32,
                };
                if node == crate::topology::CUSTOM {
                    // A user's decision may publish more messages than a small
                    // outbox holds, which would stall it by configuration, not
                    // by a bug: its outbox keeps the host's default.
                    bounds.outbox_entries_max = 10_000;
                }
                profile.host_bounds.insert(node as u8, bounds);
            }
        }
        // The saga's order deadline, from the stream it was drawn from before
        // it joined the plan (so runs are unchanged).
        if shape.order_deadline {
            let mut deadline = Rng::new(seed ^ 0xDEAD_11FE_0000_0000);
            if deadline.chance(500_000) {
                profile.order_deadline_ms = Some(deadline.range_inclusive(300, 3_000) as u32);
            }
        }
        let mut plan = FaultPlan::from_profile(profile, &mut rng, shape);
        if slow_operator {
            plan.faults.push(Fault::SlowOperator);
        }
        // Disk damage, drawn from a stream of its own so that every other draw
        // of a seed is unchanged: a torn write may leave zeros or garbage
        // beyond its kept bytes, and half the crashed nodes get a recovery probe.
        let mut disk = Rng::new(seed ^ 0xD15C_DA3A_0000_0000);
        let mut probed = Vec::new();
        for f in &mut plan.faults {
            if let Fault::Crash {
                node, torn_keep, tail, ..
            } = f
            {
                if torn_keep.is_some() && disk.chance(666_667) {
                    let len = disk.range_inclusive(1, 64) as u32;
                    *tail = Some(if disk.chance(500_000) {
                        CrashTail::Zeros { len }
                    } else {
                        CrashTail::Garbage {
                            len,
                            seed: disk.next_u64(),
                        }
                    });
                }
                if disk.chance(500_000) && !probed.contains(node) {
                    probed.push(*node);
                }
            }
        }
        for node in probed {
            plan.faults.push(Fault::BitFlip {
                node,
                where_ppm: disk.below(1_000_000) as u32,
                bit: disk.below(8) as u8,
            });
        }
        // A process pause in a quarter of the seeds, from a stream of its own.
        let mut pause = Rng::new(seed ^ 0x9A05_E000_0000_0000);
        if pause.chance(250_000) {
            let node = shape.faulty_nodes[pause.below(shape.faulty_nodes.len() as u64) as usize];
            plan.faults.push(Fault::Pause {
                at_ms: pause.below(u64::from(shape.chaos_ms)) as u32,
                for_ms: pause.range_inclusive(100, 1_500) as u32,
                node,
            });
        }
        plan.faults.extend(environment_faults(seed, shape, &plan));
        plan
    }

    pub fn from_profile(profile: FaultProfile, rng: &mut Rng, shape: &PlanShape) -> FaultPlan {
        let mut faults = Vec::new();
        for nth in 0..shape.messages_max {
            if rng.chance(profile.drop_ppm) {
                faults.push(Fault::Drop { nth });
            }
            if rng.chance(profile.ack_lost_ppm) {
                faults.push(Fault::AckLost { nth });
            }
            if rng.chance(profile.duplicate_ppm) {
                faults.push(Fault::Duplicate { nth });
            }
            if rng.chance(profile.delay_ppm) {
                faults.push(Fault::Delay {
                    nth,
                    ms: rng.range_inclusive(5, 400) as u32,
                });
            }
            if rng.chance(profile.callback_error_ppm) {
                faults.push(Fault::CallbackError {
                    nth,
                    hang: rng.chance(300_000),
                });
            }
        }
        let faulty = &shape.faulty_nodes;
        let pick = |rng: &mut Rng| faulty[rng.below(faulty.len() as u64) as usize];
        for _ in 0..profile.partitions {
            let a = pick(rng);
            let b = if rng.chance(500_000) {
                None
            } else {
                let b = pick(rng);
                if b == a { None } else { Some(b) }
            };
            faults.push(Fault::Partition {
                at_ms: rng.below(u64::from(shape.chaos_ms)) as u32,
                for_ms: rng.range_inclusive(50, 2_000) as u32,
                a,
                b,
            });
        }
        for _ in 0..profile.crashes {
            let node = pick(rng);
            let torn = rng.chance(profile.torn_ppm);
            faults.push(Fault::Crash {
                at_ms: rng.below(u64::from(shape.chaos_ms)) as u32,
                down_ms: rng.range_inclusive(10, 1_500) as u32,
                node,
                torn_keep: torn.then(|| rng.range_inclusive(1, 200) as u32),
                tail: None,
            });
        }
        if profile.clock_skew {
            for &node in faulty {
                faults.push(Fault::ClockSkew {
                    node,
                    offset_ms: rng.range_inclusive(0, 2_000) as i32 - 1_000,
                    drift_ppm: rng.range_inclusive(0, 2_000) as i32 - 1_000,
                });
            }
        }
        FaultPlan { profile, faults }
    }

    pub fn index(&self) -> PlanIndex {
        let mut ix = PlanIndex::default();
        for f in &self.faults {
            match *f {
                Fault::Drop { nth } => {
                    ix.drop.insert(nth, ());
                }
                Fault::AckLost { nth } => {
                    ix.ack_lost.insert(nth, ());
                }
                Fault::Duplicate { nth } => {
                    ix.duplicate.insert(nth, ());
                }
                Fault::Delay { nth, ms } => {
                    ix.delay.insert(nth, ms);
                }
                Fault::CallbackError { nth, hang } => {
                    ix.callback_error.insert(nth, hang);
                }
                Fault::BitFlip { node, where_ppm, bit } => {
                    ix.bit_flip.insert(node, (where_ppm, bit));
                }
                Fault::Partition { .. }
                | Fault::Crash { .. }
                | Fault::ClockSkew { .. }
                | Fault::SlowOperator
                | Fault::Pause { .. }
                | Fault::OneWay { .. }
                | Fault::SyncError { .. }
                | Fault::DiskFull { .. }
                | Fault::SyncStall { .. }
                | Fault::ClockStep { .. } => {}
            }
        }
        ix
    }

    /// The plan without entry `i` (shrinking).
    pub fn without(&self, i: usize) -> FaultPlan {
        let mut p = self.clone();
        p.faults.remove(i);
        p
    }
}

/// Faults of the environment a deployment meets beyond the network and
/// crashes: a one-way partition, a failing, full or stalling disk, a clock
/// stepped back across a restart. Each from a stream of its own, so every
/// other draw of a seed is unchanged; each in about a fifth of the seeds,
/// inside the chaos phase.
fn environment_faults(seed: u64, shape: &PlanShape, plan: &FaultPlan) -> Vec<Fault> {
    let mut out = Vec::new();
    let chaos = u64::from(shape.chaos_ms);
    let faulty = &shape.faulty_nodes;
    let pick = |rng: &mut Rng| faulty[rng.below(faulty.len() as u64) as usize];
    let mut one_way = Rng::new(seed ^ 0x0E3A_7000_0000_0000);
    if one_way.chance(200_000) {
        let from = pick(&mut one_way);
        let mut to = pick(&mut one_way);
        if to == from {
            to = crate::topology::BROKER as u8;
        }
        if to == from {
            to = faulty[0];
        }
        out.push(Fault::OneWay {
            at_ms: one_way.below(chaos) as u32,
            for_ms: one_way.range_inclusive(100, 2_000) as u32,
            from,
            to,
        });
    }
    let mut sync = Rng::new(seed ^ 0xE10E_5C00_0000_0000);
    if sync.chance(200_000) {
        out.push(Fault::SyncError {
            node: pick(&mut sync),
            at_ms: sync.below(chaos) as u32,
            down_ms: sync.range_inclusive(10, 1_000) as u32,
        });
    }
    let mut full = Rng::new(seed ^ 0xF0E1_0000_0000_0000);
    if full.chance(200_000) {
        let at_ms = full.below(chaos);
        out.push(Fault::DiskFull {
            node: pick(&mut full),
            at_ms: at_ms as u32,
            for_ms: full.range_inclusive(50, 1_500).min(chaos - at_ms) as u32,
        });
    }
    let mut stall = Rng::new(seed ^ 0x57A1_1000_0000_0000);
    if stall.chance(200_000) {
        let at_ms = stall.below(chaos);
        out.push(Fault::SyncStall {
            node: pick(&mut stall),
            at_ms: at_ms as u32,
            for_ms: stall.range_inclusive(100, 2_000).min(chaos - at_ms) as u32,
        });
    }
    // A step back only matters to a node that restarts; a short subscription
    // TTL without skewed clocks (0.3-1 s) would expire on arrival from a
    // stepped-back subscriber, so those seeds step at most 100 ms.
    let mut step = Rng::new(seed ^ 0xC10C_5000_0000_0000);
    let restarts: Vec<u8> = plan
        .faults
        .iter()
        .filter_map(|f| match f {
            Fault::Crash { node, .. } => Some(*node),
            _ => None,
        })
        .chain(out.iter().filter_map(|f| match f {
            Fault::SyncError { node, .. } | Fault::DiskFull { node, .. } => Some(*node),
            _ => None,
        }))
        .collect();
    if !restarts.is_empty() && step.chance(400_000) {
        let node = restarts[step.below(restarts.len() as u64) as usize];
        let short_ttl = plan.profile.subscription_ttl_ms.is_some() && !plan.profile.clock_skew;
        let back_max = if short_ttl { 100 } else { 2_000 };
        out.push(Fault::ClockStep {
            node,
            back_ms: step.range_inclusive(1, back_max) as u32,
        });
    }
    out
}

impl FaultPlan {
    fn write(&self, f: &mut fmt::Formatter<'_>, name: &dyn Fn(u8) -> String) -> fmt::Result {
        f.write_str("profile: ")?;
        self.profile.write(f, name)?;
        writeln!(f)?;
        for fault in &self.faults {
            f.write_str("  - ")?;
            fault.write(f, name)?;
            writeln!(f)?;
        }
        Ok(())
    }

    /// The plan as printed at the top of a trace, with the custom node named
    /// by its participant's client id (`crash loyalty-service at ...`); the
    /// `Display` form names it `custom`. The JSON keeps node indices.
    pub fn describe(&self, custom: Option<&ClientId>) -> String {
        Named {
            custom,
            write: &|f, name| self.write(f, name),
        }
        .to_string()
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, &|n| node_name(n).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> PlanShape {
        PlanShape {
            chaos_ms: 5_000,
            faulty_nodes: FAULTY_NODES.to_vec(),
            messages_max: 500,
            order_deadline: true,
        }
    }

    #[test]
    fn same_seed_same_plan_and_plans_differ_across_seeds() {
        assert_eq!(FaultPlan::from_seed(3, &shape()), FaultPlan::from_seed(3, &shape()));
        let distinct: std::collections::BTreeSet<String> =
            (0..20).map(|s| FaultPlan::from_seed(s, &shape()).to_string()).collect();
        assert!(distinct.len() > 15, "swarm profiles should vary across seeds");
    }

    #[test]
    fn swarm_draws_calm_and_stormy_seeds_covering_every_kind() {
        let mut kinds = std::collections::BTreeSet::new();
        let mut calm = 0;
        for s in 0..200 {
            let p = FaultPlan::from_seed(s, &shape());
            // Calm: a handful of faults at most, the environment's included.
            if p.faults.len() < 8 {
                calm += 1;
            }
            kinds.extend(p.faults.iter().map(|f| f.kind()));
            if p.faults
                .iter()
                .any(|f| matches!(f, Fault::Crash { torn_keep: Some(_), .. }))
            {
                kinds.insert("torn_write");
            }
            if p.faults.iter().any(|f| matches!(f, Fault::Crash { tail: Some(_), .. })) {
                kinds.insert("garbage_tail");
            }
            if p.profile.attempts_max.is_some() {
                kinds.insert("dead_letter");
            }
            if p.profile.subscription_ttl_ms.is_some() {
                kinds.insert("subscription_lapse");
            }
        }
        assert!(calm > 0, "some seeds must be calm");
        assert_eq!(kinds.len(), FAULT_KINDS.len(), "kinds drawn: {kinds:?}");
    }

    #[test]
    fn plan_round_trips_through_json() {
        let p = FaultPlan::from_seed(11, &shape());
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<FaultPlan>(&j).unwrap(), p);
    }
}

//! The simulator's cluster mode: several broker instances sharing a
//! simulated PostgreSQL node, as `sagamq serve --store postgres://...` runs
//! them (`src/real/cluster/`), under crashes, pauses, cuts from the database,
//! database restarts, lost COMMITs and partitions between instances; judged
//! by the same [`crate::check::Checker`] as the single broker.
//!
//! - [`db`]: the sans-IO model of the database (tables, transactions, WAL flushes, restarts).
//! - [`plan`]: the fault plan drawn from the seed.
//! - [`world`]: the world (instances, clients, the database node, the network) and its run.
//! - `inst`, `clients`, `dbnode` (private): an instance, the clients, the database node.
//! - [`bench`](mod@bench): the simulated throughput and failover figures (`sagamq-sim cluster-bench`).
//!
//! Each instance runs the shipped lease plan ([`sagamq::cluster::plan`]) and
//! owner-side lease bound ([`sagamq::cluster::LocalLease`]), one shipped
//! broker core per partition it owns (recovered from the partition's rows on
//! takeover), writes each group commit as a fenced transaction, forwards a
//! publish to its partition's owner and a subscribe to every partition.
//!
//! Why a discrete-event loop rather than madsim tasks: every node here is a
//! sans-IO state machine stepped by one loop on a virtual nanosecond clock
//! (as [`crate::transport`]'s mailboxes are), and the database's commit-cost
//! model works in microseconds, below madsim's 1 ms timer floor. The run is a
//! pure function of the seed and the configuration.
//!
//! **Invariant:** the checker never sees this module; this module feeds it
//! [`crate::history::Event`]s.

pub mod bench;
pub mod db;
pub mod plan;
pub mod world;

mod clients;
mod dbnode;
mod inst;

use crate::check::Violation;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The planted cluster bugs (`sagamq-sim cluster --bug NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterBug {
    /// Writes skip the lease-epoch check: a stale owner (paused past its
    /// lease) keeps writing rows after the new owner loaded the partition.
    NoFencing,
    /// A subscribe is applied to the partitions this instance owns only, yet
    /// answered OK: later publishes in the other partitions miss the subscriber.
    PartialSubscription,
    /// Rows are inserted without `ON CONFLICT DO NOTHING` on their key, so a
    /// COMMIT retried after an unknown outcome stores the batch twice.
    DoubleStoreRetriedCommit,
}

pub const CLUSTER_BUGS: [ClusterBug; 3] = [
    ClusterBug::NoFencing,
    ClusterBug::PartialSubscription,
    ClusterBug::DoubleStoreRetriedCommit,
];

impl ClusterBug {
    pub fn name(self) -> &'static str {
        match self {
            ClusterBug::NoFencing => "no-fencing",
            ClusterBug::PartialSubscription => "partial-subscription",
            ClusterBug::DoubleStoreRetriedCommit => "double-store-retried-commit",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            ClusterBug::NoFencing => {
                "writes skip the lease-epoch check: a paused owner's late COMMIT lands after the takeover"
            }
            ClusterBug::PartialSubscription => {
                "a subscribe reaches only the partitions of the instance that took it, yet is answered OK"
            }
            ClusterBug::DoubleStoreRetriedCommit => {
                "rows are inserted without ON CONFLICT DO NOTHING: a COMMIT retried after an unknown outcome stores twice"
            }
        }
    }
}

impl fmt::Display for ClusterBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ClusterBug {
    type Err = String;
    fn from_str(s: &str) -> Result<ClusterBug, String> {
        CLUSTER_BUGS.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            let names: Vec<&str> = CLUSTER_BUGS.iter().map(|b| b.name()).collect();
            format!("unknown cluster bug {s:?}; one of: {}", names.join(", "))
        })
    }
}

/// What the model charges for work (see docs/cluster.md, "The simulator's cluster mode").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CostModel {
    /// Database CPU per transaction (one CPU: transactions execute one at a time).
    pub db_txn_us: u64,
    /// Database CPU per row a transaction writes.
    pub db_row_us: u64,
    /// One WAL flush; every transaction executed while the previous flush
    /// ran shares the next one (group commit).
    pub wal_flush_us: u64,
    /// Instance CPU per message it handles (a request, a forwarded request,
    /// a database answer, a callback answer).
    pub instance_msg_us: u64,
    /// One-way network latency, drawn uniformly in this range per message.
    pub net_us: (u64, u64),
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            db_txn_us: 50,
            db_row_us: 5,
            wal_flush_us: 1_000,
            instance_msg_us: 40,
            net_us: (200, 1_000),
        }
    }
}

/// How a cluster run is configured.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub instances: usize,
    pub partitions: u32,
    pub lease_ms: u64,
    /// Faults on for this long (simulated), then everything heals.
    pub chaos_ms: u64,
    /// After healing, everything must settle within this.
    pub heal_ms_max: u64,
    /// Publishers and publishes each (the sweep's workload).
    pub publishers: usize,
    pub publishes_each: usize,
    pub bug: Option<ClusterBug>,
    /// Draw the seed's fault plan (off for the benchmark).
    pub faults: bool,
    pub cost: CostModel,
    pub trace: bool,
    /// The benchmark's closed-loop workload instead of the sweep's.
    pub bench: Option<BenchLoad>,
}

impl ClusterConfig {
    pub fn new(instances: usize, partitions: u32, bug: Option<ClusterBug>) -> ClusterConfig {
        ClusterConfig {
            instances: instances.max(1),
            partitions: partitions.clamp(1, sagamq::cluster::PARTITIONS_MAX),
            lease_ms: 1_000,
            chaos_ms: 6_000,
            heal_ms_max: 40_000,
            publishers: 4,
            publishes_each: 20,
            bug,
            faults: true,
            cost: CostModel::default(),
            trace: false,
            bench: None,
        }
    }
}

/// The benchmark's load: `lanes` clients each with one publish in flight,
/// the next sent as soon as the last is acknowledged; acknowledgements are
/// counted in `[from_ms, to_ms)`; at `to_ms` the instance owning the most
/// partitions is killed and not restarted; the run ends at `end_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchLoad {
    pub lanes: usize,
    pub from_ms: u64,
    pub to_ms: u64,
    pub end_ms: u64,
}

/// What one cluster seed produced.
#[derive(Debug, Default)]
pub struct ClusterResult {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// Faults that actually fired, per kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub coverage: BTreeMap<&'static str, u64>,
    pub trace: Vec<String>,
    pub trace_hash: u64,
    pub sim_ms: u64,
    pub acked: u64,
    pub takeovers: u64,
    /// The benchmark: acknowledged publishes in its window, and the time from
    /// the kill to the last of the killed owner's partitions serving again.
    pub bench_acked: u64,
    pub failover_ms: Option<u64>,
}

/// A sweep's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterSummary {
    pub instances: usize,
    pub partitions: u32,
    pub bug: Option<String>,
    pub seeds: u64,
    pub passed: u64,
    pub failed: u64,
    /// (seed, invariant, detail) of each failing seed (the first 20).
    pub failures: Vec<(u64, String, String)>,
    pub first_failing_seed: Option<u64>,
    pub faults: BTreeMap<String, u64>,
    pub coverage: BTreeMap<String, u64>,
    pub acked: u64,
    pub takeovers: u64,
    pub sim_ms: u64,
}

impl ClusterSummary {
    pub fn human(&self) -> String {
        let mut out = format!(
            "cluster ({} instances, {} partitions{}): {} seeds, {} passed, {} failed; {} publishes acknowledged, {} takeovers, {:.1} simulated s\n",
            self.instances,
            self.partitions,
            self.bug.as_ref().map(|b| format!(", bug {b}")).unwrap_or_default(),
            self.seeds,
            self.passed,
            self.failed,
            self.acked,
            self.takeovers,
            self.sim_ms as f64 / 1000.0
        );
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!("faults fired: {}\n", faults.join(", ")));
        let paths: Vec<String> = self
            .coverage
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!("paths reached: {}\n", paths.join(", ")));
        for (seed, inv, detail) in &self.failures {
            out.push_str(&format!(
                "seed {seed}: {inv}: {detail}\n  replay: cargo run --release -p sagamq-sim -- replay --scenario cluster --seed {seed} --instances {} --partitions {}{}\n",
                self.instances,
                self.partitions,
                self.bug.as_ref().map(|b| format!(" --bug {b}")).unwrap_or_default()
            ));
        }
        out
    }
}

/// Runs one seed.
pub fn run(seed: u64, cfg: &ClusterConfig) -> ClusterResult {
    world::World::new(seed, cfg).run()
}

/// Runs every seed of `seeds` in order; stops at the first failure if asked.
pub fn sweep(cfg: &ClusterConfig, seeds: std::ops::Range<u64>, stop_at_first: bool) -> ClusterSummary {
    let mut s = ClusterSummary {
        instances: cfg.instances,
        partitions: cfg.partitions,
        bug: cfg.bug.map(|b| b.name().to_string()),
        faults: plan::FAULT_KINDS.iter().map(|k| (k.to_string(), 0)).collect(),
        ..ClusterSummary::default()
    };
    for seed in seeds {
        let r = run(seed, cfg);
        s.seeds += 1;
        s.acked += r.acked;
        s.takeovers += r.takeovers;
        s.sim_ms += r.sim_ms;
        for (k, v) in &r.faults {
            *s.faults.entry(k.to_string()).or_default() += v;
        }
        for (k, v) in &r.coverage {
            *s.coverage.entry(k.to_string()).or_default() += v;
        }
        if let Some(v) = r.violations.first() {
            s.failed += 1;
            s.first_failing_seed.get_or_insert(seed);
            if s.failures.len() < 20 {
                s.failures.push((seed, v.invariant.to_string(), v.detail.clone()));
            }
            if stop_at_first {
                break;
            }
        } else {
            s.passed += 1;
        }
    }
    s
}

//! The cluster mode (issue 15): seeded sweeps of several instances on a
//! simulated PostgreSQL must pass with every fault kind firing and the
//! cluster's paths reached; each planted cluster bug must be caught within
//! its seed budget while the shipped code passes the same seeds; a seed
//! replays to the same trace.
//!
//! `SAGAMQ_SEEDS=0..20000 cargo test --release -p sagamq-sim --test cluster` widens the sweep.

mod common;

use sagamq_sim::cluster::{self, ClusterBug, ClusterConfig, ClusterSummary, plan::FAULT_KINDS};

/// Paths the default sweep must reach (counted by the world and the checker).
const PATHS: [&str; 12] = [
    "cluster_forwarded_publish",
    "cluster_no_owner_503",
    "cluster_lease_ran_out",
    "cluster_write_fenced",
    "cluster_write_retried",
    "cluster_late_subscriber_processed",
    "cluster_recovery_probe",
    "recovery_broker",
    "compaction",
    "duplicate_publish",
    "dedup_after_recovery",
    "dedup_after_compaction",
];

fn sweep(instances: usize, partitions: u32, bug: Option<ClusterBug>, seeds: std::ops::Range<u64>) -> ClusterSummary {
    let s = cluster::sweep(&ClusterConfig::new(instances, partitions, bug), seeds, false);
    println!("{}", s.human());
    s
}

#[test]
fn cluster_sweep_passes_with_every_fault_kind_firing() {
    let seeds = common::seeds(0..150);
    let mut total = ClusterSummary::default();
    for (instances, partitions) in [(3, 8), (2, 4), (5, 16)] {
        let s = sweep(instances, partitions, None, seeds.clone());
        assert_eq!(s.failed, 0, "{}", s.human());
        assert_eq!(s.acked, s.seeds * 80, "every publish of every seed acknowledged");
        for (k, v) in s.faults {
            *total.faults.entry(k).or_default() += v;
        }
        for (k, v) in s.coverage {
            *total.coverage.entry(k).or_default() += v;
        }
    }
    if common::default_seeds() {
        for kind in FAULT_KINDS {
            assert!(
                total.faults.get(kind).copied().unwrap_or(0) > 0,
                "fault {kind} never fired"
            );
        }
        for path in PATHS {
            assert!(
                total.coverage.get(path).copied().unwrap_or(0) > 0,
                "path {path} never reached: {:?}",
                total.coverage
            );
        }
    }
}

/// A planted bug, the seeds it must be caught within (from 0), and the
/// invariants that name its consequence.
struct BugCase {
    bug: ClusterBug,
    budget: u64,
    invariants: &'static [&'static str],
}

/// Each bug is caught within its budget, by the invariant that names its
/// consequence; the shipped code passes the same seeds (the sweep above
/// covers 0..150 of the same shapes).
#[test]
fn planted_cluster_bugs_are_caught_within_their_seed_budget() {
    let cases = [
        BugCase {
            bug: ClusterBug::NoFencing,
            budget: 40,
            invariants: &["recovery", "recovery-equivalence"],
        },
        BugCase {
            bug: ClusterBug::PartialSubscription,
            budget: 5,
            invariants: &["no-lost-publish"],
        },
        BugCase {
            bug: ClusterBug::DoubleStoreRetriedCommit,
            budget: 40,
            invariants: &["recovery", "recovery-equivalence"],
        },
    ];
    let (instances, partitions) = (3, 8);
    for BugCase {
        bug,
        budget,
        invariants,
    } in cases
    {
        let cfg = ClusterConfig::new(instances, partitions, Some(bug));
        let s = cluster::sweep(&cfg, 0..budget, true);
        let Some(seed) = s.first_failing_seed else {
            panic!("{bug} not caught in seeds 0..{budget}: {}", s.human());
        };
        let (_, invariant, detail) = &s.failures[0];
        assert!(
            invariants.contains(&invariant.as_str()),
            "{bug} caught at seed {seed} by {invariant} ({detail}), expected one of {invariants:?}"
        );
        println!("{bug}: caught at seed {seed} by {invariant}: {detail}");
        let shipped = cluster::run(seed, &ClusterConfig::new(instances, partitions, None));
        assert!(
            shipped.violations.is_empty(),
            "the shipped code fails seed {seed} too: {:?}",
            shipped.violations
        );
    }
}

#[test]
fn a_cluster_seed_replays_to_the_same_trace() {
    let mut cfg = ClusterConfig::new(3, 8, None);
    cfg.trace = true;
    let a = cluster::run(11, &cfg);
    let b = cluster::run(11, &cfg);
    assert!(a.trace.len() > 50, "a traced run records its events");
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.trace_hash, b.trace_hash);
    let c = cluster::run(12, &cfg);
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
    // Tracing does not change the run.
    cfg.trace = false;
    let quiet = cluster::run(11, &cfg);
    assert_eq!(
        (quiet.acked, quiet.takeovers, quiet.sim_ms),
        (a.acked, a.takeovers, a.sim_ms)
    );
}

/// The benchmark's failover (the owner of the most partitions killed, to the
/// last of its partitions serving elsewhere) stays within the bound users are
/// told (`takeover_bound_ms`: the lease plus one lease round) plus loading,
/// and is not instant (the lease must run out first); publishes flow before.
#[test]
fn a_killed_owner_s_partitions_serve_again_within_the_takeover_bound() {
    let lease_ms = 1_000;
    let bound = sagamq::cluster::takeover_bound_ms(lease_ms) + 50;
    for seed in 1..=3 {
        let (rate, failover) = cluster::bench::measure_with(3, 8, lease_ms, seed, 16);
        let failover = failover.expect("the killed owner's partitions serve again");
        println!("seed {seed}: {rate:.0} acked/s, failover {failover} ms");
        assert!(rate > 0.0);
        assert!(
            (lease_ms / 2..=bound).contains(&failover),
            "failover {failover} ms outside {}..={bound}",
            lease_ms / 2
        );
    }
}

//! The cluster figures: simulated acknowledged publishes/s and failover time
//! for 1, 2, 3 and 5 instances over 4 and 16 partitions, under the
//! [`CostModel`]. They show how the design scales under that model; they are
//! not measurements of PostgreSQL or of this machine.

use super::{BenchLoad, ClusterConfig, CostModel, run};
use std::fmt::Write as _;

/// Closed-loop publishers in all, whatever the instance count: enough to
/// saturate the busiest resource of every configuration, so the figure is a
/// capacity rather than the clients' own pace.
pub const LANES: usize = 256;

/// One run's figures: acknowledged publishes/s in the window, failover ms.
pub fn measure(instances: usize, partitions: u32, lease_ms: u64, seed: u64) -> (f64, Option<u64>) {
    measure_with(instances, partitions, lease_ms, seed, LANES)
}

/// [`measure`] with `lanes` closed-loop publishers.
pub fn measure_with(instances: usize, partitions: u32, lease_ms: u64, seed: u64, lanes: usize) -> (f64, Option<u64>) {
    let mut cfg = ClusterConfig::new(instances, partitions, None);
    cfg.faults = false;
    cfg.lease_ms = lease_ms;
    let load = BenchLoad {
        lanes,
        from_ms: 2 * lease_ms,
        to_ms: 2 * lease_ms + 1_000,
        end_ms: 2 * lease_ms + 1_000 + 2 * lease_ms,
    };
    cfg.bench = Some(load);
    let r = run(seed, &cfg);
    let rate = r.bench_acked as f64 * 1000.0 / (load.to_ms - load.from_ms) as f64;
    (rate, r.failover_ms)
}

/// The table `sagamq-sim cluster-bench` prints: per configuration, the
/// mean throughput and the range of failover times over seeds `1..=seeds`.
pub fn figures(lease_ms: u64, seeds: u64) -> String {
    let c = CostModel::default();
    let seeds = seeds.max(1);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "SIMULATED under a cost model, not measured: database one CPU, {} us per transaction + {} us per row, \
         WAL flush {} us shared by every transaction executed meanwhile (group commit); instance {} us CPU per \
         message handled; network {}-{} us one way; {} closed-loop publishers in all, each to a random instance \
         (forwarded to the owner when it is another: 3 messages handled instead of 1), no subscriber; \
         one write in flight per partition; throughput counted over 1 s after 2 leases of warm-up; lease {} ms; \
         failover: the owner of the most partitions killed (not restarted) -> the last of its partitions \
         serving on another instance. Seeds 1..={seeds}: throughput mean, failover min-max.",
        c.db_txn_us, c.db_row_us, c.wal_flush_us, c.instance_msg_us, c.net_us.0, c.net_us.1, LANES, lease_ms
    );
    let _ = writeln!(
        out,
        "| instances | partitions | acked publishes/s (simulated) | failover ms (simulated) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for partitions in [4, 16] {
        for instances in [1, 2, 3, 5] {
            let runs: Vec<(f64, Option<u64>)> = (1..=seeds)
                .map(|seed| measure(instances, partitions, lease_ms, seed))
                .collect();
            let rate = runs.iter().map(|r| r.0).sum::<f64>() / runs.len() as f64;
            let failovers: Option<Vec<u64>> = runs.iter().map(|r| r.1).collect();
            let f = match failovers {
                _ if instances == 1 => "n/a (no survivor)".to_string(),
                Some(f) => format!(
                    "{}-{}",
                    f.iter().min().copied().unwrap_or(0),
                    f.iter().max().copied().unwrap_or(0)
                ),
                None => "not within 2 leases".to_string(),
            };
            let _ = writeln!(out, "| {instances} | {partitions} | {rate:.0} | {f} |");
        }
    }
    out
}

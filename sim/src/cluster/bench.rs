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

/// One configuration's figures: acknowledged publishes/s in the window, failover ms.
pub fn measure(instances: usize, partitions: u32, lease_ms: u64) -> (f64, Option<u64>) {
    let mut cfg = ClusterConfig::new(instances, partitions, None);
    cfg.faults = false;
    cfg.lease_ms = lease_ms;
    let load = BenchLoad {
        lanes: LANES,
        from_ms: 3 * lease_ms,
        to_ms: 3 * lease_ms + 1_000,
        end_ms: 3 * lease_ms + 1_000 + 2 * lease_ms,
    };
    cfg.bench = Some(load);
    let r = run(1, &cfg);
    let rate = r.bench_acked as f64 * 1000.0 / (load.to_ms - load.from_ms) as f64;
    (rate, r.failover_ms)
}

/// The table `sagamq-sim cluster-bench` prints.
pub fn figures(lease_ms: u64) -> String {
    let c = CostModel::default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "SIMULATED under a cost model, not measured: database one CPU, {} us per transaction + {} us per row, \
         WAL flush {} us shared by every transaction executed meanwhile (group commit); instance {} us CPU per \
         message handled; network {}-{} us one way; {} closed-loop publishers in all, each to a random instance \
         (forwarded to the owner when it is another: 3 messages handled instead of 1), no subscriber; \
         one write in flight per partition; throughput counted over 1 s after 3 leases of warm-up; lease {} ms; failover: the owner of the most partitions killed \
         (not restarted) -> the last of its partitions serving on another instance.",
        c.db_txn_us, c.db_row_us, c.wal_flush_us, c.instance_msg_us, c.net_us.0, c.net_us.1, LANES, lease_ms
    );
    let _ = writeln!(
        out,
        "| instances | partitions | acked publishes/s (simulated) | failover ms (simulated) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for partitions in [4, 16] {
        for instances in [1, 2, 3, 5] {
            let (rate, failover) = measure(instances, partitions, lease_ms);
            let f = match failover {
                Some(ms) => ms.to_string(),
                None if instances == 1 => "n/a (no survivor)".to_string(),
                None => "not within 2 leases".to_string(),
            };
            let _ = writeln!(out, "| {instances} | {partitions} | {rate:.0} | {f} |");
        }
    }
    out
}

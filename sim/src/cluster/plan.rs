//! The cluster's fault plan, drawn from the seed: each fault family from a
//! stream of its own (so adding draws to one family never moves another's),
//! each family switched on in about half of the seeds (swarm testing).

use sagamq::rng::Rng;

/// Every fault kind the cluster world can fire; the cargo-test sweep asserts each fires.
pub const FAULT_KINDS: [&str; 6] = ["crash", "pause", "db_cut", "db_restart", "commit_lost", "peer_cut"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Instance `inst` is killed; it starts again (a new instance id) after `down_ms`.
    Crash { at_ms: u64, inst: usize, down_ms: u64 },
    /// Instance `inst` stops for `pause_ms` (longer than a lease) without
    /// crashing, at its next write after `at_ms`: after it checked its lease,
    /// before its COMMIT leaves (the dangerous point); within a second anyway.
    Pause { at_ms: u64, inst: usize, pause_ms: u64 },
    /// Instance `inst` cannot reach the database for `dur_ms`; clients and
    /// the other instances still reach it.
    DbCut { at_ms: u64, inst: usize, dur_ms: u64 },
    /// The database restarts: every connection dropped, unflushed
    /// transactions partly kept (the seed decides how many), down `down_ms`.
    DbRestart { at_ms: u64, down_ms: u64 },
    /// The next `count` write transactions after `at_ms` lose their
    /// connection around COMMIT: committed or not (the seed decides), the
    /// instance is not told which.
    CommitLost { at_ms: u64, count: u32 },
    /// Instances `a` and `b` cannot reach each other for `dur_ms`.
    PeerCut {
        at_ms: u64,
        a: usize,
        b: usize,
        dur_ms: u64,
    },
}

impl Fault {
    /// Its name in [`FAULT_KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Crash { .. } => "crash",
            Fault::Pause { .. } => "pause",
            Fault::DbCut { .. } => "db_cut",
            Fault::DbRestart { .. } => "db_restart",
            Fault::CommitLost { .. } => "commit_lost",
            Fault::PeerCut { .. } => "peer_cut",
        }
    }

    pub fn at_ms(&self) -> u64 {
        match *self {
            Fault::Crash { at_ms, .. }
            | Fault::Pause { at_ms, .. }
            | Fault::DbCut { at_ms, .. }
            | Fault::DbRestart { at_ms, .. }
            | Fault::CommitLost { at_ms, .. }
            | Fault::PeerCut { at_ms, .. } => at_ms,
        }
    }
}

/// The faults of one seed, in the order drawn (families in [`FAULT_KINDS`] order).
pub fn draw(seed: u64, instances: usize, chaos_ms: u64, lease_ms: u64) -> Vec<Fault> {
    let mut out = Vec::new();
    let inst = |r: &mut Rng| r.below(instances.max(1) as u64) as usize;
    // Faults start once the cluster has had a few lease rounds to spread out.
    let at = |r: &mut Rng| r.range_inclusive(chaos_ms / 8, chaos_ms * 7 / 8);
    let long = |r: &mut Rng| r.range_inclusive(lease_ms * 6 / 5, lease_ms * 5 / 2);
    for (k, salt) in [
        0xC2A5_4000_u64,
        0x9A05_E100,
        0xDBC0_7000,
        0xDB2E_5000,
        0xC033_1700,
        0x9EE2_C000,
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = Rng::new(seed ^ (salt << 32));
        if !r.chance(550_000) {
            continue;
        }
        for _ in 0..r.range_inclusive(1, 2) {
            let f = match k {
                0 => Fault::Crash {
                    at_ms: at(&mut r),
                    inst: inst(&mut r),
                    down_ms: r.range_inclusive(200, 3_000),
                },
                1 => Fault::Pause {
                    at_ms: at(&mut r),
                    inst: inst(&mut r),
                    pause_ms: long(&mut r),
                },
                2 => Fault::DbCut {
                    at_ms: at(&mut r),
                    inst: inst(&mut r),
                    dur_ms: long(&mut r),
                },
                3 => Fault::DbRestart {
                    at_ms: at(&mut r),
                    down_ms: r.range_inclusive(20, 800),
                },
                4 => Fault::CommitLost {
                    at_ms: at(&mut r),
                    count: r.range_inclusive(1, 4) as u32,
                },
                _ if instances >= 2 => {
                    let a = inst(&mut r);
                    let b = (a + 1 + r.below(instances as u64 - 1) as usize) % instances;
                    Fault::PeerCut {
                        at_ms: at(&mut r),
                        a,
                        b,
                        dur_ms: r.range_inclusive(300, 2_500),
                    }
                }
                _ => continue,
            };
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_plan_and_every_family_appears_across_seeds() {
        assert_eq!(draw(7, 3, 6_000, 1_000), draw(7, 3, 6_000, 1_000));
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..50 {
            for f in draw(seed, 3, 6_000, 1_000) {
                assert!(f.at_ms() >= 750 && f.at_ms() <= 5_250);
                if let Fault::PeerCut { a, b, .. } = f {
                    assert_ne!(a, b);
                }
                kinds.insert(f.kind());
            }
        }
        assert_eq!(kinds, FAULT_KINDS.into_iter().collect());
        assert!(
            draw(1, 1, 6_000, 1_000)
                .iter()
                .all(|f| !matches!(f, Fault::PeerCut { .. }))
        );
    }
}

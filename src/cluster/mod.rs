//! The cluster's decisions, sans-IO: which partition a message belongs to,
//! the cluster-wide message id, and which partition leases an instance should
//! renew, take or hand back given a view of the lease table.
//!
//! **Invariants:** a `GlobalID` maps to the same partition in every process
//! and every build (CRC-32 of its bytes, never a seeded hash), so dedup by
//! `(GlobalID, SubID)` and a saga's order stay within one partition; a
//! cluster message id names its partition and the partition core's own id,
//! and the two round-trip; [`plan`] is a pure function of its arguments (the
//! database's verdict on each lease is an input, never a clock read here), so
//! the real driver (`src/real/cluster/`) and a simulator can share it. Safety
//! does not rest on the plan: every write is fenced by the lease epoch in the
//! database; the plan only decides who tries to own what.

use crate::broker::Lsn;
use crate::types::{GlobalId, MsgId};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The most partitions a store may be initialised with.
pub const PARTITIONS_MAX: u32 = 1024;
/// Partitions of a store initialised without `--partitions`.
pub const PARTITIONS_DEFAULT: u32 = 16;

/// One partition: one broker core, owned by one instance at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// The partition count of a store (fixed when the store is initialised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partitions {
    count: u32,
}

impl Partitions {
    pub fn new(count: u32) -> Result<Partitions, String> {
        if count == 0 || count > PARTITIONS_MAX {
            return Err(format!(
                "the partition count must be between 1 and {PARTITIONS_MAX}, not {count}"
            ));
        }
        Ok(Partitions { count })
    }

    pub fn count(self) -> u32 {
        self.count
    }

    pub fn all(self) -> impl Iterator<Item = PartitionId> {
        (0..self.count).map(PartitionId)
    }

    /// The partition of a message: CRC-32 of its `GlobalID`, so stable
    /// across processes, builds and restarts.
    pub fn of(self, global_id: &GlobalId) -> PartitionId {
        PartitionId(crc32fast::hash(global_id.as_str().as_bytes()) % self.count)
    }

    /// The id clients see for message `local` of partition `p`: `local *
    /// count + p`. Unique across partitions; the partition is `id % count`.
    pub fn cluster_msg_id(self, p: PartitionId, local: MsgId) -> MsgId {
        assert!(p.0 < self.count, "{p} out of {} partitions", self.count);
        MsgId(
            local
                .0
                .saturating_mul(u64::from(self.count))
                .saturating_add(u64::from(p.0)),
        )
    }

    /// The partition and the partition core's id of a cluster message id.
    pub fn split_msg_id(self, id: MsgId) -> (PartitionId, MsgId) {
        let count = u64::from(self.count);
        // The remainder is below `count`, which fits a u32.
        (PartitionId((id.0 % count) as u32), MsgId(id.0 / count))
    }
}

/// An instance of `sagamq serve` in a cluster (a fresh id per process start:
/// a restarted process is a new instance, and its old leases simply expire).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lease row as the database judged it (by its own clock) at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub partition: PartitionId,
    pub owner: Option<InstanceId>,
    /// Raised by every takeover; writes carry it (fencing).
    pub epoch: u64,
    /// `expires_at > now()` in the database.
    pub live: bool,
}

/// What an instance should do with leases this round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeasePlan {
    /// Extend these (partition, epoch): the partitions this instance serves.
    pub renew: Vec<(PartitionId, u64)>,
    /// Try to take these (free, or their owner stopped renewing).
    pub acquire: Vec<PartitionId>,
    /// Hand these back (stop serving first, then expire the lease) so that
    /// an instance with fewer partitions can take them.
    pub release: Vec<(PartitionId, u64)>,
}

/// The share of `partitions` one of `instances` live instances should own: the ceiling.
pub fn target_share(partitions: u32, instances: usize) -> usize {
    let n = instances.max(1);
    (partitions as usize).div_ceil(n)
}

/// Decides this round's lease work for `me`.
///
/// - Renews every partition `me` serves (by its epoch: a lease that expired
///   but that nobody took is still safely renewable, since a takeover raises
///   the epoch).
/// - Takes free or expired partitions while it owns fewer than its share
///   (`ceil(partitions / live instances)`), starting at an offset derived
///   from its id so instances starting together do not all race for the
///   same rows.
/// - Hands back partitions above its share, but only as many as other live
///   instances lack, and the highest-numbered first, so a balanced cluster
///   does not churn.
///
/// `live_instances` are the instances whose heartbeat the database still
/// counts (it should include `me`; it is added if missing).
pub fn plan(
    me: &InstanceId,
    leases: &[LeaseView],
    live_instances: &BTreeSet<InstanceId>,
    serving: &BTreeSet<PartitionId>,
) -> LeasePlan {
    let mut live = live_instances.clone();
    live.insert(me.clone());
    let share = target_share(leases.len() as u32, live.len());
    let mut out = LeasePlan::default();
    let mut owned: BTreeMap<&InstanceId, usize> = live.iter().map(|i| (i, 0)).collect();
    for l in leases {
        match &l.owner {
            Some(o) if o == me && serving.contains(&l.partition) => out.renew.push((l.partition, l.epoch)),
            Some(o) if o == me => {}
            Some(o) if l.live => {
                if let Some(n) = owned.get_mut(o) {
                    *n += 1;
                }
            }
            _ => {}
        }
    }
    let mine = out.renew.len();
    owned.insert(me, mine);
    if mine < share {
        let free: Vec<PartitionId> = leases
            .iter()
            .filter(|l| !l.live || l.owner.is_none())
            .filter(|l| !serving.contains(&l.partition))
            .map(|l| l.partition)
            .collect();
        if !free.is_empty() {
            let start = crc32fast::hash(me.0.as_bytes()) as usize % free.len();
            out.acquire = free
                .iter()
                .cycle()
                .skip(start)
                .take(free.len().min(share - mine))
                .copied()
                .collect();
        }
    } else if mine > share {
        let lacking: usize = owned
            .iter()
            .filter(|(i, _)| **i != me)
            .map(|(_, n)| share.saturating_sub(*n))
            .sum();
        let n = (mine - share).min(lacking);
        let mut by_partition = out.renew.clone();
        by_partition.sort();
        out.release = by_partition.iter().rev().take(n).copied().collect();
        out.renew.retain(|r| !out.release.contains(r));
    }
    out
}

/// An owner's own view of one lease, on its monotonic clock (milliseconds
/// since any fixed origin). It stops serving at `renew_sent + ttl - margin`
/// unless a renewal succeeds: the renewal was judged by the database after
/// it was sent, so the database's expiry is never earlier than this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLease {
    pub epoch: u64,
    /// When the last successful renewal (or the acquisition) was sent.
    pub renew_sent_ms: u64,
}

impl LocalLease {
    pub fn valid_until_ms(self, ttl_ms: u64) -> u64 {
        self.renew_sent_ms + ttl_ms - lease_margin_ms(ttl_ms)
    }
    pub fn valid_at(self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms < self.valid_until_ms(ttl_ms)
    }
}

/// How much earlier than the database an owner gives its lease up (clock
/// rate differences and the time a reply takes to reach it): a fifth.
pub fn lease_margin_ms(ttl_ms: u64) -> u64 {
    ttl_ms / 5
}

/// The round period of the lease loop: a quarter of the lease, so a live
/// owner renews about three times before its lease could expire.
pub fn lease_tick_ms(ttl_ms: u64) -> u64 {
    (ttl_ms / 4).max(1)
}

/// The bound users are told: after an owner stops, its partitions serve
/// again on another instance within the lease, one round to notice, and the
/// time to load the partition's rows.
pub fn takeover_bound_ms(ttl_ms: u64) -> u64 {
    ttl_ms + lease_tick_ms(ttl_ms)
}

/// One row of a partition's log: what a store (PostgreSQL, or the
/// simulator's model of it) keeps per group commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRow {
    pub lsn: u64,
    pub frames: Vec<u8>,
    /// Compaction: this row replaces every row of the partition before it.
    pub replaces: bool,
}

/// The rows gathered while the previous write was in flight: consecutive
/// appends share one row keyed by their last lsn; a compaction supersedes
/// everything pending before it.
#[derive(Debug, Default)]
pub struct PendingRows {
    rows: Vec<RecordRow>,
    lsn: Option<Lsn>,
}

impl PendingRows {
    pub fn is_empty(&self) -> bool {
        self.lsn.is_none()
    }

    pub fn append(&mut self, lsn: Lsn, frames: Vec<u8>) {
        match self.rows.last_mut() {
            Some(row) if !row.replaces => {
                row.frames.extend_from_slice(&frames);
                row.lsn = lsn.0;
            }
            _ => self.rows.push(RecordRow {
                lsn: lsn.0,
                frames,
                replaces: false,
            }),
        }
        self.lsn = Some(lsn);
    }

    pub fn replace(&mut self, lsn: Lsn, frames: Vec<u8>) {
        self.rows.clear();
        self.rows.push(RecordRow {
            lsn: lsn.0,
            frames,
            replaces: true,
        });
        self.lsn = Some(lsn);
    }

    /// The rows of the next write and the lsn it makes durable.
    pub fn take(&mut self) -> Option<(Lsn, Vec<RecordRow>)> {
        let lsn = self.lsn.take()?;
        Some((lsn, std::mem::take(&mut self.rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> InstanceId {
        InstanceId(s.to_string())
    }

    fn leases(owners: &[Option<(&str, bool)>]) -> Vec<LeaseView> {
        owners
            .iter()
            .enumerate()
            .map(|(i, o)| LeaseView {
                partition: PartitionId(i as u32),
                owner: o.map(|(s, _)| id(s)),
                epoch: 1,
                live: o.is_some_and(|(_, live)| live),
            })
            .collect()
    }

    fn set<T: Ord + Clone>(xs: &[T]) -> BTreeSet<T> {
        xs.iter().cloned().collect()
    }

    #[test]
    fn a_global_id_always_lands_in_the_same_partition_in_range() {
        let p = Partitions::new(16).unwrap();
        // Fixed values: a change here would move existing messages.
        assert_eq!(p.of(&GlobalId::lit("order-1")), p.of(&GlobalId::lit("order-1")));
        assert_eq!(
            p.of(&GlobalId::lit("test-order-1")).0,
            crc32fast::hash(b"test-order-1") % 16
        );
        let mut seen = BTreeSet::new();
        for i in 0..1000 {
            let q = p.of(&GlobalId::lit(&format!("g{i}")));
            assert!(q.0 < 16);
            seen.insert(q);
        }
        assert_eq!(seen.len(), 16, "1000 ids reach every partition");
        assert!(Partitions::new(0).is_err());
        assert!(Partitions::new(PARTITIONS_MAX + 1).is_err());
    }

    #[test]
    fn cluster_message_ids_round_trip_and_never_collide() {
        let p = Partitions::new(16).unwrap();
        let mut seen = BTreeSet::new();
        for part in p.all() {
            for local in 1..50 {
                let c = p.cluster_msg_id(part, MsgId(local));
                assert_eq!(p.split_msg_id(c), (part, MsgId(local)));
                assert!(seen.insert(c), "{c} twice");
            }
        }
    }

    #[test]
    fn a_first_instance_takes_every_free_partition() {
        let l = leases(&[None, None, None, None]);
        let plan = plan(&id("a"), &l, &set(&[id("a")]), &BTreeSet::new());
        assert_eq!(set(&plan.acquire), set(&[0, 1, 2, 3].map(PartitionId)));
        assert!(plan.renew.is_empty() && plan.release.is_empty());
    }

    #[test]
    fn three_instances_share_and_a_stopped_owner_s_partitions_are_taken() {
        // b stopped renewing: its leases are no longer live.
        let l = leases(&[
            Some(("a", true)),
            Some(("a", true)),
            Some(("b", false)),
            Some(("b", false)),
            Some(("c", true)),
            Some(("c", true)),
        ]);
        let serving = set(&[PartitionId(0), PartitionId(1)]);
        // b is gone from the live set too: share = 3 each for a and c.
        let p = plan(&id("a"), &l, &set(&[id("a"), id("c")]), &serving);
        assert_eq!(p.renew, vec![(PartitionId(0), 1), (PartitionId(1), 1)]);
        assert_eq!(p.acquire.len(), 1);
        assert!([PartitionId(2), PartitionId(3)].contains(&p.acquire[0]));
    }

    #[test]
    fn an_instance_above_its_share_hands_back_only_what_others_lack() {
        let l = leases(&[
            Some(("a", true)),
            Some(("a", true)),
            Some(("a", true)),
            Some(("a", true)),
            Some(("a", true)),
            Some(("a", true)),
        ]);
        let serving: BTreeSet<_> = (0..6).map(PartitionId).collect();
        // b joined: share 3, b lacks 3.
        let p = plan(&id("a"), &l, &set(&[id("a"), id("b")]), &serving);
        assert_eq!(
            p.release,
            vec![(PartitionId(5), 1), (PartitionId(4), 1), (PartitionId(3), 1)]
        );
        assert_eq!(p.renew.len(), 3);
        // Balanced (a 3, b 3): nothing moves.
        let l = leases(&[
            Some(("a", true)),
            Some(("a", true)),
            Some(("a", true)),
            Some(("b", true)),
            Some(("b", true)),
            Some(("b", true)),
        ]);
        let serving: BTreeSet<_> = (0..3).map(PartitionId).collect();
        let p = plan(&id("a"), &l, &set(&[id("a"), id("b")]), &serving);
        assert!(p.release.is_empty() && p.acquire.is_empty());
        // 16 over 3: share 6; 6/5/5 is balanced, nobody hands back.
        assert_eq!(target_share(16, 3), 6);
    }

    #[test]
    fn a_lease_owned_in_the_table_but_not_served_is_neither_renewed_nor_retaken_by_its_owner() {
        // After a fenced write the runner stopped: the row still names `a`
        // and is live, but `a` does not serve it; it must not renew it.
        let l = leases(&[Some(("a", true)), None]);
        let p = plan(&id("a"), &l, &set(&[id("a")]), &BTreeSet::new());
        assert!(p.renew.is_empty());
        assert_eq!(p.acquire, vec![PartitionId(1)]);
    }

    #[test]
    fn an_owner_gives_up_before_the_database_would() {
        let lease = LocalLease {
            epoch: 3,
            renew_sent_ms: 1000,
        };
        assert!(lease.valid_at(1000 + 3999, 5000));
        assert!(!lease.valid_at(1000 + 4000, 5000));
        assert_eq!(takeover_bound_ms(2000), 2500);
    }

    #[test]
    fn appends_share_a_row_and_a_compaction_supersedes_what_was_pending() {
        let mut p = PendingRows::default();
        assert!(p.is_empty());
        p.append(Lsn(1), b"a".to_vec());
        p.append(Lsn(2), b"b".to_vec());
        p.replace(Lsn(3), b"S".to_vec());
        p.append(Lsn(4), b"c".to_vec());
        p.append(Lsn(5), b"d".to_vec());
        let (lsn, rows) = p.take().unwrap();
        assert_eq!(lsn, Lsn(5));
        let shape: Vec<(u64, &[u8], bool)> = rows.iter().map(|r| (r.lsn, &r.frames[..], r.replaces)).collect();
        assert_eq!(shape, [(3, &b"S"[..], true), (5, &b"cd"[..], false)]);
        assert!(p.is_empty() && p.take().is_none());
    }
}

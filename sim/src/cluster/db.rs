//! A sans-IO model of PostgreSQL as the real cluster driver
//! (`src/real/cluster/store.rs`) uses it: the lease table judged by the
//! database's own clock, the records table keyed `(partition, epoch, lsn)`,
//! instance heartbeats, and transactions that apply atomically.
//!
//! Durability is a write-ahead log: a transaction is applied when the
//! database executes it and becomes durable only when a later WAL flush
//! covers it; its answer is sent only then (synchronous commit). A restart
//! keeps a prefix of the unflushed transactions (the WAL is sequential: the
//! caller draws how long from the seed) and rolls the rest back, newest
//! first, from their undo records.
//!
//! Reads (a round's lease view, a partition's load) see applied but not yet
//! flushed transactions. That is weaker than PostgreSQL, and harmless here:
//! a new owner loads only after its `acquire` was flushed, and every
//! transaction applied before that acquire is in the WAL ahead of it.
//!
//! **Invariants:** with `fencing` on, a write commits only if the lease row
//! names the writer and its epoch, in the same transaction; with
//! `idempotent_rows` on, a row already present under its key is not stored
//! again (`ON CONFLICT DO NOTHING`). The two switches exist for the planted
//! bugs (`no-fencing`, `double-store-retried-commit`).

use sagamq::cluster::{InstanceId, LeaseView, PartitionId};
use std::collections::{BTreeMap, BTreeSet};

pub use sagamq::cluster::RecordRow;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Lease {
    owner: Option<InstanceId>,
    epoch: u64,
    /// On the database's clock; 0 is `-infinity` (never taken).
    expires_ns: u64,
}

/// `(partition, epoch, lsn, serial)`: `serial` is 0 unless rows are stored
/// without the conflict clause (the planted bug), when each insert gets a new one.
type RowKey = (u32, u64, u64, u64);

/// One transaction, as the real store's methods issue them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A lease round: heartbeat, renew these leases, read the lease table and
    /// the live instances (heartbeat within `ttl_ns`).
    Round {
        me: InstanceId,
        renew: Vec<(PartitionId, u64)>,
        ttl_ns: u64,
    },
    Acquire {
        p: PartitionId,
        me: InstanceId,
        ttl_ns: u64,
    },
    Release {
        p: PartitionId,
        me: InstanceId,
        epoch: u64,
    },
    Load {
        p: PartitionId,
    },
    Write {
        p: PartitionId,
        me: InstanceId,
        epoch: u64,
        rows: Vec<RecordRow>,
    },
}

impl Op {
    /// Read-only transactions are answered at once, the others after their flush.
    pub fn mutates(&self) -> bool {
        !matches!(self, Op::Load { .. })
    }

    pub fn rows(&self) -> usize {
        match self {
            Op::Write { rows, .. } => rows.len(),
            _ => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Round {
        renewed: BTreeSet<PartitionId>,
        leases: Vec<LeaseView>,
        live: BTreeSet<InstanceId>,
    },
    Acquired(Option<u64>),
    Released,
    /// The partition's log image (file header, then every row's frames in key order).
    Loaded {
        image: Vec<u8>,
        rows: u64,
    },
    Written,
    /// The lease names someone else or a later epoch: nothing was written.
    Fenced,
}

#[derive(Clone, Debug)]
enum Undo {
    Lease(u32, Lease),
    Heartbeat(InstanceId, Option<u64>),
    Row(RowKey, Option<Vec<u8>>),
}

#[derive(Debug)]
pub struct Db {
    leases: Vec<Lease>,
    records: BTreeMap<RowKey, Vec<u8>>,
    heartbeats: BTreeMap<InstanceId, u64>,
    /// Applied, not yet flushed: each transaction's undo records, in commit order.
    unflushed: Vec<Vec<Undo>>,
    serial: u64,
    pub fencing: bool,
    pub idempotent_rows: bool,
}

impl Db {
    pub fn new(partitions: u32) -> Db {
        Db {
            leases: vec![Lease::default(); partitions as usize],
            records: BTreeMap::new(),
            heartbeats: BTreeMap::new(),
            unflushed: Vec::new(),
            serial: 0,
            fencing: true,
            idempotent_rows: true,
        }
    }

    /// Transactions applied but not yet covered by a flush.
    pub fn unflushed(&self) -> usize {
        self.unflushed.len()
    }

    /// A WAL flush covering the first `n` unflushed transactions completed: they are durable.
    pub fn flushed(&mut self, n: usize) {
        let n = n.min(self.unflushed.len());
        self.unflushed.drain(..n);
    }

    /// The server restarted: the WAL kept the first `kept` unflushed
    /// transactions; the others are rolled back (newest first).
    pub fn restart(&mut self, kept: usize) {
        let kept = kept.min(self.unflushed.len());
        while self.unflushed.len() > kept {
            let undo = self.unflushed.pop().expect("longer than kept");
            for u in undo.into_iter().rev() {
                self.undo(u);
            }
        }
        self.unflushed.clear();
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::Lease(p, l) => self.leases[p as usize] = l,
            Undo::Heartbeat(id, None) => {
                self.heartbeats.remove(&id);
            }
            Undo::Heartbeat(id, Some(t)) => {
                self.heartbeats.insert(id, t);
            }
            Undo::Row(k, None) => {
                self.records.remove(&k);
            }
            Undo::Row(k, Some(f)) => {
                self.records.insert(k, f);
            }
        }
    }

    /// Executes one transaction at `now_ns` on the database's clock. A
    /// mutating one is applied now and waits for a flush to be durable.
    pub fn execute(&mut self, now_ns: u64, op: &Op) -> OpResult {
        let mut undo = Vec::new();
        let result = match op {
            Op::Round { me, renew, ttl_ns } => self.round(now_ns, me, renew, *ttl_ns, &mut undo),
            Op::Acquire { p, me, ttl_ns } => {
                let l = &mut self.leases[p.0 as usize];
                if l.expires_ns <= now_ns {
                    undo.push(Undo::Lease(p.0, l.clone()));
                    l.owner = Some(me.clone());
                    l.epoch += 1;
                    l.expires_ns = now_ns + ttl_ns;
                    OpResult::Acquired(Some(l.epoch))
                } else {
                    OpResult::Acquired(None)
                }
            }
            Op::Release { p, me, epoch } => {
                let l = &mut self.leases[p.0 as usize];
                if l.owner.as_ref() == Some(me) && l.epoch == *epoch {
                    undo.push(Undo::Lease(p.0, l.clone()));
                    l.expires_ns = now_ns;
                }
                OpResult::Released
            }
            Op::Load { p } => {
                let (image, rows) = self.load(*p);
                OpResult::Loaded { image, rows }
            }
            Op::Write { p, me, epoch, rows } => self.write(*p, me, *epoch, rows, &mut undo),
        };
        if op.mutates() {
            self.unflushed.push(undo);
        }
        result
    }

    fn round(
        &mut self,
        now_ns: u64,
        me: &InstanceId,
        renew: &[(PartitionId, u64)],
        ttl_ns: u64,
        undo: &mut Vec<Undo>,
    ) -> OpResult {
        undo.push(Undo::Heartbeat(me.clone(), self.heartbeats.get(me).copied()));
        self.heartbeats.insert(me.clone(), now_ns);
        let mut renewed = BTreeSet::new();
        for &(p, epoch) in renew {
            let l = &mut self.leases[p.0 as usize];
            if l.owner.as_ref() == Some(me) && l.epoch == epoch {
                undo.push(Undo::Lease(p.0, l.clone()));
                l.expires_ns = now_ns + ttl_ns;
                renewed.insert(p);
            }
        }
        let leases = self
            .leases
            .iter()
            .enumerate()
            .map(|(i, l)| LeaseView {
                partition: PartitionId(i as u32),
                owner: l.owner.clone(),
                epoch: l.epoch,
                live: l.expires_ns > now_ns,
            })
            .collect();
        let live = self
            .heartbeats
            .iter()
            .filter(|(_, t)| **t + ttl_ns > now_ns)
            .map(|(id, _)| id.clone())
            .collect();
        OpResult::Round { renewed, leases, live }
    }

    fn write(
        &mut self,
        p: PartitionId,
        me: &InstanceId,
        epoch: u64,
        rows: &[RecordRow],
        undo: &mut Vec<Undo>,
    ) -> OpResult {
        let l = &self.leases[p.0 as usize];
        if self.fencing && (l.owner.as_ref() != Some(me) || l.epoch != epoch) {
            return OpResult::Fenced;
        }
        for row in rows {
            if row.replaces {
                let before: Vec<RowKey> = self
                    .records
                    .range((p.0, 0, 0, 0)..(p.0, epoch, row.lsn, 0))
                    .map(|(k, _)| *k)
                    .collect();
                for k in before {
                    let old = self.records.remove(&k);
                    undo.push(Undo::Row(k, old));
                }
            }
            let key = if self.idempotent_rows {
                (p.0, epoch, row.lsn, 0)
            } else {
                self.serial += 1;
                (p.0, epoch, row.lsn, self.serial)
            };
            if let std::collections::btree_map::Entry::Vacant(e) = self.records.entry(key) {
                e.insert(row.frames.clone());
                undo.push(Undo::Row(key, None));
            }
        }
        OpResult::Written
    }

    /// A partition's log image: the file header, then its rows' frames in key order.
    pub fn load(&self, p: PartitionId) -> (Vec<u8>, u64) {
        let mut image = sagamq::log::empty_log();
        let mut n = 0;
        for (_, frames) in self.records.range((p.0, 0, 0, 0)..(p.0 + 1, 0, 0, 0)) {
            image.extend_from_slice(frames);
            n += 1;
        }
        (image, n)
    }

    /// The owner and epoch of partition `p`'s lease, and whether it is live at `now_ns`.
    pub fn lease(&self, p: PartitionId, now_ns: u64) -> (Option<&InstanceId>, u64, bool) {
        let l = &self.leases[p.0 as usize];
        (l.owner.as_ref(), l.epoch, l.expires_ns > now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> InstanceId {
        InstanceId(s.to_string())
    }

    fn row(lsn: u64, f: &[u8]) -> RecordRow {
        RecordRow {
            lsn,
            frames: f.to_vec(),
            replaces: false,
        }
    }

    fn acquire(db: &mut Db, now: u64, who: &str) -> Option<u64> {
        let op = Op::Acquire {
            p: PartitionId(0),
            me: id(who),
            ttl_ns: 100,
        };
        match db.execute(now, &op) {
            OpResult::Acquired(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn write(db: &mut Db, who: &str, epoch: u64, rows: Vec<RecordRow>) -> OpResult {
        db.execute(
            0,
            &Op::Write {
                p: PartitionId(0),
                me: id(who),
                epoch,
                rows,
            },
        )
    }

    fn frames(db: &Db) -> Vec<u8> {
        db.load(PartitionId(0)).0[sagamq::log::empty_log().len()..].to_vec()
    }

    #[test]
    fn a_lease_is_taken_only_once_expired_by_the_database_clock_and_raises_the_epoch() {
        let mut db = Db::new(1);
        assert_eq!(acquire(&mut db, 10, "a"), Some(1));
        assert_eq!(acquire(&mut db, 50, "b"), None, "a's lease runs until 110");
        assert_eq!(acquire(&mut db, 110, "b"), Some(2));
        assert_eq!(db.lease(PartitionId(0), 111), (Some(&id("b")), 2, true));
    }

    #[test]
    fn a_stale_owner_is_fenced_unless_fencing_is_off() {
        let mut db = Db::new(1);
        acquire(&mut db, 0, "a");
        acquire(&mut db, 200, "b");
        assert_eq!(write(&mut db, "a", 1, vec![row(1, b"x")]), OpResult::Fenced);
        assert!(frames(&db).is_empty());
        assert_eq!(write(&mut db, "b", 2, vec![row(1, b"y")]), OpResult::Written);
        db.fencing = false;
        assert_eq!(write(&mut db, "a", 1, vec![row(2, b"x")]), OpResult::Written);
        assert_eq!(frames(&db), b"xy", "the stale row sorts before the new owner's");
    }

    #[test]
    fn a_write_stored_again_is_stored_once_unless_rows_are_not_idempotent() {
        let mut db = Db::new(1);
        acquire(&mut db, 0, "a");
        write(&mut db, "a", 1, vec![row(1, b"ab")]);
        write(&mut db, "a", 1, vec![row(1, b"ab")]);
        assert_eq!(frames(&db), b"ab");
        db.idempotent_rows = false;
        write(&mut db, "a", 1, vec![row(1, b"ab")]);
        assert_eq!(frames(&db), b"abab");
    }

    #[test]
    fn a_compaction_replaces_earlier_rows() {
        let mut db = Db::new(2);
        acquire(&mut db, 0, "a");
        write(&mut db, "a", 1, vec![row(1, b"a"), row(2, b"b")]);
        let snap = RecordRow {
            lsn: 3,
            frames: b"S".to_vec(),
            replaces: true,
        };
        write(&mut db, "a", 1, vec![snap, row(4, b"c")]);
        assert_eq!(frames(&db), b"Sc");
    }

    #[test]
    fn a_restart_keeps_flushed_and_a_prefix_of_unflushed_transactions() {
        let mut db = Db::new(1);
        acquire(&mut db, 0, "a");
        db.flushed(1);
        write(&mut db, "a", 1, vec![row(1, b"1")]);
        write(&mut db, "a", 1, vec![row(2, b"2")]);
        write(&mut db, "a", 1, vec![row(3, b"3")]);
        assert_eq!(db.unflushed(), 3);
        db.restart(1);
        assert_eq!(frames(&db), b"1");
        assert_eq!(db.unflushed(), 0);
        // A lease taken in a rolled-back transaction is free again.
        acquire(&mut db, 500, "b");
        db.restart(0);
        assert_eq!(db.lease(PartitionId(0), 500), (Some(&id("a")), 1, false));
    }
}

//! The database node: the [`Db`] model behind a network address, with one
//! CPU that executes transactions in arrival order (each costs
//! `db_txn_us + rows * db_row_us`), a WAL flusher (group commit: every
//! transaction executed while a flush runs shares the next one), restarts
//! and connections lost around COMMIT.

use super::db::{Db, Op, OpResult};
use super::world::{Ev, MS, Msg, Node, World};
use std::collections::VecDeque;

/// A transaction waiting for its flush: where its answer goes.
struct Awaiting {
    to: Node,
    req: u64,
    result: OpResult,
    /// Its connection was already lost (the answer is never sent).
    lost: bool,
}

pub(super) struct DbNode {
    pub db: Db,
    pub up: bool,
    /// Bumped at each restart: events of an older generation are void.
    pub life: u64,
    queue: VecDeque<(Node, u64, Op)>,
    cpu_busy: bool,
    flushing: bool,
    /// One per unflushed transaction, in the same order as the model's WAL.
    awaiting: Vec<Awaiting>,
    /// Writes still to lose their connection around COMMIT (the fault).
    pub commit_lost: u32,
}

impl DbNode {
    pub fn new(partitions: u32) -> DbNode {
        DbNode {
            db: Db::new(partitions),
            up: true,
            life: 0,
            queue: VecDeque::new(),
            cpu_busy: false,
            flushing: false,
            awaiting: Vec::new(),
            commit_lost: 0,
        }
    }
}

impl World {
    pub(super) fn db_arrive(&mut self, from: Node, msg: Msg) {
        let Msg::DbReq { req, op } = msg else { return };
        if !self.db.up {
            // Connection refused.
            self.send(Node::Db, from, Msg::DbResp { req, result: None }, 0);
            return;
        }
        self.db.queue.push_back((from, req, op));
        self.db_schedule_cpu();
    }

    fn db_schedule_cpu(&mut self) {
        if self.db.cpu_busy {
            return;
        }
        let Some((_, _, op)) = self.db.queue.front() else {
            return;
        };
        let c = self.cfg.cost;
        let cost = (c.db_txn_us + c.db_row_us * op.rows() as u64) * 1_000;
        self.db.cpu_busy = true;
        let life = self.db.life;
        self.at(self.now + cost, Ev::DbCpu { life });
    }

    pub(super) fn db_cpu(&mut self, life: u64) {
        if life != self.db.life {
            return;
        }
        self.db.cpu_busy = false;
        let Some((from, req, op)) = self.db.queue.pop_front() else {
            return;
        };
        let mut lost = false;
        if matches!(op, Op::Write { .. }) && self.db.commit_lost > 0 {
            self.db.commit_lost -= 1;
            self.fired("commit_lost");
            lost = true;
            let committed = self.rng.db.chance(500_000);
            self.line("fault", || {
                format!("connection lost during the COMMIT of {from:?}'s write (committed: {committed})")
            });
            // The connection reset reaches the client; the server finishes or aborts.
            self.send(Node::Db, from, Msg::DbResp { req, result: None }, 0);
            if !committed {
                self.db_schedule_cpu();
                return;
            }
        }
        if let Op::Write { p, epoch, .. } = &op {
            let (_, current, _) = self.db.db.lease(*p, self.now);
            if *epoch != current {
                let (p, epoch) = (*p, *epoch);
                self.line("db", || {
                    format!("write of {p} at epoch {epoch} while the lease is at epoch {current}")
                });
            }
        }
        let result = self.db.db.execute(self.now, &op);
        if op.mutates() {
            self.db.awaiting.push(Awaiting {
                to: from,
                req,
                result,
                lost,
            });
            self.db_start_flush();
        } else if !lost {
            self.send(
                Node::Db,
                from,
                Msg::DbResp {
                    req,
                    result: Some(result),
                },
                0,
            );
        }
        self.db_schedule_cpu();
    }

    fn db_start_flush(&mut self) {
        if self.db.flushing || self.db.db.unflushed() == 0 {
            return;
        }
        self.db.flushing = true;
        let n = self.db.db.unflushed();
        let life = self.db.life;
        self.at(self.now + self.cfg.cost.wal_flush_us * 1_000, Ev::DbFlushed { life, n });
    }

    pub(super) fn db_flushed(&mut self, life: u64, n: usize) {
        if life != self.db.life {
            return;
        }
        self.db.flushing = false;
        self.db.db.flushed(n);
        let done: Vec<Awaiting> = self.db.awaiting.drain(..n.min(self.db.awaiting.len())).collect();
        for a in done {
            if !a.lost {
                self.send(
                    Node::Db,
                    a.to,
                    Msg::DbResp {
                        req: a.req,
                        result: Some(a.result),
                    },
                    0,
                );
            }
        }
        self.db_start_flush();
    }

    /// The database restarts: every connection drops (each waiting client is
    /// told), the WAL keeps a seeded prefix of the unflushed transactions.
    pub(super) fn db_restart(&mut self, down_ms: u64) {
        let unflushed = self.db.db.unflushed();
        let kept = self.rng.db.below(unflushed as u64 + 1) as usize;
        self.line("fault", || {
            format!("database restarts for {down_ms} ms; {kept} of {unflushed} unflushed transactions survive")
        });
        self.db.db.restart(kept);
        let waiting: Vec<(Node, u64)> = self
            .db
            .awaiting
            .drain(..)
            .filter(|a| !a.lost)
            .map(|a| (a.to, a.req))
            .chain(self.db.queue.drain(..).map(|(to, req, _)| (to, req)))
            .collect();
        for (to, req) in waiting {
            self.send(Node::Db, to, Msg::DbResp { req, result: None }, 0);
        }
        self.db.life += 1;
        self.db.up = false;
        self.db.cpu_busy = false;
        self.db.flushing = false;
        let life = self.db.life;
        self.at(self.now + down_ms * MS, Ev::DbUp { life });
    }

    pub(super) fn db_up(&mut self, life: u64) {
        if life == self.db.life && !self.db.up {
            self.db.up = true;
            self.line("world", || "database up".to_string());
        }
    }
}

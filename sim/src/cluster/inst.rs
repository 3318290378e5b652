//! One broker instance, as `src/real/cluster/` builds it: a lease loop
//! (heartbeat, renew, [`sagamq::cluster::plan`], take, hand back), a broker
//! core per owned partition recovered from the partition's rows, one fenced
//! write in flight per partition (retried as is after an unknown outcome
//! while the lease lasts locally; a fenced write stops the partition), and
//! routing: a publish to its partition's owner, a subscribe to every partition.
//!
//! **Invariant:** a partition acts (takes a request, answers, sends a
//! callback, writes) only while its lease is valid on the owner's own clock
//! ([`LocalLease::valid_at`]): the check comes first in every handler, so a
//! paused owner does nothing for a partition it lost once it resumes.

use super::ClusterBug;
use super::db::{Op, OpResult, RecordRow};
use super::world::{Ev, ITimer, MS, Msg, Node, World};
use crate::history::Event;
use sagamq::broker::{Broker, BrokerInput, BrokerOutput, Callback, CallbackResult, DeliveryId, Lsn, Reply, RequestId};
use sagamq::cluster::PendingRows;
use sagamq::cluster::{self as cl, InstanceId, LeaseView, LocalLease, PartitionId};
use sagamq::machine::Machine;
use sagamq::{ClientId, MessageKey, PublishRequest, SubscribeRequest, Time, Topic};
use std::collections::{BTreeMap, BTreeSet};

/// A coordinating instance gives a forwarded request this long.
const FORWARD_TIMEOUT_NS: u64 = 1_000 * MS;
/// Pause between attempts of a write whose outcome was unknown (as the real driver).
const WRITE_RETRY_NS: u64 = 100 * MS;

/// Where a partition core's answer to a request goes.
#[derive(Clone, Debug)]
pub(super) enum ReplyTo {
    Client { c: usize, req: u64, key: MessageKey },
    Peer { j: usize, fid: u64, key: MessageKey },
    SubPart { coord: usize, op: u64 },
}

/// What a database request was for.
#[derive(Clone, Copy, Debug)]
pub(super) enum DbCtx {
    Round { sent: u64 },
    Acquire { p: PartitionId, sent: u64 },
    Release,
    Load { p: PartitionId, epoch: u64, sent: u64 },
    Write { p: PartitionId, epoch: u64 },
}

/// A subscribe's partitions served here, and the others with their owners.
type SubscribeTargets = (Vec<PartitionId>, Vec<(PartitionId, usize)>);

/// A subscribe this instance fans out to every partition.
pub(super) struct SubOp {
    s: usize,
    req: u64,
    client: ClientId,
    topic: Topic,
    remaining: BTreeSet<PartitionId>,
    until: Time,
}

/// A partition this instance serves.
pub(super) struct Part {
    pub lease: LocalLease,
    pub core: Broker,
    pending: PendingRows,
    in_flight: Option<(Lsn, Vec<RecordRow>)>,
    replies: BTreeMap<RequestId, ReplyTo>,
    req_next: u64,
    timer_at: Option<u64>,
}

impl Part {
    /// Whether the lease is valid at `local_ms` on the owner's clock.
    pub fn valid(&self, local_ms: u64, lease_ms: u64) -> bool {
        self.lease.valid_at(local_ms, lease_ms)
    }

    pub fn writing(&self) -> bool {
        self.in_flight.is_some() || !self.pending.is_empty()
    }
}

pub(super) struct Inst {
    pub id: InstanceId,
    pub inc: u64,
    pub up: bool,
    pub busy_until: u64,
    pub parts: BTreeMap<PartitionId, Part>,
    /// Taking or loading: not yet serving.
    pub claiming: BTreeSet<PartitionId>,
    /// Who serves each partition, from the last lease round (for forwarding).
    pub owners: Vec<Option<usize>>,
    pub round_in_flight: bool,
    pub db_reqs: BTreeMap<u64, DbCtx>,
    pub fwds: BTreeMap<u64, (usize, u64)>,
    pub sub_ops: BTreeMap<u64, SubOp>,
    /// Callback attempts in flight: global delivery id -> (partition, epoch, the core's id).
    pub callbacks: BTreeMap<u64, (PartitionId, u64, DeliveryId)>,
    /// A pause fault waiting for this instance's next write (the fault's index).
    pub pause_armed: Option<usize>,
    /// Events waiting while the instance is busy or paused, first in, first out.
    pub inbox: std::collections::VecDeque<Ev>,
    /// A wake-up to take the inbox's next event is scheduled.
    pub wake_armed: bool,
    /// This process's clock rate error (parts per million): its lease
    /// bound is judged on its own clock, the lease itself on the database's.
    pub drift_ppm: i64,
}

impl Inst {
    pub fn new(i: usize, inc: u64, drift_ppm: i64) -> Inst {
        Inst {
            drift_ppm,
            inbox: std::collections::VecDeque::new(),
            wake_armed: false,
            id: InstanceId(format!("i{i}.{inc}")),
            inc,
            up: false,
            busy_until: 0,
            parts: BTreeMap::new(),
            claiming: BTreeSet::new(),
            owners: Vec::new(),
            round_in_flight: false,
            db_reqs: BTreeMap::new(),
            fwds: BTreeMap::new(),
            sub_ops: BTreeMap::new(),
            callbacks: BTreeMap::new(),
            pause_armed: None,
        }
    }
}

impl Inst {
    /// This instance's monotonic clock (ms) at virtual time `now_ns`.
    pub fn local_ms(&self, now_ns: u64) -> u64 {
        let t = i128::from(now_ns) * i128::from(1_000_000 + self.drift_ppm) / 1_000_000;
        u64::try_from(t).unwrap_or(0) / MS
    }
}

/// The instance index an instance id names (`i{index}.{incarnation}`).
fn index_of(id: &InstanceId) -> Option<usize> {
    id.0.strip_prefix('i')?.split('.').next()?.parse().ok()
}

impl World {
    fn timer(&mut self, i: usize, at_ns: u64, t: ITimer) {
        let inc = self.insts[i].inc;
        self.at(at_ns, Ev::Inst { i, inc, t });
    }

    fn db_call(&mut self, i: usize, op: Op, ctx: DbCtx, delay_ns: u64) {
        let req = self.id();
        self.insts[i].db_reqs.insert(req, ctx);
        self.send(Node::Inst(i), Node::Db, Msg::DbReq { req, op }, delay_ns);
        let timeout = self.cfg.lease_ms * MS / 2;
        self.timer(i, self.now + delay_ns + timeout, ITimer::DbTimeout(req));
    }

    /// Whether `i` serves `p` now; a partition whose lease ran out on the
    /// owner's clock is dropped here (stops serving, answers nothing more).
    fn serves(&mut self, i: usize, p: PartitionId) -> bool {
        let (lease_ms, local) = (self.cfg.lease_ms, self.insts[i].local_ms(self.now));
        match self.insts[i].parts.get(&p) {
            Some(part) if part.valid(local, lease_ms) => true,
            Some(_) => {
                self.check.count("cluster_lease_ran_out");
                self.stop(i, p, "its lease ran out on the owner's clock");
                false
            }
            None => false,
        }
    }

    fn stop(&mut self, i: usize, p: PartitionId, why: &str) {
        if self.insts[i].parts.remove(&p).is_some() {
            let id = self.insts[i].id.clone();
            self.line("inst", || format!("{id} stopped serving {p}: {why}"));
        }
    }

    pub(super) fn inst_timer(&mut self, i: usize, t: ITimer) {
        match t {
            ITimer::LeaseTick => self.lease_tick(i),
            ITimer::Core(p, epoch) => {
                if !self.serves(i, p) || self.insts[i].parts[&p].lease.epoch != epoch {
                    return;
                }
                let now = self.time();
                let part = self.insts[i].parts.get_mut(&p).expect("served");
                part.timer_at = None;
                if part.core.poll_timeout().is_some_and(|t| t <= now) {
                    part.core.handle_timeout(now);
                }
                self.drain(i, p);
            }
            ITimer::CallbackTimeout(gdid) => {
                if let Some((p, epoch, did)) = self.insts[i].callbacks.remove(&gdid) {
                    self.callback_result(i, p, epoch, did, CallbackResult::TimedOut);
                }
            }
            ITimer::DbTimeout(req) => {
                if let Some(ctx) = self.insts[i].db_reqs.remove(&req) {
                    self.db_result(i, ctx, None);
                }
            }
            ITimer::FwdTimeout(fid) => {
                if let Some((c, req)) = self.insts[i].fwds.remove(&fid) {
                    self.send(Node::Inst(i), Node::Pub(c), Msg::PubReply { req, reply: None }, 0);
                }
            }
            ITimer::SubOpTimeout(op) => self.sub_op_failed(i, op),
            ITimer::RetryWrite(p, epoch) => {
                if self.serves(i, p) && self.insts[i].parts[&p].lease.epoch == epoch {
                    self.send_write(i, p, true);
                }
            }
        }
    }

    pub(super) fn inst_msg(&mut self, i: usize, from: Node, msg: Msg) {
        match msg {
            Msg::Publish { req, publish } => {
                let Node::Pub(c) = from else { return };
                self.on_publish(i, c, req, publish);
            }
            Msg::Subscribe { req, sub } => {
                let Node::Sub(s) = from else { return };
                self.on_subscribe(i, s, req, sub);
            }
            Msg::FwdPublish { fid, publish } => {
                let Node::Inst(j) = from else { return };
                let p = self.parts.of(&publish.global_id);
                if self.serves(i, p) {
                    let key = publish.key();
                    self.feed_publish(i, p, publish, ReplyTo::Peer { j, fid, key });
                } else {
                    self.send(Node::Inst(i), from, Msg::FwdReply { fid, reply: None }, 0);
                }
            }
            Msg::FwdReply { fid, reply } => {
                if let Some((c, req)) = self.insts[i].fwds.remove(&fid) {
                    self.send(Node::Inst(i), Node::Pub(c), Msg::PubReply { req, reply }, 0);
                }
            }
            Msg::FwdSubscribe { op, p, sub } => {
                let Node::Inst(coord) = from else { return };
                if self.serves(i, p) {
                    self.feed(
                        i,
                        p,
                        BrokerInput::Subscribe {
                            req: RequestId(0),
                            subscribe: sub,
                        },
                        Some(ReplyTo::SubPart { coord, op }),
                    );
                } else {
                    self.send(Node::Inst(i), from, Msg::SubPartReply { op, p, until: None }, 0);
                }
            }
            Msg::SubPartReply { op, p, until } => self.sub_part_reply(i, op, p, until),
            Msg::CallbackAnswer { gdid, ok } => {
                if let Some((p, epoch, did)) = self.insts[i].callbacks.remove(&gdid) {
                    let result = if ok {
                        CallbackResult::Delivered
                    } else {
                        CallbackResult::Failed
                    };
                    if self.callback_result(i, p, epoch, did, result) {
                        self.observe(Event::AnswerReceived {
                            delivery: DeliveryId(gdid),
                            ok,
                        });
                    }
                }
            }
            Msg::DbResp { req, result } => {
                if let Some(ctx) = self.insts[i].db_reqs.remove(&req) {
                    self.db_result(i, ctx, result);
                }
            }
            Msg::PubReply { .. } | Msg::SubReply { .. } | Msg::Callback { .. } | Msg::DbReq { .. } => {}
        }
    }

    fn callback_result(&mut self, i: usize, p: PartitionId, epoch: u64, did: DeliveryId, r: CallbackResult) -> bool {
        if !self.serves(i, p) || self.insts[i].parts[&p].lease.epoch != epoch {
            return false;
        }
        self.feed(
            i,
            p,
            BrokerInput::CallbackResult {
                delivery: did,
                result: r,
            },
            None,
        );
        true
    }

    fn on_publish(&mut self, i: usize, c: usize, req: u64, publish: PublishRequest) {
        let p = self.parts.of(&publish.global_id);
        if self.serves(i, p) {
            let key = publish.key();
            self.feed_publish(i, p, publish, ReplyTo::Client { c, req, key });
            return;
        }
        match self.insts[i].owners.get(p.0 as usize).copied().flatten() {
            Some(j) if j != i => {
                self.check.count("cluster_forwarded_publish");
                let fid = self.id();
                self.insts[i].fwds.insert(fid, (c, req));
                self.send(Node::Inst(i), Node::Inst(j), Msg::FwdPublish { fid, publish }, 0);
                self.timer(i, self.now + FORWARD_TIMEOUT_NS, ITimer::FwdTimeout(fid));
            }
            _ => {
                self.check.count("cluster_no_owner_503");
                self.send(Node::Inst(i), Node::Pub(c), Msg::PubReply { req, reply: None }, 0);
            }
        }
    }

    fn feed_publish(&mut self, i: usize, p: PartitionId, publish: PublishRequest, to: ReplyTo) {
        let now = self.time();
        let id = self.insts[i].id.clone();
        let key = publish.key();
        self.line("inst", || format!("{id} {p} takes publish {key}"));
        self.observe(Event::PublishReceived { publish: &publish, now });
        self.feed(
            i,
            p,
            BrokerInput::Publish {
                req: RequestId(0),
                publish,
            },
            Some(to),
        );
    }

    /// Feeds one input to `p`'s core (numbering the request when it is one), then drains it.
    fn feed(&mut self, i: usize, p: PartitionId, mut input: BrokerInput, to: Option<ReplyTo>) {
        let now = self.time();
        let part = self.insts[i].parts.get_mut(&p).expect("fed only while served");
        if let Some(to) = to {
            part.req_next += 1;
            let id = RequestId(part.req_next);
            match &mut input {
                BrokerInput::Publish { req, .. } | BrokerInput::Subscribe { req, .. } => *req = id,
                _ => {}
            }
            part.replies.insert(id, to);
        }
        part.core.handle(now, input);
        self.drain(i, p);
    }

    fn on_subscribe(&mut self, i: usize, s: usize, req: u64, sub: SubscribeRequest) {
        let now = self.time();
        self.observe(Event::SubscribeReceived {
            client: &sub.client_id,
            topic: &sub.topic,
            expire: sub.expire_time,
            now,
        });
        let Some((local, remote)) = self.subscribe_targets(i) else {
            self.send(Node::Inst(i), Node::Sub(s), Msg::SubReply { req, until: None }, 0);
            return;
        };
        let op = self.id();
        let remaining = local.iter().copied().chain(remote.iter().map(|(p, _)| *p)).collect();
        let (client, topic, until) = (sub.client_id.clone(), sub.topic.clone(), sub.expire_time);
        self.insts[i].sub_ops.insert(
            op,
            SubOp {
                s,
                req,
                client,
                topic,
                remaining,
                until,
            },
        );
        for (p, j) in remote {
            self.send(
                Node::Inst(i),
                Node::Inst(j),
                Msg::FwdSubscribe {
                    op,
                    p,
                    sub: sub.clone(),
                },
                0,
            );
        }
        for p in local {
            self.feed(
                i,
                p,
                BrokerInput::Subscribe {
                    req: RequestId(0),
                    subscribe: sub.clone(),
                },
                Some(ReplyTo::SubPart { coord: i, op }),
            );
        }
        self.timer(i, self.now + FORWARD_TIMEOUT_NS, ITimer::SubOpTimeout(op));
        self.sub_op_check(i, op);
    }

    /// Where a subscribe taken by `i` goes: the partitions `i` serves, and
    /// every other partition's owner; None while some partition has none.
    /// (The planted `partial-subscription` skips the partitions served elsewhere.)
    fn subscribe_targets(&mut self, i: usize) -> Option<SubscribeTargets> {
        let partial = self.cfg.bug == Some(ClusterBug::PartialSubscription);
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for p in self.parts.all() {
            if self.serves(i, p) {
                local.push(p);
            } else if !partial {
                match self.insts[i].owners.get(p.0 as usize).copied().flatten() {
                    Some(j) if j != i => remote.push((p, j)),
                    _ => return None,
                }
            }
        }
        Some((local, remote))
    }

    fn sub_part_reply(&mut self, i: usize, op: u64, p: PartitionId, until: Option<Time>) {
        let Some(until) = until else {
            self.sub_op_failed(i, op);
            return;
        };
        let Some(o) = self.insts[i].sub_ops.get_mut(&op) else {
            return;
        };
        o.remaining.remove(&p);
        o.until = o.until.min(until);
        self.sub_op_check(i, op);
    }

    fn sub_op_check(&mut self, i: usize, op: u64) {
        if !self.insts[i].sub_ops.get(&op).is_some_and(|o| o.remaining.is_empty()) {
            return;
        }
        let o = self.insts[i].sub_ops.remove(&op).expect("checked");
        self.observe(Event::Subscribed {
            client: &o.client,
            topic: &o.topic,
            until: o.until,
        });
        self.send(
            Node::Inst(i),
            Node::Sub(o.s),
            Msg::SubReply {
                req: o.req,
                until: Some(o.until),
            },
            0,
        );
    }

    fn sub_op_failed(&mut self, i: usize, op: u64) {
        if let Some(o) = self.insts[i].sub_ops.remove(&op) {
            self.send(
                Node::Inst(i),
                Node::Sub(o.s),
                Msg::SubReply {
                    req: o.req,
                    until: None,
                },
                0,
            );
        }
    }

    /// Takes every output of `p`'s core: rows to write, answers, callbacks.
    fn drain(&mut self, i: usize, p: PartitionId) {
        loop {
            let Some(part) = self.insts[i].parts.get_mut(&p) else {
                return;
            };
            let Some(out) = part.core.poll_output() else { break };
            match out {
                BrokerOutput::Persist { lsn, frames } => part.pending.append(lsn, frames),
                BrokerOutput::Rewrite { lsn, frames, .. } => {
                    part.pending.replace(lsn, frames);
                    self.observe(Event::Compacted);
                }
                BrokerOutput::Reply { req, reply } => {
                    if let Some(to) = part.replies.remove(&req) {
                        self.answer(i, p, to, reply);
                    }
                }
                BrokerOutput::Callback(cb) => self.send_callback(i, p, cb),
            }
        }
        self.send_write(i, p, false);
        self.arm_core_timer(i, p);
    }

    fn answer(&mut self, i: usize, p: PartitionId, to: ReplyTo, reply: Reply) {
        let reply = match reply {
            Reply::Published { msg_id, duplicate } => Reply::Published {
                msg_id: self.cluster_id(p, msg_id),
                duplicate,
            },
            other => other,
        };
        match to {
            ReplyTo::Client { c, req, key } => {
                self.line("inst", || format!("i{i} {p} answers {key}: {reply:?}"));
                self.observe(Event::PublishAnswered {
                    key: &key,
                    reply: &reply,
                });
                self.send(
                    Node::Inst(i),
                    Node::Pub(c),
                    Msg::PubReply {
                        req,
                        reply: Some(reply),
                    },
                    0,
                );
            }
            ReplyTo::Peer { j, fid, key } => {
                self.line("inst", || {
                    format!("i{i} {p} answers {key} (forwarded by i{j}): {reply:?}")
                });
                self.observe(Event::PublishAnswered {
                    key: &key,
                    reply: &reply,
                });
                self.send(
                    Node::Inst(i),
                    Node::Inst(j),
                    Msg::FwdReply {
                        fid,
                        reply: Some(reply),
                    },
                    0,
                );
            }
            ReplyTo::SubPart { coord, op } => {
                let until = match reply {
                    Reply::Subscribed { expire_time } => Some(expire_time),
                    _ => None,
                };
                if coord == i {
                    self.sub_part_reply(i, op, p, until);
                } else {
                    self.send(Node::Inst(i), Node::Inst(coord), Msg::SubPartReply { op, p, until }, 0);
                }
            }
        }
    }

    fn send_callback(&mut self, i: usize, p: PartitionId, cb: Callback) {
        let gdid = self.id();
        let epoch = self.insts[i].parts[&p].lease.epoch;
        self.insts[i].callbacks.insert(gdid, (p, epoch, cb.delivery));
        let mut message = cb.message.clone();
        message.msg_id = self.cluster_id(p, message.msg_id);
        let seen = Callback {
            delivery: DeliveryId(gdid),
            message: message.clone(),
            ..cb.clone()
        };
        let now = self.time();
        self.observe(Event::CallbackSent { callback: &seen, now });
        let s = cb
            .url
            .rsplit('/')
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        let msg = Msg::Callback {
            gdid,
            message,
            client: cb.client,
        };
        self.send(Node::Inst(i), Node::Sub(s), msg, 0);
        let timeout = u64::try_from(self.broker.callback_timeout.as_nanos()).unwrap_or(u64::MAX);
        self.timer(i, self.now + timeout, ITimer::CallbackTimeout(gdid));
    }

    fn arm_core_timer(&mut self, i: usize, p: PartitionId) {
        let Some(part) = self.insts[i].parts.get_mut(&p) else {
            return;
        };
        let Some(t) = part.core.poll_timeout() else { return };
        let at = t.0.saturating_sub(crate::clock::CLOCK_BASE_NS).max(self.now);
        if part.timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        part.timer_at = Some(at);
        let epoch = part.lease.epoch;
        self.timer(i, at, ITimer::Core(p, epoch));
    }

    /// Starts `p`'s next write (one in flight at a time), or writes the one
    /// in flight again after an unknown outcome. A pause fault armed on this
    /// instance lands here: after the lease check, before the COMMIT leaves.
    fn send_write(&mut self, i: usize, p: PartitionId, again: bool) {
        let Some(part) = self.insts[i].parts.get_mut(&p) else {
            return;
        };
        match (&part.in_flight, again) {
            (None, false) => {
                let Some(next) = part.pending.take() else { return };
                part.in_flight = Some(next);
            }
            (Some(_), true) => {}
            _ => return,
        }
        let (_, rows) = part.in_flight.clone().expect("set above");
        let epoch = part.lease.epoch;
        let mut delay = 0;
        if let Some(k) = self.insts[i].pause_armed
            && let super::plan::Fault::Pause { pause_ms, .. } = self.faults_plan[k]
        {
            self.pause(i, pause_ms);
            delay = pause_ms * MS;
        }
        let me = self.insts[i].id.clone();
        self.db_call(i, Op::Write { p, me, epoch, rows }, DbCtx::Write { p, epoch }, delay);
    }

    fn db_result(&mut self, i: usize, ctx: DbCtx, result: Option<OpResult>) {
        match ctx {
            DbCtx::Round { sent } => {
                self.insts[i].round_in_flight = false;
                if let Some(OpResult::Round { renewed, leases, live }) = result {
                    self.round_done(i, sent, &renewed, &leases, &live);
                }
            }
            DbCtx::Acquire { p, sent } => match result {
                Some(OpResult::Acquired(Some(epoch))) => {
                    let op = Op::Load { p };
                    self.db_call(i, op, DbCtx::Load { p, epoch, sent }, 0);
                }
                _ => {
                    self.insts[i].claiming.remove(&p);
                }
            },
            DbCtx::Release => {}
            DbCtx::Load { p, epoch, sent } => {
                self.insts[i].claiming.remove(&p);
                if let Some(OpResult::Loaded { image, rows }) = result {
                    self.take_over(i, p, epoch, sent, &image, rows);
                }
            }
            DbCtx::Write { p, epoch } => self.write_done(i, p, epoch, result),
        }
    }

    fn write_done(&mut self, i: usize, p: PartitionId, epoch: u64, result: Option<OpResult>) {
        if result == Some(OpResult::Fenced) {
            // The database refused a stale owner's write (whether or not the
            // owner's own clock already told it to stop).
            self.check.count("cluster_write_fenced");
        }
        if !self.serves(i, p) || self.insts[i].parts[&p].lease.epoch != epoch {
            return;
        }
        match result {
            Some(OpResult::Written) => {
                let now = self.time();
                let part = self.insts[i].parts.get_mut(&p).expect("served");
                let Some((lsn, _)) = part.in_flight.take() else { return };
                part.core.handle(now, BrokerInput::Durable { lsn });
                self.drain(i, p);
            }
            Some(_) => {
                self.stop(i, p, "its write was fenced (the lease moved on)");
            }
            None => {
                self.check.count("cluster_write_retried");
                let id = self.insts[i].id.clone();
                self.line("inst", || {
                    format!("{id}: the write of {p} has an unknown outcome; writing it again")
                });
                self.timer(i, self.now + WRITE_RETRY_NS, ITimer::RetryWrite(p, epoch));
            }
        }
    }

    /// The partition's rows are loaded: its core recovers from them and serves.
    fn take_over(&mut self, i: usize, p: PartitionId, epoch: u64, sent: u64, image: &[u8], rows: u64) {
        let lease = LocalLease {
            epoch,
            renew_sent_ms: self.insts[i].local_ms(sent),
        };
        if !lease.valid_at(self.insts[i].local_ms(self.now), self.cfg.lease_ms) {
            return;
        }
        let seed = self.seed ^ (u64::from(p.0) << 32) ^ epoch;
        let core = match Broker::recover(self.broker.clone(), seed, image) {
            Ok((core, _)) => core,
            Err(e) => {
                let detail = format!("{p}'s rows in the database do not recover at its takeover by i{i}: {e}");
                let at = self.now_ms();
                self.violation(crate::check::Violation::safety("recovery", detail, at));
                return;
            }
        };
        let id = self.insts[i].id.clone();
        self.line("inst", || format!("{id} serves {p} at epoch {epoch} ({rows} rows)"));
        self.takeovers += 1;
        self.observe(Event::Crashed {
            node: crate::topology::BROKER,
        });
        self.observe(Event::Booted {
            node: crate::topology::BROKER,
            records: rows,
            torn_bytes: 0,
        });
        let part = Part {
            lease,
            core,
            pending: PendingRows::default(),
            in_flight: None,
            replies: BTreeMap::new(),
            req_next: 0,
            timer_at: None,
        };
        self.insts[i].parts.insert(p, part);
        self.served(p);
        self.drain(i, p);
    }

    fn lease_tick(&mut self, i: usize) {
        let tick = cl::lease_tick_ms(self.cfg.lease_ms) * MS;
        self.timer(i, self.now + tick, ITimer::LeaseTick);
        let served: Vec<PartitionId> = self.insts[i].parts.keys().copied().collect();
        for p in served {
            self.serves(i, p);
        }
        if self.insts[i].round_in_flight {
            return;
        }
        self.insts[i].round_in_flight = true;
        let renew = self.insts[i]
            .parts
            .iter()
            .map(|(p, part)| (*p, part.lease.epoch))
            .collect();
        let op = Op::Round {
            me: self.insts[i].id.clone(),
            renew,
            ttl_ns: self.cfg.lease_ms * MS,
        };
        let sent = self.now;
        self.db_call(i, op, DbCtx::Round { sent }, 0);
    }

    fn round_done(
        &mut self,
        i: usize,
        sent: u64,
        renewed: &BTreeSet<PartitionId>,
        leases: &[LeaseView],
        live: &BTreeSet<InstanceId>,
    ) {
        let sent_ms = self.insts[i].local_ms(sent);
        for p in renewed {
            if let Some(part) = self.insts[i].parts.get_mut(p) {
                part.lease.renew_sent_ms = part.lease.renew_sent_ms.max(sent_ms);
            }
        }
        self.insts[i].owners = leases
            .iter()
            .map(|l| l.owner.as_ref().filter(|_| l.live).and_then(index_of))
            .collect();
        let serving: BTreeSet<PartitionId> = self.insts[i]
            .parts
            .keys()
            .chain(self.insts[i].claiming.iter())
            .copied()
            .collect();
        let me = self.insts[i].id.clone();
        let plan = cl::plan(&me, leases, live, &serving);
        for p in plan.acquire {
            if self.insts[i].claiming.insert(p) {
                let op = Op::Acquire {
                    p,
                    me: me.clone(),
                    ttl_ns: self.cfg.lease_ms * MS,
                };
                self.db_call(i, op, DbCtx::Acquire { p, sent: self.now }, 0);
            }
        }
        for (p, epoch) in plan.release {
            let idle = self.insts[i]
                .parts
                .get(&p)
                .is_some_and(|part| !part.writing() && part.replies.is_empty());
            if idle {
                self.stop(i, p, "handed back to even out the partitions");
                let op = Op::Release {
                    p,
                    me: me.clone(),
                    epoch,
                };
                self.db_call(i, op, DbCtx::Release, 0);
            }
        }
    }
}

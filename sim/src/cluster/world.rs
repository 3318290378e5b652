//! The cluster world: instances, the database node, publishers and
//! subscribers exchanging messages over a simulated network, stepped by one
//! event loop on a virtual nanosecond clock. Events due at the same instant
//! run in the order they were scheduled, so the run is the seed's alone.
//!
//! Phases: chaos (the plan's faults fire; the workload runs), heal (every
//! cut healed, every crashed instance and the database up again), then the
//! run ends once quiescent (every publish acknowledged, every subscription
//! confirmed, every partition served, nothing queued for a subscriber,
//! nothing left to write) or when the heal bound passes. The checker then
//! judges liveness, and every partition's rows are recovered and compared
//! with the live owner's core (recovery equivalence).

use super::clients::{PubJob, SubJob};
use super::db::{Op, OpResult};
use super::dbnode::DbNode;
use super::inst::Inst;
use super::plan::{self, Fault};
use super::{ClusterBug, ClusterConfig, ClusterResult};
use crate::check::{BrokerSnapshot, Checker, DurableState, Snapshot, Spec, Violation};
use crate::clock::CLOCK_BASE_NS;
use crate::history::Event;
use crate::trace::{Trace, trace_hash};
use sagamq::broker::{Broker, BrokerConfig, Reply};
use sagamq::cluster::{PartitionId, Partitions};
use sagamq::rng::Rng;
use sagamq::saga::order::OrderFlow;
use sagamq::{ClientId, Message, MsgId, PublishRequest, SubscribeRequest, Time};
use std::collections::BTreeMap;
use std::time::Duration;

pub(super) const MS: u64 = 1_000_000;
/// The monitor's period after healing (quiescence checks).
const MONITOR_NS: u64 = 50 * MS;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Node {
    Db,
    Inst(usize),
    Pub(usize),
    Sub(usize),
}

#[derive(Clone, Debug)]
pub(super) enum Msg {
    Publish {
        req: u64,
        publish: PublishRequest,
    },
    /// None: 503 (no owner, the owner unreachable, the partition stopped).
    PubReply {
        req: u64,
        reply: Option<Reply>,
    },
    Subscribe {
        req: u64,
        sub: SubscribeRequest,
    },
    SubReply {
        req: u64,
        until: Option<Time>,
    },
    FwdPublish {
        fid: u64,
        publish: PublishRequest,
    },
    FwdReply {
        fid: u64,
        reply: Option<Reply>,
    },
    FwdSubscribe {
        op: u64,
        p: PartitionId,
        sub: SubscribeRequest,
    },
    SubPartReply {
        op: u64,
        p: PartitionId,
        until: Option<Time>,
    },
    Callback {
        gdid: u64,
        message: Message,
        client: ClientId,
    },
    CallbackAnswer {
        gdid: u64,
        ok: bool,
    },
    DbReq {
        req: u64,
        op: Op,
    },
    /// None: the connection was lost (refused, reset, or cut during COMMIT).
    DbResp {
        req: u64,
        result: Option<OpResult>,
    },
}

#[derive(Clone, Copy, Debug)]
pub(super) enum ITimer {
    LeaseTick,
    Core(PartitionId, u64),
    CallbackTimeout(u64),
    DbTimeout(u64),
    FwdTimeout(u64),
    SubOpTimeout(u64),
    RetryWrite(PartitionId, u64),
}

#[derive(Clone, Copy, Debug)]
pub(super) enum CTimer {
    Attempt(usize),
    Timeout(usize, u64),
}

pub(super) enum Ev {
    Net {
        from: Node,
        to: Node,
        to_inc: u64,
        msg: Msg,
    },
    Inst {
        i: usize,
        inc: u64,
        t: ITimer,
    },
    Pub(CTimer),
    Sub(CTimer),
    DbCpu {
        life: u64,
    },
    DbFlushed {
        life: u64,
        n: usize,
    },
    DbUp {
        life: u64,
    },
    /// Instance `i` takes the next event of its inbox.
    Wake {
        i: usize,
        inc: u64,
    },
    Fault(usize),
    FaultEnd(usize),
    Heal,
    Monitor,
    BenchKill,
}

/// The run's random streams, one per concern.
pub(super) struct Streams {
    pub net: Rng,
    pub work: Rng,
    pub answers: Rng,
    pub db: Rng,
    /// Each instance process's clock rate.
    pub clocks: Rng,
}

pub struct World {
    pub(super) cfg: ClusterConfig,
    pub(super) seed: u64,
    pub(super) parts: Partitions,
    pub(super) broker: BrokerConfig,
    pub(super) now: u64,
    order: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    pub(super) rng: Streams,
    pub(super) insts: Vec<Inst>,
    pub(super) db: DbNode,
    pub(super) pubs: Vec<PubJob>,
    pub(super) subs: Vec<SubJob>,
    /// Subscriber clients: their ids (a subscriber node per client).
    pub(super) sub_clients: Vec<ClientId>,
    /// Requests of clients in flight: request id -> job.
    pub(super) pub_reqs: BTreeMap<u64, usize>,
    pub(super) sub_reqs: BTreeMap<u64, usize>,
    pub(super) next_id: u64,
    /// `db_cut[i]`: until when instance `i` and the database cannot reach each other.
    pub(super) db_cut: Vec<u64>,
    /// `peer_cut[a][b]`: until when instances `a` and `b` cannot reach each other.
    pub(super) peer_cut: Vec<Vec<u64>>,
    pub(super) faults_plan: Vec<Fault>,
    pub(super) faults: BTreeMap<&'static str, u64>,
    pub(super) healed: bool,
    pub(super) check: Checker,
    pub(super) trace: Trace,
    pub(super) acked: u64,
    pub(super) takeovers: u64,
    /// The benchmark: acknowledgements in its window; the killed owner's
    /// partitions and when it was killed; when each served again.
    pub(super) bench_acked: u64,
    pub(super) killed: Option<(u64, Vec<PartitionId>)>,
    pub(super) served_again: BTreeMap<PartitionId, u64>,
    done: bool,
}

impl World {
    pub fn new(seed: u64, cfg: &ClusterConfig) -> World {
        let parts = Partitions::new(cfg.partitions).expect("partitions clamped");
        let broker = BrokerConfig {
            callback_timeout: Duration::from_millis(300),
            retry_backoff_initial: Duration::from_millis(20),
            retry_backoff_max: Duration::from_millis(500),
            attempts_max: 12,
            subscription_grace: Duration::from_secs(60),
            compact_garbage_records_min: 16,
            ..BrokerConfig::default()
        };
        let spec = Spec {
            flow: OrderFlow::Seed,
            orders: BTreeMap::new(),
            stock: BTreeMap::new(),
            balances: BTreeMap::new(),
            attempts_max: broker.attempts_max,
            grace: broker.subscription_grace,
            dispatch_gap_max: broker.callback_timeout + broker.retry_backoff_max,
            backoff_initial: broker.retry_backoff_initial,
            backoff_max: broker.retry_backoff_max,
            // Each partition is a broker core with its own bounds: across the
            // cluster a subscriber may have up to `partitions` times each.
            inflight_max: broker
                .inflight_per_subscriber_max
                .saturating_mul(cfg.partitions as usize),
            callback_timeout: broker.callback_timeout,
            pending_max: broker
                .pending_per_subscriber_max
                .saturating_mul(cfg.partitions as usize),
            messages_max: broker.messages_max.saturating_mul(cfg.partitions as usize),
            // Not judged: a request lost with an instance that forwarded it is
            // never answered, so the checker's count is no lower bound here.
            unsynced_max: usize::MAX,
        };
        let mut db = DbNode::new(cfg.partitions);
        db.db.fencing = cfg.bug != Some(ClusterBug::NoFencing);
        db.db.idempotent_rows = cfg.bug != Some(ClusterBug::DoubleStoreRetriedCommit);
        let n = cfg.instances;
        let mut w = World {
            seed,
            parts,
            broker,
            now: 0,
            order: 0,
            queue: BTreeMap::new(),
            rng: Streams {
                net: Rng::new(seed ^ 0x4E37_0000_0000_0000),
                work: Rng::new(seed ^ 0x3023_C000_0000_0000),
                answers: Rng::new(seed ^ 0xA45E_2000_0000_0000),
                db: Rng::new(seed ^ 0xDB00_0000_0000_0000),
                clocks: Rng::new(seed ^ 0xC10C_D21F_0000_0000),
            },
            insts: Vec::new(),
            db,
            pubs: Vec::new(),
            subs: Vec::new(),
            sub_clients: Vec::new(),
            pub_reqs: BTreeMap::new(),
            sub_reqs: BTreeMap::new(),
            next_id: 0,
            db_cut: vec![0; n],
            peer_cut: vec![vec![0; n]; n],
            faults_plan: if cfg.faults {
                plan::draw(seed, n, cfg.chaos_ms, cfg.lease_ms)
            } else {
                Vec::new()
            },
            faults: plan::FAULT_KINDS.iter().map(|k| (*k, 0)).collect(),
            healed: false,
            check: Checker::new(spec).order_within_partitions(parts),
            trace: Trace::new(cfg.trace),
            acked: 0,
            takeovers: 0,
            bench_acked: 0,
            killed: None,
            served_again: BTreeMap::new(),
            done: false,
            cfg: cfg.clone(),
        };
        for i in 0..n {
            let drift = w.drift();
            w.insts.push(Inst::new(i, 0, drift));
        }
        let faults = format!("{:?}", w.faults_plan);
        w.line("world", || {
            format!(
                "seed {seed}: {n} instances, {} partitions, lease {} ms, bug {}, faults {faults}",
                cfg.partitions,
                cfg.lease_ms,
                cfg.bug.map_or("none", |b| b.name()),
            )
        });
        w
    }

    /// A process's clock rate error: up to 0.5% either way (a lease margin is 20%).
    fn drift(&mut self) -> i64 {
        self.rng.clocks.range_inclusive(0, 10_000) as i64 - 5_000
    }

    /// Schedules `ev` at `at_ns` (never in the past).
    pub(super) fn at(&mut self, at_ns: u64, ev: Ev) {
        self.order += 1;
        self.queue.insert((at_ns.max(self.now), self.order), ev);
    }

    pub(super) fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The brokers' clock (every node reads the same virtual time here).
    pub(super) fn time(&self) -> Time {
        Time(CLOCK_BASE_NS + self.now)
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.now / MS
    }

    pub(super) fn observe(&mut self, event: Event<'_>) {
        let at = self.now_ms();
        self.check.observe(at, event);
    }

    pub(super) fn fired(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    pub(super) fn line(&mut self, node: &str, text: impl FnOnce() -> String) {
        self.trace.line(self.now, node, text);
    }

    /// Records a violation (the checker keeps the first of each invariant; so does the trace).
    pub(super) fn violation(&mut self, v: Violation) {
        if self.check.violations().iter().any(|old| old.invariant == v.invariant) {
            return;
        }
        let detail = v.detail.clone();
        self.line("checker", || format!("VIOLATION {}: {detail}", v.invariant));
        self.check.violation(v);
    }

    /// Sends `msg` from `from` to `to` after `delay_ns` plus the network's
    /// latency; lost if the link is cut now or when it arrives, or the
    /// destination's process is gone by then.
    pub(super) fn send(&mut self, from: Node, to: Node, msg: Msg, delay_ns: u64) {
        if self.cut(from, to) {
            return;
        }
        let (lo, hi) = self.cfg.cost.net_us;
        let latency = self.rng.net.range_inclusive(lo, hi.max(lo)) * 1_000;
        let to_inc = match to {
            Node::Inst(i) => self.insts[i].inc,
            _ => 0,
        };
        self.at(self.now + delay_ns + latency, Ev::Net { from, to, to_inc, msg });
    }

    pub(super) fn cut(&self, a: Node, b: Node) -> bool {
        match (a, b) {
            (Node::Inst(i), Node::Db) | (Node::Db, Node::Inst(i)) => self.now < self.db_cut[i],
            (Node::Inst(i), Node::Inst(j)) => self.now < self.peer_cut[i][j],
            _ => false,
        }
    }

    pub fn run(mut self) -> ClusterResult {
        self.start();
        while !self.done {
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                break;
            };
            self.now = t;
            self.step(ev);
        }
        self.finish()
    }

    fn start(&mut self) {
        for i in 0..self.insts.len() {
            self.insts[i].up = true;
            let inc = self.insts[i].inc;
            self.at(
                i as u64 * MS,
                Ev::Inst {
                    i,
                    inc,
                    t: ITimer::LeaseTick,
                },
            );
        }
        match self.cfg.bench {
            Some(b) => {
                self.bench_workload(b.lanes);
                self.at(b.to_ms * MS, Ev::BenchKill);
                self.at(b.end_ms * MS, Ev::Heal);
            }
            None => {
                self.workload();
                for k in 0..self.faults_plan.len() {
                    let at = self.faults_plan[k].at_ms() * MS;
                    self.at(at, Ev::Fault(k));
                }
                self.at(self.cfg.chaos_ms * MS, Ev::Heal);
            }
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Net { from, to, to_inc, msg } => self.arrive(from, to, to_inc, msg),
            Ev::Inst { i, inc, .. } => self.deliver_to_instance(i, inc, ev),
            Ev::Wake { i, inc } => self.wake(i, inc),
            Ev::Pub(t) => self.pub_timer(t),
            Ev::Sub(t) => self.sub_timer(t),
            Ev::DbCpu { life } => self.db_cpu(life),
            Ev::DbFlushed { life, n } => self.db_flushed(life, n),
            Ev::DbUp { life } => self.db_up(life),
            Ev::Fault(k) => self.fault(k),
            Ev::FaultEnd(k) => self.fault_end(k),
            Ev::Heal => self.heal(),
            Ev::Monitor => self.monitor(),
            Ev::BenchKill => self.bench_kill(),
        }
    }

    /// An event for instance `i`'s process `inc`: lost if that process is
    /// gone; queued behind earlier ones while the instance is busy or paused
    /// (its inbox is first in, first out); handled now otherwise.
    fn deliver_to_instance(&mut self, i: usize, inc: u64, ev: Ev) {
        let inst = &mut self.insts[i];
        if !inst.up || inst.inc != inc {
            return;
        }
        if self.now < inst.busy_until || !inst.inbox.is_empty() {
            inst.inbox.push_back(ev);
            self.arm_wake(i);
            return;
        }
        self.handle_at_instance(i, ev);
    }

    fn arm_wake(&mut self, i: usize) {
        let inst = &mut self.insts[i];
        if inst.wake_armed || inst.inbox.is_empty() {
            return;
        }
        inst.wake_armed = true;
        let (at, inc) = (inst.busy_until.max(self.now), inst.inc);
        self.at(at, Ev::Wake { i, inc });
    }

    fn wake(&mut self, i: usize, inc: u64) {
        let inst = &mut self.insts[i];
        if !inst.up || inst.inc != inc {
            return;
        }
        inst.wake_armed = false;
        if self.now >= inst.busy_until
            && let Some(ev) = inst.inbox.pop_front()
        {
            self.handle_at_instance(i, ev);
        }
        self.arm_wake(i);
    }

    /// Handles one event at a free instance; a message costs it CPU time.
    fn handle_at_instance(&mut self, i: usize, ev: Ev) {
        match ev {
            Ev::Net { from, msg, .. } => {
                let cost = self.cfg.cost.instance_msg_us * 1_000;
                self.insts[i].busy_until = self.now + cost;
                self.inst_msg(i, from, msg);
            }
            Ev::Inst { t, .. } => self.inst_timer(i, t),
            _ => {}
        }
    }

    fn arrive(&mut self, from: Node, to: Node, to_inc: u64, msg: Msg) {
        if self.cut(from, to) {
            return;
        }
        match to {
            Node::Db => self.db_arrive(from, msg),
            Node::Inst(i) => self.deliver_to_instance(i, to_inc, Ev::Net { from, to, to_inc, msg }),
            Node::Pub(_) => self.pub_msg(msg),
            Node::Sub(s) => self.sub_msg(s, from, msg),
        }
    }

    fn fault(&mut self, k: usize) {
        if self.healed {
            return;
        }
        let f = self.faults_plan[k];
        match f {
            Fault::Crash { inst, down_ms, .. } => {
                if self.insts[inst].up {
                    self.fired("crash");
                    self.crash(inst);
                    self.at(self.now + down_ms * MS, Ev::FaultEnd(k));
                }
            }
            Fault::Pause { inst, .. } => {
                self.insts[inst].pause_armed = Some(k);
                self.at(self.now + 1_000 * MS, Ev::FaultEnd(k));
            }
            Fault::DbCut { inst, dur_ms, .. } => {
                self.fired("db_cut");
                self.line("fault", || format!("i{inst} cut off from the database for {dur_ms} ms"));
                self.db_cut[inst] = self.db_cut[inst].max(self.now + dur_ms * MS);
            }
            Fault::DbRestart { down_ms, .. } => {
                if self.db.up {
                    self.fired("db_restart");
                    self.db_restart(down_ms);
                }
            }
            Fault::CommitLost { count, .. } => self.db.commit_lost += count,
            Fault::PeerCut { a, b, dur_ms, .. } => {
                self.fired("peer_cut");
                self.line("fault", || format!("i{a} and i{b} cut from each other for {dur_ms} ms"));
                let until = self.peer_cut[a][b].max(self.now + dur_ms * MS);
                self.peer_cut[a][b] = until;
                self.peer_cut[b][a] = until;
            }
        }
    }

    fn fault_end(&mut self, k: usize) {
        if self.healed {
            return;
        }
        match self.faults_plan[k] {
            Fault::Crash { inst, .. } => self.restart(inst),
            Fault::Pause { inst, pause_ms, .. } => {
                if self.insts[inst].pause_armed == Some(k) {
                    self.pause(inst, pause_ms);
                }
            }
            Fault::DbCut { .. } | Fault::PeerCut { .. } | Fault::DbRestart { .. } | Fault::CommitLost { .. } => {}
        }
    }

    /// Instance `i` stops (tasks frozen, nothing lost) for `pause_ms`.
    pub(super) fn pause(&mut self, i: usize, pause_ms: u64) {
        self.insts[i].pause_armed = None;
        if !self.insts[i].up {
            return;
        }
        self.fired("pause");
        self.line("fault", || format!("i{i} paused for {pause_ms} ms"));
        self.insts[i].busy_until = self.insts[i].busy_until.max(self.now) + pause_ms * MS;
    }

    fn crash(&mut self, i: usize) {
        let id = self.insts[i].id.clone();
        self.line("fault", || format!("{id} killed"));
        self.insts[i].up = false;
    }

    fn restart(&mut self, i: usize) {
        if self.insts[i].up {
            return;
        }
        let inc = self.insts[i].inc + 1;
        let drift = self.drift();
        self.insts[i] = Inst::new(i, inc, drift);
        self.insts[i].up = true;
        let id = self.insts[i].id.clone();
        self.line("world", || format!("{id} started"));
        self.at(
            self.now,
            Ev::Inst {
                i,
                inc,
                t: ITimer::LeaseTick,
            },
        );
    }

    fn heal(&mut self) {
        if self.healed {
            return;
        }
        self.healed = true;
        self.line("world", || {
            "heal: cuts healed, instances and the database up".to_string()
        });
        self.db_cut.fill(0);
        self.peer_cut.iter_mut().for_each(|r| r.fill(0));
        self.db.commit_lost = 0;
        if self.cfg.bench.is_some() {
            self.done = true;
            return;
        }
        for i in 0..self.insts.len() {
            self.insts[i].pause_armed = None;
            self.restart(i);
        }
        if !self.db.up {
            let life = self.db.life;
            self.db_up(life);
        }
        self.observe(Event::Healed);
        self.at(self.now + MONITOR_NS, Ev::Monitor);
    }

    fn monitor(&mut self) {
        if self.quiescent() {
            self.done = true;
            return;
        }
        if self.now >= (self.cfg.chaos_ms + self.cfg.heal_ms_max) * MS {
            let detail = format!(
                "not settled {} ms after healing: {}",
                self.cfg.heal_ms_max,
                self.unsettled().join("; ")
            );
            let at = self.now_ms();
            self.violation(Violation::liveness("liveness", detail, at));
            self.done = true;
            return;
        }
        self.at(self.now + MONITOR_NS, Ev::Monitor);
    }

    /// The partitions' serving cores, by partition (the first valid owner).
    pub(super) fn owners(&self) -> BTreeMap<PartitionId, usize> {
        let mut out = BTreeMap::new();
        for (i, inst) in self.insts.iter().enumerate() {
            if !inst.up {
                continue;
            }
            let local = inst.local_ms(self.now);
            for (p, part) in &inst.parts {
                if part.valid(local, self.cfg.lease_ms) {
                    out.entry(*p).or_insert(i);
                }
            }
        }
        out
    }

    fn unsettled(&self) -> Vec<String> {
        let mut out = Vec::new();
        let waiting = self.pubs.iter().filter(|j| !j.done).count();
        if waiting > 0 {
            out.push(format!("{waiting} publishes not yet answered"));
        }
        let subs = self.subs.iter().filter(|j| !j.done).count();
        if subs > 0 {
            out.push(format!("{subs} subscriptions not yet confirmed"));
        }
        let owners = self.owners();
        let unowned: Vec<String> = self
            .parts
            .all()
            .filter(|p| !owners.contains_key(p))
            .map(|p| p.to_string())
            .collect();
        if !unowned.is_empty() {
            out.push(format!("partitions not served: {}", unowned.join(" ")));
        }
        for (p, i) in owners {
            let part = &self.insts[i].parts[&p];
            let queued: usize = part
                .core
                .stats()
                .subscribers
                .values()
                .map(|s| s.pending + s.in_flight)
                .sum();
            if queued > 0 {
                out.push(format!("{p} on i{i} has {queued} deliveries queued"));
            }
            if part.writing() {
                out.push(format!("{p} on i{i} has rows to write"));
            }
        }
        out
    }

    fn quiescent(&self) -> bool {
        self.unsettled().is_empty()
    }

    fn snapshot_broker(&self) -> BrokerSnapshot {
        let mut snap = BrokerSnapshot {
            now: self.time(),
            ..BrokerSnapshot::default()
        };
        for (p, i) in self.owners() {
            let core = &self.insts[i].parts[&p].core;
            for (client, st) in core.stats().subscribers {
                *snap.queued.entry(client.clone()).or_default() += st.pending + st.in_flight;
                let dead = snap.dead.entry(client.clone()).or_default();
                for m in core.dead_letters(&client) {
                    dead.push(self.parts.cluster_msg_id(p, m.msg_id));
                }
            }
        }
        snap
    }

    /// Every partition's rows, recovered, must equal its live owner's core.
    fn probe_recovery(&mut self) {
        let at = self.now_ms();
        for (p, i) in self.owners() {
            let (image, _) = self.db.db.load(p);
            let live = DurableState::of(&self.insts[i].parts[&p].core);
            let detail = match Broker::recover(self.broker.clone(), self.seed ^ 0xB20C_E500, &image) {
                Ok((r, _)) => live.differs(&DurableState::of(&r)).map(|d| {
                    format!("{p} recovered from its rows in the database differs from its live owner i{i}: {d}")
                }),
                Err(e) => Some(format!("{p}'s rows in the database do not recover: {e}")),
            };
            if let Some(detail) = detail {
                self.violation(Violation::safety("recovery-equivalence", detail, at));
                return;
            }
        }
        self.check.count("cluster_recovery_probe");
    }

    fn finish(mut self) -> ClusterResult {
        if self.cfg.bench.is_none() {
            self.judge_end();
        }
        let failover_ms = self.killed.as_ref().and_then(|(at, parts)| {
            let last = parts
                .iter()
                .map(|p| self.served_again.get(p).copied())
                .collect::<Option<Vec<u64>>>()?;
            Some((last.into_iter().max().unwrap_or(*at) - at) / MS)
        });
        let trace = self.trace.into_lines();
        ClusterResult {
            seed: self.seed,
            violations: self.check.violations().to_vec(),
            faults: self.faults,
            coverage: self.check.coverage().clone(),
            trace_hash: trace_hash(&trace),
            trace,
            sim_ms: self.now / MS,
            acked: self.acked,
            takeovers: self.takeovers,
            bench_acked: self.bench_acked,
            failover_ms,
        }
    }

    fn judge_end(&mut self) {
        let broker = self.snapshot_broker();
        let waiting = self.pubs.iter().any(|j| !j.done);
        let reflects = |_: usize, _: &Message| None;
        let snap = Snapshot {
            at_ms: self.now_ms(),
            down: Vec::new(),
            broker: Some(broker),
            views: Vec::new(),
            unsettled: Vec::new(),
            workload_waiting: waiting,
            reflects: &reflects,
            recorded: None,
        };
        self.check.quiescent(&snap);
        self.check.liveness(&snap);
        if self.check.violations().is_empty() {
            self.probe_recovery();
        }
    }

    fn bench_kill(&mut self) {
        let owners = self.owners();
        let mut count = vec![0usize; self.insts.len()];
        for i in owners.values() {
            count[*i] += 1;
        }
        let Some(victim) = (0..count.len()).max_by_key(|i| (count[*i], std::cmp::Reverse(*i))) else {
            return;
        };
        let lost: Vec<PartitionId> = owners.iter().filter(|(_, i)| **i == victim).map(|(p, _)| *p).collect();
        if self.insts.len() < 2 {
            return;
        }
        self.crash(victim);
        self.killed = Some((self.now, lost));
    }

    /// A partition starts serving on a new owner (the benchmark's failover clock).
    pub(super) fn served(&mut self, p: PartitionId) {
        if let Some((at, lost)) = &self.killed
            && lost.contains(&p)
            && !self.served_again.contains_key(&p)
            && self.now >= *at
        {
            self.served_again.insert(p, self.now);
        }
    }

    /// A message id as clients see it.
    pub(super) fn cluster_id(&self, p: PartitionId, local: MsgId) -> MsgId {
        self.parts.cluster_msg_id(p, local)
    }
}

//! The madsim world: one node per service (broker, order, stock, payment,
//! workload), each driving the shipped sans-IO machine; a faulty transport
//! (the plan's message faults over [`crate::transport`]'s mailboxes); a disk per node that lives outside the node so it survives
//! a kill; a supervisor that schedules the plan's crashes and partitions, then
//! heals and waits for quiescence.
//!
//! **Invariant:** every choice comes from the seed: madsim's scheduler and
//! latencies from the madsim seed, faults from the [`FaultPlan`], workload from
//! the scenario. Nothing reads the wall clock or an OS random source.

use crate::check::{BrokerSnapshot, Checker, Snapshot, Spec, Violation};
use crate::clock::Skew;
pub use crate::config::{ATTEMPTS_MAX_DEFAULT, RunConfig, SUBSCRIPTION_GRACE, broker_config};
use crate::event::{EventLog, Fate, Seq, What};
use crate::history::Event;
use crate::participants::{self, Built, HostRecoveries, Recoveries, SimParticipant};
use crate::plan::{Fault, FaultPlan, PlanIndex};
use crate::scenario::Workload;
use crate::topology::node_of_url;
pub use crate::topology::{BROKER, CUSTOM, NODES, ORDER, PAYMENT, STOCK, WORKLOAD, notify_url};
use crate::trace::Trace;
use crate::transport::{Inbound, SimClock, Transport};
use crate::wire::Wire;
use madsim::runtime::{Handle, NodeHandle, Runtime};
use sagamq::broker::{
    Broker, BrokerConfig, BrokerError, BrokerInput, BrokerOutput, CallbackResult, DeliveryId, Lsn, Recovery,
    RecoveryReport as BrokerRecoveryReport, Reply, RequestId,
};
use sagamq::log::{Disk, LogError, MemDisk};
use sagamq::machine::Machine;
use sagamq::saga::{CallbackToken, Command, CommandOutcome, OutboxId, ParticipantInput, ParticipantOutput};
use sagamq::{ClientId, MessageKey, Time, Topic};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

/// A node that fail-stopped on a full disk restarts after this long (a
/// supervisor's restart delay); while the disk stays full it fails again.
const DISK_FULL_RESTART_MS: u32 = 100;
/// The request id of the operator's redrives (their replies go nowhere).
const OPERATOR_REQUEST: RequestId = RequestId(u64::MAX);

/// A disk sync takes this long; writes issued meanwhile share it (group commit).
const SYNC_LATENCY: Duration = Duration::from_micros(500);
/// How long a torn-write crash waits for its node to start a write.
const TORN_WAIT_MAX: Duration = Duration::from_millis(500);

/// What one seed's run produced.
#[derive(Debug, Default)]
pub struct RunResult {
    pub seed: u64,
    /// Each participant's final state, by node name.
    pub views: BTreeMap<String, crate::check::View>,
    pub trace: Vec<String>,
    /// The structured events behind the diagrams (empty unless tracing).
    pub events: Vec<crate::event::Event>,
    pub violations: Vec<Violation>,
    /// Faults that actually fired, per kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub orders: u64,
    pub deliveries: u64,
    /// Network messages sent (before faults) and node wake-ups handled.
    pub messages: u64,
    pub wakeups: u64,
    pub sim_ms: u64,
    /// Named paths the run reached (see [`crate::check::COVERAGE`]).
    pub coverage: BTreeMap<&'static str, u64>,
    /// Terminal order states at the end, from the order service's view.
    pub outcomes: BTreeMap<String, u64>,
    /// The per-subscriber account (lost, duplicated, unexpected, out of order).
    pub account: crate::check::Account,
    /// Simulated time from healing to quiescence (None: never quiescent).
    pub quiescence_ms: Option<u64>,
    /// The run panicked (a node or the checker): the panic is its violation.
    pub panicked: bool,
    /// The liveness bound derived for this run (ms after healing).
    pub liveness_bound_ms: u64,
}

/// A node's machine as the checker sees it; `Down` while crashed.
pub enum Slot {
    Down,
    /// A node this run does not use (the custom node without a custom participant).
    Absent,
    Broker(Box<Broker>),
    Participant(Box<dyn SimParticipant>),
    Workload(Box<Workload>),
}

/// State shared by every node task and the supervisor. madsim runs all of them
/// on one thread, so the lock is never contended; it only satisfies `Send`.
pub struct Shared {
    pub cfg: RunConfig,
    def: sagamq::saga::scenario::Scenario,
    seed: u64,
    pub trace: Trace,
    pub events: EventLog,
    /// madsim's clock; 0 when the run started.
    clock: SimClock,
    /// The network between the nodes (mailboxes, cut links).
    net: Transport,
    /// The virtual time of the node step in progress: time cannot move while
    /// a step holds the world, so its clock is read once.
    step_ns: Option<u64>,
    skews: [Skew; NODES.len()],
    pub disks: Vec<MemDisk>,
    pub slots: Vec<Slot>,
    plan: PlanIndex,
    broker_config: BrokerConfig,
    /// Each node's display name (`topology::display_name`), by index.
    names: Arc<[String]>,
    /// The drawn profile (participants' TTL and inbox bounds come from it).
    profile: crate::plan::FaultProfile,
    /// Message faults apply only while true (the chaos phase).
    chaos: bool,
    sent_nth: u32,
    answer_nth: u32,
    callback_nth: u32,
    pub faults: BTreeMap<&'static str, u64>,
    /// A torn-write crash waits for node i to start a write; the node reports it here.
    torn_armed: [bool; NODES.len()],
    torn_signal: Option<async_channel::Sender<usize>>,
    pub check: Checker,
    pub deliveries: u64,
    wakeups: u64,
    /// The run's derived liveness bound (ms after healing).
    liveness_bound_ms: u64,
    /// A paused node handles nothing until this (elapsed ns).
    paused_until_ns: [Option<u64>; NODES.len()],
    /// Which nodes are down (crashed, not yet restarted), and how often each crashed.
    down: [bool; NODES.len()],
    crashes: [u32; NODES.len()],
    /// The plan's disk and clock faults, by node.
    env: EnvFaults,
    /// A node whose disk failed asks here to die (fail-stop) and be restarted
    /// after the given ms.
    fail_stop: Option<async_channel::Sender<(usize, u32)>>,
    /// Per node, what its host took in and put out since it booted (the stats audit).
    tally: Vec<crate::audit::HostTally>,
    /// The orders' deadlines as the order's configuration promises them;
    /// see [`judge_order_deadlines`].
    order_deadlines: crate::deadlines::OrderDeadlines,
    /// Whether the order's host runs with its default bounds (see
    /// [`judge_order_deadlines`]).
    order_deadline_judged: bool,
    /// The size of the chunks every broker recovery reads its image in
    /// (`recovery_chunk`).
    recovery_chunk: usize,
    /// Per shipped participant node, its recoveries kept to resume (boots and
    /// disk probes recover the same growing log).
    recoveries: RefCell<Vec<Option<Box<dyn Recoveries>>>>,
    /// The broker's last recovery and the bytes it was fed (see `recover_broker`).
    broker_recovery: RefCell<Option<(Vec<u8>, Recovery)>>,
    /// The same for the dedup-bound probe's recoveries (another bound).
    dedup_bound_recovery: RefCell<Option<(Vec<u8>, Recovery)>>,
}

/// The plan's disk and clock faults in the form the driver checks them.
#[derive(Clone, Debug, Default)]
struct EnvFaults {
    /// node -> (the first sync due at or after this elapsed ns fails, down ms).
    sync_error: BTreeMap<usize, (u64, u32)>,
    /// (node, from, until) in elapsed ns: appends fail.
    disk_full: Vec<(usize, u64, u64)>,
    /// (node, from, until) in elapsed ns: syncs complete only at `until`.
    sync_stall: Vec<(usize, u64, u64)>,
    /// node -> ms its clock steps back at its next restart (once).
    clock_step_ms: BTreeMap<usize, u32>,
}

impl EnvFaults {
    fn from_plan(plan: &FaultPlan) -> EnvFaults {
        let ns = |ms: u32| u64::from(ms) * 1_000_000;
        let mut env = EnvFaults::default();
        for f in &plan.faults {
            match *f {
                Fault::SyncError { node, at_ms, down_ms } => {
                    env.sync_error.insert(usize::from(node), (ns(at_ms), down_ms));
                }
                Fault::DiskFull { node, at_ms, for_ms } => {
                    env.disk_full
                        .push((usize::from(node), ns(at_ms), ns(at_ms.saturating_add(for_ms))));
                }
                Fault::SyncStall { node, at_ms, for_ms } => {
                    env.sync_stall
                        .push((usize::from(node), ns(at_ms), ns(at_ms.saturating_add(for_ms))));
                }
                Fault::ClockStep { node, back_ms } => {
                    env.clock_step_ms.insert(usize::from(node), back_ms);
                }
                _ => {}
            }
        }
        env
    }

    /// Whether an append by node `i` at elapsed `t` fails (a full disk).
    fn full(&self, i: usize, t: u64) -> bool {
        self.disk_full
            .iter()
            .any(|&(n, from, until)| n == i && (from..until).contains(&t))
    }

    /// When a sync of node `i` due at elapsed `t` can complete (a stall holds it).
    fn stalled_until(&self, i: usize, t: u64) -> Option<u64> {
        self.sync_stall
            .iter()
            .find(|&&(n, from, until)| n == i && (from..until).contains(&t))
            .map(|&(_, _, until)| until)
    }
}

impl Shared {
    /// The seed of the broker's own randomness (its retry jitter), the
    /// same for every broker booted or recovered in the run.
    fn broker_seed(&self) -> u64 {
        self.seed ^ 0xB20C_E500
    }

    fn elapsed_ns(&self) -> u64 {
        self.step_ns.unwrap_or_else(|| self.clock.elapsed_ns())
    }
    /// Node `i`'s (skewed) clock.
    fn now(&self, i: usize) -> Time {
        Time(self.skews[i].read(self.elapsed_ns()))
    }
    fn fired(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }
    fn line(&mut self, node: usize, text: impl FnOnce() -> String) {
        let t = self.elapsed_ns();
        self.trace.line(t, &self.names[node], text);
    }
    /// Reports one event of the history to the checker.
    fn observe(&mut self, event: Event<'_>) {
        let at_ms = self.elapsed_ns() / 1_000_000;
        self.check.observe(at_ms, event);
    }
    fn event(&mut self, what: impl FnOnce() -> What) {
        let t = self.elapsed_ns();
        self.events.push(t, what);
    }
}

type World = Arc<Mutex<Shared>>;

fn lock(w: &World) -> MutexGuard<'_, Shared> {
    w.lock().expect("single-threaded simulation never poisons")
}

/// Runs one seed under `plan` and judges it.
pub fn run(seed: u64, plan: &FaultPlan, cfg: &RunConfig) -> RunResult {
    let net = madsim::Config::default();
    let (plan, cfg) = (plan.clone(), cfg.clone());
    // A panic anywhere (a node's machine, an assertion, the checker) fails this
    // seed with its replay command instead of aborting the sweep.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let rt = Runtime::with_seed_and_config(seed, net);
        rt.block_on(simulate(seed, plan, cfg))
    }));
    outcome.unwrap_or_else(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "non-string panic payload".to_string());
        RunResult {
            seed,
            violations: vec![Violation::safety("panic", format!("the run panicked: {text}"), 0)],
            panicked: true,
            ..RunResult::default()
        }
    })
}

/// The run itself, inside a madsim runtime (exposed for madsim's determinism checker).
pub async fn simulate(seed: u64, plan: FaultPlan, cfg: RunConfig) -> RunResult {
    let (world, torn_rx) = setup(seed, &plan, &cfg);
    let nodes = spawn_nodes(&world);
    madsim::task::spawn(monitor(world.clone()));
    let down = chaos_phase(&world, &plan, &cfg, &nodes, &torn_rx).await;
    heal_phase(&world, &plan, &cfg, &nodes, down).await;
    finish(&world, seed)
}

/// The shared world of one run: clocks, disks, the plan's index, the checker,
/// the workload; the plan printed at the top of the trace.
fn setup(seed: u64, plan: &FaultPlan, cfg: &RunConfig) -> (World, async_channel::Receiver<usize>) {
    let mut skews = [Skew::default(); NODES.len()];
    let mut faults = BTreeMap::new();
    for f in &plan.faults {
        if let Fault::ClockSkew {
            node,
            offset_ms,
            drift_ppm,
        } = *f
        {
            skews[usize::from(node)] = Skew { offset_ms, drift_ppm };
            *faults.entry("clock_skew").or_default() += 1;
        }
    }
    let def = cfg.scenario.definition(seed, &plan.profile);
    let workload = Workload::new(&def);
    let shared = Shared {
        trace: Trace::new(cfg.trace),
        events: EventLog::new(cfg.trace),
        clock: SimClock::current(),
        net: Transport::new(NODES.len()),
        step_ns: None,
        skews,
        disks: vec![MemDisk::new(); NODES.len()],
        slots: (0..NODES.len()).map(|_| Slot::Down).collect(),
        plan: plan.index(),
        broker_config: broker_config(&plan.profile),
        profile: plan.profile.clone(),
        names: (0..NODES.len())
            .map(|i| crate::topology::display_name(i, cfg.custom.as_ref().map(|c| c.client_id())))
            .collect(),
        chaos: true,
        sent_nth: 0,
        answer_nth: 0,
        callback_nth: 0,
        faults,
        torn_armed: [false; NODES.len()],
        torn_signal: None,
        check: Checker::new(Spec::new(&def, &broker_config(&plan.profile))),
        deliveries: 0,
        wakeups: 0,
        liveness_bound_ms: 0,
        paused_until_ns: [None; NODES.len()],
        down: [false; NODES.len()],
        crashes: [0; NODES.len()],
        env: EnvFaults::from_plan(plan),
        fail_stop: None,
        tally: vec![crate::audit::HostTally::default(); NODES.len()],
        order_deadlines: crate::deadlines::OrderDeadlines::default(),
        order_deadline_judged: !plan.profile.host_bounds.contains_key(&(ORDER as u8)),
        recovery_chunk: recovery_chunk(seed),
        recoveries: RefCell::new((0..NODES.len()).map(|_| None).collect()),
        broker_recovery: RefCell::new(None),
        dedup_bound_recovery: RefCell::new(None),
        cfg: cfg.clone(),
        seed,
        def,
    };
    let world: World = Arc::new(Mutex::new(shared));
    let (torn_tx, torn_rx) = async_channel::unbounded();
    lock(&world).torn_signal = Some(torn_tx);
    {
        let mut s = lock(&world);
        s.slots[WORKLOAD] = Slot::Workload(Box::new(workload));
        // The custom node is named by its client id, here as everywhere.
        let client = cfg.custom.as_ref().map(|c| c.client_id());
        let plan_text = plan.describe(client);
        s.event(|| What::Plan {
            seed,
            scenario: cfg.scenario.to_string(),
            bug: cfg.bug.map(|b| b.to_string()),
            profile: plan.profile.describe(client),
            faults: plan.faults.iter().map(|f| f.describe(client)).collect(),
            custom: client.map(|c| c.to_string()),
        });
        let custom = client.map(|c| format!(" custom {c}")).unwrap_or_default();
        s.line(WORKLOAD, || {
            format!(
                "seed {seed} scenario {}{}{custom} plan:\n{}",
                cfg.scenario.name(),
                cfg.bug.map(|b| format!(" bug {b}")).unwrap_or_default(),
                plan_text.trim_end()
            )
        });
    }

    (world, torn_rx)
}

/// One madsim node per entry of `NODES`, each running [`node_main`].
fn spawn_nodes(world: &World) -> Vec<NodeHandle> {
    let handle = Handle::current();
    let nodes: Vec<NodeHandle> = (0..NODES.len())
        .map(|i| {
            let w = world.clone();
            handle
                .create_node()
                .name(NODES[i])
                .init(move || node_main(w.clone(), i))
                .build()
        })
        .collect();
    nodes
}

/// The chaos phase: the plan's partitions and crashes in time order. Returns
/// which nodes are still down at its end.
async fn chaos_phase(
    world: &World,
    plan: &FaultPlan,
    cfg: &RunConfig,
    nodes: &[NodeHandle],
    torn_rx: &async_channel::Receiver<usize>,
) -> [bool; NODES.len()] {
    let mut events: Vec<(u32, usize, bool)> = Vec::new(); // (at_ms, fault index, is_end)
    for (k, f) in plan.faults.iter().enumerate() {
        match *f {
            Fault::Partition { at_ms, for_ms, .. } => {
                events.push((at_ms, k, false));
                events.push((at_ms.saturating_add(for_ms).min(cfg.chaos_ms), k, true));
            }
            Fault::Crash { at_ms, down_ms, .. } => {
                events.push((at_ms, k, false));
                events.push((at_ms.saturating_add(down_ms).min(cfg.chaos_ms), k, true));
            }
            Fault::Pause { at_ms, .. } => events.push((at_ms, k, false)),
            Fault::OneWay { at_ms, for_ms, .. } => {
                events.push((at_ms, k, false));
                events.push((at_ms.saturating_add(for_ms).min(cfg.chaos_ms), k, true));
            }
            _ => {}
        }
    }
    events.sort();
    let (fail_tx, fail_rx) = async_channel::unbounded();
    lock(world).fail_stop = Some(fail_tx);
    madsim::task::spawn(fail_stops(world.clone(), nodes.to_vec(), fail_rx));
    for (at_ms, k, is_end) in events {
        sleep_until_ms(world, u64::from(at_ms)).await;
        let down = lock(world).down;
        match plan.faults[k] {
            Fault::Partition { a, b, .. } => partition(world, plan, k, a, b, is_end),
            Fault::OneWay { from, to, .. } => one_way(world, plan, k, from, to, is_end),
            Fault::Pause { at_ms, for_ms, node } => {
                let n = usize::from(node);
                let mut s = lock(world);
                if !down[n] {
                    let end_ms = u64::from(at_ms.saturating_add(for_ms).min(cfg.chaos_ms));
                    s.paused_until_ns[n] = Some(end_ms * 1_000_000);
                    s.tally[n].paused();
                    s.fired("pause");
                    let f = plan.faults[k].describe(s.cfg.custom.as_ref().map(|c| c.client_id()));
                    s.line(n, || format!("fault: {f}"));
                }
            }
            Fault::Crash {
                node, torn_keep, tail, ..
            } => {
                let n = usize::from(node);
                if !is_end && !down[n] {
                    if torn_keep.is_some() {
                        // A torn write needs a write in flight: wait (bounded) for the
                        // node to start one, then crash right after that step, before the sync.
                        lock(world).torn_armed[n] = true;
                        let within = madsim::time::Instant::now() + TORN_WAIT_MAX;
                        while let Some(ready) = recv_until(torn_rx, Some(within)).await {
                            if ready == n {
                                break;
                            }
                        }
                        lock(world).torn_armed[n] = false;
                    }
                    crash(world, &Handle::current(), nodes, n, torn_keep, tail);
                } else if is_end && down[n] {
                    restart(world, &Handle::current(), nodes, n);
                }
            }
            _ => {}
        }
    }
    sleep_until_ms(world, u64::from(cfg.chaos_ms)).await;
    lock(world).down
}

/// Nodes whose disk failed die here (fail-stop: the driver may not know what
/// reached the disk, so it keeps nothing in memory) and restart after their
/// delay, unless something else restarted or crashed them meanwhile.
async fn fail_stops(world: World, nodes: Vec<NodeHandle>, rx: async_channel::Receiver<(usize, u32)>) {
    while let Ok((n, down_ms)) = rx.recv().await {
        if lock(&world).down[n] {
            continue;
        }
        crash(&world, &Handle::current(), &nodes, n, None, None);
        let incarnation = lock(&world).crashes[n];
        let w = world.clone();
        let nodes = nodes.clone();
        madsim::task::spawn(async move {
            madsim::time::sleep(Duration::from_millis(u64::from(down_ms))).await;
            let (down, crashes) = {
                let s = lock(&w);
                (s.down[n], s.crashes[n])
            };
            if down && crashes == incarnation {
                restart(&w, &Handle::current(), &nodes, n);
            }
        });
    }
}

/// Cuts (or, `is_end`, heals) the one-way partition fault `k`: `from` can no
/// longer reach `to`; `to` still reaches `from`.
fn one_way(world: &World, plan: &FaultPlan, k: usize, from: u8, to: u8, is_end: bool) {
    let (a, b) = (usize::from(from), usize::from(to));
    lock(world).net.set_cut_one_way(a, b, !is_end);
    let mut s = lock(world);
    if !is_end {
        s.fired("one_way");
    }
    let f = plan.faults[k].describe(s.cfg.custom.as_ref().map(|c| c.client_id()));
    s.event(|| {
        let text = f.clone();
        if is_end {
            What::PartitionHeal {
                id: k,
                a,
                b: Some(b),
                text,
            }
        } else {
            What::PartitionStart {
                id: k,
                a,
                b: Some(b),
                text,
            }
        }
    });
    s.line(a, || {
        if is_end {
            format!("heal: {f}")
        } else {
            format!("fault: {f}")
        }
    });
}

/// Cuts (or, `is_end`, heals) partition fault `k` between `a` and `b` (None: everyone).
fn partition(world: &World, plan: &FaultPlan, k: usize, a: u8, b: Option<u8>, is_end: bool) {
    let a = usize::from(a);
    let links: Vec<(usize, usize)> = match b {
        Some(b) => vec![(a, usize::from(b))],
        None => (0..NODES.len())
            .filter(|&j| j != a && j != WORKLOAD)
            .map(|j| (a, j))
            .collect(),
    };
    let mut s = lock(world);
    for (x, y) in links {
        s.net.set_cut(x, y, !is_end);
    }
    if !is_end {
        s.fired("partition");
    }
    let f = plan.faults[k].describe(s.cfg.custom.as_ref().map(|c| c.client_id()));
    let b = b.map(usize::from);
    s.event(|| {
        let text = f.clone();
        if is_end {
            What::PartitionHeal { id: k, a, b, text }
        } else {
            What::PartitionStart { id: k, a, b, text }
        }
    });
    s.line(a, || {
        if is_end {
            format!("heal: {f}")
        } else {
            format!("fault: {f}")
        }
    });
}

/// The heal phase: faults off, links healed, crashed nodes restarted, dead
/// letters redriven by the operator; then liveness is required.
async fn heal_phase(world: &World, plan: &FaultPlan, cfg: &RunConfig, nodes: &[NodeHandle], down: [bool; NODES.len()]) {
    let handle = Handle::current();
    {
        let mut s = lock(world);
        s.chaos = false;
        s.net.heal_all();
        s.event(|| What::HealPhase);
        s.line(BROKER, || {
            "heal: faults off, partitions healed, crashed nodes restarted".to_string()
        });
        judge_safety(&mut s, cfg.chaos_ms.into());
        let at_ms = s.elapsed_ns() / 1_000_000;
        probe_disks(&mut s, "at the heal", at_ms);
        s.observe(Event::Healed);
    }
    // Down now (a fail-stopped node may have restarted since the chaos ended).
    let down_now = lock(world).down;
    for (n, was_down) in down.iter().zip(down_now).enumerate().map(|(n, (a, b))| (n, *a || b)) {
        if was_down && lock(world).down[n] {
            restart(world, &handle, nodes, n);
        }
    }
    // Orders are judged once everything settles, or at the liveness bound. A
    // prompt operator redrives dead letters from 1 s after the heal, every
    // second; a slow one only after that verdict, and then the run goes on
    // until the redriven messages settle too.
    let slow_operator = plan.faults.contains(&Fault::SlowOperator);
    let heal_ms = u64::from(cfg.chaos_ms);
    let mut t_ms = heal_ms;
    let bound_ms = liveness_bound(&mut lock(world), cfg);
    settle(world, &mut t_ms, heal_ms + bound_ms, !slow_operator).await;
    if slow_operator && late_redrive_due(&mut lock(world)) {
        let verdict_ms = t_ms;
        let bound_ms = liveness_bound(&mut lock(world), cfg);
        settle(world, &mut t_ms, verdict_ms + bound_ms, true).await;
    }
}

/// Final judgement, the trace's ending and the run's result; frees the machines.
fn finish(world: &World, seed: u64) -> RunResult {
    let mut s = lock(world);
    let sim_ms = s.elapsed_ns() / 1_000_000;
    // Safety, then liveness, on one reading of the world (nothing moves in between).
    judge(&mut s, sim_ms, |check, snap| {
        check.safety(snap);
        check.liveness(snap);
    });
    probe_disks(&mut s, "at the end", sim_ms);
    judge_custom_final(&mut s, sim_ms);
    final_state_lines(&mut s);
    let texts: Vec<String> = s.check.violations().iter().map(|v| v.to_string()).collect();
    for text in texts {
        // The checker's verdict, not the broker's: its own lane, judged now
        // about a moment the text names.
        let t = s.elapsed_ns();
        s.trace.line(t, "checker", || format!("VIOLATION {text}"));
    }
    for (n, v) in s.check.violations().to_vec().into_iter().enumerate() {
        s.events.push(v.at_ms.saturating_mul(1_000_000), || What::Violation {
            kind: v.kind.as_str(),
            invariant: v.invariant,
            detail: v.detail,
            first: n == 0,
        });
    }
    let shared = &mut *s;
    let views = final_views(shared);
    // madsim does not drop the tasks still parked when `block_on` returns, and
    // they hold this world: free the machines and disks now so a long sweep
    // does not keep every seed's state alive.
    // (Tasks may still be polled once more, so keep the indices valid.)
    shared.slots.iter_mut().for_each(|slot| *slot = Slot::Absent);
    shared.disks.iter_mut().for_each(|disk| *disk = MemDisk::new());
    let orders = orders_created(&views);
    let outcomes = outcomes(&views);
    RunResult {
        seed,
        views,
        trace: std::mem::take(&mut shared.trace).into_lines(),
        events: std::mem::take(&mut shared.events).into_events(),
        violations: shared.check.violations().to_vec(),
        faults: std::mem::take(&mut shared.faults),
        orders,
        deliveries: shared.deliveries,
        messages: u64::from(shared.sent_nth),
        wakeups: shared.wakeups,
        sim_ms,
        coverage: shared.check.coverage().clone(),
        outcomes,
        account: shared.check.account().clone(),
        quiescence_ms: shared.check.quiescence_ms(),
        liveness_bound_ms: shared.liveness_bound_ms,
        panicked: false,
    }
}

/// The liveness bound from now (see [`crate::config::liveness_bound_ms`]),
/// capped by `RunConfig::heal_ms_max`; traced and kept for the summary.
fn liveness_bound(s: &mut Shared, cfg: &RunConfig) -> u64 {
    let deadline_ms = s
        .def
        .order_deadline
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut wait_ms = 0;
    let mut work = 0u64;
    for (i, slot) in s.slots.iter().enumerate() {
        match slot {
            Slot::Broker(b) => work += b.stats().messages_live as u64,
            Slot::Participant(p) => {
                work += p.outbox() as u64;
                if let Some(t) = p.latest_timer() {
                    let now = s.skews[i].read(s.elapsed_ns());
                    wait_ms = wait_ms.max(t.0.saturating_sub(now) / 1_000_000);
                }
                if let crate::check::View::Order { orders } = p.view() {
                    let open = orders
                        .values()
                        .filter(|(ph, _)| *ph == crate::check::OrderPhase::InProgress);
                    work += 4 * open.count() as u64;
                }
            }
            Slot::Down => {
                // Its timers are unknown until it boots: a whole deadline.
                work += 4 * s.def.orders.len() as u64;
                wait_ms = wait_ms.max(deadline_ms);
            }
            Slot::Workload(w) if !w.all_answered() => {
                // Orders still to be created wait out a whole deadline after
                // the workload's next call (its retry backs off to 4.8 s).
                work += 4 * s.def.orders.len() as u64;
                wait_ms = wait_ms.max(deadline_ms + 4_800);
            }
            Slot::Absent | Slot::Workload(_) => {}
        }
    }
    let bound = crate::config::liveness_bound_ms(wait_ms, &s.broker_config, work).min(u64::from(cfg.heal_ms_max));
    s.liveness_bound_ms = s.liveness_bound_ms.max(bound);
    s.line(BROKER, || {
        format!("liveness bound: settled within {bound}ms (latest timer in {wait_ms}ms, {work} messages of work left)")
    });
    bound
}

/// Each participant's view, by display name (the custom node by its client id).
fn final_views(s: &Shared) -> BTreeMap<String, crate::check::View> {
    s.slots
        .iter()
        .enumerate()
        .filter_map(|(i, slot)| match slot {
            Slot::Participant(p) => Some((s.names[i].clone(), p.view())),
            _ => None,
        })
        .collect()
}

/// The custom participant's invariant over the whole world, once the run
/// settled with no other violation (see `CustomNode::with_final_check`).
fn judge_custom_final(s: &mut Shared, at_ms: u64) {
    if !s.check.violations().is_empty() {
        return;
    }
    let Some(custom) = s.cfg.custom.clone() else { return };
    if let Some(Err(detail)) = custom.judge_final(&final_views(s)) {
        s.check
            .violation(Violation::safety("custom-final-invariant", detail, at_ms));
    }
}

/// Whether a participant's log image holds an effect record that consumed
/// `key` (None: the log does not decode).
fn log_consumed(image: &[u8], key: &MessageKey) -> Option<bool> {
    let recovered = sagamq::log::decode_all(image).ok()?;
    let mut found = false;
    for (_, payload) in recovered.records {
        let record: sagamq::saga::HostRecord<serde_json::Value> = serde_json::from_slice(payload).ok()?;
        if let sagamq::saga::HostRecord::Effect { inbox: Some(k), .. } = record
            && k == *key
        {
            found = true;
        }
    }
    Some(found)
}

/// Shows the checker the world as it stands (views, queues, who is down) and
/// lets `f` judge it.
fn judge<R>(s: &mut Shared, at_ms: u64, f: impl FnOnce(&mut Checker, &Snapshot<'_>) -> R) -> R {
    let broker_now = s.now(BROKER);
    let Shared {
        check, slots, disks, ..
    } = s;
    let slots: &[Slot] = slots;
    let reflects = |node: usize, m: &sagamq::Message| match slots.get(node) {
        Some(Slot::Participant(p)) => Some(p.reflects(m)),
        _ => None,
    };
    let recorded = |node: usize, key: &MessageKey| disks.get(node).and_then(|d| log_consumed(&d.read_all(), key));
    let mut snap = Snapshot {
        at_ms,
        down: Vec::new(),
        broker: None,
        views: Vec::new(),
        unsettled: Vec::new(),
        workload_waiting: false,
        reflects: &reflects,
        recorded: Some(&recorded),
    };
    for (i, slot) in slots.iter().enumerate() {
        match slot {
            Slot::Down => snap.down.push(i),
            Slot::Absent => {}
            Slot::Broker(b) => snap.broker = Some(broker_snapshot(b, broker_now, true)),
            Slot::Participant(p) => {
                snap.views.push((i, p.view()));
                if !p.settled() {
                    snap.unsettled.push(i);
                }
            }
            Slot::Workload(w) => snap.workload_waiting = !w.all_answered(),
        }
    }
    f(check, &snap)
}

/// The broker's queues as the checker reads them (`dead`: with dead-letter ids).
fn broker_snapshot(b: &Broker, now: Time, dead: bool) -> BrokerSnapshot {
    let stats = b.stats().subscribers;
    BrokerSnapshot {
        now,
        backlog: 0,
        queued: stats
            .iter()
            .map(|(c, st)| (c.clone(), st.pending + st.in_flight))
            .collect(),
        dead: if dead {
            stats
                .iter()
                .filter(|(_, st)| st.dead_letters > 0)
                .map(|(c, _)| (c.clone(), b.dead_letters(c).iter().map(|m| m.msg_id).collect()))
                .collect()
        } else {
            BTreeMap::new()
        },
    }
}

fn judge_safety(s: &mut Shared, at_ms: u64) {
    judge(s, at_ms, |check, snap| check.safety(snap));
}

fn judge_liveness(s: &mut Shared, at_ms: u64) {
    judge(s, at_ms, |check, snap| check.liveness(snap));
}

/// Every 100 ms of the whole run: a subscriber with queued messages must be
/// getting attempts (see [`Checker::progress`]).
async fn monitor(world: World) {
    loop {
        madsim::time::sleep(Duration::from_millis(100)).await;
        let mut s = lock(&world);
        let at_ms = s.elapsed_ns() / 1_000_000;
        let now = s.now(BROKER);
        // A paused broker, or one whose disk stalls, is as good as saturated
        // for the progress bound.
        let t = s.elapsed_ns();
        let paused = s.paused_until_ns[BROKER].is_some_and(|until| until > t)
            || (s.chaos && s.env.stalled_until(BROKER, t).is_some());
        let backlog = if paused { 1 } else { s.net.backlog(BROKER, t) };
        let Shared { check, slots, .. } = &mut *s;
        if let Slot::Broker(b) = &slots[BROKER] {
            let mut snap = broker_snapshot(b, now, false);
            snap.backlog = backlog;
            check.progress(at_ms, &snap);
        }
    }
}

/// Each order's terminal state, counted (from the order service's view).
fn outcomes(views: &BTreeMap<String, crate::check::View>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for v in views.values() {
        if let crate::check::View::Order { orders } = v {
            for (_, state) in orders.values() {
                *out.entry(state.clone()).or_default() += 1;
            }
        }
    }
    out
}

/// The trace ends with how the story ended: each order's state and every
/// participant's levels and balances.
fn final_state_lines(s: &mut Shared) {
    if !s.trace.enabled() {
        return;
    }
    let mut lines = Vec::new();
    for (i, slot) in s.slots.iter().enumerate() {
        let Slot::Participant(p) = slot else { continue };
        match p.view() {
            crate::check::View::Order { orders } => {
                for (id, (_, state)) in orders {
                    lines.push((i, format!("final: order {id} {state}")));
                }
            }
            crate::check::View::Stock { level, .. } => {
                let text: Vec<String> = level.iter().map(|(p, n)| format!("{p}={n}")).collect();
                lines.push((i, format!("final: stock {}", text.join(" "))));
            }
            crate::check::View::Payment { balance, .. } => {
                let text: Vec<String> = balance.iter().map(|(c, n)| format!("{c}={n}")).collect();
                lines.push((i, format!("final: balances {}", text.join(" "))));
            }
            crate::check::View::Custom { client, .. } => lines.push((i, format!("final: {client} (custom)"))),
        }
    }
    for (i, text) in lines {
        s.line(i, || text);
    }
}

/// Orders the order service knows at the end (measured, not configured).
fn orders_created(views: &BTreeMap<String, crate::check::View>) -> u64 {
    views
        .values()
        .map(|v| match v {
            crate::check::View::Order { orders } => orders.len() as u64,
            _ => 0,
        })
        .sum()
}

async fn sleep_until_ms(world: &World, ms: u64) {
    let sleep = lock(world).clock.sleep_until_ns(ms * 1_000_000);
    sleep.await;
}

fn crash(
    world: &World,
    handle: &Handle,
    nodes: &[NodeHandle],
    n: usize,
    torn_keep: Option<u32>,
    tail: Option<crate::plan::CrashTail>,
) {
    handle.kill(nodes[n].id());
    let mut s = lock(world);
    s.down[n] = true;
    s.crashes[n] += 1;
    s.net.down(n);
    // Judge the state the crash is about to erase (a node that keeps effects
    // only in memory would otherwise hide them by forgetting).
    let at_ms = s.elapsed_ns() / 1_000_000;
    judge_safety(&mut s, at_ms);
    s.observe(Event::Crashed { node: n });
    s.slots[n] = Slot::Down;
    s.fired("crash");
    let before = s.disks[n].len();
    let torn = match torn_keep {
        Some(k) if tail.is_some() => {
            let bytes = tail.map(|t| t.bytes()).unwrap_or_default();
            let tail = match tail {
                Some(crate::plan::CrashTail::Zeros { len }) => sagamq::log::Tail::Zeros(len as usize),
                _ => sagamq::log::Tail::Garbage(&bytes),
            };
            if s.disks[n].crash_with_tail(k as usize, tail) {
                s.fired("garbage_tail");
            }
            let kept = s.disks[n].len();
            kept > 0 && sagamq::log::decode_all(&s.disks[n].read_all()).is_ok_and(|r| r.torn_bytes > 0)
        }
        Some(k) => {
            s.disks[n].crash_torn(k as usize);
            // A torn write fired only if a partial unsynced write survived.
            let kept = s.disks[n].len();
            kept > 0 && kept < before && sagamq::log::decode_all(&s.disks[n].read_all()).is_ok_and(|r| r.torn_bytes > 0)
        }
        None => {
            s.disks[n].crash();
            false
        }
    };
    if torn {
        s.fired("torn_write");
    }
    probe_recovery(&mut s, n);
    if n == BROKER {
        probe_dedup(&mut s);
    }
    s.event(|| What::Crash { node: n, torn });
    s.line(n, || {
        format!(
            "CRASH (unsynced writes lost{})",
            if torn { ", last write torn" } else { "" }
        )
    });
}

/// Builds node `node`'s participant from its disk image (empty: a fresh start):
/// the shipped participant, a planted bug's variant, or the user's own.
/// Returns the participant, the valid log length and the number of records replayed.
fn build_participant(s: &Shared, node: usize, image: &[u8]) -> Built {
    let custom = s.cfg.custom.as_ref().map(|c| c.client_id());
    let config = participants::host_config(node, s.seed, custom, &s.profile);
    let def = &s.def;
    if let Some(bug) = s.cfg.bug
        && let Some(planted) = crate::bugs::build(bug, node, def, config.clone(), image)
    {
        return planted;
    }
    match node {
        CUSTOM => match &s.cfg.custom {
            Some(custom) => custom.build(config, image),
            None => Err("no custom participant configured".to_string()),
        },
        ORDER | STOCK | PAYMENT => {
            let mut recoveries = s.recoveries.borrow_mut();
            let kept = recoveries[node].get_or_insert_with(|| -> Box<dyn Recoveries> {
                match node {
                    ORDER => Box::new(HostRecoveries::new(def.order_participant(), config)),
                    STOCK => Box::new(HostRecoveries::new(def.stock_participant(), config)),
                    _ => Box::new(HostRecoveries::new(def.payment_participant(), config)),
                }
            });
            kept.recover(image)
        }
        _ => Err(format!("node {node} runs no participant")),
    }
}

/// The chunk size of a seed's broker recoveries. The real driver reads its
/// log in chunks through the streaming reader, which carries a frame split
/// across two chunks, and a scan of a damaged tail split across them; a
/// whole image never takes those paths. So a quarter of the seeds read it
/// whole and the rest in chunks of 61 bytes to 8 KiB (smaller than most
/// frames, to a few dozen of them), drawn from the seed without touching
/// its RNG: the trace does not change, only which reader path is judged.
fn recovery_chunk(seed: u64) -> usize {
    let h = sagamq::rng::Rng::new(seed ^ 0x0C4B_ED5E_ED00_0001).next_u64();
    let pick = (h >> 8) as usize;
    match h % 4 {
        0 => usize::MAX,
        1 => 61 + pick % 68,
        2 => 129 + pick % 896,
        _ => 1025 + pick % 7168,
    }
}

/// The broker recovered from `image`, as `Broker::recover` does, resuming
/// the last recovery kept when `image` begins with the bytes it was fed:
/// boots and probes recover the same growing log again and again (a
/// compaction rewrites it, and the next recovery starts from scratch). The
/// bytes are fed in the seed's chunks (`recovery_chunk`).
fn recover_broker(s: &Shared, image: &[u8]) -> Result<(Broker, BrokerRecoveryReport), LogError> {
    recover_resuming(s, &s.broker_recovery, &s.broker_config, image)
}

/// `recover_broker` under `config`, resuming the recovery kept in `kept`.
fn recover_resuming(
    s: &Shared,
    kept: &RefCell<Option<(Vec<u8>, Recovery)>>,
    config: &BrokerConfig,
    image: &[u8],
) -> Result<(Broker, BrokerRecoveryReport), LogError> {
    let len = image.len() as u64;
    let mut kept = kept.borrow_mut();
    let resumed = kept
        .take()
        .and_then(|(bytes, mut r)| (image.starts_with(&bytes) && r.resume(len)).then_some(r));
    let mut recovery = resumed.unwrap_or_else(|| Broker::recovery(config.clone(), s.broker_seed(), len));
    let fed = usize::try_from(recovery.fed()).expect("a log in memory");
    feed_in_chunks(&mut recovery, &image[fed..], s.recovery_chunk)?;
    let mut copy = recovery.clone();
    if copy.resume(len) {
        *kept = Some((image.to_vec(), copy));
    }
    recovery.finish()
}

fn feed_in_chunks(recovery: &mut Recovery, bytes: &[u8], chunk: usize) -> Result<(), LogError> {
    bytes.chunks(chunk).try_for_each(|c| recovery.feed(c))
}

/// The dedup-bound probe (`probes::dedup_bound_misbehaves`): the broker
/// recovered from `image` once more, with a bound of 1 to 8 settled keys drawn
/// from the seed (a stream of its own), in place of the run's, which no sweep
/// fills. `settled_in_log`: what the recovery under the run's bound remembers.
/// Resumed as `recover_broker` is (the heal's recovery, then the end's).
fn dedup_bound_probe(s: &Shared, image: &[u8], settled_in_log: usize) -> Result<bool, String> {
    let max = sagamq::rng::Rng::new(s.seed ^ 0xDED0_B0D0_0000_0000).range_inclusive(1, 8) as usize;
    let config = BrokerConfig {
        dedup_settled_max: max,
        ..s.broker_config.clone()
    };
    let (mut b, _) = recover_resuming(s, &s.dedup_bound_recovery, &config, image)
        .map_err(|e| format!("recovered with dedup_settled_max {max}, refused: {e}"))?;
    crate::probes::dedup_bound_misbehaves(&mut b, max, settled_in_log, s.now(BROKER))
}

/// Node `i`'s recovery run on `image` (not installed): the records it
/// replayed, or why it refused.
fn recover_copy(s: &Shared, i: usize, image: &[u8]) -> Result<u64, String> {
    if i == BROKER {
        recover_broker(s, image)
            .map(|(_, r)| r.records)
            .map_err(|e| e.to_string())
    } else {
        build_participant(s, i, image).map(|(_, _, records)| records)
    }
}

/// The dedup probe, at every broker crash: a broker recovered (on the side)
/// from what the crash left must answer a retry of every acknowledged publish
/// with its original id, whether the message is live, settled, compacted into
/// a snapshot or remembered only as a key. (A sweep reaches a retried publish
/// of a settled key after a compaction and a recovery only rarely on its own.)
fn probe_dedup(s: &mut Shared) {
    let image = s.disks[BROKER].read_all();
    if image.is_empty() {
        return;
    }
    let Ok((b, _)) = recover_broker(s, &image) else {
        return; // a refusal is the recovery invariant's business
    };
    s.check.count("dedup_probe");
    if let Some(wrong) = retries_answered_wrongly(s, b) {
        let detail = format!("after the broker's crash, {wrong}: its dedup key was lost");
        let at = s.elapsed_ns() / 1_000_000;
        s.check.violation(Violation::safety("dedup", detail, at));
    }
}

/// The disk probes, at the heal and at the end. Each node is recovered on
/// the side, once per image (the durable bytes and, when some are not synced
/// yet, what was written), and judged twice:
///
/// - **power cut:** what a power cut at this instant would leave (the durable
///   bytes, not the page cache) must recover, and the broker recovered from
///   it must know every publish it acknowledged. A driver that acknowledges
///   what is not durable (a write in flight, or one whose fsync failed) fails
///   here without waiting for a crash to land at the wrong moment.
/// - **recovery equivalence** (running nodes, a run otherwise clean): the
///   node recovered from what it wrote must hold the state the live node
///   holds. A record that forgets part of the state (a compaction that drops
///   dead letters or dedup keys, an apply that skips a field) shows here
///   without a crash after it; at the heal, dead letters still wait for the
///   operator.
fn probe_disks(s: &mut Shared, when: &str, at_ms: u64) {
    let mut clean = s.check.violations().is_empty();
    let mut lifecycle_probed = false;
    let mut dedup_bound_probed = false;
    let mut found = Vec::new();
    let safety = |found: &mut Vec<Violation>, invariant: &'static str, detail: String| {
        found.push(Violation::safety(invariant, detail, at_ms));
    };
    for i in 0..NODES.len() {
        if i == WORKLOAD || matches!(s.slots[i], Slot::Absent) {
            continue;
        }
        let durable = s.disks[i].durable().to_vec();
        // Recovered from the durable bytes, the same as from what was written.
        let same_image = !s.disks[i].unsynced();
        let mut equivalence_done = false;
        if i == BROKER {
            let live = match &s.slots[i] {
                Slot::Broker(b) => Some(crate::check::DurableState::of(b)),
                _ => None,
            };
            if durable.is_empty() {
                if let Some((p, m)) = s.check.acknowledged().first() {
                    let detail = format!(
                        "{when}, a power cut would leave the broker an empty log, yet it acknowledged {} as {m}",
                        p.key()
                    );
                    safety(&mut found, "power-cut-probe", detail);
                    clean = false;
                }
            } else {
                match recover_broker(s, &durable) {
                    Err(e) => {
                        let detail = format!("{when}, a power cut would leave the broker a log it refuses: {e}");
                        safety(&mut found, "power-cut-probe", detail);
                        clean = false;
                    }
                    Ok((r, report)) => {
                        if clean
                            && same_image
                            && let Some(live) = &live
                        {
                            equivalence_done = true;
                            if let Some(d) = live.differs(&crate::check::DurableState::of(&r)) {
                                let detail = format!(
                                    "{when}, the broker recovered from its own log differs from the live one: {d}"
                                );
                                safety(&mut found, "recovery-equivalence", detail);
                            }
                            if let Some(d) = broker_audit(s, durable.len(), report.records) {
                                safety(&mut found, "stats-audit", format!("{when}, {d}"));
                            }
                        }
                        let settled_in_log = r.stats().dedup_settled;
                        let mut r = r;
                        if clean && let Some(wrong) = hostile_requests_accepted(s, &mut r) {
                            safety(&mut found, "hostile-input-probe", format!("{when}, {wrong}"));
                            clean = false;
                        }
                        if clean {
                            let now = s.now(BROKER);
                            let config = &s.broker_config;
                            match crate::probes::unsubscribe_misbehaves(&mut r, now).and_then(|done| {
                                Ok(done && crate::probes::dead_letter_misbehaves(&mut r, config, now)?)
                            }) {
                                Ok(done) => lifecycle_probed |= done,
                                Err(wrong) => {
                                    safety(&mut found, "lifecycle-probe", format!("{when}, {wrong}"));
                                    clean = false;
                                }
                            }
                        }
                        if clean {
                            match dedup_bound_probe(s, &durable, settled_in_log) {
                                Ok(done) => dedup_bound_probed |= done,
                                Err(wrong) => {
                                    safety(&mut found, "dedup-bound-probe", format!("{when}, {wrong}"));
                                    clean = false;
                                }
                            }
                        }
                        if let Some(wrong) = retries_answered_wrongly(s, r) {
                            let detail = format!("{when}, after a power cut {wrong}: acknowledged but not durable");
                            safety(&mut found, "power-cut-probe", detail);
                            clean = false;
                        }
                    }
                }
            }
            if clean && !equivalence_done && live.is_some() {
                // Some bytes are not durable yet: judge what was written.
                broker_equivalence(s, when, at_ms);
            }
        } else {
            let name = s.names[i].clone();
            let live = match &s.slots[i] {
                Slot::Participant(p) => Some(p.view()),
                _ => None,
            };
            if let Slot::Participant(p) = &s.slots[i]
                && let (Some(stats), Some(gauges)) = (p.stats(), p.gauges())
                && let Some(d) = s.tally[i].audit(stats, &gauges)
            {
                safety(&mut found, "stats-audit", format!("{when}, {name} miscounts: {d}"));
            }

            if !durable.is_empty() {
                match build_participant(s, i, &durable) {
                    Err(e) => {
                        let detail = format!("{when}, a power cut would leave {name} a log it refuses: {e}");
                        safety(&mut found, "power-cut-probe", detail);
                        clean = false;
                    }
                    Ok((r, _, _)) => {
                        let client = crate::topology::client_of(i, s.cfg.custom.as_ref().map(|c| c.client_id()));
                        // Reflected live but not by what a power cut would leave: an
                        // effect answered 2xx before it was durable. (One the live
                        // participant does not reflect either is `no-lost-effect`'s
                        // to judge at the end: lost, or logic that is not idempotent.)
                        let reflected =
                            |p: &dyn SimParticipant, m: &sagamq::Message| p.consumed(&m.key()) || p.reflects(m);
                        if clean
                            && let Slot::Participant(live) = &s.slots[i]
                            && let Some(m) = s
                                .check
                                .processed_by(&client)
                                .find(|m| reflected(live.as_ref(), m) && !reflected(r.as_ref(), m))
                        {
                            let detail = format!(
                                "{when}, {name} answered {} 2xx but a power cut now would lose its effect (not in its durable log)",
                                m.key()
                            );
                            safety(&mut found, "power-cut-probe", detail);
                            clean = false;
                        }
                        if clean
                            && same_image
                            && let Some(v) = &live
                        {
                            equivalence_done = true;
                            if let Some(d) = v.differs(&r.view()) {
                                let detail =
                                    format!("{when}, {name} recovered from its own log differs from the live one: {d}");
                                safety(&mut found, "recovery-equivalence", detail);
                            }
                        }
                    }
                }
            }
            if clean
                && !equivalence_done
                && let Some(v) = &live
            {
                let detail = match build_participant(s, i, &s.disks[i].read_all()) {
                    Ok((r, _, _)) => v
                        .differs(&r.view())
                        .map(|d| format!("{when}, {name} recovered from its own log differs from the live one: {d}")),
                    Err(e) => Some(format!("{when}, {name} refuses its own log: {e}")),
                };
                if let Some(detail) = detail {
                    safety(&mut found, "recovery-equivalence", detail);
                }
            }
        }
    }
    for v in found {
        s.check.violation(v);
    }
    if lifecycle_probed {
        s.check.count("lifecycle_probe");
    }
    if dedup_bound_probed {
        s.check.count("dedup_bound_probe");
    }
}

/// Recovery equivalence of the broker alone (see [`probe_disks`]), on what it
/// wrote, in a run otherwise clean.
fn broker_equivalence(s: &mut Shared, when: &str, at_ms: u64) {
    if !s.check.violations().is_empty() {
        return;
    }
    let Slot::Broker(b) = &s.slots[BROKER] else { return };
    let live = crate::check::DurableState::of(b);
    let image = s.disks[BROKER].read_all();
    let (detail, audit) = match recover_broker(s, &image) {
        Ok((r, report)) => (
            live.differs(&crate::check::DurableState::of(&r))
                .map(|d| format!("{when}, the broker recovered from its own log differs from the live one: {d}")),
            broker_audit(s, image.len(), report.records),
        ),
        Err(e) => (Some(format!("{when}, the broker refuses its own log: {e}")), None),
    };
    if let Some(detail) = detail {
        s.check
            .violation(Violation::safety("recovery-equivalence", detail, at_ms));
    }
    if let Some(d) = audit {
        s.check
            .violation(Violation::safety("stats-audit", format!("{when}, {d}"), at_ms));
    }
}

/// The live broker's stats against a recount of the log it wrote (see
/// [`crate::check::DurableState::audit`]).
fn broker_audit(s: &Shared, log_len: usize, log_records: u64) -> Option<String> {
    let Slot::Broker(b) = &s.slots[BROKER] else { return None };
    crate::check::DurableState::audit(b, s.broker_config.dedup_settled_max, log_len as u64, log_records)
}

/// The hostile-input probe (with the power-cut probe, on the recovered
/// broker): requests a careless or hostile client sends (an empty or
/// oversized callback URL, a subscription already expired, an oversized
/// content) must each be refused with its own error, and leave nothing
/// stored. The sweep's participants never send them. None when all are.
fn hostile_requests_accepted(s: &Shared, b: &mut Broker) -> Option<String> {
    use sagamq::broker::BrokerError;
    let now = s.now(BROKER);
    let client = ClientId::lit("hostile-client");
    let topic = Topic::lit(sagamq::saga::topics::SALE_ORDER_CREATED);
    let subscribe = |url: String, expire: Time| sagamq::SubscribeRequest {
        client_id: client.clone(),
        topic: topic.clone(),
        notify_url: url,
        expire_time: expire,
    };
    let later = Time(now.0 + 60_000_000_000);
    let long_url = format!("sim://{}", "x".repeat(sagamq::types::URL_LEN_MAX));
    let long_content = "x".repeat(sagamq::types::CONTENT_LEN_MAX + 1);
    type Case = (&'static str, BrokerInput, fn(&BrokerError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "a subscribe with an empty callback URL",
            BrokerInput::Subscribe {
                req: RequestId(u64::MAX - 1),
                subscribe: subscribe(String::new(), later),
            },
            |e| matches!(e, BrokerError::InvalidUrl),
        ),
        (
            "a subscribe with an oversized callback URL",
            BrokerInput::Subscribe {
                req: RequestId(u64::MAX - 1),
                subscribe: subscribe(long_url, later),
            },
            |e| matches!(e, BrokerError::InvalidUrl),
        ),
        (
            "a subscribe that has already expired",
            BrokerInput::Subscribe {
                req: RequestId(u64::MAX - 1),
                subscribe: subscribe("sim://hostile".to_string(), now),
            },
            |e| matches!(e, BrokerError::AlreadyExpired),
        ),
        (
            "a publish with an oversized content",
            BrokerInput::Publish {
                req: RequestId(u64::MAX - 1),
                publish: sagamq::PublishRequest {
                    global_id: sagamq::GlobalId::lit("hostile"),
                    sub_id: sagamq::SubId::lit("1"),
                    sender_id: sagamq::SenderId::lit("hostile-client"),
                    create_time: 0,
                    topic: topic.clone(),
                    content: long_content,
                },
            },
            |e| matches!(e, BrokerError::ContentTooLong { .. }),
        ),
    ];
    // What the recovered broker has to do of its own (timers due, records
    // of its recovery) happens first, so what follows is the requests' doing.
    b.handle_timeout(now);
    while b.poll_output().is_some() {}
    for (what, input, expected) in cases {
        let before = crate::check::DurableState::of(b);
        b.handle(now, input);
        let mut answer = None;
        let mut wrote = false;
        while let Some(out) = b.poll_output() {
            match out {
                BrokerOutput::Reply { reply, .. } => answer = Some(reply),
                BrokerOutput::Persist { .. } | BrokerOutput::Rewrite { .. } => wrote = true,
                BrokerOutput::Callback(_) => {}
            }
        }
        let refused = matches!(&answer, Some(Reply::Rejected(e)) if expected(e));
        if !refused || wrote || crate::check::DurableState::of(b) != before {
            return Some(format!(
                "{what} was answered {answer:?}{} instead of refused with nothing stored",
                if wrote { " and written to the log" } else { "" }
            ));
        }
    }
    None
}

/// Retries every acknowledged publish against `b` (a recovered broker, on
/// the side): the first one not answered as a duplicate with its original
/// id, described; None when all are.
fn retries_answered_wrongly(s: &Shared, mut b: Broker) -> Option<String> {
    let now = s.now(BROKER);
    let mut wrong = None;
    for (k, (publish, msg_id)) in s.check.acknowledged().into_iter().enumerate() {
        let key = publish.key();
        let req = RequestId(u64::MAX - 1 - k as u64);
        b.handle(now, BrokerInput::Publish { req, publish });
        let mut answer = None;
        while let Some(out) = b.poll_output() {
            if let BrokerOutput::Reply { req: r, reply } = out
                && r == req
            {
                answer = Some(reply);
            }
        }
        match answer {
            Some(Reply::Published {
                msg_id: m,
                duplicate: true,
            }) if m == msg_id => {}
            other => {
                let answer = match other {
                    None => "taken as a new message".to_string(),
                    Some(reply) => format!("answered {reply:?}"),
                };
                wrong = Some(format!(
                    "a retry of {key} (acknowledged as {msg_id}) was {answer} by the recovered broker"
                ));
                break;
            }
        }
    }
    wrong
}

/// The recovery probe (see [`Fault::BitFlip`]): the node's own recovery on a
/// copy of the log its crash left, with one bit flipped. Refusing is right;
/// accepting is right only when the flip is in the last record and only that
/// record is cut (a torn write of it would look the same).
fn probe_recovery(s: &mut Shared, n: usize) {
    let Some(&(where_ppm, bit)) = s.plan.bit_flip.get(&(n as u8)) else {
        return;
    };
    let image = s.disks[n].read_all();
    let Ok(found) = sagamq::log::decode_all(&image) else {
        return;
    };
    let Some(&(last_offset, _)) = found.records.last() else {
        return;
    };
    let frames = found.records.len() as u64;
    let valid = usize::try_from(found.valid_len).expect("a log in memory");
    let offset = usize::try_from(found.valid_len * u64::from(where_ppm) / 1_000_000).expect("within the log");
    let mut copy = image[..valid].to_vec();
    copy[offset] ^= 1 << (bit % 8);
    s.fired("bit_flip");
    let in_last = offset as u64 >= last_offset;
    let wrong = match recover_copy(s, n, &copy) {
        Err(_) => None,
        Ok(records) if in_last && records + 1 >= frames => None,
        Ok(records) => Some(format!(
            "{} recovered {records} of {frames} records from its log with bit {bit} flipped at byte {offset}{}: acknowledged records after the damage were cut instead of refused",
            s.names[n],
            if in_last {
                " (in the last record)"
            } else {
                " (before the last record)"
            }
        )),
    };
    s.line(n, || {
        format!(
            "probe: recovery of a copy with bit {bit} flipped at byte {offset} of {valid}: {}",
            if wrong.is_some() {
                "ACCEPTED damage"
            } else {
                "refused or cut only the last record"
            }
        )
    });
    if let Some(detail) = wrong {
        let at = s.elapsed_ns() / 1_000_000;
        s.check.violation(Violation::safety("recovery-probe", detail, at));
    }
}

fn restart(world: &World, handle: &Handle, nodes: &[NodeHandle], n: usize) {
    let mut s = lock(world);
    s.event(|| What::Restart { node: n });
    s.line(n, || "restart".to_string());
    s.paused_until_ns[n] = None; // a restart ends a pause
    s.down[n] = false;
    if let Some(back_ms) = s.env.clock_step_ms.remove(&n) {
        // The clock reads `back_ms` earlier from now on (kept in the skew so
        // every reading and wake-up of the node agrees).
        s.skews[n].offset_ms = s.skews[n]
            .offset_ms
            .saturating_sub(i32::try_from(back_ms).unwrap_or(i32::MAX));
        s.fired("clock_step");
        s.line(n, || format!("fault: clock stepped back {back_ms}ms"));
    }
    drop(s);
    handle.restart(nodes[n].id());
}

/// Runs the heal phase in 100 ms steps from `*t_ms` until everything is
/// settled (with `operator`, dead letters included) or `until_ms`. With
/// `operator`, dead letters are redriven every second.
async fn settle(world: &World, t_ms: &mut u64, until_ms: u64, operator: bool) {
    let from_ms = *t_ms;
    loop {
        *t_ms += 100;
        sleep_until_ms(world, *t_ms).await;
        let mut s = lock(world);
        if operator && *t_ms >= from_ms + 1_000 && (*t_ms - from_ms).is_multiple_of(1_000) {
            redrive_all(&mut s);
        }
        let at_ms = s.elapsed_ns() / 1_000_000;
        let quiet = !busy(&s) && judge(&mut s, at_ms, |check, snap| check.quiescent(snap));
        let done = quiet && (!operator || dead_letters(&s) == 0);
        if done || *t_ms >= until_ms {
            return;
        }
    }
}

/// Work visibly left (a node down, a participant unsettled, the workload
/// waiting, a delivery queued): the checker would find the world not
/// quiescent, so the settle loop need not read every participant's view.
fn busy(s: &Shared) -> bool {
    s.slots.iter().any(|slot| match slot {
        Slot::Down => true,
        Slot::Participant(p) => !p.settled(),
        Slot::Workload(w) => !w.all_answered(),
        Slot::Broker(b) => b.stats().subscribers.values().any(|st| st.pending + st.in_flight > 0),
        Slot::Absent => false,
    })
}

/// With a slow operator: judges liveness now and, if it holds and dead letters
/// wait, says the operator redrives them only now (the run then goes on).
fn late_redrive_due(s: &mut Shared) -> bool {
    if !s.check.violations().is_empty() {
        return false;
    }
    let sim_ms = s.elapsed_ns() / 1_000_000;
    judge_liveness(s, sim_ms);
    if !s.check.violations().is_empty() || dead_letters(s) == 0 {
        return false;
    }
    s.fired("slow_operator");
    s.line(BROKER, || "operator: late, redriving dead letters only now".to_string());
    true
}

/// Dead letters held by the broker (0 while it is down).
fn dead_letters(s: &Shared) -> u64 {
    match &s.slots[BROKER] {
        Slot::Broker(b) => b.stats().subscribers.values().map(|st| st.dead_letters as u64).sum(),
        _ => 0,
    }
}

/// The operator asks the broker to redrive every subscriber's dead letters.
/// The request is queued to the broker's own task, which handles it as a step
/// of its own (its clock, its outputs drained at once), as an HTTP request would be.
fn redrive_all(s: &mut Shared) {
    let Slot::Broker(broker) = &s.slots[BROKER] else {
        return;
    };
    let clients: Vec<_> = broker
        .stats()
        .subscribers
        .into_iter()
        .filter(|(_, st)| st.dead_letters > 0)
        .collect();
    for (client, st) in clients {
        *s.faults.entry("dead_letter").or_default() += st.dead_letters as u64;
        let now_ns = s.elapsed_ns();
        let Shared { net, clock, .. } = &mut *s;
        net.post(clock, now_ns, BROKER, Inbound::Redrive(client.clone()));
        s.event(|| What::Note {
            node: BROKER,
            text: format!("operator: redrive {} dead letters of {client}", st.dead_letters),
        });
        s.line(BROKER, || {
            format!("operator: redrive {} dead letters of {client}", st.dead_letters)
        });
    }
}

/// Waits for the first of a message and a deadline (None: the deadline passed).
/// Biased toward the message so the order of events depends only on the
/// simulation, not on polling luck.
async fn recv_until<T>(rx: &async_channel::Receiver<T>, deadline: Option<madsim::time::Instant>) -> Option<T> {
    let mut recv = pin!(rx.recv());
    let far = madsim::time::Instant::now() + Duration::from_secs(3_600);
    let mut sleep = pin!(madsim::time::sleep_until(deadline.unwrap_or(far)));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = recv.as_mut().poll(cx) {
            return Poll::Ready(r.ok());
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Per-incarnation driver state of a node (lost when the node crashes).
#[derive(Default)]
struct Driver {
    /// A disk sync in progress completes at this virtual time.
    sync_due_ns: Option<u64>,
    /// What the sync in progress promises: the disk's length and the last
    /// lsn written when it began (None after a `replace` since: then the
    /// whole file, as a compaction's sync must).
    sync_covers: Option<(usize, Option<Lsn>)>,
    /// Highest lsn written (not yet known durable) and highest known durable.
    lsn_written: Option<Lsn>,
    lsn_durable: Option<Lsn>,
    /// Broker: request id -> (requesting node, what was asked).
    requests: BTreeMap<RequestId, (usize, Pending)>,
    /// Broker: the operator's redrives handed in and not yet answered.
    redrives: usize,
    /// Order: the create-order command of the step under way.
    creating: Option<String>,
    next_request: u64,
    /// Participant: callback token -> (broker delivery, message key).
    callbacks: BTreeMap<CallbackToken, (DeliveryId, MessageKey)>,
    next_token: u64,
    /// Messages to send after this step.
    outgoing: Vec<(usize, Wire)>,
    /// A torn-write crash is armed and this step began a write: signal it once
    /// the step's messages are sent.
    torn_after_step: bool,
    /// The disk failed: this incarnation does nothing more (fail-stop).
    failed: bool,
    /// The virtual time the machine's timer was last handled.
    timer_handled_ns: Option<u64>,
    /// Outputs drained from the machine so far (a timeout that yields none
    /// and is still due is a spin, see [`spin_check`]).
    drained: u64,
}

enum Pending {
    Publish { req: u64, key: MessageKey },
    Subscribe { topic: Topic, client: ClientId },
}

async fn node_main(world: World, i: usize) {
    if !boot(&world, i) {
        return;
    }
    lock(&world).net.up(i);
    let mut drv = Driver::default();
    // A booted machine first gets a timer step: recovery may have left it
    // work to announce (callbacks to resume, outbox entries to re-publish).
    step(&world, &mut drv, i, true);
    loop {
        // Wait for the first of: a message due, the machine's deadline, the
        // disk sync; a paused node waits for the end of its pause as well.
        std::future::poll_fn(|cx| {
            let mut s = lock(&world);
            let now_ns = s.elapsed_ns();
            let next = next_wake_ns(&s, &drv, i);
            let Shared { net, clock, .. } = &mut *s;
            net.wait(clock, now_ns, i, next, cx)
        })
        .await;
        step(&world, &mut drv, i, false);
        if drv.failed {
            // Fail-stop: this incarnation waits to be killed and restarted.
            std::future::pending::<()>().await;
        }
    }
}

/// When node `i` must next wake (virtual ns): its first message due, its
/// machine's deadline, its disk sync; not before a pause ends.
fn next_wake_ns(s: &Shared, drv: &Driver, i: usize) -> Option<u64> {
    let machine_ns = poll_timeout(&s.slots[i]).map(|t| {
        let at = s.skews[i].virtual_at(t.0);
        // A deadline handled at this very instant and still pending waits a
        // millisecond (madsim's timer granularity) instead of spinning.
        match drv.timer_handled_ns {
            Some(h) if at <= h => h + 1_000_000,
            _ => at,
        }
    });
    let next = [machine_ns, drv.sync_due_ns, s.net.next_due_ns(i)]
        .into_iter()
        .flatten()
        .min()?;
    Some(match s.paused_until_ns[i] {
        Some(until) => next.max(until),
        None => next,
    })
}

/// One wake-up of node `i`: completes a due disk sync, handles the messages
/// it may take in now (each a step of its own: handled, outputs drained,
/// sent), then the machine's timer if it is due (or `first`: the
/// incarnation's first step).
fn step(world: &World, drv: &mut Driver, i: usize, first: bool) {
    let mut s = lock(world);
    let now_ns = s.clock.elapsed_ns();
    s.step_ns = Some(now_ns);
    step_locked(&mut s, drv, i, first, now_ns);
    s.step_ns = None;
}

fn step_locked(s: &mut Shared, drv: &mut Driver, i: usize, first: bool, now_ns: u64) {
    if drv.failed {
        return; // fail-stopped: waiting to be killed
    }
    if s.paused_until_ns[i].is_some_and(|until| until > now_ns) {
        return; // woken early (a stale timer): what is due waits for the pause's end
    }
    s.wakeups += 1;
    let now = s.now(i);
    // A sync that fell due completes first: the device finishing a write
    // never waits behind the node's inbox.
    complete_sync(s, drv, i, now);
    if drv.failed {
        return;
    }
    drain(s, drv, i);
    send_outgoing(s, drv, i);
    while !drv.failed
        && let Some(inbound) = s.net.pop_due(i, now_ns)
    {
        let redrive = matches!(inbound, Inbound::Redrive(_));
        match inbound {
            Inbound::Net { from, seq, wire } => on_wire(s, drv, i, now, from, seq, wire),
            Inbound::Redrive(client) => on_redrive(s, drv, i, now, &client),
        }
        drain(s, drv, i);
        send_outgoing(s, drv, i);
        if redrive {
            // The sweep never crashes the broker after the operator acts:
            // judge the redrive's record against the live state now.
            broker_equivalence(s, "after a redrive", now_ns / 1_000_000);
        }
    }
    if drv.failed {
        return;
    }
    let due = poll_timeout(&s.slots[i]).is_some_and(|t| s.skews[i].virtual_at(t.0) <= now_ns);
    if first || due && drv.timer_handled_ns != Some(now_ns) {
        drv.timer_handled_ns = Some(now_ns);
        let drained = drv.drained;
        on_timer(s, drv, i, now);
        if drv.failed {
            return;
        }
        drain(s, drv, i);
        spin_check(s, i, now, drv.drained > drained);
        send_outgoing(s, drv, i);
        if i == ORDER && !drv.failed {
            judge_order_deadlines(s, now);
        }
    }
}

/// **Invariant `order-deadline`:** once the order's timer has been handled
/// at `now`, no order whose deadline (its creation plus the scenario's
/// deadline, on the order's clock) has come is still waiting for stock or
/// payment: it has finished or begun to cancel. Judged only while the
/// order's host has its roomy default bounds (a host at a small bound holds
/// deadlines back, as documented). Catches an order whose deadline is
/// computed too long, which the saga sweep's liveness bound, read from the
/// order's own timers, adapts to.
fn judge_order_deadlines(s: &mut Shared, now: Time) {
    if !s.order_deadline_judged {
        return;
    }
    let due = s.order_deadlines.due_by(now);
    if due.is_empty() {
        return;
    }
    let Slot::Participant(p) = &s.slots[ORDER] else { return };
    let crate::view::View::Order { orders } = p.view() else {
        return;
    };
    for (at, order) in due {
        let Some((phase, status)) = orders.get(&order) else {
            continue;
        };
        s.check.count("deadline_judged");
        if *phase == crate::view::OrderPhase::InProgress && status != "Compensating" {
            let late = now.as_nanos().saturating_sub(at.as_nanos()) / 1_000_000;
            let detail =
                format!("order {order} is still {status} {late} ms after its deadline, with the order's timer handled");
            let at_ms = s.elapsed_ns() / 1_000_000;
            s.check.violation(Violation::safety("order-deadline", detail, at_ms));
        }
    }
}

/// The machine contract: a timeout handled at `now` either does something
/// (an output) or leaves the next timeout later (or none). One that does
/// nothing and is still due wakes the node again at once, forever: a busy
/// loop that a real driver burns a core on.
fn spin_check(s: &mut Shared, i: usize, now: Time, produced: bool) {
    if produced {
        return;
    }
    if let Some(next) = poll_timeout(&s.slots[i])
        && next <= now
    {
        let at = s.elapsed_ns() / 1_000_000;
        let detail = format!(
            "{} handled its timeout at {}ms, did nothing, and still asks to be woken at {}ms: it would spin",
            s.names[i],
            now.0 / 1_000_000,
            next.0 / 1_000_000
        );
        s.check.violation(Violation::safety("timer-spin", detail, at));
    }
}

/// Sends what the last step produced; a torn-write crash armed for this node
/// strikes once the step that began a write is over.
fn send_outgoing(s: &mut Shared, drv: &mut Driver, i: usize) {
    for (dst, wire) in std::mem::take(&mut drv.outgoing) {
        send(s, i, dst, wire);
    }
    if std::mem::take(&mut drv.torn_after_step)
        && let Some(tx) = &s.torn_signal
    {
        // The step that began the write is over (what it sent is out) and
        // the write is not synced yet: the torn-write crash strikes now.
        let _ = tx.try_send(i);
    }
}

/// The operator's redrive of `client`'s dead letters, handled by the broker
/// as a step of its own (its clock, its outputs drained at once).
fn on_redrive(s: &mut Shared, drv: &mut Driver, i: usize, now: Time, client: &ClientId) {
    if let Slot::Broker(b) = &mut s.slots[i] {
        drv.redrives += 1;
        let dead = |b: &Broker| -> Vec<sagamq::MsgId> { b.dead_letters(client).iter().map(|m| m.msg_id).collect() };
        let before = dead(b);
        let req = OPERATOR_REQUEST;
        b.handle(
            now,
            BrokerInput::Redrive {
                req,
                client: client.clone(),
            },
        );
        let after = dead(b);
        let moved: Vec<sagamq::MsgId> = before.iter().filter(|m| !after.contains(m)).copied().collect();
        s.observe(Event::Redrive {
            client,
            dead: &before,
            moved: &moved,
        });
    }
}

/// Recovers node `i`'s machine from its disk. False if recovery refused (a violation).
fn boot(world: &World, i: usize) -> bool {
    let mut s = lock(world);
    if i == WORKLOAD {
        return true; // the workload models the outside world: it never crashes
    }
    if i == CUSTOM && s.cfg.custom.is_none() {
        s.slots[i] = Slot::Absent;
        return false;
    }
    let image = s.disks[i].read_all();
    let result: Result<(Slot, u64, u64), String> = if i == BROKER {
        let seed = s.broker_seed();
        if image.is_empty() {
            Ok((Slot::Broker(Box::new(Broker::new(s.broker_config.clone(), seed))), 0, 0))
        } else {
            recover_broker(&s, &image)
                .map(|(b, r)| (Slot::Broker(Box::new(b)), r.valid_len, r.records))
                .map_err(|e| e.to_string())
        }
    } else {
        build_participant(&s, i, &image).map(|(p, valid_len, records)| (Slot::Participant(p), valid_len, records))
    };
    match result {
        Ok((slot, valid_len, records)) => {
            let torn_bytes = image.len() as u64 - valid_len.min(image.len() as u64);
            s.observe(Event::Booted {
                node: i,
                records,
                torn_bytes,
            });
            if i == BROKER && torn_bytes > 0 && s.recovery_chunk < image.len() {
                s.check.count("torn_tail_read_in_chunks");
            }
            s.disks[i].truncate(valid_len);
            s.slots[i] = slot;
            let terms = match &s.slots[i] {
                Slot::Participant(p) => p.terms(),
                _ => None,
            };
            s.tally[i] = crate::audit::HostTally::new(terms);
            if !image.is_empty() {
                s.line(i, || format!("recovered from {records} records ({valid_len} bytes)"));
            }
            true
        }
        Err(e) => {
            let at = s.elapsed_ns() / 1_000_000;
            let text = format!("{} refused to start: {e}", s.names[i]);
            s.check.violation(Violation::safety("recovery", text, at));
            false
        }
    }
}

fn poll_timeout(slot: &Slot) -> Option<Time> {
    match slot {
        Slot::Down | Slot::Absent => None,
        Slot::Broker(b) => b.poll_timeout(),
        Slot::Participant(p) => p.poll_timeout(),
        Slot::Workload(w) => w.poll_timeout(),
    }
}

/// Completes the disk sync in progress if it is due: the device finishing a
/// write, which never waits behind the node's inbox.
fn complete_sync(s: &mut Shared, drv: &mut Driver, i: usize, now: Time) {
    let t = s.elapsed_ns();
    if drv.sync_due_ns.is_some_and(|due| due <= t) {
        if s.chaos
            && let Some(until) = s.env.stalled_until(i, t)
        {
            // The device holds the sync until the stall ends.
            drv.sync_due_ns = Some(until);
            s.fired("sync_stall");
            s.line(i, || format!("fault: disk sync stalls until {}ms", until / 1_000_000));
            return;
        }
        drv.sync_due_ns = None;
        if s.chaos
            && let Some(&(at, down_ms)) = s.env.sync_error.get(&i)
            && at <= t
        {
            s.env.sync_error.remove(&i);
            drv.sync_covers = None;
            let lost = s.disks[i].sync_failed();
            s.fired("sync_error");
            s.line(i, || {
                format!(
                    "fault: disk sync failed (EIO){}",
                    if lost { ", its bytes lost" } else { "" }
                )
            });
            if !(i == BROKER && crate::bugs::broker_ignores_sync_error(s.cfg.bug)) {
                fail_stop(s, drv, i, down_ms);
                return;
            }
            // (The planted bug carries on as if the sync had covered everything.)
        } else if let Some((len, covered)) = drv.sync_covers.take() {
            // An fdatasync promises what was written before it was called;
            // what came during it waits for the next one.
            s.disks[i].sync_to(len);
            if s.disks[i].len() > len {
                drv.sync_due_ns = Some(t + u64::try_from(SYNC_LATENCY.as_nanos()).unwrap_or(0));
                drv.sync_covers = Some((s.disks[i].len(), drv.lsn_written));
            }
            if covered.is_some() && drv.lsn_written == covered {
                drv.lsn_written = None;
            }
            return report_durable(s, drv, i, now, covered);
        } else {
            // A compaction's `replace` came during the sync: the whole file.
            s.disks[i].sync();
        }
        let lsn = drv.lsn_written.take();
        report_durable(s, drv, i, now, lsn);
    }
}

/// Tells node `i`'s machine that every record up to `lsn` is durable.
fn report_durable(s: &mut Shared, drv: &mut Driver, i: usize, now: Time, lsn: Option<Lsn>) {
    let Some(lsn) = lsn else { return };
    drv.lsn_durable = Some(lsn);
    match &mut s.slots[i] {
        Slot::Broker(b) => b.handle(now, BrokerInput::Durable { lsn }),
        Slot::Participant(p) => {
            s.tally[i].durable(lsn.0);
            p.handle(now, ParticipantInput::Durable { lsn });
        }
        Slot::Down | Slot::Absent | Slot::Workload(_) => {}
    }
}

/// The shipped reaction to a disk error: the process dies at once (nothing
/// more is sent, nothing reported durable) and restarts after `down_ms`,
/// recovering from what reached the disk.
fn fail_stop(s: &mut Shared, drv: &mut Driver, i: usize, down_ms: u32) {
    drv.failed = true;
    drv.outgoing.clear();
    if let Some(tx) = &s.fail_stop {
        let _ = tx.try_send((i, down_ms));
    }
}

fn on_timer(s: &mut Shared, drv: &mut Driver, i: usize, now: Time) {
    complete_sync(s, drv, i, now);
    if drv.failed {
        return;
    }
    if i == WORKLOAD && !matches!(&s.slots[i], Slot::Workload(w) if w.started()) {
        let ready = s.slots.iter().all(|slot| match slot {
            Slot::Participant(p) => p.ready(),
            Slot::Broker(_) | Slot::Workload(_) | Slot::Absent => true,
            Slot::Down => false,
        });
        if let Slot::Workload(w) = &mut s.slots[i] {
            w.readiness(now, ready);
        }
        if ready {
            s.event(|| What::Note {
                node: WORKLOAD,
                text: "every service subscribed: traffic starts".to_string(),
            });
            s.line(i, || "every service subscribed: traffic starts".to_string());
        }
    }
    match &mut s.slots[i] {
        Slot::Down | Slot::Absent => {}
        Slot::Broker(b) => b.handle_timeout(now),
        Slot::Participant(p) => p.handle_timeout(now),
        Slot::Workload(w) => w.handle_timeout(now),
    }
}

#[allow(clippy::too_many_arguments)] // one more than clippy's limit: the message's sequence number
fn on_wire(s: &mut Shared, drv: &mut Driver, i: usize, now: Time, src: usize, seq: Seq, wire: Wire) {
    s.event(|| What::Recv { seq, from: src, to: i });
    if s.trace.enabled() {
        let text = wire.to_string();
        let names = s.names.clone();
        s.line(i, || format!("<- {} {text}", names[src]));
    }
    match (&mut s.slots[i], wire) {
        (Slot::Broker(_), Wire::Publish { req, publish }) => {
            let id = RequestId(drv.next_request);
            drv.next_request += 1;
            drv.requests.insert(
                id,
                (
                    src,
                    Pending::Publish {
                        req,
                        key: publish.key(),
                    },
                ),
            );
            if s.check.lapsed(&publish.topic, now) > 0 {
                s.fired("subscription_lapse");
            }
            s.observe(Event::PublishReceived { publish: &publish, now });
            let Slot::Broker(b) = &mut s.slots[i] else {
                unreachable!("matched a broker")
            };
            b.handle(now, BrokerInput::Publish { req: id, publish });
        }
        (Slot::Broker(_), Wire::Subscribe { subscribe }) => {
            s.observe(Event::SubscribeReceived {
                client: &subscribe.client_id,
                topic: &subscribe.topic,
                expire: subscribe.expire_time,
                now,
            });
            let Slot::Broker(b) = &mut s.slots[i] else {
                unreachable!("matched a broker")
            };
            let id = RequestId(drv.next_request);
            drv.next_request += 1;
            let pending = Pending::Subscribe {
                topic: subscribe.topic.clone(),
                client: subscribe.client_id.clone(),
            };
            drv.requests.insert(id, (src, pending));
            b.handle(now, BrokerInput::Subscribe { req: id, subscribe });
        }
        (Slot::Broker(_), Wire::CallbackAnswer { delivery, ok }) => {
            s.observe(Event::AnswerReceived { delivery, ok });
            let Slot::Broker(b) = &mut s.slots[i] else {
                unreachable!("matched a broker")
            };
            let result = if ok {
                CallbackResult::Delivered
            } else {
                CallbackResult::Failed
            };
            b.handle(now, BrokerInput::CallbackResult { delivery, result });
        }
        (Slot::Participant(p), Wire::PublishReply { req, reply }) => {
            let outbox = OutboxId(req);
            let input = match reply {
                Reply::Published { msg_id, .. } => ParticipantInput::PublishAcked { outbox, msg_id },
                _ => ParticipantInput::PublishFailed { outbox },
            };
            s.tally[i].replied(&input);
            p.handle(now, input);
        }
        (
            Slot::Participant(p),
            Wire::SubscribeReply {
                topic,
                reply: Reply::Subscribed { .. },
            },
        ) => {
            p.handle(now, ParticipantInput::Subscribed { topic });
        }
        (Slot::Participant(_), Wire::Callback { delivery, message }) => {
            let nth = s.callback_nth;
            s.callback_nth += 1;
            if s.chaos
                && let Some(&hang) = s.plan.callback_error.get(&nth)
            {
                *s.faults.entry("callback_error").or_default() += 1;
                s.event(|| What::CallbackFault { seq, node: i, hang });
                if !hang {
                    drv.outgoing
                        .push((BROKER, Wire::CallbackAnswer { delivery, ok: false }));
                }
                let t = s.elapsed_ns();
                s.trace.line(t, &s.names[i], || {
                    format!(
                        "fault: callback #{nth} {}",
                        if hang { "never answered" } else { "answered 500" }
                    )
                });
                return;
            }
            s.observe(Event::CallbackReceived {
                node: i,
                message: &message,
            });
            let Slot::Participant(p) = &mut s.slots[i] else {
                unreachable!("matched a participant")
            };
            let token = CallbackToken(drv.next_token);
            drv.next_token += 1;
            let key = message.key();
            s.tally[i].delivered(p.consumed(&key));
            drv.callbacks.insert(token, (delivery, key));
            p.handle(now, ParticipantInput::Deliver { token, message });
        }
        (Slot::Participant(p), Wire::CreateOrder { spec }) if i == ORDER => {
            s.tally[i].commanded();
            drv.creating = Some(spec.order_id.clone());
            p.handle(now, ParticipantInput::Command(Command::CreateOrder(spec)));
        }
        (Slot::Workload(w), Wire::OrderAccepted { order_id, refused }) => w.answered(&order_id, refused),
        (_, _) => {}
    }
}

/// Moves the machine's outputs to the disk, the checker and the outgoing queue.
fn drain(s: &mut Shared, drv: &mut Driver, i: usize) {
    let mut wrote = false;
    let mut created: Option<String> = None;
    let mut disk_full = false;
    let now = s.now(i);
    // Virtual time does not move within a step.
    let t = s.elapsed_ns();
    loop {
        let Shared {
            cfg,
            slots,
            disks,
            check,
            trace,
            names,
            env,
            chaos,
            tally,
            broker_config,
            ..
        } = &mut *s;
        // An append to a full disk fails (ENOSPC): the process dies with it.
        let full = *chaos && env.full(i, t);
        match &mut slots[i] {
            Slot::Down | Slot::Absent => break,
            Slot::Broker(b) => {
                let Some(out) = b.poll_output() else { break };
                drv.drained += 1;
                if trace.enabled() {
                    let text = out.to_string();
                    trace.line(t, &names[i], || text);
                }
                match out {
                    BrokerOutput::Persist { .. } | BrokerOutput::Rewrite { .. } if full => {
                        disk_full = true;
                        break;
                    }
                    BrokerOutput::Persist { lsn, frames } => {
                        disks[i].append(&frames);
                        drv.lsn_written = Some(lsn);
                        wrote = true;
                        if crate::bugs::broker_durable_early(cfg.bug) {
                            b.handle(now, BrokerInput::Durable { lsn });
                        }
                    }
                    BrokerOutput::Rewrite { lsn, frames, replaced } => {
                        check.observe(t / 1_000_000, Event::Compacted);
                        let image = disks[i].read_all();
                        if let (Ok(written), Ok(kept)) =
                            (sagamq::log::decode_all(&image), sagamq::log::decode_frames(&frames))
                        {
                            let (written, kept) = (written.records.len() as u64, kept.records.len() as u64);
                            let min = broker_config.compact_garbage_records_min;
                            check.compaction_judged(written, replaced, kept, min, t / 1_000_000);
                        }
                        disks[i].replace(&frames);
                        drv.lsn_written = Some(lsn);
                        drv.sync_covers = None;
                        wrote = true;
                    }
                    BrokerOutput::Reply { req, reply } => {
                        let pending = drv.requests.remove(&req);
                        if req == OPERATOR_REQUEST {
                            drv.redrives = drv.redrives.saturating_sub(1);
                        }
                        if let Reply::Rejected(BrokerError::TooManyUnsyncedPublishes) = reply {
                            // Every request handed in and not yet answered
                            // waits for fsync (one answered at once left in
                            // its own step): the refusal needs that many.
                            check.unsynced_refusal(drv.requests.len() + drv.redrives, t / 1_000_000);
                        }
                        match pending {
                            Some((src, Pending::Publish { req, key })) => {
                                check.observe(
                                    t / 1_000_000,
                                    Event::PublishAnswered {
                                        key: &key,
                                        reply: &reply,
                                    },
                                );
                                drv.outgoing.push((src, Wire::PublishReply { req, reply }));
                            }
                            Some((src, Pending::Subscribe { topic, client })) => {
                                if let Reply::Subscribed { expire_time } = reply {
                                    let until = expire_time;
                                    check.observe(
                                        t / 1_000_000,
                                        Event::Subscribed {
                                            client: &client,
                                            topic: &topic,
                                            until,
                                        },
                                    );
                                }
                                drv.outgoing.push((src, Wire::SubscribeReply { topic, reply }));
                            }
                            None => {} // an operator request (redrive)
                        }
                    }
                    BrokerOutput::Callback(cb) => {
                        check.observe(t / 1_000_000, Event::CallbackSent { callback: &cb, now });
                        if let Some(dst) = node_of_url(&cb.url) {
                            drv.outgoing.push((
                                dst,
                                Wire::Callback {
                                    delivery: cb.delivery,
                                    message: cb.message,
                                },
                            ));
                        }
                    }
                }
            }
            Slot::Participant(p) => {
                let Some(out) = p.poll_output() else { break };
                drv.drained += 1;
                tally[i].output(&out, now);
                if trace.enabled() {
                    let text = out.to_string();
                    trace.line(t, &names[i], || text);
                }
                match out {
                    ParticipantOutput::Persist { .. } if full => {
                        disk_full = true;
                        break;
                    }
                    ParticipantOutput::Persist { lsn, frames } => {
                        disks[i].append(&frames);
                        drv.lsn_written = Some(lsn);
                        wrote = true;
                        // A create-order command that wrote a record created the order.
                        created = created.or(drv.creating.take());
                    }
                    ParticipantOutput::Publish { outbox, publish } => {
                        check.observe(
                            t / 1_000_000,
                            Event::Emitted {
                                node: i,
                                publish: &publish,
                            },
                        );
                        drv.outgoing.push((BROKER, Wire::Publish { req: outbox.0, publish }));
                    }
                    ParticipantOutput::Subscribe(subscribe) => {
                        drv.outgoing.push((BROKER, Wire::Subscribe { subscribe }));
                    }
                    ParticipantOutput::CommandDone {
                        command: Command::CreateOrder(spec),
                        outcome,
                    } => {
                        // The create-order call returns: committed (durable) or refused.
                        let refused = match outcome {
                            CommandOutcome::Committed => None,
                            CommandOutcome::Refused(why) => Some(why),
                        };
                        drv.outgoing.push((
                            WORKLOAD,
                            Wire::OrderAccepted {
                                order_id: spec.order_id,
                                refused,
                            },
                        ));
                    }
                    ParticipantOutput::Answer { token, ok } => {
                        if let Some((delivery, key)) = drv.callbacks.remove(&token) {
                            if ok {
                                let client = crate::topology::client_of(i, cfg.custom.as_ref().map(|c| c.client_id()));
                                check.observe(
                                    t / 1_000_000,
                                    Event::Processed {
                                        node: i,
                                        client: &client,
                                        key: &key,
                                    },
                                );
                                s.deliveries += 1;
                            }
                            drv.outgoing.push((BROKER, Wire::CallbackAnswer { delivery, ok }));
                        }
                    }
                }
            }
            Slot::Workload(w) => {
                let Some(spec) = w.poll_output() else { break };
                drv.drained += 1;
                drv.outgoing.push((ORDER, Wire::CreateOrder { spec }));
            }
        }
    }
    drv.creating = None;
    if let (Some(order), Some(after)) = (created, s.def.order_deadline) {
        s.order_deadlines.created(order, now.plus(after));
    }
    let tally = &mut s.tally[i];
    tally.step_done();
    let (judged, at_bound) = (tally.take_judged(), tally.take_at_bound());
    let (early, breach) = (tally.retry_violation(), tally.bounds_violation());
    s.check.count_n("host_retry_judged", judged);
    s.check.count_n("host_refused_at_bound", at_bound);
    let at = t / 1_000_000;
    if let Some(d) = early {
        s.check
            .violation(Violation::safety("host-retry", format!("{}: {d}", s.names[i]), at));
    }
    if let Some(d) = breach {
        s.check
            .violation(Violation::safety("host-bounds", format!("{}: {d}", s.names[i]), at));
    }
    if disk_full {
        s.fired("disk_full");
        s.line(i, || "fault: disk full (ENOSPC): the write failed".to_string());
        fail_stop(s, drv, i, DISK_FULL_RESTART_MS);
        return;
    }
    if wrote && s.torn_armed[i] {
        s.torn_armed[i] = false;
        drv.torn_after_step = true;
    }
    if wrote && drv.sync_due_ns.is_none() {
        drv.sync_covers = Some((s.disks[i].len(), drv.lsn_written));
        drv.sync_due_ns = Some(s.elapsed_ns() + u64::try_from(SYNC_LATENCY.as_nanos()).unwrap_or(0));
    }
}

/// Sends through the faulty transport: the plan decides drop, lost callback
/// answer, delay and duplicate by the message's sequence number, which travels
/// with the message so a receive can name its send (the diagrams' arrows).
fn send(s: &mut Shared, from: usize, dst: usize, wire: Wire) {
    let (seq, delay_ms, copies) = {
        let nth = s.sent_nth;
        s.sent_nth += 1;
        let answer_nth = if wire.is_callback_answer() {
            s.answer_nth += 1;
            Some(s.answer_nth - 1)
        } else {
            None
        };
        let t = s.elapsed_ns();
        let seq = Seq(nth);
        if !s.chaos {
            s.events.send(
                t,
                seq,
                from,
                dst,
                &wire,
                Fate::Sent {
                    delay_ms: 0,
                    duplicated: false,
                },
            );
            (seq, 0, 1)
        } else if s.plan.drop.contains_key(&nth) {
            s.fired("drop");
            s.events.send(t, seq, from, dst, &wire, Fate::Dropped);
            let names = s.names.clone();
            s.line(from, || format!("fault: drop -> {} {wire}", names[dst]));
            return;
        } else if answer_nth.is_some_and(|a| s.plan.ack_lost.contains_key(&a)) {
            s.fired("ack_lost");
            s.events.send(t, seq, from, dst, &wire, Fate::AnswerLost);
            let names = s.names.clone();
            s.line(from, || format!("fault: lose answer -> {} {wire}", names[dst]));
            return;
        } else {
            let delay = s.plan.delay.get(&nth).copied().unwrap_or(0);
            if delay > 0 {
                s.fired("delay");
            }
            let dup = s.plan.duplicate.contains_key(&nth);
            if dup {
                s.fired("duplicate");
            }
            let fate = Fate::Sent {
                delay_ms: delay,
                duplicated: dup,
            };
            s.events.send(t, seq, from, dst, &wire, fate);
            if delay > 0 || dup {
                let names = s.names.clone();
                s.line(from, || {
                    format!(
                        "fault: delay {delay}ms, copies {} -> {} {wire}",
                        1 + u32::from(dup),
                        names[dst]
                    )
                });
            }
            (seq, delay, 1 + usize::from(dup))
        }
    };
    // Each copy draws its own latency; a send to a crashed node is lost like
    // a refused connection (the sender's retry logic covers it).
    let now_ns = s.elapsed_ns();
    let delay_ns = u64::from(delay_ms) * 1_000_000;
    let Shared { net, clock, .. } = s;
    for _ in 1..copies {
        net.send(clock, now_ns, from, dst, seq, wire.clone(), delay_ns);
    }
    net.send(clock, now_ns, from, dst, seq, wire, delay_ns);
}

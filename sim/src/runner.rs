//! Sweeps, summaries and shrinking: what the CLI and the tests call.

use crate::check::Violation;
pub use crate::config::RunConfig;
use crate::plan::{FAULT_KINDS, FaultPlan, FaultProfile};
use crate::scenario::Scenario;
use crate::world::{self, RunResult};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The plan a seed draws for this configuration.
pub fn plan_for(seed: u64, cfg: &RunConfig) -> FaultPlan {
    FaultPlan::from_seed(seed, &cfg.plan_shape())
}

/// Runs one seed with the plan it draws.
pub fn run_seed(seed: u64, cfg: &RunConfig) -> RunResult {
    world::run(seed, &plan_for(seed, cfg), cfg)
}

/// The one command that reproduces a seed: the configuration's own template
/// when it has one ([`RunConfig::reproduce_with`]); the CLI's `replay` for the
/// shipped configurations. The CLI cannot load a user's participant (it would
/// replay a different world, which may well pass), so for a custom
/// configuration without a template this says so and names the API to call.
pub fn replay_command(seed: u64, cfg: &RunConfig) -> String {
    if let Some(template) = &cfg.reproduce {
        return template.replace("{seed}", &seed.to_string());
    }
    if let Some(custom) = &cfg.custom {
        return format!(
            "SAGAMQ_SEED={seed} <the test that built this configuration> (the CLI's replay cannot load \
             custom participant {}; RunConfig::reproduce_with puts that test's command here)",
            custom.client_id()
        );
    }
    let mut cmd = format!(
        "cargo run --release -p sagamq-sim -- replay --seed {seed} --scenario {}",
        cfg.scenario
    );
    if let Some(bug) = cfg.bug {
        cmd.push_str(&format!(" --bug {bug}"));
    }
    cmd
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub seed: u64,
    pub kind: &'static str,
    pub invariant: &'static str,
    pub detail: String,
    pub sim_ms: u64,
    pub replay: String,
    /// For a custom configuration: the call that writes this seed's trace,
    /// diagram and shrunk plan, and where.
    pub artifacts: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// The scenario, and the custom participant when one ran (`saga + custom loyalty-service`).
    pub scenario: String,
    pub bug: Option<String>,
    pub seeds: u64,
    pub passed: u64,
    pub failed: u64,
    pub failures: Vec<Failure>,
    /// Seeds run before (and including) the first failing one, in seed order.
    pub seeds_to_first_failure: Option<u64>,
    pub orders: u64,
    pub deliveries: u64,
    pub sim_ms: u64,
    pub wall_ms: u64,
    pub faults: BTreeMap<String, u64>,
    /// Terminal order states, counted from the order service's final view.
    pub outcomes: BTreeMap<String, u64>,
    /// How often each named path happened (see `check::COVERAGE`).
    pub coverage: BTreeMap<String, u64>,
    /// Per-subscriber account over the sweep (Jepsen's total-queue categories).
    pub account: crate::check::Account,
    /// Simulated ms from healing to quiescence: median, 99th percentile, max.
    pub quiescence_ms: Quantiles,
    /// The derived liveness bound of the runs (ms after healing).
    pub liveness_bound_ms: Quantiles,
    /// The largest quiescence time as a share of its run's bound, in percent.
    pub quiescence_of_bound_pct_max: u64,
    /// Seeds whose run panicked (each also counts as a failure).
    pub panics: u64,
    #[serde(skip)]
    quiescence: Vec<u64>,
    #[serde(skip)]
    bounds: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Quantiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Summary {
    fn absorb(&mut self, r: &RunResult, cfg: &RunConfig) {
        self.seeds += 1;
        self.orders += r.orders;
        self.deliveries += r.deliveries;
        self.sim_ms += r.sim_ms;
        for (k, n) in &r.faults {
            *self.faults.entry((*k).to_string()).or_default() += n;
        }
        for (k, n) in &r.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &r.coverage {
            *self.coverage.entry((*k).to_string()).or_default() += n;
        }
        self.account.add(&r.account);
        self.panics += u64::from(r.panicked);
        if let Some(q) = r.quiescence_ms {
            self.quiescence.push(q);
            if let Some(pct) = (q * 100).checked_div(r.liveness_bound_ms) {
                self.quiescence_of_bound_pct_max = self.quiescence_of_bound_pct_max.max(pct);
            }
        }
        if r.liveness_bound_ms > 0 {
            self.bounds.push(r.liveness_bound_ms);
        }
        match r.violations.first() {
            None => self.passed += 1,
            Some(v) => {
                self.failed += 1;
                self.failures.push(failure(r.seed, v, cfg));
            }
        }
    }

    fn finish(&mut self) {
        fn quantiles(v: &mut [u64]) -> Quantiles {
            v.sort_unstable();
            let at = |q: f64| {
                if v.is_empty() {
                    0
                } else {
                    v[((v.len() - 1) as f64 * q).round() as usize]
                }
            };
            Quantiles {
                p50: at(0.5),
                p99: at(0.99),
                max: at(1.0),
            }
        }
        self.quiescence_ms = quantiles(&mut self.quiescence);
        self.liveness_bound_ms = quantiles(&mut self.bounds);
    }

    /// Named paths (see `check::COVERAGE`) the sweep never reached.
    pub fn uncovered(&self) -> Vec<&'static str> {
        crate::check::COVERAGE
            .iter()
            .copied()
            .filter(|k| self.coverage.get(*k).copied().unwrap_or(0) == 0)
            .collect()
    }

    /// Kinds that never fired in the whole sweep.
    pub fn silent_fault_kinds(&self) -> Vec<&'static str> {
        FAULT_KINDS
            .iter()
            .copied()
            .filter(|k| self.faults.get(*k).copied().unwrap_or(0) == 0)
            .collect()
    }

    pub fn human(&self) -> String {
        let mut s = format!(
            "scenario {}{}: {} seeds, {} passed, {} failed; {} orders, {} deliveries; {:.1} s simulated in {:.2} s wall ({:.0} seeds/s)\nfaults fired:",
            self.scenario,
            self.bug.as_ref().map(|b| format!(" (bug {b})")).unwrap_or_default(),
            self.seeds,
            self.passed,
            self.failed,
            self.orders,
            self.deliveries,
            self.sim_ms as f64 / 1000.0,
            self.wall_ms as f64 / 1000.0,
            self.seeds as f64 / (self.wall_ms.max(1) as f64 / 1000.0),
        );
        for k in FAULT_KINDS {
            s.push_str(&format!(" {k}={}", self.faults.get(k).copied().unwrap_or(0)));
        }
        s.push_str("\noutcomes:");
        for (k, n) in &self.outcomes {
            s.push_str(&format!(" {k}={n}"));
        }
        s.push_str("\ncoverage:");
        for (k, n) in &self.coverage {
            s.push_str(&format!(" {k}={n}"));
        }
        let a = &self.account;
        s.push_str(&format!(
            "\naccount: lost={} duplicated={} unexpected={} out_of_order={}; heal->quiescence p50={}ms p99={}ms max={}ms (at most {}% of its run's liveness bound; bounds p50={}ms max={}ms); panics={}",
            a.lost,
            a.duplicated,
            a.unexpected,
            a.out_of_order,
            self.quiescence_ms.p50,
            self.quiescence_ms.p99,
            self.quiescence_ms.max,
            self.quiescence_of_bound_pct_max,
            self.liveness_bound_ms.p50,
            self.liveness_bound_ms.max,
            self.panics
        ));
        if let Some(n) = self.seeds_to_first_failure {
            s.push_str(&format!("\nfirst failure after {n} seeds"));
        }
        for f in self.failures.iter().take(10) {
            s.push_str(&format!(
                "\nFAIL seed {} {} invariant `{}` at t={}ms: {}\n  reproduce: {}",
                f.seed, f.kind, f.invariant, f.sim_ms, f.detail, f.replay
            ));
            if let Some(a) = &f.artifacts {
                s.push_str(&format!("\n  artifacts: {a}"));
            }
        }
        if self.failures.len() > 10 {
            s.push_str(&format!("\n... and {} more failures", self.failures.len() - 10));
        }
        s
    }
}

fn failure(seed: u64, v: &Violation, cfg: &RunConfig) -> Failure {
    Failure {
        seed,
        kind: v.kind.as_str(),
        invariant: v.invariant,
        detail: v.detail.clone(),
        sim_ms: v.at_ms,
        replay: replay_command(seed, cfg),
        artifacts: cfg.custom.as_ref().map(|_| {
            format!(
                "sagamq_sim::runner::explain_failure({seed}, &cfg) writes the trace, an SVG diagram and the shrunk plan to {}",
                artifacts_root().join(seed.to_string()).display()
            )
        }),
    }
}

/// Runs `seeds` on `jobs` threads (each with its own madsim runtimes); results
/// are merged in seed order, so the summary does not depend on scheduling.
/// `stop_at_first` ends the sweep early once a failure is found (bug hunting).
pub fn sweep(
    cfg: &RunConfig,
    seeds: Range<u64>,
    jobs: usize,
    stop_at_first: bool,
    progress: &(dyn Fn(u64, u64, u64) + Sync),
) -> Summary {
    let started = Instant::now();
    let total = seeds.end.saturating_sub(seeds.start);
    let jobs = jobs.clamp(1, 64) as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let failed = std::sync::atomic::AtomicU64::new(0);
    // With stop_at_first, the lowest failing seed so far: workers keep running
    // seeds below it (another may fail first in seed order) and stop above it.
    let first_fail = std::sync::atomic::AtomicU64::new(u64::MAX);
    let mut results: Vec<RunResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..jobs)
            .map(|j| {
                let (done, failed, first_fail, seeds) = (&done, &failed, &first_fail, seeds.clone());
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut seed = seeds.start + j;
                    while seed < seeds.end && seed < first_fail.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut r = run_seed(seed, cfg);
                        r.trace = Vec::new();
                        if !r.violations.is_empty() {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if stop_at_first {
                                first_fail.fetch_min(seed, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        out.push(r);
                        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        progress(d, total, failed.load(std::sync::atomic::Ordering::Relaxed));
                        seed += jobs;
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sweep worker panicked"))
            .collect()
    });
    results.sort_by_key(|r| r.seed);
    let mut summary = Summary {
        scenario: cfg.describe(),
        bug: cfg.bug.map(|b| b.to_string()),
        ..Summary::default()
    };
    // With stop_at_first, other workers may have run seeds past the first
    // failure; keep the prefix up to it. Every seed below it ran, so
    // seeds-to-first-failure is exact whatever the number of workers.
    if let Some(pos) = results.iter().position(|r| !r.violations.is_empty()) {
        summary.seeds_to_first_failure = Some(pos as u64 + 1);
        if stop_at_first {
            results.truncate(pos + 1);
        }
    }
    for r in &results {
        summary.absorb(r, cfg);
    }
    summary.finish();
    summary.wall_ms = started.elapsed().as_millis() as u64;
    summary
}

/// A drawn setting of a plan's profile that shrinking puts back to its default.
#[derive(Clone, Copy, Debug)]
enum Setting {
    /// A node's small inbox.
    Inbox(u8),
    /// A node's small host bounds.
    HostBounds(u8),
    OrderDeadline,
    AttemptsMax,
    Bounds,
    SubscriptionGrace,
    /// The short TTL and the grace that comes with it.
    SubscriptionTtl,
}

impl Setting {
    /// Puts the setting back to its default; false if it already was.
    fn reset(self, p: &mut FaultProfile) -> bool {
        match self {
            Setting::Inbox(node) => p.inbox_keys_max.remove(&node).is_some(),
            Setting::HostBounds(node) => p.host_bounds.remove(&node).is_some(),
            Setting::OrderDeadline => p.order_deadline_ms.take().is_some(),
            Setting::AttemptsMax => p.attempts_max.take().is_some(),
            Setting::Bounds => p.bounds.take().is_some(),
            Setting::SubscriptionGrace => p.subscription_grace_ms.take().is_some(),
            Setting::SubscriptionTtl => {
                p.subscription_grace_ms = None;
                p.subscription_ttl_ms.take().is_some()
            }
        }
    }
}

/// The result of shrinking a failing seed's plan.
pub struct Shrunk {
    pub original: FaultPlan,
    pub minimal: FaultPlan,
    pub invariant: &'static str,
    pub result: RunResult,
    pub runs: u32,
}

/// Removes chunks of faults (halves, quarters, ... single entries), then puts
/// the profile's drawn settings (small inboxes, a short order deadline, a
/// short retry budget, small broker bounds, a short subscription TTL and
/// grace) back to their defaults, each while the run still fails on the same
/// invariant. Same madsim seed throughout.
/// Returns None if the seed does not fail.
pub fn shrink(seed: u64, cfg: &RunConfig, plan: FaultPlan, runs_max: u32) -> Option<Shrunk> {
    let first = world::run(seed, &plan, cfg);
    let invariant = first.violations.first()?.invariant;
    let fails = |p: &FaultPlan| {
        world::run(seed, p, cfg)
            .violations
            .first()
            .is_some_and(|v| v.invariant == invariant)
    };
    let mut current = plan.clone();
    let mut runs = 1;
    let mut chunk = current.faults.len().div_ceil(2).max(1);
    while chunk >= 1 && runs < runs_max {
        let mut start = 0;
        let mut removed_any = false;
        while start < current.faults.len() && runs < runs_max {
            let end = (start + chunk).min(current.faults.len());
            let mut candidate = current.clone();
            candidate.faults.drain(start..end);
            runs += 1;
            if fails(&candidate) {
                current = candidate;
                removed_any = true;
            } else {
                start = end;
            }
        }
        if chunk == 1 && !removed_any {
            break;
        }
        if !removed_any || chunk > 1 {
            chunk /= 2;
        }
    }
    // Then the profile's drawn settings: each goes back to the simulator's
    // default unless the failure needs it (so a plan that shrinks to no
    // faults still shows the settings it fails under, and only those).
    let mut settings: Vec<Setting> = current
        .profile
        .inbox_keys_max
        .keys()
        .map(|n| Setting::Inbox(*n))
        .collect();
    settings.extend(current.profile.host_bounds.keys().map(|n| Setting::HostBounds(*n)));
    settings.extend([
        Setting::OrderDeadline,
        Setting::AttemptsMax,
        Setting::Bounds,
        Setting::SubscriptionGrace,
        Setting::SubscriptionTtl,
    ]);
    for setting in settings {
        if runs >= runs_max {
            break;
        }
        let mut candidate = current.clone();
        if !setting.reset(&mut candidate.profile) {
            continue;
        }
        runs += 1;
        if fails(&candidate) {
            current = candidate;
        }
    }
    let mut traced = cfg.clone();
    traced.trace = true;
    let result = world::run(seed, &current, &traced);
    Some(Shrunk {
        original: plan,
        minimal: current,
        invariant,
        result,
        runs,
    })
}

/// Bare madsim endpoint relay: a source node sends `messages` values to a
/// relay node that forwards each to a sink (no broker logic). The yardstick
/// for the simulator's own cost per delivery. Returns the values the sink got
/// and the simulated milliseconds it took.
pub fn bare_relay(seed: u64, messages: u64) -> (u64, u64) {
    use madsim::net::Endpoint;
    use std::net::SocketAddr;
    let rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.block_on(async move {
        let started = madsim::time::Instant::now();
        let ip = |n: u8| -> SocketAddr { format!("10.9.0.{n}:1").parse().expect("literal address") };
        let handle = madsim::runtime::Handle::current();
        let relay = handle.create_node().name("relay").ip(ip(2).ip()).build();
        let sink = handle.create_node().name("sink").ip(ip(3).ip()).build();
        let source = handle.create_node().name("source").ip(ip(1).ip()).build();
        let sink_task = sink.spawn(async move {
            let ep = Endpoint::bind(ip(3)).await.expect("bind");
            let mut got = 0u64;
            while got < messages {
                let (p, _) = ep.recv_from_raw(1).await.expect("recv");
                let _ = p.downcast::<u64>().expect("u64");
                got += 1;
            }
            got
        });
        relay.spawn(async move {
            let ep = Endpoint::bind(ip(2)).await.expect("bind");
            loop {
                let (p, _) = ep.recv_from_raw(1).await.expect("recv");
                ep.send_to_raw(ip(3), 1, p).await.expect("send");
            }
        });
        source.spawn(async move {
            let ep = Endpoint::bind(ip(1)).await.expect("bind");
            for i in 0..messages {
                ep.send_to_raw(ip(2), 1, Box::new(i)).await.expect("send");
                if i % 16 == 15 {
                    madsim::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        });
        let got = sink_task.await.expect("sink finished");
        let sim_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (got, sim_ms)
    })
}

/// CPU time this thread has run (Linux `/proc/thread-self/schedstat`), so a
/// benchmark on a shared machine can tell its own cost from its waiting.
fn thread_cpu() -> Option<std::time::Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(std::time::Duration::from_nanos(ns))
}

/// Wall and CPU time spent in one side of the benchmark, and what it did.
#[derive(Default)]
struct Side {
    wall: std::time::Duration,
    cpu: Option<std::time::Duration>,
    seeds: u64,
    deliveries: u64,
    sim_ms: u64,
}

impl Side {
    /// Runs `f`, adding its wall and CPU time.
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let (wall0, cpu0) = (Instant::now(), thread_cpu());
        let r = f();
        self.wall += wall0.elapsed();
        self.cpu = match (self.cpu, cpu0, thread_cpu()) {
            (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
            (None, Some(a), Some(b)) if self.seeds == 0 => Some(b.saturating_sub(a)),
            _ => None,
        };
        r
    }

    fn line(&self, name: &str) -> String {
        let per = |n: f64, d: std::time::Duration| n / d.as_secs_f64().max(1e-9);
        let wall = self.wall;
        let mut s = format!(
            "{name}: {} seeds, {} deliveries, {:.1} s simulated in {:.2} s wall = {:.0} seeds/s, {:.0} deliveries/s, {:.0} simulated s per wall s",
            self.seeds,
            self.deliveries,
            self.sim_ms as f64 / 1000.0,
            wall.as_secs_f64(),
            per(self.seeds as f64, wall),
            per(self.deliveries as f64, wall),
            per(self.sim_ms as f64 / 1000.0, wall),
        );
        if let Some(cpu) = self.cpu {
            s.push_str(&format!(
                "\n  on CPU {:.2} s ({:.0}% of wall) = {:.0} seeds/s, {:.0} deliveries/s, {:.0} simulated s per CPU s",
                cpu.as_secs_f64(),
                100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9),
                per(self.seeds as f64, cpu),
                per(self.deliveries as f64, cpu),
                per(self.sim_ms as f64 / 1000.0, cpu),
            ));
        }
        s
    }
}

/// Prints the simulator's figures for seeds `0..seeds` of the saga scenario
/// on this thread: seeds/s, deliveries/s and simulated seconds per second,
/// next to a bare madsim relay measured side by side (after each saga seed,
/// one relay runtime with the same seed carrying as many deliveries), in wall
/// time and, where Linux reports it, in this thread's CPU time.
pub fn bench(seeds: u64) -> String {
    let cfg = RunConfig::new(Scenario::Saga { orders: 20 }, None);
    let (mut saga, mut relay) = (Side::default(), Side::default());
    let (mut failed, mut messages, mut wakeups, mut orders) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let r = saga.time(|| run_seed(seed, &cfg));
        saga.seeds += 1;
        saga.deliveries += r.deliveries;
        saga.sim_ms += r.sim_ms;
        messages += r.messages;
        wakeups += r.wakeups;
        orders += r.orders;
        failed += u64::from(!r.violations.is_empty());
        let (got, sim_ms) = relay.time(|| bare_relay(seed, r.deliveries.max(1)));
        relay.seeds += 1;
        relay.deliveries += got;
        relay.sim_ms += sim_ms;
    }
    let n = seeds.max(1);
    let ratio = (saga.deliveries as f64 / saga.wall.as_secs_f64().max(1e-9))
        / (relay.deliveries as f64 / relay.wall.as_secs_f64().max(1e-9));
    format!(
        "{}; {failed} failed\n{}\nratio of deliveries/s saga/bare = {ratio:.2}\nper saga seed: {} orders, {} messages, {} node wake-ups, {} ms simulated",
        saga.line("saga (20 orders, swarm faults)"),
        relay.line("bare madsim relay (same seeds, as many deliveries per seed, interleaved)"),
        orders / n,
        messages / n,
        wakeups / n,
        saga.sim_ms / n,
    )
}

/// What [`explain_failure`] wrote for one seed, under `dir`.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub seed: u64,
    /// `<target>/sagamq-sim/<seed>/`.
    pub dir: PathBuf,
    /// The canonical trace of the seed's own plan (`trace.txt`).
    pub trace: PathBuf,
    /// The seed's plan as drawn (`plan.json`; `world::run` takes it back).
    pub plan: PathBuf,
    /// The shrunk plan (`shrunk-plan.json`) and its run's trace
    /// (`shrunk-trace.txt`); `None` when the seed passes.
    pub shrunk_plan: Option<PathBuf>,
    pub shrunk_trace: Option<PathBuf>,
    /// The sequence diagram (`diagram.svg`) of the shrunk run, or of the seed's
    /// run when it passes; the first violation's order when it names one.
    pub svg: PathBuf,
    /// The first violation of the seed's run, if any.
    pub violation: Option<Violation>,
}

impl Artifacts {
    /// One line per file, for a failure message.
    pub fn describe(&self) -> String {
        let mut s = format!("seed {} artifacts in {}:", self.seed, self.dir.display());
        let mut files = vec![&self.trace, &self.plan, &self.svg];
        files.extend(self.shrunk_plan.iter());
        files.extend(self.shrunk_trace.iter());
        for f in files {
            s.push_str(&format!("\n  {}", f.display()));
        }
        s
    }
}

/// Where [`explain_failure`] writes: `$SAGAMQ_ARTIFACTS_DIR` if set, else the
/// cargo target directory the running binary was built in (found by its
/// `CACHEDIR.TAG`), else `$CARGO_TARGET_DIR`, else `./target`; then `sagamq-sim/`.
pub fn artifacts_root() -> PathBuf {
    if let Some(d) = std::env::var_os("SAGAMQ_ARTIFACTS_DIR") {
        return PathBuf::from(d);
    }
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    });
    let target = from_exe
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("sagamq-sim")
}

/// Everything the CLI gives for a failing seed, for any configuration
/// (including a custom participant the CLI cannot load): reruns `seed` traced,
/// shrinks its plan, and writes the trace, the plan, the shrunk plan and its
/// trace, and an SVG sequence diagram under `<target>/sagamq-sim/<seed>/`
/// (see [`artifacts_root`]). Returns their paths.
pub fn explain_failure(seed: u64, cfg: &RunConfig) -> std::io::Result<Artifacts> {
    explain_failure_in(&artifacts_root(), seed, cfg)
}

/// [`explain_failure`] writing under `root/<seed>/`.
pub fn explain_failure_in(root: &Path, seed: u64, cfg: &RunConfig) -> std::io::Result<Artifacts> {
    let dir = root.join(seed.to_string());
    std::fs::create_dir_all(&dir)?;
    let mut traced = cfg.clone();
    traced.trace = true;
    let plan = plan_for(seed, cfg);
    let run = world::run(seed, &plan, &traced);
    let json = |p: &FaultPlan| serde_json::to_string_pretty(p).expect("plan serializes");
    let trace_path = dir.join("trace.txt");
    std::fs::write(&trace_path, crate::trace::render(&run.trace))?;
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, json(&plan))?;
    let violation = run.violations.first().cloned();
    let (mut shrunk_plan, mut shrunk_trace) = (None, None);
    let mut drawn = run;
    if violation.is_some()
        && let Some(s) = shrink(seed, cfg, plan, 200)
    {
        let p = dir.join("shrunk-plan.json");
        std::fs::write(&p, json(&s.minimal))?;
        shrunk_plan = Some(p);
        let t = dir.join("shrunk-trace.txt");
        std::fs::write(&t, crate::trace::render(&s.result.trace))?;
        shrunk_trace = Some(t);
        drawn = s.result;
    }
    let command = replay_command(seed, cfg);
    let order = violation.as_ref().and_then(|v| {
        let words: Vec<&str> = v
            .detail
            .split(|c: char| c.is_whitespace() || ",;:()`'\"".contains(c))
            .collect();
        crate::diagram::orders(&drawn.events)
            .into_iter()
            .find(|o| words.contains(&o.as_str()))
    });
    let opts = crate::diagram::Options {
        order,
        command: Some(command.clone()),
    };
    let svg = crate::diagram::svg(&drawn.events, &opts)
        .or_else(|_| {
            crate::diagram::svg(
                &drawn.events,
                &crate::diagram::Options {
                    order: None,
                    command: Some(command),
                },
            )
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let svg_path = dir.join("diagram.svg");
    std::fs::write(&svg_path, svg)?;
    Ok(Artifacts {
        seed,
        dir,
        trace: trace_path,
        plan: plan_path,
        shrunk_plan,
        shrunk_trace,
        svg: svg_path,
        violation,
    })
}

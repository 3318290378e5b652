//! `sagamq bench`: the project's own numbers, without peers. Starts the broker
//! binary as a child process (or uses `--url`), then measures
//! 1. acked durable publishes/s with `--inflight` publishes in flight and the
//!    subscriber attached (closed loop), and end-to-end msgs/s, with the
//!    broker's µs of CPU per acked publish and per delivered callback (its
//!    `getrusage(RUSAGE_SELF)` from `/stats` before and after the phase);
//! 2. end-to-end latency (publish start to callback receipt) at a fixed rate
//!    (open loop), p50/p99, and the publish-ack latency;
//! 3. recovery speed: builds a log of `--recovery-records` records through the
//!    core, then times opening + replaying it.
//!
//! **Invariant:** a message counts as delivered once, at its first callback;
//! every figure is printed with the parameters that produced it.

use super::client::{BrokerClient, Receiver};
use super::clock::unix_nanos_now;
use super::file_disk::FileDisk;
use super::server;
use crate::broker::{Broker, BrokerConfig, BrokerInput, BrokerOutput, Lsn, RequestId};
use crate::machine::Machine;
use crate::types::{ClientId, GlobalId, Message, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use axum::http::StatusCode;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Messages in each throughput run.
    #[arg(long, default_value_t = 20_000)]
    pub msgs: u64,
    /// Throughput runs (the median publish rate is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Publishes in flight.
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Content bytes per message.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// Messages per second in the latency run.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Messages in the latency run.
    #[arg(long, default_value_t = 10_000)]
    pub lat_msgs: u64,
    /// Records in the log built for the recovery run.
    #[arg(long, default_value_t = 1_000_000)]
    pub recovery_records: u64,
    /// Which parts to run.
    #[arg(long, value_delimiter = ',', default_value = "throughput,latency,recovery")]
    pub parts: Vec<String>,
    /// Work directory (default: a fresh one in the temp dir, removed afterwards).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Measure an already running broker instead of starting one.
    #[arg(long)]
    pub url: Option<String>,
    /// Extra argument for the `serve` child (repeatable), e.g. `--serve-arg=--threads=1`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Start this broker binary instead of this one (an A/B against another build).
    #[arg(long)]
    pub broker_exe: Option<PathBuf>,
    /// Bearer token for `--url`.
    #[arg(long, env = "SAGAMQ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// CPU seconds (user + system) a process has used so far, from `/proc` (Linux;
/// `None` elsewhere). Clock ticks are taken as 100 Hz, the Linux default.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Process-local monotonic nanoseconds (publisher and receiver share it).
fn mono_ns(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Receipt bookkeeping of one phase.
struct PhaseRec {
    phase: u32,
    n: u64,
    seen: Vec<bool>,
    received: u64,
    duplicates: u64,
    e2e_ns: Vec<u64>,
    last_ns: u64,
}

struct Shared {
    base: Instant,
    rec: Mutex<Option<PhaseRec>>,
    all_received: Notify,
}

/// Content: `bench:<phase>:<seq>:<t_ns>:` padded to `size` bytes.
fn make_content(phase: u32, seq: u64, t_ns: u64, size: usize) -> String {
    let mut s = format!("bench:{phase}:{seq}:{t_ns}:");
    while s.len() < size {
        s.push('x');
    }
    s
}

fn parse_content(c: &str) -> Option<(u32, u64, u64)> {
    let mut it = c.strip_prefix("bench:")?.split(':');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

fn on_callback(shared: &Shared, body: &[u8]) -> StatusCode {
    let now = mono_ns(shared.base);
    let Ok(msg) = serde_json::from_slice::<Message>(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let Some((phase, seq, t_ns)) = parse_content(&msg.content) else {
        return StatusCode::OK;
    };
    let mut guard = shared.rec.lock().expect("bench lock");
    if let Some(rec) = guard.as_mut()
        && rec.phase == phase
        && seq < rec.n
    {
        let i = seq as usize;
        if rec.seen[i] {
            rec.duplicates += 1;
        } else {
            rec.seen[i] = true;
            rec.received += 1;
            rec.e2e_ns.push(now.saturating_sub(t_ns));
            rec.last_ns = now;
            if rec.received == rec.n {
                shared.all_received.notify_one();
            }
        }
    }
    StatusCode::OK
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

struct PhaseResult {
    /// CPU of the broker and of this load generator, in % of one core over the phase.
    server_cpu_pct: Option<f64>,
    loadgen_cpu_pct: Option<f64>,
    /// The broker's CPU over the phase (its `getrusage(RUSAGE_SELF)`, read
    /// through `/stats`) per publish it acked and per callback it saw
    /// delivered in that time: one CPU figure, two divisors.
    cpu_us_per_publish: Option<f64>,
    cpu_us_per_callback: Option<f64>,
    publish_per_s: f64,
    e2e_per_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    errors: u64,
    duplicates: u64,
    delivered: u64,
    late: u64,
}

struct Bench {
    client: BrokerClient,
    shared: Arc<Shared>,
    callback_base: String,
    payload: usize,
    inflight: usize,
    run_id: u64,
    server_pid: Option<u32>,
}

impl Bench {
    async fn phase(&self, name: &str, phase: u32, n: u64, rate: Option<u64>) -> Result<PhaseResult, String> {
        let topic = Topic::new(format!("bench-{name}-{}", self.run_id)).map_err(|e| e.to_string())?;
        let sub = SubscribeRequest {
            client_id: ClientId::new(format!("bench-{name}-{}", self.run_id)).map_err(|e| e.to_string())?,
            topic: topic.clone(),
            notify_url: format!("{}/cb/{topic}", self.callback_base),
            expire_time: Time(unix_nanos_now() + 3_600_000_000_000),
        };
        *self.shared.rec.lock().expect("bench lock") = Some(PhaseRec {
            phase,
            n,
            seen: vec![false; n as usize],
            received: 0,
            duplicates: 0,
            e2e_ns: Vec::with_capacity(n as usize),
            last_ns: 0,
        });
        self.client
            .subscribe(&sub)
            .await
            .map_err(|e| format!("subscribe: {e}"))?;

        let acks = Arc::new(Mutex::new(Vec::<u64>::with_capacity(n as usize)));
        let errors = Arc::new(AtomicU64::new(0));
        let last_ack = Arc::new(AtomicU64::new(0));
        let base = self.shared.base;
        let counters0 = BrokerCounters::read(&self.client, self.server_pid).await;
        let cpu0 = (self.server_pid.and_then(cpu_seconds), cpu_seconds(std::process::id()));
        let t0 = mono_ns(base);
        let publish_one = {
            let client = self.client.clone();
            let topic = topic.clone();
            let acks = acks.clone();
            let errors = errors.clone();
            let last_ack = last_ack.clone();
            let payload = self.payload;
            let run_id = self.run_id;
            move |seq: u64| {
                let client = client.clone();
                let topic = topic.clone();
                let acks = acks.clone();
                let errors = errors.clone();
                let last_ack = last_ack.clone();
                async move {
                    let t = mono_ns(base);
                    let p = PublishRequest {
                        global_id: GlobalId::lit(&format!("{topic}-{run_id}-{seq}")),
                        sub_id: SubId::lit("1"),
                        sender_id: SenderId::lit("bench"),
                        create_time: i64::try_from(unix_nanos_now()).unwrap_or(i64::MAX),
                        topic,
                        content: make_content(phase, seq, t, payload),
                    };
                    // Capacity refusals (503) are retried, bounded.
                    for attempt in 0..20u32 {
                        match client.publish(&p).await {
                            Ok(_) => {
                                let done = mono_ns(base);
                                acks.lock().expect("acks").push(done - t);
                                last_ack.fetch_max(done, Ordering::Relaxed);
                                return;
                            }
                            Err(e) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                if attempt == 0 {
                                    eprintln!("bench: publish {seq}: {e}");
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }
            }
        };

        let mut late = 0u64;
        match rate {
            None => {
                let next = Arc::new(AtomicU64::new(0));
                let mut workers = Vec::new();
                for _ in 0..self.inflight {
                    let next = next.clone();
                    let publish_one = publish_one.clone();
                    workers.push(tokio::spawn(async move {
                        loop {
                            let seq = next.fetch_add(1, Ordering::Relaxed);
                            if seq >= n {
                                break;
                            }
                            publish_one(seq).await;
                        }
                    }));
                }
                for w in workers {
                    w.await.map_err(|e| e.to_string())?;
                }
            }
            Some(rate) => {
                let window = Arc::new(Semaphore::new(self.inflight));
                let start = tokio::time::Instant::now();
                let mut tasks = Vec::with_capacity(n as usize);
                for seq in 0..n {
                    let at = start + Duration::from_nanos(seq * 1_000_000_000 / rate.max(1));
                    tokio::time::sleep_until(at).await;
                    let permit = match window.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            late += 1;
                            window.clone().acquire_owned().await.map_err(|e| e.to_string())?
                        }
                    };
                    let f = publish_one(seq);
                    tasks.push(tokio::spawn(async move {
                        f.await;
                        drop(permit);
                    }));
                }
                for t in tasks {
                    t.await.map_err(|e| e.to_string())?;
                }
            }
        }
        // Wait for the callbacks (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.shared.all_received.notified();
            let got = self
                .shared
                .rec
                .lock()
                .expect("bench lock")
                .as_ref()
                .map_or(0, |r| r.received);
            if got >= n || tokio::time::Instant::now() >= deadline {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        let rec = self
            .shared
            .rec
            .lock()
            .expect("bench lock")
            .take()
            .ok_or("phase record missing")?;
        let wall = mono_ns(base).saturating_sub(t0) as f64 / 1e9;
        let cpu_pct = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall.max(1e-9) * 100.0);
        let server_cpu_pct = cpu_pct(cpu0.0, self.server_pid.and_then(cpu_seconds));
        let loadgen_cpu_pct = cpu_pct(cpu0.1, cpu_seconds(std::process::id()));
        let counters1 = BrokerCounters::read(&self.client, self.server_pid).await;
        let (cpu_us_per_publish, cpu_us_per_callback) = match (counters0, counters1) {
            (Some(a), Some(b)) => a.per_message_us(&b),
            _ => (None, None),
        };
        let mut acks = std::mem::take(&mut *acks.lock().expect("acks"));
        acks.sort_unstable();
        let mut e2e = rec.e2e_ns;
        e2e.sort_unstable();
        let pub_s = (last_ack.load(Ordering::Relaxed).saturating_sub(t0)) as f64 / 1e9;
        let e2e_s = rec.last_ns.saturating_sub(t0) as f64 / 1e9;
        Ok(PhaseResult {
            server_cpu_pct,
            loadgen_cpu_pct,
            cpu_us_per_publish,
            cpu_us_per_callback,
            publish_per_s: acks.len() as f64 / pub_s.max(1e-9),
            e2e_per_s: rec.received as f64 / e2e_s.max(1e-9),
            ack_p50_ms: pct(&acks, 0.50),
            ack_p99_ms: pct(&acks, 0.99),
            e2e_p50_ms: pct(&e2e, 0.50),
            e2e_p99_ms: pct(&e2e, 0.99),
            errors: errors.load(Ordering::Relaxed),
            duplicates: rec.duplicates,
            delivered: rec.received,
            late,
        })
    }
}

/// What `/stats` says about the broker's CPU and work so far.
#[derive(Clone, Copy, Debug)]
struct BrokerCounters {
    cpu_seconds: f64,
    publishes_acked: u64,
    callbacks_delivered: u64,
}

impl BrokerCounters {
    /// From `/stats`; a broker built before `/stats` carried its CPU is read
    /// from `/proc/<pid>/stat` instead (the same kernel counters, in 10 ms ticks).
    async fn read(client: &BrokerClient, pid: Option<u32>) -> Option<BrokerCounters> {
        let (200, st) = client.get_json("/stats").await.ok()? else {
            return None;
        };
        let process = &st["process"];
        let rusage = process["cpu_user_seconds"]
            .as_f64()
            .zip(process["cpu_system_seconds"].as_f64())
            .map(|(u, s)| u + s);
        Some(BrokerCounters {
            cpu_seconds: rusage.or_else(|| pid.and_then(cpu_seconds))?,
            publishes_acked: st["publishes"]["acked"].as_u64()?,
            callbacks_delivered: st["callbacks"]["delivered"].as_u64()?,
        })
    }

    /// µs of CPU per acked publish and per delivered callback between `self` and `later`.
    fn per_message_us(&self, later: &BrokerCounters) -> (Option<f64>, Option<f64>) {
        let cpu_us = (later.cpu_seconds - self.cpu_seconds) * 1e6;
        let per = |n: u64| (n > 0).then(|| cpu_us / n as f64);
        (
            per(later.publishes_acked.saturating_sub(self.publishes_acked)),
            per(later.callbacks_delivered.saturating_sub(self.callbacks_delivered)),
        )
    }
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.1} µs"))
}

/// The broker binary as a child process; SIGTERM (graceful) when dropped.
struct ChildBroker {
    child: Child,
    url: String,
}

impl ChildBroker {
    fn start(exe: Option<&Path>, data: &Path, log: &Path, extra: &[String]) -> Result<ChildBroker, String> {
        let exe = match exe {
            Some(e) => e.to_path_buf(),
            None => std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?,
        };
        let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = std::process::Command::new(exe)
            .args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra)
            .env_remove("SAGAMQ_TOKEN")
            .env_remove("SAGAMQ_SIGNING_KEY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn the broker: {e}"))?;
        let url = super::cli::read_listen_line(&mut child)?;
        Ok(ChildBroker { child, url })
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fmt_pct(p: Option<f64>) -> String {
    p.map_or("n/a".to_string(), |p| format!("{p:.0}%"))
}

fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = v.len() / 2;
    Some(v.swap_remove(mid))
}

pub async fn main(args: BenchArgs) -> ExitCode {
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagamq bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> Result<(), String> {
    let (work, remove_work) = match &args.data {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("sagamq-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let want = |p: &str| args.parts.iter().any(|x| x == p);
    let mut summary = serde_json::Map::new();
    summary.insert("inflight".into(), args.inflight.into());
    summary.insert("payload_bytes".into(), args.payload.into());

    if want("throughput") || want("latency") {
        let child;
        let (url, token, server_pid) = match &args.url {
            Some(u) => (u.clone(), args.token.clone(), None),
            None => {
                let data = work.join("broker");
                let _ = std::fs::remove_dir_all(&data);
                child = ChildBroker::start(
                    args.broker_exe.as_deref(),
                    &data,
                    &work.join("broker.log"),
                    &args.serve_args,
                )?;
                (child.url.clone(), None, Some(child.child.id()))
            }
        };
        let client = BrokerClient::new(url.clone(), token);
        if !client.wait_ready(250).await {
            return Err(format!("broker at {url} does not answer /ping"));
        }
        let shared = Arc::new(Shared {
            base: Instant::now(),
            rec: Mutex::new(None),
            all_received: Notify::new(),
        });
        let s2 = shared.clone();
        let receiver = Receiver::start(
            "127.0.0.1:0".parse().expect("static addr"),
            Arc::new(move |_h, body| on_callback(&s2, body)),
        )
        .await
        .map_err(|e| format!("callback receiver: {e}"))?;
        let bench = Bench {
            client: client.clone(),
            shared,
            callback_base: receiver.url(""),
            payload: args.payload,
            inflight: args.inflight,
            run_id: unix_nanos_now(),
            server_pid,
        };
        println!(
            "broker: {url}; payload {} B; {} publishes in flight",
            args.payload, args.inflight
        );
        let warm = bench.phase("warm", 1, 2_000.min(args.msgs), None).await?;
        let _ = warm;
        if want("throughput") {
            let mut runs = Vec::new();
            for r in 0..args.repeat.max(1) {
                let res = bench.phase(&format!("thr{r}"), 10 + r, args.msgs, None).await?;
                println!(
                    "throughput run {r}: {} msgs: {:.0} acked publishes/s, {:.0} e2e msgs/s, ack p50/p99 {:.2}/{:.2} ms, e2e p50/p99 {:.2}/{:.2} ms, delivered {}, duplicates {}, publish errors {}, CPU broker {} loadgen {}; broker CPU {} per acked publish, {} per delivered callback",
                    args.msgs,
                    res.publish_per_s,
                    res.e2e_per_s,
                    res.ack_p50_ms,
                    res.ack_p99_ms,
                    res.e2e_p50_ms,
                    res.e2e_p99_ms,
                    res.delivered,
                    res.duplicates,
                    res.errors,
                    fmt_pct(res.server_cpu_pct),
                    fmt_pct(res.loadgen_cpu_pct),
                    fmt_us(res.cpu_us_per_publish),
                    fmt_us(res.cpu_us_per_callback)
                );
                runs.push(res);
            }
            if let Some(m) = median_by(runs, |r| r.publish_per_s) {
                summary.insert("publish_msgs_per_s".into(), m.publish_per_s.round().into());
                summary.insert("e2e_msgs_per_s".into(), m.e2e_per_s.round().into());
                summary.insert("thr_e2e_p99_ms".into(), m.e2e_p99_ms.into());
                summary.insert("thr_cpu_us_per_acked_publish".into(), m.cpu_us_per_publish.into());
                summary.insert("thr_cpu_us_per_delivered_callback".into(), m.cpu_us_per_callback.into());
            }
        }
        if want("latency") {
            let res = bench.phase("lat", 2, args.lat_msgs, Some(args.rate)).await?;
            println!(
                "latency at {} msgs/s ({} msgs): e2e p50/p99 {:.2}/{:.2} ms, ack p50/p99 {:.2}/{:.2} ms, delivered {}, late sends {}, publish errors {}, CPU broker {} loadgen {}; broker CPU {} per acked publish, {} per delivered callback",
                args.rate,
                args.lat_msgs,
                res.e2e_p50_ms,
                res.e2e_p99_ms,
                res.ack_p50_ms,
                res.ack_p99_ms,
                res.delivered,
                res.late,
                res.errors,
                fmt_pct(res.server_cpu_pct),
                fmt_pct(res.loadgen_cpu_pct),
                fmt_us(res.cpu_us_per_publish),
                fmt_us(res.cpu_us_per_callback)
            );
            summary.insert("lat_rate".into(), args.rate.into());
            summary.insert("lat_cpu_us_per_acked_publish".into(), res.cpu_us_per_publish.into());
            summary.insert("lat_e2e_p50_ms".into(), res.e2e_p50_ms.into());
            summary.insert("lat_e2e_p99_ms".into(), res.e2e_p99_ms.into());
            summary.insert("lat_pub_ack_p99_ms".into(), res.ack_p99_ms.into());
        }
        if let Ok((200, st)) = client.get_json("/stats").await {
            let io = &st["io"];
            println!(
                "group commit: {} fsyncs for {} records ({:.1} records per fsync on average, {} at most), {:.3} ms per fsync",
                io["fsyncs"],
                io["records_written"],
                io["records_per_fsync_avg"].as_f64().unwrap_or(0.0),
                io["records_per_fsync_max"],
                io["fsync_seconds_total"].as_f64().unwrap_or(0.0) * 1e3 / io["fsyncs"].as_f64().unwrap_or(1.0).max(1.0)
            );
            summary.insert("records_per_fsync_avg".into(), io["records_per_fsync_avg"].clone());
            let (f, p) = (&io["fsync_time"], &st["publishes"]["time_in_broker"]);
            println!(
                "over the whole run: fdatasync p50/p99 at most {}/{} µs, max {} µs; publish inside the broker (taken to answered) p50/p99 at most {}/{} µs, max {} µs",
                f["p50_us_at_most"],
                f["p99_us_at_most"],
                f["max_us"],
                p["p50_us_at_most"],
                p["p99_us_at_most"],
                p["max_us"]
            );
        }
        receiver.stop().await;
    }

    if want("recovery") && args.recovery_records > 0 {
        let dir = work.join("recovery");
        let _ = std::fs::remove_dir_all(&dir);
        let n = args.recovery_records;
        let payload = args.payload;
        let dir2 = dir.clone();
        let (records, bytes, build) = tokio::task::spawn_blocking(move || build_log(&dir2, n, payload))
            .await
            .map_err(|e| e.to_string())??;
        println!(
            "recovery: built a log of {records} records, {:.1} MB, in {:.1} s",
            bytes as f64 / 1e6,
            build.as_secs_f64()
        );
        let dir2 = dir.clone();
        let cpu0 = cpu_seconds(std::process::id());
        let (report, took) = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = server::recover(&dir2, recovery_config(), 1).map(|(_, _, report)| report);
            (r, t0.elapsed())
        })
        .await
        .map_err(|e| e.to_string())?;
        let report = report.map_err(|e| e.to_string())?;
        let cpu = cpu0.zip(cpu_seconds(std::process::id())).map(|(a, b)| b - a);
        let per_s = report.records as f64 / took.as_secs_f64().max(1e-9);
        if let Some(cpu) = cpu {
            println!(
                "recovery: {cpu:.2} CPU seconds ({:.0} records per CPU second)",
                report.records as f64 / cpu.max(0.01)
            );
        }
        // The same replay from memory: the core's part without the file read.
        let dir2 = dir.clone();
        let replay = tokio::task::spawn_blocking(move || -> Result<Duration, String> {
            let image = std::fs::read(dir2.join(super::file_disk::LOG_FILE_NAME)).map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            Broker::recover(recovery_config(), 1, &image).map_err(|e| e.to_string())?;
            Ok(t0.elapsed())
        })
        .await
        .map_err(|e| e.to_string())??;
        println!(
            "recovery: Broker::recover alone (image in memory): {:.3} s, {:.0} records/s",
            replay.as_secs_f64(),
            report.records as f64 / replay.as_secs_f64().max(1e-9)
        );
        summary.insert(
            "recovery_in_memory_records_per_s".into(),
            (report.records as f64 / replay.as_secs_f64().max(1e-9)).round().into(),
        );
        println!(
            "recovery: replayed {} records ({:.1} MB) in {:.3} s: {:.0} records/s ({:.0} MB/s)",
            report.records,
            report.valid_len as f64 / 1e6,
            took.as_secs_f64(),
            per_s,
            report.valid_len as f64 / 1e6 / took.as_secs_f64().max(1e-9)
        );
        summary.insert("recovery_records".into(), report.records.into());
        summary.insert("recovery_records_per_s".into(), per_s.round().into());
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", serde_json::Value::Object(summary));
    if remove_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// Bounds large enough that building the recovery log is never refused, and
/// no compaction, so the log holds every record written.
fn recovery_config() -> BrokerConfig {
    BrokerConfig {
        messages_max: usize::MAX / 2,
        dedup_settled_max: usize::MAX / 2,
        publishes_unsynced_max: usize::MAX / 2,
        pending_per_subscriber_max: usize::MAX / 2,
        compact_garbage_records_min: u64::MAX,
        ..BrokerConfig::default()
    }
}

/// Feeds publishes through the core until its log holds `n` records.
fn build_log(dir: &Path, n: u64, payload: usize) -> Result<(u64, u64, Duration), String> {
    let t0 = Instant::now();
    let mut disk = FileDisk::open(dir).map_err(|e| e.to_string())?;
    let mut broker = Broker::new(recovery_config(), 1);
    let mut records = 0u64;
    let mut buf = Vec::with_capacity(8 << 20);
    let mut last_lsn = None;
    let topic = Topic::lit("recovery");
    let content = "x".repeat(payload);
    // One publish writes at least one record: n publishes bound the loop.
    for i in 0..n {
        if records >= n {
            break;
        }
        let publish = PublishRequest {
            global_id: GlobalId::new(format!("rec-{i}")).map_err(|e| e.to_string())?,
            sub_id: SubId::lit("1"),
            sender_id: SenderId::lit("bench"),
            create_time: i as i64,
            topic: topic.clone(),
            content: content.clone(),
        };
        let now = Time(1_000 + i);
        broker.handle(
            now,
            BrokerInput::Publish {
                req: RequestId(i),
                publish,
            },
        );
        drain_into(&mut broker, &mut disk, &mut buf, &mut records, &mut last_lsn)?;
        if buf.len() >= 4 << 20 || i + 1 == n || records >= n {
            disk.try_append(&buf).map_err(|e| e.to_string())?;
            buf.clear();
            if let Some(lsn) = last_lsn.take() {
                broker.handle(now, BrokerInput::Durable { lsn });
                drain_into(&mut broker, &mut disk, &mut buf, &mut records, &mut last_lsn)?;
            }
        }
    }
    disk.try_append(&buf).map_err(|e| e.to_string())?;
    disk.try_sync().map_err(|e| e.to_string())?;
    Ok((records, disk.len(), t0.elapsed()))
}

/// Collects the core's writes: appends into `buf`, a rewrite replaces the file.
fn drain_into(
    broker: &mut Broker,
    disk: &mut FileDisk,
    buf: &mut Vec<u8>,
    records: &mut u64,
    last_lsn: &mut Option<Lsn>,
) -> Result<(), String> {
    while let Some(out) = broker.poll_output() {
        match out {
            BrokerOutput::Persist { lsn, frames } => {
                *records += super::log_writer::count_frames(&frames);
                buf.extend_from_slice(&frames);
                *last_lsn = Some(lsn);
            }
            BrokerOutput::Rewrite { lsn, frames, .. } => {
                buf.clear();
                disk.try_replace(&frames).map_err(|e| e.to_string())?;
                *records = super::log_writer::count_frames(&frames);
                *last_lsn = Some(lsn);
            }
            BrokerOutput::Reply { .. } | BrokerOutput::Callback(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_and_has_the_requested_size() {
        let c = make_content(3, 42, 123_456, 200);
        assert_eq!(c.len(), 200);
        assert_eq!(parse_content(&c), Some((3, 42, 123_456)));
        assert_eq!(parse_content("other"), None);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1_000_000).collect();
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
    }
}

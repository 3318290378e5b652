//! The `sagamq` command line: `serve`, `demo`, `bench`.
//!
//! **Invariant:** every knob of [`crate::broker::BrokerConfig`] that an operator
//! may need is a flag whose default is [`ServeOptions::new`]'s, so the binary
//! and the library agree on defaults.

use super::callbacks::Allowlist;
use super::server::{self, ServeOptions};
use crate::broker::BrokerConfig;
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ExitCode};
use std::time::Duration;

/// `serve` prints this followed by its base URL on stdout once it accepts requests.
pub const LISTENING_PREFIX: &str = "sagamq listening on ";

#[derive(Parser, Debug)]
#[command(
    name = "sagamq",
    version,
    about = "Transactional pub/sub broker with a durable log and HTTP callbacks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Serve the HTTP API with a durable log in --data.
    Serve(ServeArgs),
    /// Run the seed scenario (order + stock over real HTTP on loopback) and check the outcome.
    Demo(DemoArgs),
    /// Measure acked durable publishes/s, end-to-end latency and recovery speed.
    Bench(super::bench::BenchArgs),
    /// Print the callback signing key of a data directory (generated if it has none).
    SigningKey(SigningKeyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SigningKeyArgs {
    /// The broker's data directory.
    #[arg(long)]
    pub data: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3333")]
    pub addr: SocketAddr,
    /// Directory of the log (created if missing). Not with --store.
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: super::cluster_args::ClusterArgs,
    /// Shared secret required as `Authorization: Bearer` on mutating routes.
    #[arg(long, env = "SAGAMQ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// HMAC-SHA256 key for the X-SagaMQ-Signature callback header; must differ from --token.
    /// Default: the key kept in --data (generated at the first start; see `sagamq signing-key`).
    #[arg(long, env = "SAGAMQ_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<String>,
    /// Callback targets allowed: `loopback` (default), `*`, `*.domain`, a host name (these allow public
    /// addresses only), an IP or a CIDR block (these allow any address in them, private ones included).
    /// Every resolved address is checked; the broker's own address never passes. Repeatable or comma-separated.
    #[arg(long = "callback-allow", value_name = "ENTRIES")]
    pub callback_allow: Vec<String>,
    /// PEM file of CA certificates trusted for https callbacks besides the bundled Mozilla roots (repeatable).
    #[arg(long = "callback-ca", value_name = "FILE")]
    pub callback_ca: Vec<PathBuf>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = super::http::BODY_LEN_MAX_DEFAULT)]
    pub body_limit_bytes: usize,
    /// Scoped tokens, JSON: {"tokens":[{"name","token","publish":bool,"subscribe":[ClientID|"*"],
    /// "dead_letters":[ClientID|"*"]}]}. --token, if also given, may do everything.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Allow a non-loopback --addr without --token (mutating routes open to the network).
    #[arg(long)]
    pub insecure: bool,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = super::listener::CONNECTIONS_MAX_DEFAULT)]
    pub connections_max: usize,
    /// A request head (or the next one on a kept-alive connection) must arrive within this, in ms.
    #[arg(long, default_value_t = super::listener::HEADER_READ_TIMEOUT_DEFAULT.as_millis() as u64)]
    pub header_timeout_ms: u64,
    /// A request body must arrive within this once its head did, in ms (else 408).
    #[arg(long, default_value_t = super::listener::BODY_READ_TIMEOUT_DEFAULT.as_millis() as u64)]
    pub body_timeout_ms: u64,
    /// Seed of the retry jitter (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Delivery acks (writes no request waits for) are synced at most this late, in µs.
    #[arg(long, default_value_t = 2000)]
    pub lazy_sync_us: u64,
    /// Runtime threads: 1 runs everything on one thread (plus the log writer);
    /// 0 is one per core but one, at least 1 (the log writer keeps a core:
    /// on 2 cores, one thread).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Test hook: wait this long (signals already handled) before recovering.
    /// Lets a test deliver SIGTERM during startup deterministically.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_startup_delay_ms: u64,
}

/// The core's bounds and timings ([`BrokerConfig`]); defaults are the core's, except the callback window (64)
/// and the subscription grace (300 s).
#[derive(Args, Debug, Clone)]
pub struct Tuning {
    /// Callback with no answer after this many ms counts as timed out.
    #[arg(long)]
    pub callback_timeout_ms: Option<u64>,
    /// First retry delay in ms (doubles per attempt, with jitter).
    #[arg(long)]
    pub retry_initial_ms: Option<u64>,
    /// Cap of the retry delay in ms.
    #[arg(long)]
    pub retry_max_ms: Option<u64>,
    /// Attempts per message and subscriber before it becomes a dead letter.
    #[arg(long)]
    pub attempts_max: Option<u32>,
    /// Callbacks in flight per subscriber [default: 64].
    #[arg(long)]
    pub inflight_per_subscriber: Option<usize>,
    /// Messages queued per subscriber before publishes are refused.
    #[arg(long)]
    pub pending_per_subscriber_max: Option<usize>,
    /// Publishes accepted but not yet durable before new ones are refused.
    #[arg(long)]
    pub publishes_unsynced_max: Option<usize>,
    /// Compact when the log holds this many records beyond the live state.
    #[arg(long)]
    pub compact_garbage_records_min: Option<u64>,
    /// An expired subscription still gets new messages (queued, paused) for this many ms [default: 300000].
    #[arg(long)]
    pub subscription_grace_ms: Option<u64>,
}

impl Tuning {
    pub fn apply(&self, mut c: BrokerConfig) -> BrokerConfig {
        if let Some(v) = self.callback_timeout_ms {
            c.callback_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.retry_initial_ms {
            c.retry_backoff_initial = Duration::from_millis(v);
        }
        if let Some(v) = self.retry_max_ms {
            c.retry_backoff_max = Duration::from_millis(v);
        }
        if let Some(v) = self.attempts_max {
            c.attempts_max = v;
        }
        if let Some(v) = self.subscription_grace_ms {
            c.subscription_grace = Duration::from_millis(v);
        }
        if let Some(v) = self.inflight_per_subscriber {
            c.inflight_per_subscriber_max = v;
        }
        if let Some(v) = self.pending_per_subscriber_max {
            c.pending_per_subscriber_max = v;
        }
        if let Some(v) = self.publishes_unsynced_max {
            c.publishes_unsynced_max = v;
        }
        if let Some(v) = self.compact_garbage_records_min {
            c.compact_garbage_records_min = v;
        }
        c
    }
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the logs here instead of a fresh temporary directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

impl ServeArgs {
    pub fn options(&self) -> Result<ServeOptions, String> {
        let mut o = ServeOptions::new(self.addr, self.data.clone().unwrap_or_default());
        o.token = self.token.clone().filter(|t| !t.is_empty());
        o.signing_key = self.signing_key.clone().filter(|t| !t.is_empty());
        o.allow = Allowlist::parse(&self.callback_allow)?;
        o.body_len_max = self.body_limit_bytes;
        o.insecure = self.insecure;
        for path in &self.callback_ca {
            o.callback_ca.extend(super::callbacks::load_ca_file(path)?);
        }
        if let Some(path) = &self.credentials {
            o.credentials = super::auth::Auth::load_file(path)?;
        }
        if self.connections_max == 0 || self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err("--connections-max, --header-timeout-ms and --body-timeout-ms must be positive".into());
        }
        o.connections.connections_max = self.connections_max;
        o.connections.header_read_timeout = Duration::from_millis(self.header_timeout_ms);
        o.body_read_timeout = Duration::from_millis(self.body_timeout_ms);
        if let Some(seed) = self.seed {
            o.seed = seed;
        }
        o.broker = self.tuning.apply(o.broker);
        o.lazy_sync_delay = Duration::from_micros(self.lazy_sync_us);
        Ok(o)
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// `threads == 1`: one thread runs every task (no cross-thread wakeups);
/// otherwise a work-stealing runtime with that many workers. 0: one per core
/// but one, since the log writer thread (write + `fdatasync` of every group
/// commit) needs a core of its own; on 2 cores that is one runtime thread,
/// which spent about 20 % less CPU per message than two work-stealing
/// workers, with fewer context switches (docs/real-broker.md, issue 14).
/// The other commands (`None`) get one worker per core.
fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match threads {
        None => cores,
        Some(0) => cores.saturating_sub(1).max(1),
        Some(n) => n,
    };
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads);
    b.enable_all().thread_name("sagamq").build()
}

/// Ctrl-C (SIGINT) or SIGTERM, listened for from the moment it is built.
///
/// Built before recovery starts, so a signal that arrives while the log is
/// being recovered or before the listen line is printed is queued and honoured
/// (a clean stop). Listening only once serving began left a window in which
/// SIGTERM still had its default action and killed the process: that was the
/// flaky `sigterm_stops_cleanly_and_a_torn_tail_is_cut_at_restart` (a
/// duplicate publish is answered from memory, so the test could send SIGTERM
/// before the handler existed).
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Registers the handlers now (needs a tokio runtime context).
    pub fn install() -> std::io::Result<ShutdownSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignal {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignal {})
    }

    /// Completes at the first signal (at once if one arrived since `install`).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            biased;
            _ = self.int.recv() => tracing::info!("Ctrl-C received"),
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received");
        }
    }
}

/// Ctrl-C or SIGTERM, listened for from the first poll (use [`ShutdownSignal`]
/// to listen from an earlier point).
pub async fn shutdown_signal() {
    match ShutdownSignal::install() {
        Ok(mut s) => s.recv().await,
        Err(e) => {
            tracing::warn!("cannot listen for signals: {e}");
            std::future::pending::<()>().await
        }
    }
}

pub fn main() -> ExitCode {
    super::callbacks::install_default_crypto_provider();
    let cli = Cli::parse();
    init_tracing();
    let threads = match &cli.command {
        Command::Serve(a) => Some(a.threads),
        Command::Demo(_) | Command::Bench(_) | Command::SigningKey(_) => None,
    };
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sagamq: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => {
            let opts = match args.options() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("sagamq serve: {e}");
                    return ExitCode::from(2);
                }
            };
            if args.cluster.store.is_some() {
                return super::cluster_args::serve(&opts, &args.cluster, &rt);
            }
            if opts.auth().is_open() {
                tracing::warn!(
                    "no --token and no --credentials: mutating routes are open to anyone who can reach --addr"
                );
            }
            let startup_delay = Duration::from_millis(args.debug_startup_delay_ms);
            let r = rt.block_on(async move {
                // Before anything else: see [`ShutdownSignal`].
                let mut signal = ShutdownSignal::install().map_err(|err| server::ServeError::Io {
                    what: "listen for SIGTERM/SIGINT".into(),
                    err,
                })?;
                tracing::info!(data = %opts.data_dir.display(), "starting: recovering the log");
                let starting = async {
                    tokio::time::sleep(startup_delay).await;
                    server::start(opts).await
                };
                let running = tokio::select! {
                    biased;
                    () = signal.recv() => {
                        // Recovery only reads and cuts a torn tail (each step
                        // durable on its own), so stopping here loses nothing;
                        // a recovery still running finishes before the runtime
                        // is dropped, and the directory lock goes with it.
                        tracing::info!("stopped before serving");
                        return Ok(());
                    }
                    r = starting => r?,
                };
                // One machine-readable line on stdout, so scripts and tests
                // that start the broker on port 0 learn its address.
                println!("{LISTENING_PREFIX}{}", running.url());
                let _ = std::io::Write::flush(&mut std::io::stdout());
                running.run_until(signal.recv()).await
            });
            serve_exit(r)
        }
        Command::Demo(args) => rt.block_on(super::demo::main(args)),
        Command::Bench(args) => rt.block_on(super::bench::main(args)),
        Command::SigningKey(args) => match signing_key_command(&args.data) {
            Ok(key) => {
                println!("{key}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sagamq signing-key: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The key of `dir`: read if present, else generated under the directory's
/// lock (a running broker holds it, and already has its key unless it was
/// given `--signing-key`).
fn signing_key_command(dir: &std::path::Path) -> Result<String, String> {
    use super::fs::Fs;
    if let Some(k) = super::signing_key::load(dir)? {
        return Ok(k);
    }
    let fs = super::fs::StdFs;
    fs.create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _lock = fs
        .lock(&dir.join(super::file_disk::LOCK_FILE_NAME))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ResourceBusy => format!(
                "{} has no signing key file and a broker is running on it, so it was started with --signing-key: \
                 that is the key",
                dir.display()
            ),
            _ => format!("lock {}: {e}", dir.display()),
        })?;
    super::signing_key::load_or_create(dir)
}

/// How `sagamq serve` ends: a clean stop, or the error on stderr and a failure code.
pub(crate) fn serve_exit<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sagamq serve: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the `sagamq listening on URL` line a starting `serve` prints on stdout.
pub fn read_listen_line(child: &mut Child) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("child stdout not piped")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("read broker stdout: {e}"))?;
    line.trim()
        .strip_prefix(LISTENING_PREFIX)
        .map(str::to_string)
        .ok_or_else(|| format!("broker did not start (stdout: {line:?})"))
}

//! Assembles a running broker: recovers the log, starts the writer thread, the
//! driver task and the HTTP server, and shuts them down in order.
//!
//! **Invariant:** the HTTP port opens only after recovery succeeded, and at
//! shutdown the listener closes first, in-flight requests finish (their fsyncs
//! included), and only then does the driver stop.

use super::auth::Auth;
use super::callbacks::{Allowlist, CallbackConfig, Dispatcher};
use super::clock::Clock;
use super::driver::{Driver, DriverHandle, FatalLogError};
use super::file_disk::FileDisk;
use super::fs::Fs;
use super::http::{self, HttpConfig};
use super::listener::ConnectionLimits;
use super::log_writer::LogWriter;
use crate::broker::{Broker, BrokerConfig, RecoveryReport};
use crate::log::LogError;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a graceful shutdown waits for in-flight requests before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Callbacks in flight per subscriber in `sagamq serve` (the core's default is 16).
pub const INFLIGHT_PER_SUBSCRIBER_DEFAULT: usize = 64;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub token: Option<String>,
    /// Key for callback signatures. `None`: the key kept in the data
    /// directory ([`super::signing_key`]), generated at the first start.
    /// Never the API token (refused).
    pub signing_key: Option<String>,
    pub allow: Allowlist,
    pub body_len_max: usize,
    /// CA certificates trusted for `https` callbacks besides the bundled roots.
    pub callback_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Scoped tokens (`--credentials FILE`), in addition to `token`.
    pub credentials: Auth,
    /// Serve a non-loopback address without a token (refused otherwise).
    pub insecure: bool,
    /// Connection limit and header (and keep-alive idle) timeout.
    pub connections: ConnectionLimits,
    /// A request body must arrive within this once its head did.
    pub body_read_timeout: Duration,
    pub broker: BrokerConfig,
    /// Seeds the core's retry jitter.
    pub seed: u64,
    /// How late a write no request waits for (a delivery ack) may be synced.
    pub lazy_sync_delay: std::time::Duration,
    /// Where the log lives: the OS (default) or, in tests, the page-cache model.
    pub fs: Arc<dyn Fs>,
    /// The log file is grown by this many bytes of zeros at a time, ahead of
    /// its records ([`LOG_PREALLOC_SLICE`]; 0: plain appends).
    pub log_prealloc_slice: u64,
    /// Test-only: the log writer reports a batch durable *before* its
    /// `fdatasync` (the bug the power-loss test must catch).
    #[cfg(test)]
    pub(crate) test_reply_before_fsync: bool,
    /// Test-only: the wall clock was stepped by this many seconds before start.
    #[cfg(test)]
    pub(crate) test_clock_step_secs: i64,
}

/// How long `serve` keeps entitling an expired subscription (delivery paused).
pub const SUBSCRIPTION_GRACE_DEFAULT: std::time::Duration = std::time::Duration::from_secs(300);

impl ServeOptions {
    pub fn new(addr: SocketAddr, data_dir: PathBuf) -> ServeOptions {
        let broker = BrokerConfig {
            // Over HTTP a callback takes a loopback round trip or more; a window
            // of 16 caps one subscriber near 10k msgs/s, below what publishers
            // reach, so the real runtime opens it to 64.
            inflight_per_subscriber_max: INFLIGHT_PER_SUBSCRIBER_DEFAULT,
            // A subscriber restarting, or cut off, past its ExpireTime loses
            // nothing published within this.
            subscription_grace: SUBSCRIPTION_GRACE_DEFAULT,
            ..BrokerConfig::default()
        };
        ServeOptions {
            addr,
            data_dir,
            token: None,
            signing_key: None,
            allow: Allowlist::loopback(),
            body_len_max: http::BODY_LEN_MAX_DEFAULT,
            credentials: Auth::default(),
            callback_ca: Vec::new(),
            insecure: false,
            connections: ConnectionLimits::default(),
            body_read_timeout: super::listener::BODY_READ_TIMEOUT_DEFAULT,
            broker,
            seed: super::clock::unix_nanos_now(),
            lazy_sync_delay: super::driver::LAZY_SYNC_DELAY_DEFAULT,
            fs: super::fs::std_fs(),
            log_prealloc_slice: LOG_PREALLOC_SLICE,
            #[cfg(test)]
            test_reply_before_fsync: false,
            #[cfg(test)]
            test_clock_step_secs: 0,
        }
    }

    /// Every credential: the file's scoped tokens, and `token` with every right.
    pub fn auth(&self) -> Auth {
        match &self.token {
            Some(t) => self.credentials.clone().with(super::auth::Credential {
                token: t.clone(),
                scope: super::auth::Scope::everything("--token"),
            }),
            None => self.credentials.clone(),
        }
    }

    /// Refuses options that would weaken the broker (a clear error, before anything is touched).
    fn check(&self) -> Result<(), ServeError> {
        let auth = self.auth();
        if let Some(k) = &self.signing_key
            && auth.tokens().any(|t| t == k)
        {
            return Err(ServeError::Config(
                "the signing key must differ from the API token: every subscriber that verifies callbacks \
                 holds the signing key, and must not be able to publish with it"
                    .into(),
            ));
        }
        if !self.addr.ip().is_loopback() && auth.is_open() && !self.insecure {
            return Err(ServeError::Config(format!(
                "refusing to serve {} without a token: anyone who can reach it could publish, subscribe \
                 and drain other clients' queues. Give --token (or SAGAMQ_TOKEN), listen on a loopback \
                 address, or pass --insecure to accept that",
                self.addr
            )));
        }
        if self.signing_key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err(ServeError::Config("the signing key is empty".into()));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum ServeError {
    Io {
        what: String,
        err: std::io::Error,
    },
    /// The log is damaged in the middle, holds an undecodable record, or is in
    /// a format version this build does not read.
    Recovery {
        path: PathBuf,
        err: LogError,
    },
    Http(String),
    Log(FatalLogError),
    /// The options, or a file they name (signing key, CA), are refused.
    Config(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Io { what, err } => write!(f, "{what}: {err}"),
            ServeError::Recovery { path, err } => write!(f, "cannot recover {}: {err}", path.display()),
            ServeError::Http(e) => write!(f, "HTTP: {e}"),
            ServeError::Log(e) => write!(f, "{e}"),
            ServeError::Config(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for ServeError {}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |err| ServeError::Io { what, err }
}

/// A broker serving HTTP in the current tokio runtime.
pub struct RunningBroker {
    pub addr: SocketAddr,
    pub recovery: RecoveryReport,
    /// The key callbacks are signed with (given, or the data directory's).
    pub signing_key: String,
    driver: DriverHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningBroker {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A handle to the driver (stats without going through HTTP).
    pub fn driver(&self) -> DriverHandle {
        self.driver.clone()
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests and fsyncs.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops by itself (a fatal log error) or was told to.
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Http(format!("server task: {e}"))),
        }
    }

    /// Stops when `signal` completes (Ctrl-C / SIGTERM in the binary).
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
        let stop = self.stop.take();
        let mut task = self.task;
        tokio::select! {
            biased;
            r = &mut task => return r.unwrap_or_else(|e| Err(ServeError::Http(format!("server task: {e}")))),
            () = signal => {}
        }
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        task.await
            .unwrap_or_else(|e| Err(ServeError::Http(format!("server task: {e}"))))
    }
}

/// Recovers the log in `opts.data_dir`, binds `opts.addr` and serves.
pub async fn start(opts: ServeOptions) -> Result<RunningBroker, ServeError> {
    let clock = Clock::new();
    #[cfg(test)]
    let clock = clock.stepped(opts.test_clock_step_secs);
    let dir = opts.data_dir.clone();
    let broker_config = opts.broker.clone();
    let seed = opts.seed;
    let t0 = Instant::now();
    opts.check()?;
    let fs = opts.fs.clone();
    let given_key = opts.signing_key.clone();
    let prealloc = opts.log_prealloc_slice;
    let (broker, disk, recovery, signing_key) = tokio::task::spawn_blocking(move || {
        let (broker, mut disk, report) = recover_in(fs, &dir, broker_config, seed)?;
        disk.preallocate(prealloc);
        // Under the directory's lock (held by `disk`): only one process ever
        // generates the key.
        let key = match given_key {
            Some(k) => k,
            None => super::signing_key::load_or_create(&dir).map_err(ServeError::Config)?,
        };
        Ok::<_, ServeError>((broker, disk, report, key))
    })
    .await
    .map_err(|e| ServeError::Http(format!("recovery task: {e}")))??;
    tracing::info!(
        records = recovery.records,
        bytes = recovery.valid_len,
        torn_bytes = recovery.torn_bytes,
        ms = t0.elapsed().as_millis() as u64,
        "recovered the log"
    );

    #[cfg(test)]
    let writer = if opts.test_reply_before_fsync {
        LogWriter::spawn_replying_before_fsync(disk)
    } else {
        LogWriter::spawn(disk)
    };
    #[cfg(not(test))]
    let writer = LogWriter::spawn(disk);
    let writer = writer.map_err(io_err("start the log writer thread"))?;
    // Bound before the callback client exists: the allowlist must know the
    // broker's own address, which is never a callback target.
    let listener = TcpListener::bind(opts.addr)
        .await
        .map_err(io_err(format!("bind {}", opts.addr)))?;
    let addr = listener.local_addr().map_err(io_err("local_addr"))?;
    let allow = opts.allow.clone().with_own_address(addr);
    let (callbacks, callback_results) = Dispatcher::new(CallbackConfig {
        timeout: opts.broker.callback_timeout,
        signing_key: Some(signing_key.as_bytes().to_vec()),
        allow: allow.clone(),
        inflight_per_subscriber_max: opts.broker.inflight_per_subscriber_max,
        extra_roots: opts.callback_ca.clone(),
    })
    .map_err(ServeError::Config)?;
    let (driver, handle) = Driver::new(broker, clock, writer, callbacks, callback_results);
    let driver = driver.with_lazy_sync_delay(opts.lazy_sync_delay);

    let app = http::router(
        handle.clone(),
        HttpConfig {
            auth: opts.auth(),
            body_len_max: opts.body_len_max,
            body_read_timeout: opts.body_read_timeout,
            allow,
        },
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let driver_task = tokio::spawn(driver.run());
    let shutdown_handle = handle.clone();
    let limits = opts.connections;
    let task = tokio::spawn(async move {
        let serve = super::listener::serve(listener, app, limits, stop_rx, SHUTDOWN_GRACE);
        let mut driver_task = driver_task;
        tokio::select! {
            biased;
            // A fatal log error ends the driver: stop serving at once.
            r = &mut driver_task => {
                r.map_err(|e| ServeError::Http(format!("driver task: {e}")))?
                    .map_err(ServeError::Log)?;
                return Err(ServeError::Http("driver stopped unexpectedly".into()));
            }
            stopped = serve => {
                if stopped == super::listener::Stopped::GraceExpired {
                    tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; stopping anyway");
                }
            }
        }
        shutdown_handle.shutdown().await;
        driver_task
            .await
            .map_err(|e| ServeError::Http(format!("driver task: {e}")))?
            .map_err(ServeError::Log)
    });
    tracing::info!(%addr, data = %opts.data_dir.display(), auth = !opts.auth().is_open(), signing_key_given = opts.signing_key.is_some(), "sagamq serving");
    Ok(RunningBroker {
        addr,
        recovery,
        signing_key,
        driver: handle,
        stop: Some(stop_tx),
        task,
    })
}

/// Bytes of log read per step of recovery.
const RECOVERY_CHUNK: usize = 4 << 20;

/// Replays the whole log into a broker, streamed in chunks: replay overlaps
/// nothing, but it never holds the whole image (no allocation and page faults
/// the size of the log).
fn replay(disk: &FileDisk, config: BrokerConfig, seed: u64) -> Result<(Broker, RecoveryReport), ServeError> {
    let log_len = disk.len();
    if log_len == 0 {
        let report = RecoveryReport {
            records: 0,
            valid_len: 0,
            torn_bytes: 0,
        };
        return Ok((Broker::new(config, seed), report));
    }
    let path = disk.path().to_path_buf();
    let read_err = io_err(format!("read {}", path.display()));
    let recovery_err = |err| ServeError::Recovery {
        path: path.clone(),
        err,
    };
    let mut file = disk.open_reader().map_err(io_err(format!("open {}", path.display())))?;
    let mut recovery = Broker::recovery(config, seed, log_len);
    let mut buf = vec![0u8; RECOVERY_CHUNK];
    let mut fed = 0u64;
    while fed < log_len {
        let want = usize::try_from(log_len - fed).unwrap_or(usize::MAX).min(buf.len());
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(read_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the log ended at byte {fed} of {log_len} while being read"),
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        recovery.feed(&buf[..n]).map_err(recovery_err)?;
        fed += n as u64;
    }
    recovery.finish().map_err(recovery_err)
}

/// Bytes of zeros the broker's log file is grown by at a time, ahead of its
/// records (see [`FileDisk::preallocate`]): one `fdatasync` per slice commits
/// a new file size, instead of every one. Its zeros are written back with that
/// sync, so a slice is kept small enough not to stand out in the sync times.
pub const LOG_PREALLOC_SLICE: u64 = 512 * 1024;

/// Opens the log, rebuilds the broker from it, and cuts a torn tail (a tail
/// of zeros is kept as preallocated space).
pub fn recover(
    dir: &std::path::Path,
    config: BrokerConfig,
    seed: u64,
) -> Result<(Broker, FileDisk, RecoveryReport), ServeError> {
    recover_in(super::fs::std_fs(), dir, config, seed)
}

/// [`recover`] on another file system (the page-cache model in tests).
pub fn recover_in(
    fs: Arc<dyn Fs>,
    dir: &std::path::Path,
    config: BrokerConfig,
    seed: u64,
) -> Result<(Broker, FileDisk, RecoveryReport), ServeError> {
    let mut disk = FileDisk::open_in(fs, dir).map_err(io_err(format!("open the log in {}", dir.display())))?;
    // Log format v2 cuts a tail of zeros (a size that reached the disk
    // before its data) as a torn tail and refuses damage followed by data.
    let (broker, mut report) = replay(&disk, config, seed)?;
    if report.torn_bytes > 0 {
        // Zeros to the end of the file hold no record: the log's own
        // preallocated space (after any stop), kept as it is.
        let zeros = disk
            .adopt_zero_tail(report.valid_len)
            .map_err(io_err(format!("read {}", disk.path().display())))?;
        if zeros {
            tracing::debug!(
                valid_len = report.valid_len,
                zero_bytes = report.torn_bytes,
                "the log is followed by preallocated zeros"
            );
            report.torn_bytes = 0;
        } else {
            tracing::warn!(
                valid_len = report.valid_len,
                torn_bytes = report.torn_bytes,
                "the log ends in a torn write (crash during a write); cutting it off"
            );
            disk.try_truncate(report.valid_len)
                .map_err(io_err(format!("truncate {}", disk.path().display())))?;
        }
    }
    Ok((broker, disk, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerRecord;
    use crate::log::{FILE_HEADER_LEN, empty_log};
    use crate::types::MsgId;

    /// An epoch record, framed; its payload ends in zero bytes when `next_msg_id` is 0.
    fn epoch_frame(n: u64, next_msg_id: u64) -> Vec<u8> {
        let mut out = Vec::new();
        BrokerRecord::Epoch {
            incarnation: n,
            next_msg_id: MsgId(next_msg_id),
        }
        .encode_framed(&mut Vec::new(), &mut out);
        out
    }

    fn dir(name: &str) -> std::path::PathBuf {
        temp_dir(name)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sagamq-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn epoch(incarnation: u64) -> BrokerRecord {
        BrokerRecord::Epoch {
            incarnation,
            next_msg_id: MsgId(1),
        }
    }

    /// The error `recover` gives for a log file holding `bytes`, which it
    /// must leave as it was.
    fn refusal(name: &str, bytes: &[u8]) -> String {
        let dir = temp_dir(name);
        let log = dir.join(super::super::file_disk::LOG_FILE_NAME);
        std::fs::write(&log, bytes).unwrap();
        let err = match recover(&dir, BrokerConfig::default(), 1) {
            Ok(_) => panic!("{name}: recovered"),
            Err(e) => e.to_string(),
        };
        assert_eq!(std::fs::read(&log).unwrap(), bytes, "{name}: the log was changed");
        std::fs::remove_dir_all(&dir).unwrap();
        err
    }

    #[test]
    fn a_version_1_log_is_refused_by_name_and_left_untouched() {
        let mut v1 = Vec::new();
        for i in 1..=3 {
            let mut payload = Vec::new();
            epoch(i).encode(&mut payload);
            v1.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            v1.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            v1.extend_from_slice(&payload);
        }
        let err = refusal("v1", &v1);
        assert!(err.contains("log format version 1 is not supported"), "{err}");
    }

    #[test]
    fn a_flipped_length_in_the_middle_is_refused_and_the_log_left_untouched() {
        let (mut image, mut scratch) = (empty_log(), Vec::new());
        let mut offsets = Vec::new();
        for i in 1..=3 {
            offsets.push(image.len());
            epoch(i).encode_framed(&mut scratch, &mut image);
        }
        assert_eq!(offsets[0], FILE_HEADER_LEN);
        // The length's top byte: it now points far past the end of the file.
        image[offsets[1] + 3] ^= 0x40;
        let err = refusal("flip", &image);
        assert!(err.contains(&format!("corrupt at byte offset {}", offsets[1])), "{err}");
        assert!(
            err.contains(&format!("valid frame after it at byte offset {}", offsets[2])),
            "{err}"
        );
    }

    #[test]
    fn a_tail_of_zeros_is_cut_but_zeros_followed_by_data_are_refused() {
        // Valid records, then zeros (a size that reached the disk before its
        // data); the last valid record itself ends in zero bytes.
        let d = dir("zeros");
        let mut log = empty_log();
        log.extend_from_slice(&epoch_frame(1, 0));
        let valid = log.len() as u64;
        log.extend_from_slice(&[0u8; 24]);
        std::fs::write(d.join(crate::real::file_disk::LOG_FILE_NAME), &log).unwrap();
        let (_, disk, report) = recover(&d, BrokerConfig::default(), 1).expect("zeros hold no record");
        assert_eq!(report.valid_len, valid);
        assert_eq!(
            report.torn_bytes, 0,
            "zeros to the end are preallocated space, not a torn write"
        );
        assert_eq!(disk.len(), valid, "the log goes on at the first zero");
        assert_eq!(
            std::fs::read(d.join(crate::real::file_disk::LOG_FILE_NAME)).unwrap(),
            log,
            "kept as they are"
        );
        drop(disk);

        // A frame cut short by zeros in its payload is torn too.
        let d2 = dir("zeros-partial");
        let mut log = empty_log();
        log.extend_from_slice(&epoch_frame(1, 0));
        let mut second = epoch_frame(u64::MAX, u64::MAX);
        let half = second.len() / 2;
        second[half..].fill(0);
        log.extend_from_slice(&second);
        log.extend_from_slice(&[0u8; 4096]);
        std::fs::write(d2.join(crate::real::file_disk::LOG_FILE_NAME), &log).unwrap();
        let (_, disk, report) = recover(&d2, BrokerConfig::default(), 1).expect("a zero-filled frame is torn");
        assert_eq!(report.valid_len, valid);
        assert!(report.torn_bytes > 0);
        let file_len = std::fs::metadata(d2.join(crate::real::file_disk::LOG_FILE_NAME))
            .unwrap()
            .len();
        assert_eq!((disk.len(), file_len), (valid, valid), "cut durably");
        drop(disk);

        // Zeros in the middle with a record after them: damage, refused, untouched.
        let d3 = dir("zeros-middle");
        let mut log = empty_log();
        log.extend_from_slice(&epoch_frame(1, 0));
        log.extend_from_slice(&[0u8; 24]);
        log.extend_from_slice(&epoch_frame(2, 7));
        let path = d3.join(crate::real::file_disk::LOG_FILE_NAME);
        std::fs::write(&path, &log).unwrap();
        let err = recover(&d3, BrokerConfig::default(), 1).err().expect("refused");
        assert!(matches!(err, ServeError::Recovery { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), log, "a refused log is not modified");
        for d in [d, d2, d3] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

//! The `sagamq` binary as a process: SIGKILL during a publishing load loses no
//! acknowledged publish, a torn tail is cut, corruption in the middle is
//! refused with its offset, SIGTERM shuts down cleanly, a second broker on the
//! same data directory is refused, and the demo passes.
#![cfg(feature = "real")]

mod real_support;

use real_support::*;
use sagamq::real::cli::read_listen_line;
use sagamq::real::client::BrokerClient;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sagamq");

struct Broker {
    child: Child,
    url: String,
}

fn spawn(dir: &Path) -> Broker {
    let log = std::fs::File::create(dir.with_extension("stderr")).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--retry-initial-ms",
            "10",
            "--retry-max-ms",
            "100",
            "--data",
        ])
        .arg(dir)
        .env_remove("SAGAMQ_TOKEN")
        .env_remove("SAGAMQ_SIGNING_KEY")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn sagamq");
    let url = read_listen_line(&mut child).expect("broker prints its address");
    Broker { child, url }
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit within {secs}s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_publishing_load_loses_no_acknowledged_publish() {
    let dir = temp_dir("kill9");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let mut b = spawn(&dir);
    let c = BrokerClient::new(b.url.clone(), None);
    c.subscribe(&subscribe("s1", "load", &rx.url("/cb"))).await.unwrap();

    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..16 {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            for j in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let gid = format!("w{w}-{j}");
                match c.publish(&publish(&gid, "load", "payload")).await {
                    Ok(ack) => {
                        acked.lock().unwrap().insert(gid, ack.msg_id.0);
                    }
                    Err(_) => break, // the broker died under us
                }
            }
        }));
    }
    eventually(30, "300 acknowledged publishes", || acked.lock().unwrap().len() >= 300).await;
    b.child.kill().unwrap(); // SIGKILL, publishes still in flight
    b.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let b2 = spawn(&dir);
    assert!(stderr_of(&dir).contains("recovered the log"));
    let c2 = BrokerClient::new(b2.url.clone(), None);
    eventually(30, "every acknowledged publish delivered after the restart", || {
        let got = inbox.delivered_gids();
        acked.keys().all(|g| got.contains(g))
    })
    .await;
    // The dedup index survived too: each acknowledged publish keeps its MsgID.
    for (gid, msg_id) in acked.iter().take(100) {
        let again = c2.publish(&publish(gid, "load", "payload")).await.unwrap();
        assert_eq!((again.msg_id.0, again.duplicate), (*msg_id, true), "{gid}");
    }
    let mut child = b2.child;
    sigterm(&child);
    assert!(wait_exit(&mut child, 10).success());
    rx.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = temp_dir("lock");
    let mut b = spawn(&dir);
    let c = BrokerClient::new(b.url.clone(), None);
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    let log = dir.join("sagamq.log");
    let before = std::fs::read(&log).unwrap();
    let second = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sagamq");
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second broker started: {stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert_eq!(
        std::fs::read(&log).unwrap(),
        before,
        "the refused broker touched the log"
    );
    // The first one is unharmed and still serves.
    let again = c.publish(&publish("g1", "t", "x")).await.unwrap();
    assert!(again.duplicate);
    sigterm(&b.child);
    assert!(wait_exit(&mut b.child, 10).success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_torn_tail_is_cut_at_restart() {
    let dir = temp_dir("torn");
    let mut b = spawn(&dir);
    let c = BrokerClient::new(b.url.clone(), None);
    let first = c.publish(&publish("g1", "t", "x")).await.unwrap();
    c.publish(&publish("g2", "t", "y")).await.unwrap();
    sigterm(&b.child);
    let status = wait_exit(&mut b.child, 10);
    assert!(status.success(), "exit status {status}");
    assert!(stderr_of(&dir).contains("stopped cleanly"));

    // A crash in the middle of a write leaves part of a frame behind, over
    // the preallocated zeros that follow the log (or at the end of the file).
    let log = dir.join("sagamq.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let clean = sagamq::log::decode_all(&bytes).expect("a clean log");
    assert!(
        bytes[clean.valid_len as usize..].iter().all(|b| *b == 0),
        "only zeros after the log"
    );
    let good_len = clean.valid_len;
    let torn = [40, 0, 0, 0, 1, 2, 3, 4, 9, 9];
    let at = good_len as usize;
    if bytes.len() < at + torn.len() {
        bytes.resize(at + torn.len(), 0);
    }
    bytes[at..at + torn.len()].copy_from_slice(&torn);
    std::fs::write(&log, &bytes).unwrap();

    let mut b = spawn(&dir);
    assert!(stderr_of(&dir).contains("torn write"), "{}", stderr_of(&dir));
    // The file now holds only whole records: the old ones unchanged, the torn
    // frame gone (the running broker may already have appended new records).
    let now = std::fs::read(&log).unwrap();
    assert_eq!(now[..good_len as usize], bytes[..good_len as usize]);
    let frames = sagamq::log::decode_all(&now).expect("a clean log");
    assert!(
        now[frames.valid_len as usize..].iter().all(|b| *b == 0),
        "torn tail not cut: {} bytes after {}",
        now.len(),
        frames.valid_len
    );
    let c = BrokerClient::new(b.url.clone(), None);
    let again = c.publish(&publish("g1", "t", "x")).await.unwrap();
    assert_eq!((again.msg_id, again.duplicate), (first.msg_id, true));
    sigterm(&b.child);
    assert!(wait_exit(&mut b.child, 10).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM while the broker is still starting (recovering, not yet listening)
/// is a clean stop, never the signal's default action. The hidden startup
/// delay holds the process in that window; before the handlers were installed
/// ahead of recovery, this SIGTERM killed the process (exit by signal 15).
#[test]
fn sigterm_during_startup_stops_cleanly_before_serving() {
    let dir = temp_dir("early-term");
    let log = std::fs::File::create(dir.with_extension("stderr")).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--debug-startup-delay-ms",
            "30000",
            "--data",
        ])
        .arg(&dir)
        .env_remove("SAGAMQ_TOKEN")
        .env_remove("SAGAMQ_SIGNING_KEY")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn sagamq");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stderr_of(&dir).contains("starting: recovering the log") {
        assert!(Instant::now() < deadline, "no startup line: {}", stderr_of(&dir));
        std::thread::sleep(Duration::from_millis(5));
    }
    sigterm(&child);
    let status = wait_exit(&mut child, 10);
    assert!(status.success(), "exit status {status}: {}", stderr_of(&dir));
    let err = stderr_of(&dir);
    assert!(err.contains("stopped before serving"), "{err}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.is_empty(), "it must not have listened: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_middle_of_the_log_is_refused_with_its_offset() {
    let dir = temp_dir("corrupt");
    let mut b = spawn(&dir);
    let c = BrokerClient::new(b.url.clone(), None);
    for i in 0..5 {
        c.publish(&publish(&format!("g{i}"), "t", "x")).await.unwrap();
    }
    sigterm(&b.child);
    assert!(wait_exit(&mut b.child, 10).success());
    let log = dir.join("sagamq.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[10] ^= 0xFF; // inside the payload of the first frame
    std::fs::write(&log, &bytes).unwrap();

    let out = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("byte offset 0"), "{err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(out.stdout.is_empty(), "it must not start listening");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the damaged log was modified");
    let _ = std::fs::remove_dir_all(&dir);
}

fn signing_key_of(dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["signing-key", "--data"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `sagamq signing-key` shows the key callbacks are signed with: generated
/// before the first start if asked, kept by `serve`, readable while it runs.
#[test]
fn signing_key_command_shows_the_key_the_broker_keeps() {
    let dir = temp_dir("signing-key");
    let key = signing_key_of(&dir);
    assert_eq!(key.len(), 64, "{key}");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
    let mut b = spawn(&dir);
    assert_eq!(signing_key_of(&dir), key, "serve replaced the key");
    sigterm(&b.child);
    assert!(wait_exit(&mut b.child, 10).success());
    // A damaged key file is refused with a clear error, not replaced.
    std::fs::write(dir.join("signing.key"), "garbage\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    assert_eq!(std::fs::read_to_string(dir.join("signing.key")).unwrap(), "garbage\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command line's security flags: a non-loopback address needs a token
/// (or `--insecure`), a bad credentials or CA file is refused with its reason,
/// a good credentials file counts as a token.
#[test]
fn serve_refuses_unsafe_or_bad_security_flags_with_the_reason() {
    let dir = temp_dir("flags");
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--data"])
            .arg(&dir)
            .args(extra)
            .env_remove("SAGAMQ_TOKEN")
            .env_remove("SAGAMQ_SIGNING_KEY")
            .output()
            .unwrap()
    };
    let out = run(&["--addr", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure"), "{err}");
    assert!(out.stdout.is_empty(), "it must not listen");

    let creds = dir.with_extension("credentials.json");
    std::fs::write(&creds, r#"{"tokens":[{"name":"a","token":"short"}]}"#).unwrap();
    let out = run(&["--addr", "127.0.0.1:0", "--credentials", creds.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));

    let ca = dir.with_extension("ca.pem");
    std::fs::write(&ca, "no certificate here\n").unwrap();
    let out = run(&["--addr", "127.0.0.1:0", "--callback-ca", ca.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PEM certificate"));

    std::fs::write(
        &creds,
        r#"{"tokens":[{"name":"a","token":"a-token-0123456789ab","publish":true}]}"#,
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--addr",
            "0.0.0.0:0",
            "--credentials",
            creds.to_str().unwrap(),
            "--data",
        ])
        .arg(&dir)
        .env_remove("SAGAMQ_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = read_listen_line(&mut child).expect("serves with a credentials file");
    assert!(url.starts_with("http://0.0.0.0:"), "{url}");
    sigterm(&child);
    assert!(wait_exit(&mut child, 10).success());
    for f in [creds, ca] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_binary_runs_the_seed_scenario_and_exits_zero() {
    let out = Command::new(BIN).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("test-order-1: StockOutboundDone (expected StockOutboundDone)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("test-order-2: StockOutboundFailed (expected StockOutboundFailed)"),
        "{stdout}"
    );
    assert!(stdout.contains("stock test-prod-1: 9 left"), "{stdout}");
    assert!(stdout.contains("demo passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_outcome_in_process() {
    let dir = temp_dir("demo");
    let outcome = sagamq::real::demo::run(&dir).await.unwrap();
    assert!(outcome.passed(), "{outcome:?}");
    assert_eq!(outcome.orders.len(), 2);
    assert_eq!(outcome.stock_left, 9);
    let _ = std::fs::remove_dir_all(&dir);
}

//! Three `sagamq serve --store postgres://...` processes on one PostgreSQL:
//! a publish load through all three, `kill -9` of the instance serving the
//! most partitions, its partitions taken over, every acknowledged publish
//! delivered, and every publish repeated through a surviving instance
//! answered with its original MsgID.
//!
//! Needs `SAGAMQ_TEST_PG` (`.ci/run` starts a throwaway server and sets it);
//! without it the test prints why and skips, unless `SAGAMQ_REQUIRE_PG=1`.
#![cfg(feature = "postgres")]

mod real_support;

use real_support::{Inbox, loopback0};
use sagamq::real::cli::read_listen_line;
use sagamq::real::cluster::testdb;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sagamq");
const PARTITIONS: u32 = 8;
const LEASE_MS: u64 = 1500;
const MESSAGES: usize = 600;

struct Instance {
    child: Option<Child>,
    url: String,
    log: std::path::PathBuf,
}

impl Instance {
    fn spawn(store: &str, n: usize) -> Instance {
        Instance::spawn_with(store, n, &[])
    }

    fn spawn_with(store: &str, n: usize, extra: &[&str]) -> Instance {
        let log = std::env::temp_dir().join(format!("sagamq-pg-cluster-{}-{n}.log", std::process::id()));
        let mut child = Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--store", store])
            .args([
                "--partitions",
                &PARTITIONS.to_string(),
                "--lease-ms",
                &LEASE_MS.to_string(),
            ])
            .args(["--retry-initial-ms", "50", "--retry-max-ms", "500"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sagamq serve");
        let url = read_listen_line(&mut child).unwrap_or_else(|e| {
            panic!(
                "instance {n}: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Instance {
            child: Some(child),
            url,
            log,
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
            let _ = c.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- log of {} ---\n{}",
                self.url,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn client() -> reqwest::Client {
    sagamq::real::callbacks::client_builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap()
}

async fn served(http: &reqwest::Client, url: &str) -> Option<BTreeSet<u64>> {
    let v: Value = http
        .get(format!("{url}/cluster"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(v["Served"].as_array()?.iter().filter_map(Value::as_u64).collect())
}

fn publish_body(i: usize) -> Value {
    json!({"GlobalID": format!("order-{i}"), "SubID": "1", "SenderID": "test", "CreateTime": i,
           "Topic": "orders", "Content": format!("payload-{i}")})
}

#[derive(Default)]
struct Tally {
    acked: BTreeMap<usize, u64>,
    retry_after_503: u64,
    other_failures: u64,
}

/// Publishes message `i` until some instance acknowledges it (starting at
/// `first`, moving on after a refusal), within a deadline.
async fn publish_until_acked(
    http: &reqwest::Client,
    urls: &[String],
    i: usize,
    first: usize,
    tally: &Mutex<Tally>,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut k = first;
    loop {
        assert!(Instant::now() < deadline, "message {i} never acknowledged");
        let url = &urls[k % urls.len()];
        match http.post(format!("{url}/publish")).json(&publish_body(i)).send().await {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap();
                return v["MsgID"].as_u64().expect("MsgID");
            }
            Ok(r) if r.status() == 503 => {
                assert!(r.headers().contains_key("retry-after"), "a 503 without Retry-After");
                tally.lock().unwrap().retry_after_503 += 1;
            }
            Ok(r) => panic!("publish {i}: {} {}", r.status(), r.text().await.unwrap_or_default()),
            // The killed instance: connection refused.
            Err(_) => tally.lock().unwrap().other_failures += 1,
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_lose_nothing_when_the_busiest_owner_is_killed() {
    let Some(store) = testdb::fresh("three_instances").await else {
        return;
    };
    let inbox = Arc::new(Inbox::default());
    let receiver = inbox.serve(loopback0()).await;
    // The first initialises the store; the others join it.
    let mut instances = vec![Instance::spawn(&store, 0)];
    instances.push(Instance::spawn(&store, 1));
    instances.push(Instance::spawn(&store, 2));
    let urls: Vec<String> = instances.iter().map(|i| i.url.clone()).collect();
    let http = client();

    // Balanced: every instance serves some partitions and together all.
    let t = Instant::now();
    loop {
        let mut all = BTreeSet::new();
        let mut each = true;
        for u in &urls {
            let s = served(&http, u).await.unwrap_or_default();
            each &= !s.is_empty();
            all.extend(s);
        }
        if each && all.len() == PARTITIONS as usize {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the cluster never balanced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Subscribed through one instance: every partition entitles it.
    let sub = json!({"ClientID": "audit", "Topic": "orders", "NotifyUrl": receiver.url("/cb"),
                     "ExpireTime": u64::MAX / 2});
    // 503 (a partition whose owner this instance has not learnt yet) is retried, as clients do.
    let t = Instant::now();
    loop {
        let r = http
            .post(format!("{}/subscribe", urls[1]))
            .json(&sub)
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            break;
        }
        assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
        assert!(r.headers().contains_key("retry-after"));
        assert!(t.elapsed() < Duration::from_secs(20), "subscribe never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(Mutex::new(0usize));
    let killed = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (http, urls, tally, next) = (http.clone(), urls.clone(), tally.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    if *n >= MESSAGES {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                let id = publish_until_acked(&http, &urls, i, i + w, &tally).await;
                tally.lock().unwrap().acked.insert(i, id);
            }
        }));
    }
    // A third of the load in, kill -9 the instance serving the most partitions.
    while tally.lock().unwrap().acked.len() < MESSAGES / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut victim = 0;
    let mut victim_parts = BTreeSet::new();
    for (k, u) in urls.iter().enumerate() {
        let s = served(&http, u).await.unwrap_or_default();
        if s.len() > victim_parts.len() {
            victim = k;
            victim_parts = s;
        }
    }
    let acked_before_kill: BTreeMap<usize, u64> = tally.lock().unwrap().acked.clone();
    instances[victim].kill9();
    let t_kill = Instant::now();
    killed.notify_waiters();
    eprintln!(
        "killed instance {victim} ({}), serving partitions {victim_parts:?}",
        urls[victim]
    );
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != victim)
        .map(|(_, u)| u.clone())
        .collect();

    // Its partitions are served again by the survivors.
    let takeover = loop {
        let mut all = BTreeSet::new();
        for u in &survivors {
            all.extend(served(&http, u).await.unwrap_or_default());
        }
        if victim_parts.is_subset(&all) {
            break t_kill.elapsed();
        }
        assert!(
            t_kill.elapsed() < Duration::from_millis(LEASE_MS * 2 + 5000),
            "partitions {victim_parts:?} not taken over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "takeover: {} ms after kill -9 (lease {LEASE_MS} ms; bound {} ms plus the load)",
        takeover.as_millis(),
        sagamq::cluster::takeover_bound_ms(LEASE_MS)
    );

    for t in tasks {
        t.await.unwrap();
    }
    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    assert_eq!(tally.acked.len(), MESSAGES);
    eprintln!(
        "acked {} publishes; {} answers were 503 with Retry-After, {} connection failures (the killed instance)",
        tally.acked.len(),
        tally.retry_after_503,
        tally.other_failures
    );
    let ids: BTreeSet<u64> = tally.acked.values().copied().collect();
    assert_eq!(ids.len(), MESSAGES, "two messages share a MsgID");
    assert!(acked_before_kill.len() >= MESSAGES / 3);

    // Every acknowledged publish reaches the subscriber (at least once).
    let want: BTreeSet<String> = (0..MESSAGES).map(|i| format!("order-{i}")).collect();
    let t = Instant::now();
    while !want.is_subset(&inbox.delivered_gids()) {
        let missing = want.difference(&inbox.delivered_gids()).count();
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{missing} acknowledged publishes never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every callback carries the MsgID the publisher was given.
    for m in inbox.messages.lock().unwrap().iter() {
        let i: usize = m.global_id.as_str()["order-".len()..].parse().unwrap();
        assert_eq!(
            m.msg_id.0, tally.acked[&i],
            "callback of order-{i} carries another MsgID"
        );
    }

    // Repeated through a survivor, every publish (those the killed instance
    // acknowledged included) is answered with its original MsgID.
    let dummy = Mutex::new(Tally::default());
    for (i, id) in &tally.acked {
        let again = publish_until_acked(&http, &survivors, *i, *i, &dummy).await;
        assert_eq!(again, *id, "order-{i} answered with another MsgID after the kill");
    }
    let r: Value = http
        .post(format!("{}/publish", survivors[0]))
        .json(&publish_body(0))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["Duplicate"], true, "{r}");
}

/// Runs `sagamq serve ARGS` to its exit: (exit code, stderr).
fn serve_refused(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("run sagamq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bad flags and an unreachable database are refused with a clear error,
/// before anything is served (no database needed).
#[test]
fn bad_store_flags_and_an_unreachable_database_are_refused_clearly() {
    let (code, err) = serve_refused(&["--addr", "127.0.0.1:0", "--store", "mysql://db/x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected a postgres:// URL"), "{err}");

    let (code, err) = serve_refused(&["--store", "postgres://u@127.0.0.1:1/x", "--data", "/tmp/never"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    let (code, err) = serve_refused(&["--store", "postgres://u@127.0.0.1:1/x", "--partitions", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("partition count must be between 1 and"), "{err}");

    let (code, err) = serve_refused(&["--partitions", "4"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--store"), "--partitions without --store: {err}");

    // Nothing listens on port 1: a clear error naming the database, no password shown.
    let t = Instant::now();
    let (code, err) = serve_refused(&["--addr", "127.0.0.1:0", "--store", "postgres://u:secret@127.0.0.1:1/x"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("connect to PostgreSQL"), "{err}");
    assert!(!err.contains("secret"), "the password leaked: {err}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// Dead letters live in each message's partition; any instance lists them
/// all and redrives them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_of_every_partition_are_listed_and_redriven_through_any_instance() {
    let Some(store) = testdb::fresh("dead_letters").await else {
        return;
    };
    let inbox = Arc::new(Inbox::default());
    inbox.status.store(500, std::sync::atomic::Ordering::Relaxed);
    let receiver = inbox.serve(loopback0()).await;
    let extra = ["--attempts-max", "2"];
    let a = Instance::spawn_with(&store, 0, &extra);
    let b = Instance::spawn_with(&store, 1, &extra);
    let http = client();
    let sub = json!({"ClientID": "dl", "Topic": "orders", "NotifyUrl": receiver.url("/cb"),
                     "ExpireTime": u64::MAX / 2});
    let t = Instant::now();
    while !http
        .post(format!("{}/subscribe", a.url))
        .json(&sub)
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
    {
        assert!(t.elapsed() < Duration::from_secs(20), "subscribe never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    const N: usize = 20;
    let tally = Mutex::new(Tally::default());
    let urls = vec![a.url.clone(), b.url.clone()];
    for i in 0..N {
        publish_until_acked(&http, &urls, i, i, &tally).await;
    }
    let list = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{url}/dead-letters?client=dl")).send().await.unwrap();
            if !r.status().is_success() {
                return None;
            }
            let v: Value = r.json().await.unwrap();
            Some(v["Count"].as_u64().unwrap())
        }
    };
    let t = Instant::now();
    while list(b.url.clone()).await != Some(N as u64) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not every message became a dead letter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        list(a.url.clone()).await,
        Some(N as u64),
        "both instances see every partition"
    );
    inbox.status.store(0, std::sync::atomic::Ordering::Relaxed);
    let r: Value = http
        .post(format!("{}/dead-letters/redrive", a.url))
        .json(&json!({"ClientID": "dl"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["Redriven"], N as u64, "{r}");
    let want: BTreeSet<String> = (0..N).map(|i| format!("order-{i}")).collect();
    let t = Instant::now();
    while !want.is_subset(&inbox.delivered_gids()) {
        assert!(t.elapsed() < Duration::from_secs(30), "redriven messages not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(list(b.url.clone()).await, Some(0));
}

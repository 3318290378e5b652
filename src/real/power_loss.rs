//! Power-loss test of the real broker: the HTTP server, driver, log writer
//! thread, compaction and recovery of `sagamq serve`, run on the page-cache
//! model ([`super::page_cache`]) and cut at every boundary between two
//! file-system calls of a run (and at every acknowledgement a client got),
//! clean and torn.
//!
//! **Invariant checked:** for every crash image, recovery succeeds (it never
//! refuses a log it wrote) and everything acknowledged before the cut is
//! there: each acknowledged publish keeps its `MsgID` (dedup) and is, for each
//! subscriber entitled to it, still queued, already delivered (before the
//! cut), or a dead letter; each acknowledged subscription still receives new
//! publishes; dead letters, once durable, stay. The same run with a writer
//! that answers before `fdatasync` must be caught.

use super::client::{BrokerClient, Receiver};
use super::clock::unix_nanos_now;
use super::page_cache::{CrashImage, PageCacheFs};
use super::server::{self, ServeOptions};
use crate::broker::{BrokerConfig, BrokerInput, BrokerOutput, Reply, RequestId};
use crate::machine::Machine;
use crate::types::{ClientId, GlobalId, Message, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use axum::http::StatusCode;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC: &str = "orders";
/// Subscriber `f` refuses messages with this content, so they become dead letters.
const DEAD: &str = "dead";
const WORKERS: usize = 4;
const PUBLISHES_PER_WORKER: usize = 12;

fn data_dir() -> PathBuf {
    PathBuf::from("/power-loss/data")
}

fn config() -> BrokerConfig {
    BrokerConfig {
        attempts_max: 2,
        retry_backoff_initial: Duration::from_millis(1),
        retry_backoff_max: Duration::from_millis(4),
        callback_timeout: Duration::from_secs(5),
        // Compact often: cuts must land inside compactions too.
        compact_garbage_records_min: 16,
        // Recovery's check lists every queued message as a callback at once.
        inflight_per_subscriber_max: 10_000,
        ..ServeOptions::new("127.0.0.1:0".parse().unwrap(), data_dir()).broker
    }
}

#[derive(Clone, Debug)]
enum Event {
    Subscribed {
        client: String,
    },
    Published {
        publish: PublishRequest,
        msg_id: u64,
        entitled: Vec<String>,
    },
    Delivered {
        client: String,
        msg_id: u64,
    },
}

/// What the clients saw, each event tagged with its note index (so an image
/// knows which came before it).
#[derive(Default)]
struct History {
    /// Acknowledged by an earlier incarnation, before the cut this run starts from.
    prior: Vec<Event>,
    events: Mutex<Vec<(u64, Event)>>,
}

impl History {
    fn record(&self, fs: &PageCacheFs, event: Event) {
        // Under the history lock, so note order and list order agree.
        let mut events = self.events.lock().unwrap();
        let n = fs.note();
        events.push((n, event));
    }

    fn before(&self, image: &CrashImage) -> Vec<Event> {
        let events = self.events.lock().unwrap();
        let mine = events.iter().filter(|(n, _)| *n < image.notes).map(|(_, e)| e.clone());
        self.prior.iter().cloned().chain(mine).collect()
    }
}

struct Run {
    images: Vec<CrashImage>,
    history: Arc<History>,
    /// `f`'s dead letters as listed over HTTP before the graceful shutdown.
    dead_letters_listed: BTreeSet<u64>,
    compactions: u64,
    fsyncs: u64,
}

fn publish_request(gid: &str, content: &str) -> PublishRequest {
    PublishRequest {
        global_id: GlobalId::lit(gid),
        sub_id: SubId::lit("1"),
        sender_id: SenderId::lit("power-loss"),
        create_time: 0,
        topic: Topic::lit(TOPIC),
        content: content.to_string(),
    }
}

async fn subscriber(fs: &PageCacheFs, history: &Arc<History>, client: &'static str) -> Receiver {
    let (fs, history) = (fs.clone(), history.clone());
    let handler = Arc::new(move |_: &axum::http::HeaderMap, body: &axum::body::Bytes| {
        let Ok(m) = serde_json::from_slice::<Message>(body) else {
            return StatusCode::BAD_REQUEST;
        };
        if client == "f" && m.content == DEAD {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        history.record(
            &fs,
            Event::Delivered {
                client: client.to_string(),
                msg_id: m.msg_id.0,
            },
        );
        StatusCode::OK
    });
    Receiver::start("127.0.0.1:0".parse().unwrap(), handler).await.unwrap()
}

async fn subscribe(c: &BrokerClient, fs: &PageCacheFs, history: &History, client: &str, url: String) {
    let req = SubscribeRequest {
        client_id: ClientId::lit(client),
        topic: Topic::lit(TOPIC),
        notify_url: url,
        expire_time: Time(unix_nanos_now() + 3_600_000_000_000),
    };
    c.subscribe(&req).await.expect("subscribe");
    history.record(
        fs,
        Event::Subscribed {
            client: client.to_string(),
        },
    );
}

/// `WORKERS` concurrent publishers; every `DEAD`-content message becomes a
/// dead letter at `f`; every third one is published twice.
async fn publish_phase(
    c: &BrokerClient,
    fs: &PageCacheFs,
    history: &Arc<History>,
    phase: &str,
    entitled: &[&str],
    workers: usize,
) {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (c, fs, history) = (c.clone(), fs.clone(), history.clone());
        let entitled: Vec<String> = entitled.iter().map(|s| s.to_string()).collect();
        let phase = phase.to_string();
        tasks.push(tokio::spawn(async move {
            for j in 0..PUBLISHES_PER_WORKER {
                let content = if j % 4 == 0 { DEAD } else { "ok" };
                let p = publish_request(&format!("{phase}-{w}-{j}"), content);
                let ack = c.publish(&p).await.expect("publish");
                assert!(!ack.duplicate);
                history.record(
                    &fs,
                    Event::Published {
                        publish: p.clone(),
                        msg_id: ack.msg_id.0,
                        entitled: entitled.clone(),
                    },
                );
                if j % 3 == 0 {
                    let again = c.publish(&p).await.expect("publish again");
                    assert_eq!((again.msg_id, again.duplicate), (ack.msg_id, true));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Where a run starts: an empty disk, or what a cut left of an earlier run
/// (with what that run had acknowledged before the cut).
enum Start<'a> {
    Empty,
    After {
        image: &'a CrashImage,
        acknowledged: Vec<Event>,
    },
}

async fn run_workload(seed: u64, reply_before_fsync: bool, sync_latency: Duration, start: Start<'_>) -> Run {
    let (fs, prior) = match start {
        Start::Empty => (PageCacheFs::new(seed), Vec::new()),
        Start::After { image, acknowledged } => (PageCacheFs::from_image(image, seed), acknowledged),
    };
    let restarted = !prior.is_empty();
    // An fsync takes time on a real device; a broken writer's early answer
    // reaches the client while it runs.
    fs.set_sync_latency(sync_latency);
    fs.record(true);
    let history = Arc::new(History {
        prior,
        ..History::default()
    });
    let mut o = ServeOptions::new("127.0.0.1:0".parse().unwrap(), data_dir());
    o.fs = Arc::new(fs.clone());
    o.seed = seed;
    o.broker = config();
    o.test_reply_before_fsync = reply_before_fsync;
    // Small slices: the log grows by many of them in a run, and most writes
    // overwrite preallocated zeros in place, as in `serve`.
    o.log_prealloc_slice = 2048;
    // The key file lives on the real file system; the log is what is tested.
    o.signing_key = Some("power-loss-signing-key".into());
    let broker = server::start(o).await.expect("broker starts");
    let c = BrokerClient::new(broker.url(), None);
    let (g, f, h) = (
        subscriber(&fs, &history, "g").await,
        subscriber(&fs, &history, "f").await,
        subscriber(&fs, &history, "h").await,
    );
    if restarted {
        // The services came back on new ports: they renew with their new URLs.
        subscribe(&c, &fs, &history, "g", g.url("/cb")).await;
        subscribe(&c, &fs, &history, "f", f.url("/cb")).await;
        subscribe(&c, &fs, &history, "h", h.url("/cb")).await;
        publish_phase(&c, &fs, &history, "c", &["g", "f", "h"], 2).await;
    } else {
        subscribe(&c, &fs, &history, "g", g.url("/cb")).await;
        subscribe(&c, &fs, &history, "f", f.url("/cb")).await;
        publish_phase(&c, &fs, &history, "a", &["g", "f"], WORKERS).await;
        subscribe(&c, &fs, &history, "h", h.url("/cb")).await;
        publish_phase(&c, &fs, &history, "b", &["g", "f", "h"], WORKERS).await;
    }

    // Let deliveries and dead letters settle (bounded): nothing queued.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead_letters_listed = loop {
        let (status, v) = c.get_json("/dead-letters?client=f").await.unwrap();
        assert_eq!(status, 200, "{v}");
        let listed: BTreeSet<u64> = v["Messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["MsgID"].as_u64().unwrap())
            .collect();
        let st = broker.driver().stats().await.unwrap();
        let queued: usize = st.broker.subscribers.values().map(|s| s.pending + s.in_flight).sum();
        if queued == 0 {
            break listed;
        }
        assert!(Instant::now() < deadline, "did not settle: {queued} queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if !restarted {
        let dead_expected = 2 * WORKERS * PUBLISHES_PER_WORKER.div_ceil(4);
        assert_eq!(dead_letters_listed.len(), dead_expected, "f refuses a quarter");
    }
    let st = broker.driver().stats().await.unwrap();
    broker.shutdown().await.expect("clean shutdown");
    for r in [g, f, h] {
        r.stop().await;
    }
    let mut images = fs.take_images();
    // After a clean shutdown everything is durable.
    let mut last = fs.crash_image("after shutdown", false);
    last.notes = u64::MAX;
    images.push(last);
    Run {
        images,
        history,
        dead_letters_listed,
        compactions: st.io.compactions,
        fsyncs: st.io.fsyncs,
    }
}

/// What one crash image recovered to.
struct Recovered {
    dead_letters: BTreeSet<u64>,
}

/// Recovers `image` with the real recovery code and checks it against what
/// was acknowledged before the cut. `Err` lists what was lost.
fn check_image(image: &CrashImage, history: &History) -> Result<Recovered, String> {
    let fs = PageCacheFs::from_image(image, 0);
    let (mut broker, _disk, _report) = server::recover_in(Arc::new(fs), &data_dir(), config(), 1)
        .map_err(|e| format!("recovery refused the log: {e}"))?;
    let now = Time(unix_nanos_now());
    let mut queued: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut replies: BTreeMap<RequestId, Reply> = BTreeMap::new();
    let drain = |broker: &mut crate::broker::Broker,
                 queued: &mut BTreeMap<String, BTreeSet<u64>>,
                 replies: &mut BTreeMap<RequestId, Reply>| {
        for _ in 0..100 {
            let mut durable = None;
            while let Some(out) = broker.poll_output() {
                match out {
                    BrokerOutput::Persist { lsn, .. } | BrokerOutput::Rewrite { lsn, .. } => durable = Some(lsn),
                    BrokerOutput::Reply { req, reply } => {
                        replies.insert(req, reply);
                    }
                    BrokerOutput::Callback(cb) => {
                        queued
                            .entry(cb.client.to_string())
                            .or_default()
                            .insert(cb.message.msg_id.0);
                    }
                }
            }
            match durable {
                Some(lsn) => broker.handle(now, BrokerInput::Durable { lsn }),
                None => return,
            }
        }
        panic!("outputs did not settle");
    };
    // The epoch record, then every queued message goes out as a callback.
    drain(&mut broker, &mut queued, &mut replies);
    let events = history.before(image);
    let delivered: BTreeSet<(&str, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delivered { client, msg_id } => Some((client.as_str(), *msg_id)),
            _ => None,
        })
        .collect();
    let dead = |broker: &crate::broker::Broker, c: &str| -> BTreeSet<u64> {
        broker
            .dead_letters(&ClientId::lit(c))
            .iter()
            .map(|m| m.msg_id.0)
            .collect()
    };
    let mut lost = Vec::new();
    let mut req_next = 0;
    for e in &events {
        let Event::Published {
            publish,
            msg_id,
            entitled,
        } = e
        else {
            continue;
        };
        for c in entitled {
            let held = queued.get(c).is_some_and(|q| q.contains(msg_id))
                || delivered.contains(&(c.as_str(), *msg_id))
                || dead(&broker, c).contains(msg_id);
            if !held {
                lost.push(format!(
                    "msg {msg_id} ({}) for {c}: neither queued, delivered nor a dead letter",
                    publish.global_id
                ));
            }
        }
        req_next += 1;
        let req = RequestId(req_next);
        broker.handle(
            now,
            BrokerInput::Publish {
                req,
                publish: publish.clone(),
            },
        );
        drain(&mut broker, &mut queued, &mut replies);
        match replies.get(&req) {
            Some(Reply::Published {
                msg_id: m,
                duplicate: true,
            }) if m.0 == *msg_id => {}
            other => lost.push(format!(
                "publish {} (acked as msg {msg_id}) answered {other:?} after recovery",
                publish.global_id
            )),
        }
    }
    // Every acknowledged subscription still receives a new publish.
    let subscribed: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Subscribed { client } => Some(client.as_str()),
            _ => None,
        })
        .collect();
    if !subscribed.is_empty() {
        req_next += 1;
        let req = RequestId(req_next);
        let probe = publish_request("probe-after-recovery", "probe");
        broker.handle(now, BrokerInput::Publish { req, publish: probe });
        drain(&mut broker, &mut queued, &mut replies);
        match replies.get(&req) {
            Some(Reply::Published {
                msg_id,
                duplicate: false,
            }) => {
                for c in subscribed {
                    if !queued.get(c).is_some_and(|q| q.contains(&msg_id.0)) {
                        lost.push(format!("subscription of {c} (acknowledged) gets no new publish"));
                    }
                }
            }
            other => lost.push(format!("probe publish answered {other:?}")),
        }
    }
    if lost.is_empty() {
        Ok(Recovered {
            dead_letters: dead(&broker, "f"),
        })
    } else {
        Err(lost.join("; "))
    }
}

#[derive(Debug, Default)]
struct Verdict {
    images: usize,
    torn: usize,
    by_label: BTreeMap<String, usize>,
    failures: Vec<String>,
}

fn check_run(run: &Run) -> Verdict {
    let mut v = Verdict::default();
    let mut dead_before: BTreeSet<u64> = BTreeSet::new();
    let mut dead_before_step = 0;
    let last = run.images.len() - 1;
    for (i, image) in run.images.iter().enumerate() {
        v.images += 1;
        v.torn += usize::from(image.torn);
        *v.by_label.entry(image.label.clone()).or_default() += 1;
        match check_image(image, &run.history) {
            Err(e) => v.failures.push(format!(
                "cut at step {} before {} ({}): {e}",
                image.step,
                image.label,
                if image.torn { "torn" } else { "clean" }
            )),
            Ok(r) if !image.torn => {
                // Durable dead letters stay (the run never redrives).
                if !dead_before.is_subset(&r.dead_letters) {
                    v.failures.push(format!(
                        "cut at step {}: dead letters {:?} durable at step {dead_before_step} are gone",
                        image.step,
                        dead_before.difference(&r.dead_letters).collect::<Vec<_>>()
                    ));
                }
                if i == last && r.dead_letters != run.dead_letters_listed {
                    v.failures.push(format!(
                        "after a clean shutdown the dead letters are {:?}, the broker listed {:?}",
                        r.dead_letters, run.dead_letters_listed
                    ));
                }
                dead_before = r.dead_letters;
                dead_before_step = image.step;
            }
            Ok(_) => {}
        }
    }
    v
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn every_acknowledged_write_survives_a_power_cut_at_every_file_system_boundary() {
    let t0 = Instant::now();
    let run = runtime().block_on(run_workload(11, false, Duration::from_millis(1), Start::Empty));
    let ran = t0.elapsed();
    let v = check_run(&run);
    assert!(
        v.failures.is_empty(),
        "{} failures, first: {:#?}",
        v.failures.len(),
        &v.failures[..v.failures.len().min(5)]
    );
    // The cuts covered what they must: syncs, compactions (write of the
    // temporary file, its fdatasync, the rename, the directory fsync), torn
    // tails, and acknowledgements in hand.
    assert!(run.compactions >= 2, "only {} compactions", run.compactions);
    for label in ["fdatasync", "write", "rename", "fsync dir", "create", "note"] {
        assert!(
            v.by_label.get(label).copied().unwrap_or(0) > 0,
            "no cut before {label}: {:?}",
            v.by_label
        );
    }
    // Timing decides how many cuts find unsynced bytes; dozens always do.
    assert!(v.torn > 40, "only {} torn images", v.torn);
    assert!(run.fsyncs > 20, "only {} fsyncs", run.fsyncs);
    eprintln!(
        "power loss: {} images ({} torn) over {} fsyncs and {} compactions; run {:?}, checks {:?}; {:?}",
        v.images,
        v.torn,
        run.fsyncs,
        run.compactions,
        ran,
        t0.elapsed() - ran,
        v.by_label
    );
}

/// Cuts during recovery itself: a broker restarted on what a cut left (a log
/// ending in half a frame, and a cut in the middle of a compaction) cuts the
/// torn tail, writes its epoch record, takes new work, and is cut again at
/// every boundary of that run. Nothing acknowledged before either cut is lost.
#[test]
fn a_broker_restarted_on_what_a_cut_left_survives_further_cuts() {
    let rt = runtime();
    let first = rt.block_on(run_workload(13, false, Duration::from_millis(1), Start::Empty));
    let log = data_dir().join(super::file_disk::LOG_FILE_NAME);
    // 1. Mid-run, durable state plus half a frame: recovery must cut it.
    let mut half_frame = first
        .images
        .iter()
        .filter(|i| !i.torn && i.files.get(&log).is_some_and(|b| !b.is_empty()))
        .nth(first.images.len() / 4)
        .expect("a clean mid-run image")
        .clone();
    half_frame
        .files
        .get_mut(&log)
        .unwrap()
        .extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    // 2. A torn cut in the middle of a compaction (the temp file may exist).
    let mid_compaction = first
        .images
        .iter()
        .rfind(|i| i.torn && (i.label == "rename" || i.label == "fsync dir"))
        .or_else(|| first.images.iter().rfind(|i| i.torn))
        .expect("a torn image")
        .clone();
    for (n, start) in [half_frame, mid_compaction].iter().enumerate() {
        let acknowledged = first.history.before(start);
        let second = rt.block_on(run_workload(
            20 + n as u64,
            false,
            Duration::from_millis(1),
            Start::After {
                image: start,
                acknowledged,
            },
        ));
        let v = check_run(&second);
        assert!(
            v.failures.is_empty(),
            "restart from the cut before {} at step {}: {} failures, first: {:#?}",
            start.label,
            start.step,
            v.failures.len(),
            &v.failures[..v.failures.len().min(3)]
        );
        if n == 0 {
            for label in ["set_len", "fsync"] {
                assert!(
                    v.by_label.get(label).copied().unwrap_or(0) > 0,
                    "recovery's truncation was not cut: {:?}",
                    v.by_label
                );
            }
        }
    }
}

#[test]
fn the_power_loss_check_catches_a_broker_that_answers_before_fdatasync() {
    // A longer fsync (5 ms, still realistic) so the early answer reaches the
    // client well before the sync ends, even on a loaded machine.
    let run = runtime().block_on(run_workload(12, true, Duration::from_millis(5), Start::Empty));
    let v = check_run(&run);
    assert!(
        v.failures
            .iter()
            .any(|f| f.contains("neither queued, delivered nor a dead letter") || f.contains("after recovery")),
        "an early answer went unnoticed: {} images, failures {:?}",
        v.images,
        v.failures
    );
}

#[test]
fn recovery_reads_what_the_model_kept() {
    // The model itself, end to end through FileDisk: a synced append is in
    // the clean image, an unsynced one only (as a prefix) in torn images.
    let fs = PageCacheFs::new(2);
    let mut disk = super::file_disk::FileDisk::open_in(Arc::new(fs.clone()), Path::new("/m")).unwrap();
    disk.try_append(b"durable").unwrap();
    disk.try_sync().unwrap();
    disk.try_append(b"+volatile").unwrap();
    // The disk writes the log's file header ahead of the first append and of a replace.
    let with_header = |rest: &[u8]| [crate::log::empty_log(), rest.to_vec()].concat();
    let clean = fs.crash_image("t", false);
    assert_eq!(clean.files[&PathBuf::from("/m/sagamq.log")], with_header(b"durable"));
    disk.try_replace(b"compacted").unwrap();
    let clean = fs.crash_image("t", false);
    assert_eq!(clean.files[&PathBuf::from("/m/sagamq.log")], with_header(b"compacted"));
}

#[test]
fn a_preallocated_log_is_overwritten_in_place_and_torn_images_keep_a_prefix_of_the_overwrite() {
    let frame = |payload: &[u8]| {
        let mut out = Vec::new();
        crate::log::encode_frame(payload, &mut out);
        out
    };
    let (first, second, third) = (frame(b"durable"), frame(b"+volatile"), frame(&[7u8; 70]));
    let fs = PageCacheFs::new(4);
    let log = PathBuf::from("/p/sagamq.log");
    let mut disk = super::file_disk::FileDisk::open_in(Arc::new(fs.clone()), Path::new("/p")).unwrap();
    disk.preallocate(64);
    disk.try_append(&first).unwrap();
    disk.try_sync().unwrap();
    let end = crate::log::FILE_HEADER_LEN + first.len();
    let clean = fs.crash_image("t", false).files[&log].clone();
    assert_eq!(clean.len(), end + 64, "grown by a slice of zeros past the log");
    assert!(clean[end..].iter().all(|b| *b == 0));
    assert_eq!(disk.len(), end as u64);
    disk.try_append(&second).unwrap();
    let mut seen_partial = false;
    for _ in 0..60 {
        let torn = &fs.crash_image("t", true).files[&log];
        assert_eq!(torn.len(), clean.len(), "an overwrite does not change the size");
        assert_eq!(torn[..end], clean[..end]);
        // A prefix of the overwrite, then the old zeros.
        let kept = (0..second.len())
            .rev()
            .find(|&i| torn[end + i] != 0)
            .map_or(0, |i| i + 1);
        assert_eq!(&torn[end..end + kept], &second[..kept]);
        assert!(torn[end + kept..].iter().all(|b| *b == 0), "{torn:?}");
        seen_partial |= kept > 0 && kept < second.len();
    }
    assert!(seen_partial, "no torn image kept part of the overwrite");
    // Past the slice: grown again by a slice.
    disk.try_append(&third).unwrap();
    disk.try_sync().unwrap();
    let now = fs.crash_image("t", false).files[&log].clone();
    let log_len = end + second.len() + third.len();
    assert_eq!(now.len(), log_len + 64);
    // Recovery reads the records, and the zeros after them as no record.
    drop(disk);
    let mut disk = super::file_disk::FileDisk::open_in(Arc::new(fs.clone()), Path::new("/p")).unwrap();
    let bytes = disk.try_read_all().unwrap();
    let r = crate::log::decode_all(&bytes).unwrap();
    assert_eq!((r.records.len(), r.valid_len), (3, log_len as u64));
    assert!(disk.adopt_zero_tail(r.valid_len).unwrap());
    assert_eq!(disk.len(), log_len as u64);
    disk.try_append(&first).unwrap();
    let bytes = disk.try_read_all().unwrap();
    assert_eq!(
        crate::log::decode_all(&bytes).unwrap().records.len(),
        4,
        "appended over the zeros"
    );
    assert_eq!(bytes.len(), log_len + 64, "no growth while the zeros last");
}

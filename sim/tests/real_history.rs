//! The simulator's oracle judges the real broker. A history is recorded from
//! outside a `sagamq serve` process (subscribe and publish requests and their
//! answers, every callback each subscriber receives and how it answered, a
//! `kill -9` and the restart) and fed to the same [`Checker`] that judges every
//! simulated run: dedup both ways, fidelity, entitlement, delivery order,
//! dead letters, and at the end the per-subscriber account (nothing
//! acknowledged lost). Then the same history with one callback erased, or one
//! delivery's content changed, must fail: the judgement can fail.
//!
//! The outside observer cannot see the broker's internal order, so the run is
//! shaped to keep the history's order the broker's: one sequential publisher
//! and one callback in flight per subscriber (`--inflight-per-subscriber 1`).
//! A publish's answer is placed before the first callback of its message (the
//! broker decides both once the message is durable; the answer may reach the
//! publisher later than the callback reaches a subscriber).
#![cfg(feature = "real")]

use sagamq::broker::{Callback, DeliveryId, Reply};
use sagamq::real::cli::read_listen_line;
use sagamq::real::client::{BrokerClient, CallbackHandler, Receiver};
use sagamq::real::clock::unix_nanos_now;
use sagamq::saga::order::OrderFlow;
use sagamq::{ClientId, GlobalId, Message, MessageKey, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use sagamq_sim::check::{BrokerSnapshot, Checker, Snapshot, Spec};
use sagamq_sim::history::Event;
use sagamq_sim::topology::{BROKER, PAYMENT, STOCK};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One recorded step, owned (the checker's events borrow).
#[derive(Clone, Debug)]
enum Rec {
    SubscribeAnswered {
        client: ClientId,
        topic: Topic,
        expire: Time,
        now: Time,
        until: Time,
    },
    PublishSent {
        publish: PublishRequest,
        now: Time,
    },
    PublishAnswered {
        key: MessageKey,
        reply: Reply,
    },
    Callback {
        node: usize,
        client: ClientId,
        message: Message,
        /// The broker's `x-sagamq-attempt` header.
        attempt: u32,
        ok: bool,
        now: Time,
    },
    Crashed,
    Booted,
}

#[derive(Default)]
struct History {
    start: Option<Instant>,
    recs: Mutex<Vec<(u64, Rec)>>,
}

impl History {
    fn push(&self, rec: Rec) {
        let at_ms = self.start.map_or(0, |s| s.elapsed().as_millis() as u64);
        self.recs.lock().unwrap().push((at_ms, rec));
    }

    /// The recorded steps, each publish answer moved before the first
    /// callback of its message (see the module's note).
    fn ordered(&self) -> Vec<(u64, Rec)> {
        let mut recs = self.recs.lock().unwrap().clone();
        let mut i = 0;
        while i < recs.len() {
            if let Rec::PublishAnswered { key, .. } = &recs[i].1
                && let Some(j) = recs[..i]
                    .iter()
                    .position(|(_, r)| matches!(r, Rec::Callback { message, .. } if message.key() == *key))
            {
                let (_, rec) = recs.remove(i);
                let at = recs[j].0;
                recs.insert(j, (at, rec));
            }
            i += 1;
        }
        recs
    }
}

/// Feeds `recs` to a fresh checker and judges the end (quiescent, the broker
/// holding no dead letters). Returns the checker.
fn judge(recs: &[(u64, Rec)], attempts_max: u32) -> Checker {
    let mut c = Checker::new(Spec {
        flow: OrderFlow::Saga,
        orders: BTreeMap::new(),
        stock: BTreeMap::new(),
        balances: BTreeMap::new(),
        attempts_max,
        grace: Duration::from_secs(300),
        dispatch_gap_max: Duration::from_secs(5),
        // The recorder sees receipts, not sends: a retry's receipt may come
        // sooner after its predecessor's than the broker's backoff (network
        // jitter), so the wait is not judged here; the numbering is.
        backoff_initial: Duration::ZERO,
        backoff_max: Duration::ZERO,
        // The broker runs with its default window; an answer is recorded
        // before the broker reads it, so the checker's count stays below
        // the broker's.
        inflight_max: sagamq::broker::BrokerConfig::default().inflight_per_subscriber_max,
        callback_timeout: sagamq::broker::BrokerConfig::default().callback_timeout,
        pending_max: sagamq::broker::BrokerConfig::default().pending_per_subscriber_max,
        messages_max: sagamq::broker::BrokerConfig::default().messages_max,
        unsynced_max: sagamq::broker::BrokerConfig::default().publishes_unsynced_max,
    });
    let mut delivery = 0;
    for (at_ms, rec) in recs {
        let at_ms = *at_ms;
        match rec {
            Rec::SubscribeAnswered {
                client,
                topic,
                expire,
                now,
                until,
            } => {
                c.observe(
                    at_ms,
                    Event::SubscribeReceived {
                        client,
                        topic,
                        expire: *expire,
                        now: *now,
                    },
                );
                c.observe(
                    at_ms,
                    Event::Subscribed {
                        client,
                        topic,
                        until: *until,
                    },
                );
            }
            Rec::PublishSent { publish, now } => c.observe(at_ms, Event::PublishReceived { publish, now: *now }),
            Rec::PublishAnswered { key, reply } => c.observe(at_ms, Event::PublishAnswered { key, reply }),
            Rec::Callback {
                node,
                client,
                message,
                attempt,
                ok,
                now,
            } => {
                delivery += 1;
                let cb = Callback {
                    delivery: DeliveryId(delivery),
                    client: client.clone(),
                    url: String::new(),
                    message: message.clone(),
                    attempt: *attempt,
                };
                c.observe(
                    at_ms,
                    Event::CallbackSent {
                        callback: &cb,
                        now: *now,
                    },
                );
                // The subscriber's answer, as it gave it (the broker reads
                // it a little later: the checker's window count stays below
                // the broker's).
                c.observe(
                    at_ms,
                    Event::AnswerReceived {
                        delivery: cb.delivery,
                        ok: *ok,
                    },
                );
                if *ok {
                    c.observe(
                        at_ms,
                        Event::Processed {
                            node: *node,
                            client,
                            key: &message.key(),
                        },
                    );
                }
            }
            Rec::Crashed => c.observe(at_ms, Event::Crashed { node: BROKER }),
            Rec::Booted => c.observe(
                at_ms,
                Event::Booted {
                    node: BROKER,
                    records: 1,
                    torn_bytes: 0,
                },
            ),
        }
    }
    let reflects = |_: usize, _: &Message| None;
    let at_ms = recs.last().map_or(0, |(t, _)| *t);
    c.liveness(&Snapshot {
        at_ms,
        down: vec![],
        broker: Some(BrokerSnapshot::default()),
        views: vec![],
        unsettled: vec![],
        workload_waiting: false,
        reflects: &reflects,
        recorded: None,
    });
    c
}

/// The `sagamq` binary of this build (the workspace's, built with `real`
/// next to this test's executable).
fn broker_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("sagamq");
    assert!(
        bin.exists(),
        "{} not built: run with `cargo test --workspace --all-features`",
        bin.display()
    );
    bin
}

fn spawn(dir: &Path) -> (Child, String) {
    let mut child = Command::new(broker_bin())
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--retry-initial-ms",
            "10",
            "--retry-max-ms",
            "50",
            "--callback-timeout-ms",
            "1000",
            "--inflight-per-subscriber",
            "1",
            "--data",
        ])
        .arg(dir)
        .env_remove("SAGAMQ_TOKEN")
        .env_remove("SAGAMQ_SIGNING_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sagamq");
    let url = read_listen_line(&mut child).expect("broker prints its address");
    (child, url)
}

/// A subscriber that records each callback into the history and answers 500
/// to every `fail_every`-th (0: never).
async fn subscriber(history: &Arc<History>, node: usize, client: &str, fail_every: usize) -> Receiver {
    let (h, client) = (history.clone(), ClientId::lit(client));
    let seen = Arc::new(Mutex::new(0usize));
    let handler: CallbackHandler = Arc::new(move |headers, body| {
        let Ok(message) = serde_json::from_slice::<Message>(body) else {
            return axum::http::StatusCode::BAD_REQUEST;
        };
        let attempt = headers
            .get("x-sagamq-attempt")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let n = {
            let mut s = seen.lock().unwrap();
            *s += 1;
            *s
        };
        let ok = fail_every == 0 || n % fail_every != 0;
        h.push(Rec::Callback {
            node,
            client: client.clone(),
            message,
            attempt,
            ok,
            now: Time(unix_nanos_now()),
        });
        if ok {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        }
    });
    Receiver::start("127.0.0.1:0".parse().unwrap(), handler)
        .await
        .expect("receiver binds")
}

async fn subscribe(history: &History, c: &BrokerClient, client: &str, topic: &str, url: &str) {
    let now = Time(unix_nanos_now());
    let expire = Time(now.0 + 3_600_000_000_000);
    let req = SubscribeRequest {
        client_id: ClientId::lit(client),
        topic: Topic::lit(topic),
        notify_url: url.to_string(),
        expire_time: expire,
    };
    let until = c.subscribe(&req).await.expect("subscribe");
    history.push(Rec::SubscribeAnswered {
        client: req.client_id,
        topic: req.topic,
        expire,
        now,
        until,
    });
}

/// Publishes `p` once; records it and its answer. False if the broker did not answer.
async fn publish(history: &History, c: &BrokerClient, p: &PublishRequest) -> bool {
    history.push(Rec::PublishSent {
        publish: p.clone(),
        now: Time(unix_nanos_now()),
    });
    match c.publish(p).await {
        Ok(ack) => {
            history.push(Rec::PublishAnswered {
                key: p.key(),
                reply: Reply::Published {
                    msg_id: ack.msg_id,
                    duplicate: ack.duplicate,
                },
            });
            true
        }
        Err(_) => false,
    }
}

fn request(n: usize) -> PublishRequest {
    let topic = if n.is_multiple_of(3) { "history.b" } else { "history.a" };
    PublishRequest {
        global_id: GlobalId::lit(&format!("h-{n}")),
        sub_id: SubId::lit("1"),
        sender_id: SenderId::lit("history-test"),
        create_time: unix_nanos_now() as i64,
        topic: Topic::lit(topic),
        content: format!("payload {n}"),
    }
}

/// Records the history of a run with a `kill -9` in the middle of a publishing load.
async fn record() -> (Vec<(u64, Rec)>, usize) {
    let dir = std::env::temp_dir().join(format!("sagamq-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let history = Arc::new(History {
        start: Some(Instant::now()),
        ..History::default()
    });
    let s1 = subscriber(&history, STOCK, "history-s1", 0).await;
    let s2 = subscriber(&history, PAYMENT, "history-s2", 5).await;
    let (mut child, url) = spawn(&dir);
    let c = BrokerClient::new(url, None);
    let url1 = format!("http://{}/cb", s1.addr);
    let url2 = format!("http://{}/cb", s2.addr);
    subscribe(&history, &c, "history-s1", "history.a", &url1).await;
    subscribe(&history, &c, "history-s1", "history.b", &url1).await;
    subscribe(&history, &c, "history-s2", "history.b", &url2).await;

    // A sequential publisher: every tenth request is sent twice (a retry).
    let mut sent: Vec<PublishRequest> = Vec::new();
    for n in 0..150 {
        let p = request(n);
        assert!(publish(&history, &c, &p).await, "publish {n} before the crash");
        if n.is_multiple_of(10) {
            assert!(publish(&history, &c, &p).await);
        }
        sent.push(p);
    }
    // kill -9 with a publish in flight.
    let inflight = request(150);
    let c2 = c.clone();
    let p2 = inflight.clone();
    let h2 = history.clone();
    let pending = tokio::spawn(async move { publish(&h2, &c2, &p2).await });
    child.kill().unwrap();
    child.wait().unwrap();
    history.push(Rec::Crashed);
    let _ = pending.await;
    sent.push(inflight);

    let (mut child, url) = spawn(&dir);
    history.push(Rec::Booted);
    let c = BrokerClient::new(url, None);
    // Retry the last publishes (one may not have been answered) and go on.
    for p in sent.iter().rev().take(5) {
        assert!(publish(&history, &c, p).await, "retry after the restart");
    }
    for n in 151..250 {
        assert!(publish(&history, &c, &request(n)).await);
    }
    // Wait until every acknowledged message reached each subscriber with a 2xx.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let recs = history.recs.lock().unwrap().clone();
        let acked: BTreeSet<MessageKey> = recs
            .iter()
            .filter_map(|(_, r)| match r {
                Rec::PublishAnswered { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let done = |client: &str, b_only: bool| -> bool {
            let got: BTreeSet<MessageKey> = recs
                .iter()
                .filter_map(|(_, r)| match r {
                    Rec::Callback {
                        client: c,
                        message,
                        ok: true,
                        ..
                    } if c.as_str() == client => Some(message.key()),
                    _ => None,
                })
                .collect();
            let topic_of = |k: &MessageKey| {
                let n: usize = k.global_id.as_str()[2..].parse().unwrap();
                n.is_multiple_of(3)
            };
            acked.iter().filter(|k| !b_only || topic_of(k)).all(|k| got.contains(k))
        };
        if done("history-s1", false) && done("history-s2", true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every acknowledged publish was delivered within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Quiet for a moment: nothing more arrives that the checker should see.
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    s1.stop().await;
    s2.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    let recs = history.ordered();
    let n = recs.len();
    (recs, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_checker_judges_a_real_broker_history_across_a_kill_9() {
    let (recs, n) = record().await;
    let callbacks = recs.iter().filter(|(_, r)| matches!(r, Rec::Callback { .. })).count();
    let failed = recs
        .iter()
        .filter(|(_, r)| matches!(r, Rec::Callback { ok: false, .. }))
        .count();
    println!("real history: {n} steps, {callbacks} callbacks ({failed} answered 500)");
    assert!(failed > 0, "the failing subscriber never failed: no redelivery judged");

    // The recorded history passes the oracle.
    let c = judge(&recs, 12);
    assert_eq!(c.violations(), &[], "the real broker's history fails the oracle");
    let account = c.account();
    assert_eq!(account.lost, 0);
    assert!(account.duplicated > 0 || failed > 0, "{account:?}");
    assert!(c.coverage()["duplicate_publish"] > 0, "{:?}", c.coverage());

    // The judgement can fail: a message's only 2xx delivery to a subscriber
    // erased from the history (a lost message) ...
    let ok_deliveries = |key: &MessageKey, to: &ClientId| {
        recs.iter()
            .filter(|(_, r)| matches!(r, Rec::Callback { message, client, ok: true, .. } if message.key() == *key && client == to))
            .count()
    };
    let only = recs
        .iter()
        .position(|(_, r)| matches!(r, Rec::Callback { message, client, ok: true, .. } if ok_deliveries(&message.key(), client) == 1))
        .expect("a message delivered once");
    let mut lost = recs.clone();
    lost.remove(only);
    let c = judge(&lost, 12);
    // (Erasing a first attempt also breaks the order of first attempts.)
    assert!(
        c.violations().iter().any(|v| v.invariant == "no-lost-publish"),
        "{:?}",
        c.violations()
    );
    assert_eq!(c.account().lost, 1);
    let last_ok = only;
    // ... one delivery's content changed ...
    let mut changed = recs.clone();
    if let (_, Rec::Callback { message, .. }) = &mut changed[last_ok] {
        message.content.push('!');
    }
    let c = judge(&changed, 12);
    assert_eq!(c.violations().first().map(|v| v.invariant), Some("fidelity"));
    // ... and one retried publish answered with another id.
    let mut dedup = recs.clone();
    let retry = dedup
        .iter()
        .rposition(|(_, r)| {
            matches!(
                r,
                Rec::PublishAnswered {
                    reply: Reply::Published { duplicate: true, .. },
                    ..
                }
            )
        })
        .expect("a retried publish");
    if let (_, Rec::PublishAnswered { reply, .. }) = &mut dedup[retry] {
        *reply = Reply::Published {
            msg_id: sagamq::MsgId(999_999),
            duplicate: true,
        };
    }
    let c = judge(&dedup, 12);
    assert_eq!(c.violations().first().map(|v| v.invariant), Some("dedup"));
}

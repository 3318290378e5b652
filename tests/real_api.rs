//! The real broker's HTTP API, in process on loopback with ephemeral ports:
//! dedup, redelivery to a subscriber that was down, bad input, the token, the
//! callback signature, the allowlist, dead letters and compaction.
#![cfg(feature = "real")]

mod real_support;

use real_support::*;
use sagamq::real::callbacks::{Allowlist, SIGNATURE_TOLERANCE_DEFAULT, SignatureError, verify, verify_now};
use sagamq::real::client::BrokerClient;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_publish_answers_the_original_msg_id_and_delivers_once_also_after_restart() {
    let dir = temp_dir("dedup");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();

    let first = c.publish(&publish("g1", "t", "one")).await.unwrap();
    assert!(!first.duplicate);
    // Same (GlobalID, SubID), even with other content: the original stands.
    let again = c.publish(&publish("g1", "t", "changed")).await.unwrap();
    assert_eq!(again.msg_id, first.msg_id);
    assert!(again.duplicate);
    let other = c.publish(&publish("g2", "t", "two")).await.unwrap();
    assert_ne!(other.msg_id, first.msg_id);
    eventually(10, "two deliveries", || inbox.count() >= 2).await;

    broker.shutdown().await.unwrap();
    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    let after = c.publish(&publish("g1", "t", "again")).await.unwrap();
    assert_eq!((after.msg_id, after.duplicate), (first.msg_id, true));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let msgs = inbox.messages.lock().unwrap().clone();
    assert_eq!(msgs.len(), 2, "delivered exactly once each: {msgs:?}");
    assert_eq!(
        msgs.iter().find(|m| m.global_id.as_str() == "g1").unwrap().content,
        "one"
    );
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_is_down_then_back_receives_everything() {
    let dir = temp_dir("down");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let addr = rx.addr;
    let url = rx.url("/cb");
    let mut o = options(&dir);
    o.broker.attempts_max = 1_000;
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &url)).await.unwrap();
    rx.stop().await; // the subscriber goes down

    const N: usize = 30;
    for i in 0..N {
        c.publish(&publish(&format!("m{i}"), "t", "x")).await.unwrap();
    }
    // Attempts fail while it is down.
    let st = broker.driver();
    let mut failed = 0;
    for _ in 0..200 {
        failed = st.stats().await.unwrap().io.callbacks_failed;
        if failed >= N as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(failed >= N as u64, "only {failed} failed attempts while down");
    assert_eq!(inbox.count(), 0);

    let rx = inbox.serve(addr).await; // back, same URL
    eventually(15, "every message after the subscriber came back", || {
        inbox.delivered_gids().len() == N
    })
    .await;
    let stats = st.stats().await.unwrap();
    assert_eq!(stats.broker.subscribers[&sagamq::ClientId::lit("s1")].dead_letters, 0);
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_json_error_and_stores_nothing() {
    let dir = temp_dir("bad");
    let mut o = options(&dir);
    o.body_len_max = 100 * 1024;
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    let good = json!({"GlobalID":"g","SubID":"s","SenderID":"x","CreateTime":1,"Topic":"t","Content":"c"});
    let with = |k: &str, v: serde_json::Value| {
        let mut j = good.clone();
        j[k] = v;
        serde_json::to_vec(&j).unwrap()
    };
    let without = |k: &str| {
        let mut j = good.clone();
        j.as_object_mut().unwrap().remove(k);
        serde_json::to_vec(&j).unwrap()
    };
    let past = json!({"ClientID":"c","Topic":"t","NotifyUrl":"http://127.0.0.1:1/x","ExpireTime":1});
    let sub = |url: &str| {
        serde_json::to_vec(&json!({"ClientID":"c","Topic":"t","NotifyUrl":url,"ExpireTime":far_future().0})).unwrap()
    };
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed json",
            "/publish",
            b"{\"GlobalID\":".to_vec(),
            400,
            "invalid request",
        ),
        ("not json", "/publish", b"hello".to_vec(), 400, "invalid request"),
        ("empty body", "/publish", Vec::new(), 400, "invalid request"),
        (
            "missing field",
            "/publish",
            without("GlobalID"),
            400,
            "missing field `GlobalID`",
        ),
        (
            "missing content",
            "/publish",
            without("Content"),
            400,
            "missing field `Content`",
        ),
        (
            "unknown field",
            "/publish",
            with("Extra", json!(1)),
            400,
            "unknown field `Extra`",
        ),
        (
            "empty id",
            "/publish",
            with("SubID", json!("")),
            400,
            "SubID must not be empty",
        ),
        (
            "oversized id",
            "/publish",
            with("GlobalID", json!("g".repeat(257))),
            400,
            "longer than the limit",
        ),
        (
            "control char",
            "/publish",
            with("Topic", json!("a\nb")),
            400,
            "control character",
        ),
        (
            "wrong type",
            "/publish",
            with("CreateTime", json!("soon")),
            400,
            "invalid type",
        ),
        (
            "content too long",
            "/publish",
            with("Content", json!("x".repeat(64 * 1024 + 1))),
            400,
            "Content is",
        ),
        (
            "body over limit",
            "/publish",
            with("Content", json!("x".repeat(200 * 1024))),
            413,
            "larger than the limit",
        ),
        (
            "expired subscription",
            "/subscribe",
            serde_json::to_vec(&past).unwrap(),
            400,
            "ExpireTime is in the past",
        ),
        (
            "url off allowlist",
            "/subscribe",
            sub("http://10.0.0.1/cb"),
            400,
            "allowlist",
        ),
        (
            "metadata url",
            "/subscribe",
            sub("http://169.254.169.254/latest"),
            400,
            "allowlist",
        ),
        ("ftp url", "/subscribe", sub("ftp://127.0.0.1/cb"), 400, "scheme"),
        ("not a url", "/subscribe", sub("cb"), 400, "not a valid URL"),
        ("empty url", "/subscribe", sub(""), 400, "NotifyUrl"),
        (
            "empty client",
            "/subscribe",
            serde_json::to_vec(
                &json!({"ClientID":"","Topic":"t","NotifyUrl":"http://127.0.0.1/","ExpireTime":far_future().0}),
            )
            .unwrap(),
            400,
            "ClientID must not be empty",
        ),
        (
            "unsubscribe unknown",
            "/unsubscribe",
            serde_json::to_vec(&json!({"ClientID":"c","Topic":"t"})).unwrap(),
            404,
            "no such subscription",
        ),
        (
            "redrive bad",
            "/dead-letters/redrive",
            serde_json::to_vec(&json!({"Client":"c"})).unwrap(),
            400,
            "unknown field",
        ),
        ("unknown route", "/nope", Vec::new(), 404, "no such route"),
    ];
    for (name, path, body, status, needle) in cases {
        let (got, v) = c.post_raw(path, body).await.unwrap();
        assert_eq!(got, status, "{name}: {v}");
        assert_eq!(v["ok"], json!(false), "{name}: {v}");
        let err = v["error"].as_str().unwrap_or("");
        assert!(err.contains(needle), "{name}: error {err:?} lacks {needle:?}");
    }
    let (got, v) = c.get_json("/dead-letters").await.unwrap();
    assert_eq!((got, v["ok"].clone()), (400, json!(false)), "{v}");
    let (got, v) = c
        .get_json(&format!("/dead-letters?client={}", "c".repeat(300)))
        .await
        .unwrap();
    assert_eq!(got, 400, "{v}");
    let (got, _) = c.get_json("/publish").await.unwrap();
    assert_eq!(got, 405);

    let st = broker.driver().stats().await.unwrap();
    assert_eq!(st.broker.messages_live, 0);
    assert_eq!(st.broker.subscriptions, 0);
    assert_eq!(st.broker.log_records, 0, "a refused request wrote to the log");
    assert_eq!(st.io.fsyncs, 0);
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_mutating_routes_and_signs_callbacks() {
    let dir = temp_dir("token");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let mut o = options(&dir);
    o.token = Some("s3cret".into());
    let broker = start(o).await;
    let anon = BrokerClient::new(broker.url(), None);
    let wrong = BrokerClient::new(broker.url(), Some("guess".into()));
    let right = BrokerClient::new(broker.url(), Some("s3cret".into()));
    let body = serde_json::to_vec(&publish("g1", "t", "c")).unwrap();
    for (who, c) in [("anonymous", &anon), ("wrong token", &wrong)] {
        for path in ["/publish", "/subscribe", "/unsubscribe", "/dead-letters/redrive"] {
            let (status, v) = c.post_raw(path, body.clone()).await.unwrap();
            assert_eq!(status, 401, "{who} {path}: {v}");
            assert!(v["error"].as_str().unwrap().contains("Bearer"));
        }
        let (status, _) = c.get_json("/dead-letters?client=a").await.unwrap();
        assert_eq!(status, 401, "{who} reads dead letters");
    }
    // Read-only health and monitoring stay open.
    for path in ["/ping", "/stats", "/metrics"] {
        let (status, _) = anon.get_json(path).await.unwrap();
        assert_eq!(status, 200, "{path}");
    }
    right.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    right.publish(&publish("g1", "t", "signed")).await.unwrap();
    eventually(10, "the signed callback", || inbox.count() == 1).await;
    let sig = inbox.signatures.lock().unwrap()[0]
        .clone()
        .expect("X-SagaMQ-Signature present");
    let body = inbox.bodies.lock().unwrap()[0].clone();
    assert!(sig.starts_with("t="), "{sig}");
    // Signed with the key generated in the data directory, never the token:
    // a subscriber that verifies callbacks cannot publish with what it holds.
    let key = sagamq::real::signing_key::load(&dir)
        .unwrap()
        .expect("a key was generated");
    assert_eq!(key, broker.signing_key);
    assert_ne!(key, "s3cret");
    assert_eq!(verify_now(key.as_bytes(), &body, &sig), Ok(()));
    assert_eq!(verify_now(b"s3cret", &body, &sig), Err(SignatureError::Mismatch));
    let mut tampered = body.clone();
    tampered[5] ^= 1;
    assert_eq!(
        verify_now(key.as_bytes(), &tampered, &sig),
        Err(SignatureError::Mismatch)
    );
    // The callback body is the message with the Go design's field names.
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for k in [
        "MsgID",
        "GlobalID",
        "SubID",
        "SenderID",
        "CreateTime",
        "Topic",
        "Content",
    ] {
        assert!(v.get(k).is_some(), "callback lacks {k}: {v}");
    }
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_signing_key_signs_instead_of_the_token() {
    let dir = temp_dir("sigkey");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let mut o = options(&dir);
    o.token = Some("publish-token".into());
    o.signing_key = Some("callback-key".into());
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), Some("publish-token".into()));
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    eventually(10, "callback", || inbox.count() == 1).await;
    let sig = inbox.signatures.lock().unwrap()[0].clone().unwrap();
    let body = inbox.bodies.lock().unwrap()[0].clone();
    assert_eq!(verify_now(b"callback-key", &body, &sig), Ok(()));
    assert!(verify_now(b"publish-token", &body, &sig).is_err());
    assert_eq!(
        sagamq::real::signing_key::load(&dir).unwrap(),
        None,
        "a given key generates none"
    );
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

/// A callback captured off the wire verifies now and is refused once it is
/// older than the tolerance (the timestamp is signed with the body, so it
/// cannot be refreshed without the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_callback_replayed_after_the_tolerance_is_refused() {
    let dir = temp_dir("replay");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let broker = start(options(&dir)).await;
    let key = broker.signing_key.clone();
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    c.publish(&publish("g1", "t", "pay 10")).await.unwrap();
    eventually(10, "callback", || inbox.count() == 1).await;
    let sig = inbox.signatures.lock().unwrap()[0].clone().unwrap();
    let body = inbox.bodies.lock().unwrap()[0].clone();
    let now = sagamq::real::callbacks::unix_secs_now();
    let tolerance = SIGNATURE_TOLERANCE_DEFAULT;
    assert_eq!(verify(key.as_bytes(), &body, &sig, now, tolerance), Ok(()));
    let later = now + tolerance.as_secs() + 2;
    match verify(key.as_bytes(), &body, &sig, later, tolerance) {
        Err(SignatureError::OutsideTolerance { .. }) => {}
        other => panic!("a replay after the tolerance was {other:?}"),
    }
    // Restamping the capture with a fresh time breaks the signature.
    let (t, v1) = sig.split_once(',').unwrap();
    let fresh = format!("t={later},{v1}");
    assert_ne!(t, format!("t={later}"));
    assert_eq!(
        verify(key.as_bytes(), &body, &fresh, later, tolerance),
        Err(SignatureError::Mismatch)
    );
    // The key survives a restart: subscribers keep verifying.
    broker.shutdown().await.unwrap();
    let broker = start(options(&dir)).await;
    assert_eq!(broker.signing_key, key);
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_equal_to_the_token_is_refused() {
    let dir = temp_dir("samekey");
    let mut o = options(&dir);
    o.token = Some("one-secret".into());
    o.signing_key = Some("one-secret".into());
    let err = sagamq::real::start(o).await.err().expect("refused");
    assert!(err.to_string().contains("must differ from the API token"), "{err}");
    assert!(!dir.join("sagamq.log").exists(), "nothing touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_is_enforced_at_subscribe_and_again_at_delivery() {
    let dir = temp_dir("allow");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    // Subscribed while loopback was allowed...
    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    broker.shutdown().await.unwrap();

    // ...then restarted with an allowlist that excludes loopback.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["10.9.9.9", "*.internal.example"]).unwrap();
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    let (status, v) = c
        .post_json("/subscribe", &subscribe("s2", "t", &rx.url("/cb")))
        .await
        .unwrap();
    assert_eq!(status, 400, "{v}");
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    let d = broker.driver();
    let mut failed = 0;
    for _ in 0..300 {
        failed = d.stats().await.unwrap().io.callbacks_failed;
        if failed >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(failed >= 2, "the stored loopback URL was not refused");
    assert_eq!(inbox.bodies.lock().unwrap().len(), 0, "a refused host was contacted");
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

/// A host allowed by name that resolves to loopback is refused unless an
/// address entry allows it, at subscribe and at delivery; the broker's own
/// routes (`/metrics`) are never a callback target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_inward_is_refused_unless_allowed_by_address() {
    let dir = temp_dir("resolve");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let by_name = format!("http://localhost:{}/cb", rx.addr.port());

    // Allowed by name only: `localhost` resolves to 127.0.0.1, refused.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["localhost"]).unwrap();
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    let (status, v) = c
        .post_json("/subscribe", &subscribe("s1", "t", &by_name))
        .await
        .unwrap();
    assert_eq!(status, 400, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("127.0.0.1") && err.contains("loopback address"), "{err}");
    broker.shutdown().await.unwrap();

    // Allowed by address (a CIDR block): accepted and delivered.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["localhost", "127.0.0.0/8"]).unwrap();
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &by_name)).await.unwrap();
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    eventually(10, "delivery to the allowed address", || inbox.count() == 1).await;

    // The broker itself, under any name or loopback address, is refused.
    let port = broker.addr.port();
    for own in [
        format!("{}/metrics", broker.url()),
        format!("http://localhost:{port}/metrics"),
        format!("http://127.0.0.2:{port}/publish"),
    ] {
        let (status, v) = c.post_json("/subscribe", &subscribe("s2", "t", &own)).await.unwrap();
        assert_eq!(status, 400, "{own}: {v}");
        assert!(v["error"].as_str().unwrap().contains("own listening address"), "{v}");
    }
    broker.shutdown().await.unwrap();

    // A name stored while allowed is refused at delivery once it is not.
    let mut o = options(&dir);
    o.allow = Allowlist::parse(&["localhost"]).unwrap();
    o.broker.attempts_max = 1_000;
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    c.publish(&publish("g2", "t", "y")).await.unwrap();
    let d = broker.driver();
    let mut failed = 0;
    for _ in 0..500 {
        failed = d.stats().await.unwrap().io.callbacks_failed;
        if failed >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(failed >= 2, "the stored name was not refused at delivery");
    assert_eq!(inbox.count(), 1, "a refused address was contacted");
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_callbacks_become_dead_letters_and_redrive_delivers_them() {
    let dir = temp_dir("dead");
    let inbox = Arc::new(Inbox::default());
    inbox.status.store(500, Ordering::Relaxed);
    let rx = inbox.serve(loopback0()).await;
    let mut o = options(&dir);
    o.broker.attempts_max = 3;
    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    c.publish(&publish("g2", "t", "y")).await.unwrap();
    let d = broker.driver();
    let mut dead = 0;
    for _ in 0..500 {
        dead = d.stats().await.unwrap().broker.subscribers[&sagamq::ClientId::lit("s1")].dead_letters;
        if dead == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(dead, 2);
    assert_eq!(inbox.bodies.lock().unwrap().len(), 6, "3 attempts each");
    let (status, v) = c.get_json("/dead-letters?client=s1").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["Count"], json!(2));
    assert_eq!(v["Messages"][0]["GlobalID"], json!("g1"));

    inbox.status.store(200, Ordering::Relaxed);
    let (status, v) = c
        .post_json("/dead-letters/redrive", &json!({"ClientID":"s1"}))
        .await
        .unwrap();
    assert_eq!((status, v["Redriven"].clone()), (200, json!(2)), "{v}");
    eventually(10, "redriven messages delivered", || inbox.count() == 2).await;
    let (_, v) = c.get_json("/dead-letters?client=s1").await.unwrap();
    assert_eq!(v["Count"], json!(0));
    let (_, metrics) = c.get_json("/stats").await.unwrap();
    assert_eq!(metrics["subscribers"]["s1"]["dead_letters"], json!(0));
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_log_bounded_and_recovery_keeps_dedup() {
    let dir = temp_dir("compact");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let mut o = options(&dir);
    o.broker.compact_garbage_records_min = 50;
    let broker = start(o.clone()).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &rx.url("/cb"))).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..400 {
        ids.push(c.publish(&publish(&format!("g{i}"), "t", "x")).await.unwrap().msg_id);
    }
    eventually(20, "all delivered", || inbox.delivered_gids().len() == 400).await;
    let d = broker.driver();
    let mut st = d.stats().await.unwrap();
    for _ in 0..100 {
        if st.broker.messages_live == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        st = d.stats().await.unwrap();
    }
    assert!(st.io.compactions > 0, "no compaction after 400 settled messages");
    assert!(
        st.broker.log_records < 400,
        "log holds {} records",
        st.broker.log_records
    );
    // Writes no request waits for (acks) reach the file within LAZY_SYNC_DELAY.
    let log = dir.join("sagamq.log");
    // (The file goes on with preallocated zeros: its valid prefix is the log.)
    eventually(5, "the file to hold every record the core wrote", || {
        let bytes = std::fs::read(&log).unwrap();
        sagamq::log::decode_all(&bytes).is_ok_and(|r| r.valid_len == st.broker.log_bytes)
    })
    .await;
    broker.shutdown().await.unwrap();

    let broker = start(o).await;
    let c = BrokerClient::new(broker.url(), None);
    let again = c.publish(&publish("g7", "t", "x")).await.unwrap();
    assert_eq!((again.msg_id, again.duplicate), (ids[7], true));
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_report_group_commit() {
    let dir = temp_dir("metrics");
    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.publish(&publish(&format!("g{i}"), "t", "x")).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (status, st) = c.get_json("/stats").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(st["publishes"]["acked"], json!(64));
    let fsyncs = st["io"]["fsyncs"].as_u64().unwrap();
    assert!((1..=64).contains(&fsyncs), "{st}");
    let resp = sagamq::real::callbacks::client_builder()
        .build()
        .unwrap()
        .get(format!("{}/metrics", broker.url()))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("# TYPE sagamq_fsyncs_total counter"));
    assert!(text.contains("sagamq_publishes_total{result=\"stored\"} 64"), "{text}");
    broker.shutdown().await.unwrap();
}

/// A broker reachable from the network must have a token, unless the
/// operator says `insecure` on purpose; loopback needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_without_a_token_is_refused_unless_insecure() {
    let dir = temp_dir("insecure");
    let mut o = options(&dir);
    o.addr = "0.0.0.0:0".parse().unwrap();
    let err = sagamq::real::start(o.clone()).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("without a token") && msg.contains("--insecure"), "{msg}");
    assert!(!dir.join("sagamq.log").exists(), "nothing touched");
    let mut with_token = o.clone();
    with_token.token = Some("t0ken".into());
    start(with_token).await.shutdown().await.unwrap();
    let mut insecure = o;
    insecure.insecure = true;
    start(insecure).await.shutdown().await.unwrap();
    // Loopback (the default) needs no token.
    start(options(&dir)).await.shutdown().await.unwrap();
}

/// Scoped tokens: a participant's token subscribes only as its own ClientID,
/// so it cannot re-subscribe another client with its own URL and drain that
/// client's queue; publishing and dead letters are scoped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_scoped_to_one_client_cannot_subscribe_as_another() {
    let dir = temp_dir("scoped");
    let inbox = Arc::new(Inbox::default());
    let rx = inbox.serve(loopback0()).await;
    let mut o = options(&dir);
    o.credentials = sagamq::real::auth::Auth::parse_file(
        r#"{"tokens":[
            {"name":"alice","token":"alice-token-0123456789","subscribe":["alice"],"dead_letters":["alice"]},
            {"name":"publisher","token":"publisher-token-01234","publish":true}
        ]}"#,
    )
    .unwrap();
    o.token = Some("admin-token-0123456789".into());
    let broker = start(o).await;
    let alice = BrokerClient::new(broker.url(), Some("alice-token-0123456789".into()));
    let publisher = BrokerClient::new(broker.url(), Some("publisher-token-01234".into()));
    let admin = BrokerClient::new(broker.url(), Some("admin-token-0123456789".into()));

    alice.subscribe(&subscribe("alice", "t", &rx.url("/a"))).await.unwrap();
    let (status, v) = alice
        .post_json("/subscribe", &subscribe("bob", "t", &rx.url("/steal")))
        .await
        .unwrap();
    assert_eq!(status, 403, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("\"alice\"") && err.contains("subscribe as ClientID \"bob\""),
        "{err}"
    );
    assert!(!err.contains("alice-token"), "a refusal must not echo the token: {err}");
    let (status, _) = alice
        .post_json("/unsubscribe", &serde_json::json!({"ClientID": "bob", "Topic": "t"}))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = alice.post_json("/publish", &publish("g0", "t", "x")).await.unwrap();
    assert_eq!(status, 403, "alice may not publish");
    let (status, _) = alice.get_json("/dead-letters?client=bob").await.unwrap();
    assert_eq!(status, 403);
    let (status, _) = alice.get_json("/dead-letters?client=alice").await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = alice
        .post_json("/dead-letters/redrive", &serde_json::json!({"ClientID": "bob"}))
        .await
        .unwrap();
    assert_eq!(status, 403);

    let (status, _) = publisher
        .post_json("/subscribe", &subscribe("alice", "t", &rx.url("/steal")))
        .await
        .unwrap();
    assert_eq!(status, 403, "publish rights do not include subscribing");
    publisher.publish(&publish("g1", "t", "x")).await.unwrap();
    eventually(10, "alice's delivery", || inbox.count() == 1).await;
    // The single --token still does everything.
    admin.subscribe(&subscribe("bob", "t", &rx.url("/b"))).await.unwrap();
    admin.publish(&publish("g2", "t", "y")).await.unwrap();
    let (status, _) = BrokerClient::new(broker.url(), Some("wrong-token-0123456789".into()))
        .post_json("/publish", &publish("g3", "t", "z"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    let st = broker.driver().stats().await.unwrap();
    assert_eq!(st.broker.subscriptions, 2, "refused subscriptions stored nothing");
    broker.shutdown().await.unwrap();
    rx.stop().await;
}

/// A graceful shutdown records the answers of callbacks in flight: a
/// subscriber that already took a message and answers 200 while the broker
/// stops does not get it again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_waits_for_callbacks_in_flight_so_a_restart_does_not_redeliver() {
    let dir = temp_dir("shutdown-inflight");
    let got: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let m: sagamq::Message = serde_json::from_slice(&body).unwrap();
                g.lock().unwrap().push(m.global_id.to_string());
                // The answer is still on its way when the broker is told to stop.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let url = format!("http://{}/cb", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    c.subscribe(&subscribe("s1", "t", &url)).await.unwrap();
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    eventually(10, "the subscriber took the message", || got.lock().unwrap().len() == 1).await;
    broker.shutdown().await.unwrap();

    let broker = start(options(&dir)).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(got.lock().unwrap().len(), 1, "redelivered after a clean restart");
    broker.shutdown().await.unwrap();
}

//! What a wall clock stepped across a restart does to subscriptions (the
//! broker reads Unix time once at start; within a process `now` is monotonic).
//!
//! **Behaviour checked:** stepped back, a persisted `ExpireTime` lies further
//! ahead, so the subscription stays entitled (and delivered to) longer:
//! nothing is lost. Stepped forward by less than the subscription grace, an
//! expired-looking subscription still gets new messages, queued with delivery
//! paused until it renews. Stepped forward by more, it gets none: what is
//! published meanwhile is not queued for it. Operators should slew, not step.

use super::client::{BrokerClient, Receiver};
use super::clock::unix_nanos_now;
use super::server::{self, ServeOptions};
use crate::types::{ClientId, GlobalId, Message, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use axum::http::StatusCode;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOUR: i64 = 3600;

fn publish(gid: &str) -> PublishRequest {
    PublishRequest {
        global_id: GlobalId::lit(gid),
        sub_id: SubId::lit("1"),
        sender_id: SenderId::lit("t"),
        create_time: 0,
        topic: Topic::lit("t"),
        content: "x".into(),
    }
}

fn subscribe(url: &str, expire_in: Duration) -> SubscribeRequest {
    SubscribeRequest {
        client_id: ClientId::lit("s1"),
        topic: Topic::lit("t"),
        notify_url: url.to_string(),
        expire_time: Time(unix_nanos_now() + u64::try_from(expire_in.as_nanos()).unwrap()),
    }
}

fn options(dir: &Path, step_secs: i64, grace: Duration) -> ServeOptions {
    let mut o = ServeOptions::new("127.0.0.1:0".parse().unwrap(), dir.to_path_buf());
    o.seed = 1;
    o.signing_key = Some("clock-step-key".into());
    o.broker.retry_backoff_initial = Duration::from_millis(10);
    o.broker.retry_backoff_max = Duration::from_millis(50);
    o.broker.subscription_grace = grace;
    o.test_clock_step_secs = step_secs;
    o
}

async fn delivered_within(got: &Mutex<Vec<String>>, gid: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if got.lock().unwrap().iter().any(|g| g == gid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_across_a_restart_moves_expiry_and_only_the_grace_protects_forward_steps() {
    let dir = std::env::temp_dir().join(format!("sagamq-clock-step-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    let rx = Receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |_: &axum::http::HeaderMap, body: &axum::body::Bytes| {
            if let Ok(m) = serde_json::from_slice::<Message>(body) {
                g.lock().unwrap().push(m.global_id.to_string());
            }
            StatusCode::OK
        }),
    )
    .await
    .unwrap();
    let url = rx.url("/cb");
    let no_grace = Duration::ZERO;

    // Real clock: a subscription for 1 s, then it lapses.
    let b = server::start(options(&dir, 0, no_grace)).await.unwrap();
    let c = BrokerClient::new(b.url(), None);
    c.subscribe(&subscribe(&url, Duration::from_secs(1))).await.unwrap();
    c.publish(&publish("live")).await.unwrap();
    assert!(delivered_within(&got, "live", Duration::from_secs(5)).await);
    b.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Stepped back an hour: the lapsed subscription is live again.
    let b = server::start(options(&dir, -HOUR, no_grace)).await.unwrap();
    let c = BrokerClient::new(b.url(), None);
    c.publish(&publish("stepped-back")).await.unwrap();
    assert!(
        delivered_within(&got, "stepped-back", Duration::from_secs(5)).await,
        "stepped back: the subscription should still be entitled"
    );
    // Renew for an hour of real time.
    c.subscribe(&subscribe(&url, Duration::from_secs(3600))).await.unwrap();
    b.shutdown().await.unwrap();

    // Stepped forward 2 h with a 3 h grace: queued, paused until renewal.
    let grace = Duration::from_secs(3 * 3600);
    let b = server::start(options(&dir, 2 * HOUR, grace)).await.unwrap();
    let c = BrokerClient::new(b.url(), None);
    c.publish(&publish("within-grace")).await.unwrap();
    assert!(
        !delivered_within(&got, "within-grace", Duration::from_millis(300)).await,
        "an expired-looking subscription is paused"
    );
    let st = b.driver().stats().await.unwrap();
    assert_eq!(st.broker.subscribers[&ClientId::lit("s1")].pending, 1, "kept, not lost");
    c.subscribe(&subscribe(&url, Duration::from_secs(4 * 3600)))
        .await
        .unwrap();
    assert!(
        delivered_within(&got, "within-grace", Duration::from_secs(5)).await,
        "delivered once renewed"
    );
    b.shutdown().await.unwrap();

    // Stepped forward 6 h, past the renewal and the grace: not entitled.
    let b = server::start(options(&dir, 6 * HOUR, no_grace)).await.unwrap();
    let c = BrokerClient::new(b.url(), None);
    c.publish(&publish("past-grace")).await.unwrap();
    let st = b.driver().stats().await.unwrap();
    assert_eq!(
        st.broker
            .subscribers
            .get(&ClientId::lit("s1"))
            .map_or(0, |s| s.pending + s.in_flight),
        0,
        "past the grace the publish is not queued for the subscriber"
    );
    assert!(!delivered_within(&got, "past-grace", Duration::from_millis(300)).await);
    b.shutdown().await.unwrap();
    rx.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

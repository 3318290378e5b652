//! Helpers shared by the `real_*` integration tests: temp dirs, an in-process
//! broker, a recording subscriber, bounded waits.
#![allow(dead_code)] // each test file uses a different subset

use sagamq::real::callbacks::SIGNATURE_HEADER;
use sagamq::real::client::{CallbackHandler, Receiver};
use sagamq::real::clock::unix_nanos_now;
use sagamq::real::{RunningBroker, ServeOptions};
use sagamq::{ClientId, GlobalId, Message, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "sagamq-test-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Options for a test broker: ephemeral port, fast retries.
pub fn options(dir: &std::path::Path) -> ServeOptions {
    let mut o = ServeOptions::new(loopback0(), dir.to_path_buf());
    o.seed = 7;
    o.broker.retry_backoff_initial = Duration::from_millis(10);
    o.broker.retry_backoff_max = Duration::from_millis(100);
    o.broker.callback_timeout = Duration::from_secs(2);
    o
}

pub async fn start(o: ServeOptions) -> RunningBroker {
    sagamq::real::start(o).await.expect("broker starts")
}

pub fn far_future() -> Time {
    Time(unix_nanos_now() + 3_600_000_000_000)
}

pub fn publish(gid: &str, topic: &str, content: &str) -> PublishRequest {
    PublishRequest {
        global_id: GlobalId::lit(gid),
        sub_id: SubId::lit("1"),
        sender_id: SenderId::lit("test"),
        create_time: unix_nanos_now() as i64,
        topic: Topic::lit(topic),
        content: content.to_string(),
    }
}

pub fn subscribe(client: &str, topic: &str, url: &str) -> SubscribeRequest {
    SubscribeRequest {
        client_id: ClientId::lit(client),
        topic: Topic::lit(topic),
        notify_url: url.to_string(),
        expire_time: far_future(),
    }
}

/// A subscriber that records every callback and answers `status`.
#[derive(Default)]
pub struct Inbox {
    pub messages: Mutex<Vec<Message>>,
    pub signatures: Mutex<Vec<Option<String>>>,
    pub bodies: Mutex<Vec<Vec<u8>>>,
    /// 0 means 200.
    pub status: AtomicU16,
}

impl Inbox {
    pub fn handler(self: &Arc<Self>) -> CallbackHandler {
        let me = self.clone();
        Arc::new(move |headers, body| {
            let sig = headers
                .get(SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            me.signatures.lock().unwrap().push(sig);
            me.bodies.lock().unwrap().push(body.to_vec());
            let status = me.status.load(Ordering::Relaxed);
            if (status == 0 || (200..300).contains(&status))
                && let Ok(m) = serde_json::from_slice::<Message>(body)
            {
                me.messages.lock().unwrap().push(m);
            }
            let code = if status == 0 { 200 } else { status };
            axum::http::StatusCode::from_u16(code).unwrap()
        })
    }

    pub async fn serve(self: &Arc<Self>, addr: SocketAddr) -> Receiver {
        Receiver::start(addr, self.handler()).await.expect("receiver binds")
    }

    pub fn delivered_gids(&self) -> std::collections::BTreeSet<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.global_id.to_string())
            .collect()
    }

    pub fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }
}

/// Polls `cond` every 10 ms for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

//! A small client of the broker's HTTP API and a callback receiver, shared by
//! `sagamq demo`, `sagamq bench`, the participants' HTTP driver and the tests.
//!
//! **Invariant:** a publish counts as acknowledged only on a 2xx answer with
//! `"ok":true`, exactly what the broker sends once the record is fsynced.

use crate::types::{MsgId, PublishRequest, SubscribeRequest, Time};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[derive(Debug)]
pub enum ClientError {
    /// No answer (connection refused, timeout, broken body).
    Transport(reqwest::Error),
    /// The broker answered with an error.
    Refused { status: u16, error: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Transport(e) => write!(f, "no answer: {e}"),
            ClientError::Refused { status, error } => write!(f, "refused ({status}): {error}"),
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishAck {
    pub msg_id: MsgId,
    pub duplicate: bool,
}

#[derive(Clone, Debug)]
pub struct BrokerClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl BrokerClient {
    /// `base` like `http://127.0.0.1:3333`.
    pub fn new(base: impl Into<String>, token: Option<String>) -> BrokerClient {
        let http = super::callbacks::client_builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()
            .expect("reqwest client with static settings");
        BrokerClient {
            http,
            base: base.into().trim_end_matches('/').to_string(),
            token,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// POSTs raw bytes; answers the status and the JSON body (or `null`).
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Result<(u16, serde_json::Value), reqwest::Error> {
        let rb = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let resp = self.auth(rb).send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<(u16, serde_json::Value), reqwest::Error> {
        self.post_raw(path, serde_json::to_vec(body).expect("serializable body"))
            .await
    }

    pub async fn get_json(&self, path: &str) -> Result<(u16, serde_json::Value), reqwest::Error> {
        let resp = self.auth(self.http.get(format!("{}{path}", self.base))).send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    }

    fn check(status: u16, v: &serde_json::Value) -> Result<(), ClientError> {
        if (200..300).contains(&status) && v["ok"] == serde_json::Value::Bool(true) {
            Ok(())
        } else {
            Err(ClientError::Refused {
                status,
                error: v["error"].as_str().unwrap_or("no error text").to_string(),
            })
        }
    }

    pub async fn publish(&self, p: &PublishRequest) -> Result<PublishAck, ClientError> {
        let (status, v) = self.post_json("/publish", p).await.map_err(ClientError::Transport)?;
        Self::check(status, &v)?;
        Ok(PublishAck {
            msg_id: MsgId(v["MsgID"].as_u64().unwrap_or(0)),
            duplicate: v["Duplicate"].as_bool().unwrap_or(false),
        })
    }

    pub async fn subscribe(&self, s: &SubscribeRequest) -> Result<Time, ClientError> {
        let (status, v) = self.post_json("/subscribe", s).await.map_err(ClientError::Transport)?;
        Self::check(status, &v)?;
        Ok(Time(v["ExpireTime"].as_u64().unwrap_or(0)))
    }

    /// Polls `GET /ping` until it answers (bounded by `tries` × 20 ms).
    pub async fn wait_ready(&self, tries: u32) -> bool {
        for _ in 0..tries {
            if let Ok((200, _)) = self.get_json("/ping").await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// Decides the answer to one incoming callback (status code) from its headers and body.
pub type CallbackHandler = Arc<dyn Fn(&HeaderMap, &Bytes) -> StatusCode + Send + Sync>;

/// An HTTP server on loopback that hands every POST (any path) to a handler.
pub struct Receiver {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Binds `addr` (use port 0 for an ephemeral port).
    pub async fn start(addr: SocketAddr, handler: CallbackHandler) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let h = handler.clone();
            async move { h(&headers, &body) }
        });
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(Receiver {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops listening; open connections are closed (the subscriber "goes down").
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Graceful: idle keep-alive connections close at once, a callback being
        // answered finishes first. Bounded, then forced.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

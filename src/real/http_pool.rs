//! The client of plain-`http` callbacks: hyper HTTP/1.1 connections, kept
//! alive and pooled per address, with one deadline over the whole exchange.
//!
//! **Invariants:** a connection is only ever made to the address the caller
//! gives (one that passed the allowlist; this module never resolves a name);
//! the pool holds at most `idle_per_addr_max` idle connections per address and
//! [`POOL_ADDRESSES_MAX`] addresses, and drops a connection idle for longer
//! than [`IDLE_TIMEOUT`]; an answer body is read up to [`ANSWER_BODY_LEN_MAX`]
//! bytes (a longer one closes its connection); redirects are answers like any
//! other (never followed).
//!
//! reqwest did the same per callback with far more machinery (URL
//! re-serialisation, a tower stack, a timer per request and a pool keyed by
//! scheme and authority); `https` callbacks still go through reqwest.

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An idle connection older than this is closed instead of reused (servers
/// commonly close theirs after 60 s or more; reqwest's default was 90 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// Distinct callback addresses with idle connections kept; past it, the
/// pool forgets the addresses whose connections are all gone.
pub const POOL_ADDRESSES_MAX: usize = 10_000;
/// Bytes of a subscriber's answer read (and thrown away) to keep its connection.
pub const ANSWER_BODY_LEN_MAX: usize = 64 * 1024;

/// What one POST came to.
#[derive(Debug)]
pub enum PostError {
    /// No answer within the deadline (connect included).
    TimedOut,
    /// Connecting or the exchange failed.
    Failed(String),
}

struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since: Instant,
}

/// Keep-alive connections per address.
pub struct HttpPool {
    idle: Mutex<BTreeMap<SocketAddr, Vec<Idle>>>,
    idle_per_addr_max: usize,
    timeout: Duration,
}

/// The parts of a callback request that do not change between attempts on
/// two connections (a retry after a stale kept-alive one).
pub struct Post<'a> {
    pub path_and_query: &'a str,
    pub host: &'a HeaderValue,
    pub headers: &'a [(HeaderName, HeaderValue)],
    pub body: Bytes,
}

impl HttpPool {
    pub fn new(idle_per_addr_max: usize, timeout: Duration) -> HttpPool {
        HttpPool {
            idle: Mutex::new(BTreeMap::new()),
            idle_per_addr_max: idle_per_addr_max.max(1),
            timeout,
        }
    }

    /// POSTs to `addr` within the pool's deadline and answers the status.
    pub async fn post(&self, addr: SocketAddr, post: Post<'_>) -> Result<StatusCode, PostError> {
        match tokio::time::timeout(self.timeout, self.exchange(addr, &post)).await {
            Ok(r) => r,
            Err(_) => Err(PostError::TimedOut),
        }
    }

    async fn exchange(&self, addr: SocketAddr, post: &Post<'_>) -> Result<StatusCode, PostError> {
        // A kept-alive connection the server has meanwhile closed fails before
        // any answer: then once more on a fresh connection. The subscriber may
        // have seen the first one; deliveries are at-least-once either way.
        if let Some(sender) = self.take_idle(addr)
            && let Ok(status) = self.send(addr, sender, post).await
        {
            return Ok(status);
        }
        let sender = connect(addr).await?;
        match self.send(addr, sender, post).await {
            Ok(status) => Ok(status),
            Err(Stale) => Err(PostError::Failed(format!(
                "{addr} closed the connection without an answer"
            ))),
        }
    }

    async fn send(
        &self,
        addr: SocketAddr,
        mut sender: http1::SendRequest<Full<Bytes>>,
        post: &Post<'_>,
    ) -> Result<StatusCode, Stale> {
        if sender.ready().await.is_err() {
            return Err(Stale);
        }
        let mut req = Request::post(post.path_and_query);
        if let Some(h) = req.headers_mut() {
            h.insert(header::HOST, post.host.clone());
            for (name, value) in post.headers {
                h.insert(name.clone(), value.clone());
            }
        }
        let req = match req.body(Full::new(post.body.clone())) {
            Ok(r) => r,
            // A path the URL parser accepted is a valid request target; treat
            // anything else as a connection that cannot carry it.
            Err(_) => return Err(Stale),
        };
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => return Err(Stale),
        };
        let status = resp.status();
        let keep = Limited::new(resp.into_body(), ANSWER_BODY_LEN_MAX)
            .collect()
            .await
            .is_ok();
        if keep {
            self.put_idle(addr, sender);
        }
        Ok(status)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, sender: http1::SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.contains_key(&addr) && idle.len() >= POOL_ADDRESSES_MAX {
            idle.retain(|_, l| {
                l.retain(|i| !i.sender.is_closed() && i.since.elapsed() < IDLE_TIMEOUT);
                !l.is_empty()
            });
            if idle.len() >= POOL_ADDRESSES_MAX {
                return;
            }
        }
        let list = idle.entry(addr).or_default();
        if list.len() >= self.idle_per_addr_max {
            // Full: drop the oldest idle connection instead of this fresh one.
            list.remove(0);
        }
        list.push(Idle {
            sender,
            since: Instant::now(),
        });
    }
}

/// The connection was closed (or could not take the request) before any answer.
struct Stale;

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, PostError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| PostError::Failed(format!("connect {addr}: {e}")))?;
    // Small request/answer exchanges: never let Nagle hold a callback back.
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| PostError::Failed(format!("HTTP handshake with {addr}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("callback connection to {addr} closed: {e}");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 server: answers every request 200 and, with
    /// `close_after_answer`, closes the connection after its answer without
    /// saying so (what a server's idle timeout looks like to a pooled client).
    async fn server(close_after_answer: bool) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (acc, ans) = (accepted.clone(), answered.clone());
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                acc.fetch_add(1, Ordering::SeqCst);
                let ans = ans.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: head, then Content-Length bytes of body.
                        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + 4 + len {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + 4 + len);
                        ans.fetch_add(1, Ordering::SeqCst);
                        if tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if close_after_answer {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, answered)
    }

    fn post(host: &HeaderValue) -> Post<'_> {
        Post {
            path_and_query: "/cb?x=1",
            host,
            headers: &[],
            body: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_reused() {
        let (addr, accepted, answered) = server(false).await;
        let pool = HttpPool::new(4, Duration::from_secs(5));
        let host = HeaderValue::from_static("example");
        for _ in 0..5 {
            assert_eq!(pool.post(addr, post(&host)).await.unwrap(), StatusCode::OK);
        }
        assert_eq!(answered.load(Ordering::SeqCst), 5);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for sequential callbacks"
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_without_a_failure() {
        let (addr, accepted, answered) = server(true).await;
        let pool = HttpPool::new(4, Duration::from_secs(5));
        let host = HeaderValue::from_static("example");
        for i in 0..5 {
            // Let the server's close reach the pooled connection (or not): either way no failure.
            if i % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                pool.post(addr, post(&host)).await.unwrap(),
                StatusCode::OK,
                "callback {i}"
            );
        }
        assert_eq!(answered.load(Ordering::SeqCst), 5, "each callback answered once");
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn no_answer_within_the_deadline_is_a_timeout() {
        // Accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                open.push(tcp);
            }
        });
        let pool = HttpPool::new(4, Duration::from_millis(200));
        let host = HeaderValue::from_static("example");
        assert!(matches!(pool.post(addr, post(&host)).await, Err(PostError::TimedOut)));
    }
}

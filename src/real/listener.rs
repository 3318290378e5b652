//! The HTTP server's accept loop, with the bounds in front of the core: a
//! connection limit, a header read timeout (which also closes idle
//! keep-alive connections) and a graceful stop with a deadline. Bodies are
//! bounded in [`super::http`] (size and read time).
//!
//! **Invariant:** at most `connections_max` connections are served at once
//! (a permit is taken before `accept` and lives as long as the connection, so
//! past the limit new clients wait in the kernel's backlog instead of costing
//! memory); a connection that sends no complete request head within
//! `header_read_timeout`, first request or next, is closed.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

/// Connections served at once by default.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// A request head (or, on a kept-alive connection, the next one) must arrive within this.
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// A request body must arrive within this once its head did.
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest request head accepted (hyper's minimum buffer is 8 KiB).
const HEADER_BYTES_MAX: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
        }
    }
}

/// What the loop ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished within the grace.
    Drained,
    /// Connections were still open when the grace ran out (they are dropped).
    GraceExpired,
}

/// Serves `app` on `listener` until `stop` fires (or its sender is dropped),
/// then stops accepting, lets open requests finish (idle connections close
/// at once) and returns once all are done or `grace` has passed.
pub async fn serve(
    listener: TcpListener,
    app: super::http::Api,
    limits: ConnectionLimits,
    mut stop: oneshot::Receiver<()>,
    grace: Duration,
) -> Stopped {
    let slots = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(HEADER_BYTES_MAX)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut stop => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, _peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small request/response exchanges: never let Nagle hold a reply back.
        let _ = tcp.set_nodelay(true);
        let service = app.connection_service();
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => Stopped::Drained,
        Err(_) => Stopped::GraceExpired,
    }
}

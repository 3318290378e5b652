//! The bounds in front of the core, over raw TCP: a slow-loris head is cut at
//! the header timeout, a trickled body gets 408, idle connections are closed
//! so a flood of them cannot lock clients out, and past the connection limit
//! a client waits until a slot frees.
#![cfg(feature = "real")]

mod real_support;

use real_support::*;
use sagamq::real::client::BrokerClient;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until EOF or `within`; answers what was read and whether the peer closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn short_timeouts(dir: &std::path::Path) -> sagamq::real::ServeOptions {
    let mut o = options(dir);
    o.connections.header_read_timeout = Duration::from_millis(300);
    o.body_read_timeout = Duration::from_millis(300);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_head_is_cut_at_the_header_timeout() {
    let dir = temp_dir("loris-head");
    let broker = start(short_timeouts(&dir)).await;
    let mut s = TcpStream::connect(broker.addr).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // One header byte every 50 ms: never a complete head.
    let mut closed = false;
    for _ in 0..60 {
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let (_, eof) = read_until_closed(&mut s, Duration::from_millis(50)).await;
        if eof {
            closed = true;
            break;
        }
    }
    assert!(closed, "a head trickled for 3 s was not cut");
    assert!(t0.elapsed() < Duration::from_secs(2), "cut after {:?}", t0.elapsed());
    // The broker still serves others.
    let c = BrokerClient::new(broker.url(), None);
    c.publish(&publish("g1", "t", "x")).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408_and_stores_nothing() {
    let dir = temp_dir("loris-body");
    let broker = start(short_timeouts(&dir)).await;
    let mut s = TcpStream::connect(broker.addr).await.unwrap();
    s.write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"GlobalID\"")
        .await
        .unwrap();
    let t0 = Instant::now();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request body not received within"), "{answer}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        t0.elapsed()
    );
    let st = broker.driver().stats().await.unwrap();
    assert_eq!((st.broker.messages_live, st.broker.log_records), (0, 0), "{st:?}");
    assert_eq!(st.io.fsyncs, 0, "the core saw the request: {st:?}");
    broker.shutdown().await.unwrap();
}

async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

/// As many idle connections as the limit: without the idle cut, every slot
/// would stay taken and the real client below would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_is_cut_and_clients_get_through() {
    let dir = temp_dir("idle-flood");
    let mut o = short_timeouts(&dir);
    o.connections.connections_max = 16;
    let broker = start(o).await;
    let mut idle = idle_connections(broker.addr, 16).await;
    let t0 = Instant::now();
    let c = BrokerClient::new(broker.url(), None);
    let ack = tokio::time::timeout(Duration::from_secs(5), c.publish(&publish("g1", "t", "x")))
        .await
        .expect("a client was locked out by idle connections")
        .unwrap();
    assert!(!ack.duplicate);
    assert!(t0.elapsed() < Duration::from_secs(3), "served after {:?}", t0.elapsed());
    for s in &mut idle {
        let (got, closed) = read_until_closed(s, Duration::from_secs(2)).await;
        assert!(closed, "an idle connection stayed open");
        assert!(!got.contains("200 OK"), "{got}");
    }
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_a_client_waits_for_a_free_slot() {
    let dir = temp_dir("conn-limit");
    let mut o = options(&dir);
    o.connections.connections_max = 4;
    o.connections.header_read_timeout = Duration::from_secs(30);
    let broker = start(o).await;
    let idle = idle_connections(broker.addr, 4).await;
    // Give the accept loop time to take all four slots.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = BrokerClient::new(broker.url(), None);
    let waiting = tokio::spawn(async move { c.publish(&publish("g1", "t", "x")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth connection was served past a limit of 4"
    );
    drop(idle);
    let ack = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap()
        .unwrap();
    assert!(!ack.duplicate);
    broker.shutdown().await.unwrap();
}

/// The head limit (16 KiB) bounds headers only: the largest valid publish
/// (64 KiB of content) still goes through, and an oversized head is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_publish_passes_and_an_oversized_head_is_refused() {
    let dir = temp_dir("big-body");
    let broker = start(options(&dir)).await;
    let c = BrokerClient::new(broker.url(), None);
    let big = "x".repeat(sagamq::CONTENT_LEN_MAX);
    let ack = c.publish(&publish("big", "t", &big)).await.unwrap();
    assert!(!ack.duplicate);
    let mut s = TcpStream::connect(broker.addr).await.unwrap();
    let head = format!(
        "GET /ping HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(40 * 1024)
    );
    let _ = s.write_all(head.as_bytes()).await;
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(closed || answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(!answer.contains("200 OK"), "{answer}");
    broker.shutdown().await.unwrap();
}

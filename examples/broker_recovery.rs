//! Measures how fast the broker recovers from its log (records per second).
//!
//! `cargo run --release --example broker_recovery [RECORDS]` (default 1,000,000).
//! Three logs of about RECORDS records each: a history of publishes and acks
//! (what accumulates between compactions), a snapshot of live messages with
//! two subscribers each, and a snapshot dominated by remembered dedup keys.

use sagamq::broker::{Broker, BrokerConfig, BrokerRecord};
use sagamq::types::*;
use std::time::Instant;

fn message(i: u64) -> Message {
    Message {
        msg_id: MsgId(i + 1),
        global_id: GlobalId::new(format!("order-{i}")).unwrap(),
        sub_id: SubId::lit("created"),
        sender_id: SenderId::lit("order-service"),
        create_time: i as i64,
        topic: Topic::lit("sale-order.created"),
        content: format!("{{\"order\":{i},\"qty\":1}}"),
    }
}

/// Builds a log image of about the given number of records: (image, records).
type MakeLog = fn(u64) -> (Vec<u8>, u64);

fn log(records: impl Iterator<Item = BrokerRecord>) -> (Vec<u8>, u64) {
    let (mut out, mut scratch, mut n) = (sagamq::log::empty_log(), Vec::new(), 0);
    for r in records {
        r.encode_framed(&mut scratch, &mut out);
        n += 1;
    }
    (out, n)
}

fn subscriptions() -> impl Iterator<Item = BrokerRecord> {
    ["stock-service", "audit"]
        .into_iter()
        .map(|c| BrokerRecord::Subscribed {
            client: ClientId::lit(c),
            topic: Topic::lit("sale-order.created"),
            url: format!("http://{c}/callback"),
            expire_time: Time::MAX,
        })
}

/// Publishes to one subscriber, each acked right after: half the records settle a message.
fn history(records: u64) -> (Vec<u8>, u64) {
    let stock = ClientId::lit("stock-service");
    log(subscriptions().chain((0..records / 2).flat_map(move |i| {
        [
            BrokerRecord::Published {
                message: message(i),
                entitled: vec![stock.clone()],
            },
            BrokerRecord::Acked {
                client: stock.clone(),
                msg_id: MsgId(i + 1),
            },
        ]
    })))
}

/// A snapshot of live messages, each queued for two subscribers.
fn live(records: u64) -> (Vec<u8>, u64) {
    let both = vec![ClientId::lit("audit"), ClientId::lit("stock-service")];
    log(
        subscriptions().chain((0..records).map(move |i| BrokerRecord::Published {
            message: message(i),
            entitled: both.clone(),
        })),
    )
}

/// A snapshot holding only remembered dedup keys (512 per record).
fn settled(keys: u64) -> (Vec<u8>, u64) {
    let all: Vec<_> = (0..keys)
        .map(|i| {
            let key = MessageKey {
                global_id: GlobalId::new(format!("order-{i}")).unwrap(),
                sub_id: SubId::lit("created"),
            };
            (key, MsgId(i + 1))
        })
        .collect();
    log(all.chunks(512).map(|c| BrokerRecord::Settled { keys: c.to_vec() }))
}

/// This thread's CPU time in nanoseconds (Linux `schedstat`), when available.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() {
    let records: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    // An optional second argument picks one case by its position (0, 1, 2).
    let only: Option<usize> = std::env::args().nth(2).and_then(|s| s.parse().ok());
    let config = BrokerConfig {
        messages_max: usize::MAX,
        dedup_settled_max: records as usize,
        ..BrokerConfig::default()
    };
    let cases: [(&str, MakeLog); 3] = [
        ("history: publish + ack", history),
        ("snapshot: live messages x2 subscribers", live),
        ("snapshot: dedup keys only", settled),
    ];
    for (i, (name, make)) in cases.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let (image, n) = make(records);
        let (start, cpu_start) = (Instant::now(), cpu_ns());
        let (broker, report) = Broker::recover(config.clone(), 1, &image).expect("recovers");
        let secs = start.elapsed().as_secs_f64();
        // On a shared machine wall time overstates the cost: report CPU time too.
        let cpu = match (cpu_start, cpu_ns()) {
            (Some(a), Some(b)) => format!(
                ", CPU {:.3}s = {:.0} records/s",
                (b - a) as f64 / 1e9,
                n as f64 / ((b - a) as f64 / 1e9)
            ),
            _ => String::new(),
        };
        assert_eq!(report.records, n);
        let stats = broker.stats();
        println!(
            "{name}: {n} records, {:.1} MB in {secs:.3}s = {:.0} records/s ({:.1} MB/s){cpu}; live messages {}, dedup keys {}",
            image.len() as f64 / 1e6,
            n as f64 / secs,
            image.len() as f64 / 1e6 / secs,
            stats.messages_live,
            stats.dedup_settled,
        );
    }
}

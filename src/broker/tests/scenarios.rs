//! Broker behaviours as readable scenarios: a script of inputs at virtual
//! times through [`Harness`], then assertions on replies, callbacks and stats.

use super::harness::*;
use crate::Machine;
use crate::broker::*;
use crate::log::{Disk, FILE_HEADER_LEN, FRAME_HEADER_LEN, LogError, decode_all, empty_log, encode_frame};
use crate::types::*;
use std::time::Duration;

const T: &str = "sale-order.created";
const U: &str = "sale-order.stock.outbound";
const STOCK: &str = "stock-service";
const AUDIT: &str = "audit";
const LONG: Time = Time(1_000_000_000_000);

fn published(h: &Harness, req: RequestId) -> (MsgId, bool) {
    match h.reply(req) {
        Some(Reply::Published { msg_id, duplicate }) => (*msg_id, *duplicate),
        other => panic!("expected Published for {req:?}, got {other:?}\n{}", h.trace_text()),
    }
}

fn rejected(h: &Harness, req: RequestId) -> BrokerError {
    match h.reply(req) {
        Some(Reply::Rejected(e)) => e.clone(),
        other => panic!("expected Rejected for {req:?}, got {other:?}\n{}", h.trace_text()),
    }
}

/// A broker with `stock-service` subscribed to `sale-order.created` for a long time.
fn with_stock(config: BrokerConfig) -> Harness {
    let mut h = Harness::new(config, 7);
    let r = h.subscribe(STOCK, T, LONG);
    assert_eq!(h.reply(r), Some(&Reply::Subscribed { expire_time: LONG }));
    h
}

fn keys(cbs: &[Callback]) -> Vec<String> {
    cbs.iter()
        .map(|c| format!("{}@{}", c.message.key(), c.client))
        .collect()
}

/// Asserts a rejected request left no trace: no bytes written, same stats.
#[track_caller]
fn assert_rejected_and_nothing_stored(h: &mut Harness, act: impl FnOnce(&mut Harness) -> RequestId) -> BrokerError {
    let (disk_before, stats_before, callbacks_before) = (h.disk.len(), h.broker.stats(), h.callbacks.len());
    let req = act(h);
    let error = rejected(h, req);
    assert_eq!(h.disk.len(), disk_before, "a rejected request wrote to the log");
    assert_eq!(h.broker.stats(), stats_before, "a rejected request changed the state");
    assert_eq!(h.callbacks.len(), callbacks_before);
    error
}

// ----- Durable before acknowledged -----

#[test]
fn a_late_older_renewal_never_shortens_a_subscription() {
    let mut h = Harness::new(BrokerConfig::default(), 7);
    let r = h.subscribe(STOCK, T, Time(2_000_000_000));
    assert_eq!(
        h.reply(r),
        Some(&Reply::Subscribed {
            expire_time: Time(2_000_000_000)
        })
    );
    // An older renewal (a duplicate or a delayed copy) arrives after the newer one.
    let r = h.subscribe(STOCK, T, Time(1_500_000_000));
    assert_eq!(
        h.reply(r),
        Some(&Reply::Subscribed {
            expire_time: Time(2_000_000_000)
        })
    );
    // A later renewal still extends it.
    let r = h.subscribe(STOCK, T, Time(3_000_000_000));
    assert_eq!(
        h.reply(r),
        Some(&Reply::Subscribed {
            expire_time: Time(3_000_000_000)
        })
    );
}

#[test]
fn publish_is_answered_and_delivered_only_once_durable() {
    let mut h = with_stock(small_config());
    h.auto_sync = false;
    let r = h.publish("order-1", "created", T, 1);
    assert!(!h.disk.is_empty(), "the record was handed to the disk");
    assert_eq!(h.reply(r), None, "answered before the record was durable");
    assert!(h.callbacks.is_empty(), "delivered before the record was durable");
    h.sync();
    assert_eq!(published(&h, r), (MsgId(1), false));
    assert_eq!(keys(&h.callbacks), ["order-1/created@stock-service"]);
}

#[test]
fn a_crash_before_the_sync_loses_the_unanswered_publish_entirely() {
    let mut h = with_stock(small_config());
    h.auto_sync = false;
    let r = h.publish("order-1", "created", T, 1);
    h.crash();
    assert_eq!(h.reply(r), None);
    assert_eq!(h.broker.stats().messages_live, 0);
    h.auto_sync = true;
    let again = h.publish("order-1", "created", T, 1);
    assert_eq!(published(&h, again), (MsgId(1), false), "stored anew, not a duplicate");
}

#[test]
fn records_of_one_call_are_persisted_together() {
    // Three callbacks time out in the same instant: their dead letters share one write.
    let config = BrokerConfig {
        attempts_max: 1,
        ..small_config()
    };
    let mut h = with_stock(config);
    for i in 0..3 {
        h.publish(&format!("order-{i}"), "created", T, i);
    }
    assert_eq!(h.callbacks.len(), 3);
    h.advance(100);
    let persists: Vec<&String> = h.trace.iter().filter(|l| l.contains("< persist")).collect();
    let last = persists.last().expect("a persist");
    assert!(last.contains("records=3"), "{last}");
    assert_eq!(h.sub_stats(STOCK).dead_letters, 3);
}

// ----- Dedup -----

#[test]
fn repeated_publish_answers_the_original_and_delivers_once() {
    let mut h = with_stock(small_config());
    let first = h.publish("order-1", "created", T, 1);
    let records = h.broker.stats().log_records;
    let again = h.publish("order-1", "created", T, 1);
    assert_eq!(published(&h, first), (MsgId(1), false));
    assert_eq!(published(&h, again), (MsgId(1), true));
    assert_eq!(h.callbacks.len(), 1);
    assert_eq!(h.broker.stats().messages_live, 1);
    assert_eq!(h.broker.stats().log_records, records, "a duplicate writes nothing");
    // Same GlobalID, other SubID: a different message.
    let other = h.publish("order-1", "paid", T, 1);
    assert_eq!(published(&h, other), (MsgId(2), false));
}

#[test]
fn duplicate_of_an_unsynced_publish_is_answered_when_the_original_is_durable() {
    let mut h = with_stock(small_config());
    h.auto_sync = false;
    let first = h.publish("order-1", "created", T, 1);
    let again = h.publish("order-1", "created", T, 1);
    assert_eq!((h.reply(first), h.reply(again)), (None, None));
    h.sync();
    assert_eq!(published(&h, first), (MsgId(1), false));
    assert_eq!(published(&h, again), (MsgId(1), true));
    assert_eq!(h.callbacks.len(), 1);
}

#[test]
fn dedup_survives_a_restart_for_pending_and_settled_messages() {
    let mut h = with_stock(small_config());
    let settled = h.publish("order-1", "created", T, 1);
    h.answer_all(CallbackResult::Delivered);
    let pending = h.publish("order-2", "created", T, 2);
    h.crash();
    // The pending message is offered again after the restart, as attempt 1.
    assert_eq!(keys(&h.callbacks), ["order-2/created@stock-service"]);
    assert_eq!(h.callbacks[0].attempt, 1);
    let r1 = h.publish("order-1", "created", T, 1);
    let r2 = h.publish("order-2", "created", T, 2);
    assert_eq!(published(&h, r1), (published(&h, settled).0, true));
    assert_eq!(published(&h, r2), (published(&h, pending).0, true));
    assert_eq!(h.callbacks.len(), 1, "nothing new delivered");
    let fresh = h.publish("order-3", "created", T, 3);
    assert_eq!(
        published(&h, fresh),
        (MsgId(3), false),
        "message ids keep counting after a restart"
    );
}

#[test]
fn dedup_survives_compaction_and_restart() {
    let config = BrokerConfig {
        compact_garbage_records_min: 10,
        ..small_config()
    };
    let mut h = with_stock(config);
    let first = h.publish("order-0", "created", T, 0);
    h.answer_all(CallbackResult::Delivered);
    for i in 1..50 {
        h.publish(&format!("order-{i}"), "created", T, i);
        h.answer_all(CallbackResult::Delivered);
    }
    assert!(h.trace.iter().any(|l| l.contains("< rewrite")), "compacted");
    h.crash();
    let again = h.publish("order-0", "created", T, 0);
    assert_eq!(published(&h, again), (published(&h, first).0, true));
    assert!(h.callbacks.is_empty());
    let fresh = h.publish("order-50", "created", T, 50);
    assert_eq!(
        published(&h, fresh),
        (MsgId(51), false),
        "ids are not reused after compaction"
    );
}

// ----- Ordering and window -----

#[test]
fn first_attempts_follow_create_time_then_msg_id() {
    let mut h = with_stock(small_config());
    h.auto_sync = false;
    h.publish("a", "s", T, 30);
    h.publish("b", "s", T, 10);
    h.publish("c", "s", T, 20);
    h.publish("d", "s", T, 10);
    h.sync();
    assert_eq!(
        keys(&h.callbacks),
        [
            "b/s@stock-service",
            "d/s@stock-service",
            "c/s@stock-service",
            "a/s@stock-service"
        ]
    );
}

#[test]
fn window_bounds_callbacks_in_flight_and_a_retry_does_not_block_the_line() {
    let config = BrokerConfig {
        inflight_per_subscriber_max: 2,
        ..small_config()
    };
    let mut h = with_stock(config);
    for i in 1..=5 {
        h.publish(&format!("m{i}"), "s", T, i);
    }
    assert_eq!(keys(&h.callbacks), ["m1/s@stock-service", "m2/s@stock-service"]);
    assert_eq!(
        h.sub_stats(STOCK),
        SubscriberStats {
            pending: 3,
            in_flight: 2,
            dead_letters: 0
        }
    );
    let cbs = h.take_callbacks();
    // m1 fails: it backs off and m3 takes its slot at once.
    h.answer(cbs[0].delivery, CallbackResult::Failed);
    assert_eq!(keys(&h.callbacks), ["m3/s@stock-service"]);
    h.answer(cbs[1].delivery, CallbackResult::Delivered);
    assert_eq!(keys(&h.callbacks), ["m3/s@stock-service", "m4/s@stock-service"]);
    // m1's backoff ends while the window is full: it goes first once a slot frees.
    h.advance(50);
    assert_eq!(h.callbacks.len(), 2);
    let m3 = h.callbacks[0].delivery;
    h.answer(m3, CallbackResult::Delivered);
    assert_eq!(keys(&h.callbacks[1..]), ["m1/s@stock-service"]);
    assert_eq!(h.callbacks[1].attempt, 2);
}

// ----- Timeouts, retries, dead letters -----

#[test]
fn silent_subscriber_times_out_and_is_retried_after_a_jittered_backoff() {
    let mut h = with_stock(small_config());
    h.publish("order-1", "created", T, 1);
    assert_eq!(h.take_callbacks()[0].attempt, 1);
    // Timeout 100ms; the first backoff is 10ms with jitter in [5ms, 10ms].
    h.advance_to(ms(104));
    assert!(h.callbacks.is_empty());
    assert_eq!(h.sub_stats(STOCK).in_flight, 0, "the timed-out attempt freed its slot");
    h.advance_to(ms(110));
    assert_eq!(h.callbacks.len(), 1);
    assert_eq!(h.callbacks[0].attempt, 2);
}

#[test]
fn driver_reported_timeout_counts_as_a_failed_attempt() {
    let mut h = with_stock(small_config());
    h.publish("order-1", "created", T, 1);
    let cb = h.take_callbacks().remove(0);
    h.answer(cb.delivery, CallbackResult::TimedOut);
    assert_eq!(h.sub_stats(STOCK).in_flight, 0);
    h.advance(10);
    assert_eq!(h.callbacks.len(), 1);
    assert_eq!(h.callbacks[0].attempt, 2);
    // A second verdict for the old attempt changes nothing.
    h.answer(cb.delivery, CallbackResult::Failed);
    assert_eq!(h.sub_stats(STOCK).in_flight, 1);
}

#[test]
fn late_delivered_answer_settles_a_timed_out_attempt() {
    let mut h = with_stock(small_config());
    h.publish("order-1", "created", T, 1);
    let first = h.take_callbacks().remove(0);
    h.advance(100); // timed out, backing off
    h.answer(first.delivery, CallbackResult::Delivered);
    assert_eq!(h.broker.stats().messages_live, 0);
    h.advance(10_000);
    assert!(h.callbacks.is_empty(), "no needless redelivery");

    // Also while a later attempt is in flight: that attempt's answer is then ignored.
    h.publish("order-2", "created", T, 2);
    let first = h.take_callbacks().remove(0);
    h.advance(110);
    let second = h.take_callbacks().remove(0);
    assert_eq!(second.attempt, 2);
    h.answer(first.delivery, CallbackResult::Delivered);
    assert_eq!(h.broker.stats().messages_live, 0);
    assert_eq!(h.sub_stats(STOCK).in_flight, 0);
    h.answer(second.delivery, CallbackResult::Failed);
    h.advance(10_000);
    assert!(h.callbacks.is_empty());
}

#[test]
fn backoff_doubles_up_to_the_cap_with_seeded_jitter() {
    let config = BrokerConfig {
        retry_backoff_initial: Duration::from_millis(100),
        retry_backoff_max: Duration::from_millis(1000),
        ..BrokerConfig::default()
    };
    let delays = |seed| {
        let mut b = Broker::new(config.clone(), seed);
        (1..=8).map(|n| b.backoff(n)).collect::<Vec<_>>()
    };
    let a = delays(1);
    for (n, d) in (1u32..).zip(&a) {
        let full = Duration::from_millis((100u64 << (n - 1)).min(1000));
        assert!(
            *d >= full / 2 && *d <= full,
            "attempt {n}: {d:?} not in [{:?}, {full:?}]",
            full / 2
        );
    }
    assert_eq!(a, delays(1), "same seed, same delays");
    assert_ne!(a, delays(2), "the jitter depends on the seed");
    // Huge attempt numbers saturate at the cap instead of overflowing.
    let mut b = Broker::new(config.clone(), 3);
    assert!(b.backoff(u32::MAX) <= Duration::from_millis(1000));
}

#[test]
fn retry_schedule_is_reproducible_from_the_seed() {
    let run = |seed| {
        let config = BrokerConfig {
            attempts_max: 6,
            ..small_config()
        };
        let mut h = Harness::new(config, seed);
        h.subscribe(STOCK, T, LONG);
        h.publish("order-1", "created", T, 1);
        for _ in 0..6 {
            h.answer_all(CallbackResult::Failed);
            h.advance(50);
        }
        assert_eq!(h.sub_stats(STOCK).dead_letters, 1);
        h.trace_text()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn exhausted_message_becomes_a_dead_letter_and_redrive_puts_it_back() {
    let mut h = with_stock(small_config()); // attempts_max = 3
    let r = h.publish("order-1", "created", T, 1);
    let msg_id = published(&h, r).0;
    for attempt in 1..=3 {
        let cb = h.take_callbacks().remove(0);
        assert_eq!(cb.attempt, attempt);
        h.answer(cb.delivery, CallbackResult::Failed);
        h.advance(50);
    }
    assert!(h.callbacks.is_empty());
    let dead = h.broker.dead_letters(&ClientId::lit(STOCK));
    assert_eq!(dead.iter().map(|m| m.msg_id).collect::<Vec<_>>(), [msg_id]);
    assert_eq!(h.sub_stats(STOCK).pending, 0);
    // Dead letters are durable and are not retried after a restart.
    h.crash();
    assert!(h.callbacks.is_empty());
    assert_eq!(h.broker.dead_letters(&ClientId::lit(STOCK)).len(), 1);
    let r = h.redrive(STOCK);
    assert_eq!(h.reply(r), Some(&Reply::Redriven { count: 1 }));
    assert_eq!(keys(&h.callbacks), ["order-1/created@stock-service"]);
    assert_eq!(
        h.callbacks[0].attempt, 1,
        "a redriven message gets a fresh set of attempts"
    );
    h.answer_all(CallbackResult::Delivered);
    assert_eq!(h.sub_stats(STOCK).dead_letters, 0);
    assert_eq!(h.broker.stats().messages_live, 0);
    let r = h.redrive(STOCK);
    assert_eq!(h.reply(r), Some(&Reply::Redriven { count: 0 }));
}

// ----- Subscriptions -----

#[test]
fn expired_subscriber_gets_nothing_new_and_keeps_its_queue_paused_until_renewal() {
    let config = BrokerConfig {
        inflight_per_subscriber_max: 1,
        ..small_config()
    };
    let mut h = Harness::new(config, 7);
    h.subscribe(STOCK, T, ms(100));
    h.subscribe(AUDIT, T, LONG);
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    assert_eq!(keys(&h.take_callbacks()), ["m1/s@audit", "m1/s@stock-service"]);
    // stock never answers m1; its subscription expires at 100ms, while m1 times out.
    h.advance_to(ms(150));
    let cbs = h.take_callbacks();
    assert!(
        cbs.iter().all(|c| c.client.as_str() == AUDIT),
        "paused: {:?}",
        keys(&cbs)
    );
    let m3 = h.publish("m3", "s", T, 3);
    assert!(!published(&h, m3).1);
    assert_eq!(h.sub_stats(STOCK).pending, 2, "m1 and m2 kept, m3 not entitled");
    h.advance(10_000);
    assert!(h.callbacks.iter().all(|c| c.client.as_str() == AUDIT));
    // Renewal resumes delivery in order; m3 never reaches stock.
    h.callbacks.clear();
    h.subscribe(STOCK, T, LONG);
    let mut got = Vec::new();
    while !h.callbacks.is_empty() {
        got.extend(keys(&h.callbacks));
        h.answer_all(CallbackResult::Delivered);
    }
    assert_eq!(got, ["m1/s@stock-service", "m2/s@stock-service"]);
}

/// With a grace, a subscriber whose subscription lapsed (cut off past its
/// ExpireTime) misses nothing published within the grace: it is queued,
/// paused, and delivered once it renews. Past the grace, nothing new.
#[test]
fn within_the_grace_an_expired_subscriber_still_gets_new_messages_paused() {
    let config = BrokerConfig {
        subscription_grace: Duration::from_millis(500),
        ..small_config()
    };
    let mut h = Harness::new(config, 7);
    h.subscribe(STOCK, T, ms(100));
    h.advance_to(ms(200));
    let m1 = h.publish("m1", "s", T, 1);
    assert!(!published(&h, m1).1);
    assert!(h.take_callbacks().is_empty(), "expired: delivery paused");
    assert_eq!(h.sub_stats(STOCK).pending, 1, "m1 is queued for stock within the grace");
    h.advance_to(ms(700));
    h.publish("m2", "s", T, 2);
    assert_eq!(h.sub_stats(STOCK).pending, 1, "past the grace: m2 is not entitled");
    h.subscribe(STOCK, T, LONG);
    let mut got = Vec::new();
    while !h.callbacks.is_empty() {
        got.extend(keys(&h.callbacks));
        h.answer_all(CallbackResult::Delivered);
    }
    assert_eq!(got, ["m1/s@stock-service"]);
}

#[test]
fn subscribing_again_renews_and_changes_the_url() {
    let mut h = Harness::new(small_config(), 7);
    h.subscribe(STOCK, T, ms(100));
    let req = h.req();
    let subscribe = SubscribeRequest {
        client_id: ClientId::lit(STOCK),
        topic: Topic::lit(T),
        notify_url: "http://new/cb".into(),
        expire_time: ms(500),
    };
    h.input(BrokerInput::Subscribe { req, subscribe });
    assert_eq!(h.reply(req), Some(&Reply::Subscribed { expire_time: ms(500) }));
    assert_eq!(h.broker.stats().subscriptions, 1);
    h.advance_to(ms(200));
    h.publish("m1", "s", T, 1);
    assert_eq!(h.callbacks[0].url, "http://new/cb");
}

#[test]
fn unsubscribed_client_gets_nothing_new_but_its_queue_drains() {
    let config = BrokerConfig {
        inflight_per_subscriber_max: 1,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.subscribe(STOCK, U, LONG);
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    let r = h.unsubscribe(STOCK, T);
    assert_eq!(h.reply(r), Some(&Reply::Unsubscribed));
    let m3 = h.publish("m3", "s", T, 3);
    assert_eq!(published(&h, m3), (MsgId(3), false));
    assert_eq!(h.broker.stats().messages_live, 2, "m3 had nobody to go to");
    assert_eq!(h.broker.stats().subscriptions, 2, "kept while m1 and m2 need its URL");
    let mut got = Vec::new();
    while !h.callbacks.is_empty() {
        got.extend(keys(&h.callbacks));
        h.answer_all(CallbackResult::Delivered);
    }
    assert_eq!(got, ["m1/s@stock-service", "m2/s@stock-service"]);
    assert_eq!(h.broker.stats().subscriptions, 1, "gone once drained");
    let again = h.unsubscribe(STOCK, T);
    assert_eq!(rejected(&h, again), BrokerError::NotSubscribed);
    // The other topic is unaffected; its subscription survives a restart.
    h.crash();
    h.publish("m4", "s", U, 4);
    assert_eq!(keys(&h.callbacks), ["m4/s@stock-service"]);
}

// ----- Bounds: each one rejects with a clear error and stores nothing -----

#[test]
fn subscriptions_max_rejects_new_subscriptions_but_renewals_and_expired_slots_work() {
    let config = BrokerConfig {
        subscriptions_max: 2,
        ..small_config()
    };
    let mut h = Harness::new(config, 7);
    h.subscribe("a", T, ms(50));
    h.subscribe("b", T, LONG);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.subscribe("c", T, LONG));
    assert_eq!(e, BrokerError::TooManySubscriptions);
    assert_eq!(e.to_string(), "broker holds its maximum number of subscriptions");
    let renew = h.subscribe("b", T, LONG);
    assert!(matches!(h.reply(renew), Some(Reply::Subscribed { .. })));
    // Once `a` expired (and holds no messages), its slot is reused.
    h.advance_to(ms(60));
    let c = h.subscribe("c", T, LONG);
    assert!(matches!(h.reply(c), Some(Reply::Subscribed { .. })));
    assert_eq!(h.broker.stats().subscriptions, 2);
}

#[test]
fn messages_max_rejects_publishes_but_still_answers_duplicates() {
    let config = BrokerConfig {
        messages_max: 2,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.publish("m3", "s", T, 3));
    assert_eq!(e, BrokerError::TooManyMessages);
    let dup = h.publish("m1", "s", T, 1);
    assert_eq!(published(&h, dup), (MsgId(1), true));
}

#[test]
fn pending_per_subscriber_max_rejects_with_queue_full() {
    let config = BrokerConfig {
        pending_per_subscriber_max: 2,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.publish("m3", "s", T, 3));
    assert_eq!(
        e,
        BrokerError::QueueFull {
            client: ClientId::lit(STOCK)
        }
    );
    assert_eq!(e.to_string(), "queue of subscriber stock-service is full");
}

#[test]
fn dead_letters_per_subscriber_max_rejects_until_redriven() {
    let config = BrokerConfig {
        dead_letters_per_subscriber_max: 2,
        attempts_max: 1,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    h.advance(100);
    assert_eq!(h.sub_stats(STOCK).dead_letters, 2);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.publish("m3", "s", T, 3));
    assert_eq!(
        e,
        BrokerError::DeadLettersFull {
            client: ClientId::lit(STOCK)
        }
    );
    h.redrive(STOCK);
    h.answer_all(CallbackResult::Delivered);
    let m3 = h.publish("m3", "s", T, 3);
    assert!(!published(&h, m3).1);
}

#[test]
fn redrive_that_would_overflow_the_queue_is_rejected() {
    let config = BrokerConfig {
        pending_per_subscriber_max: 2,
        attempts_max: 1,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.publish("m1", "s", T, 1);
    h.advance(100);
    h.publish("m2", "s", T, 2);
    h.publish("m3", "s", T, 3);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.redrive(STOCK));
    assert_eq!(
        e,
        BrokerError::QueueFull {
            client: ClientId::lit(STOCK)
        }
    );
}

#[test]
fn redrive_with_more_dead_letters_than_queue_room_moves_the_oldest_and_survives_a_crash() {
    let config = BrokerConfig {
        pending_per_subscriber_max: 2,
        attempts_max: 1,
        ..small_config()
    };
    let mut h = with_stock(config);
    let mut ids = Vec::new();
    for (k, gid) in ["m1", "m2", "m3"].into_iter().enumerate() {
        let r = h.publish(gid, "s", T, k as i64 + 1);
        ids.push(published(&h, r).0);
        h.advance(100); // its one attempt times out
    }
    assert_eq!(h.sub_stats(STOCK).dead_letters, 3);
    // Room for two: the two oldest move, one stays a dead letter (refusing
    // the whole redrive would leave all three stuck forever).
    let r = h.redrive(STOCK);
    assert_eq!(h.reply(r), Some(&Reply::Redriven { count: 2 }));
    let still: Vec<_> = h
        .broker
        .dead_letters(&ClientId::lit(STOCK))
        .iter()
        .map(|m| m.msg_id)
        .collect();
    assert_eq!(still, [ids[2]]);
    // The partial redrive is a record of its own: a restart agrees.
    h.crash();
    let still: Vec<_> = h
        .broker
        .dead_letters(&ClientId::lit(STOCK))
        .iter()
        .map(|m| m.msg_id)
        .collect();
    assert_eq!(still, [ids[2]], "the partial redrive did not survive the crash");
    let mut sent: Vec<_> = h.callbacks.iter().map(|c| c.message.msg_id).collect();
    sent.sort();
    assert_eq!(sent, [ids[0], ids[1]], "the two redriven messages are attempted again");
    h.answer_all(CallbackResult::Delivered);
    let r = h.redrive(STOCK);
    assert_eq!(h.reply(r), Some(&Reply::Redriven { count: 1 }));
    h.answer_all(CallbackResult::Delivered);
    assert_eq!(h.sub_stats(STOCK).dead_letters, 0);
    assert_eq!(h.broker.stats().messages_live, 0);
}

#[test]
fn publishes_unsynced_max_rejects_until_the_disk_catches_up() {
    let config = BrokerConfig {
        publishes_unsynced_max: 2,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.auto_sync = false;
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.publish("m3", "s", T, 3));
    assert_eq!(e, BrokerError::TooManyUnsyncedPublishes);
    h.sync();
    let m3 = h.publish("m3", "s", T, 3);
    h.sync();
    assert_eq!(published(&h, m3), (MsgId(3), false));
}

#[test]
fn dedup_settled_max_forgets_the_oldest_settled_key_first() {
    let config = BrokerConfig {
        dedup_settled_max: 2,
        ..small_config()
    };
    let mut h = with_stock(config);
    for k in ["a", "b", "c"] {
        h.publish(k, "s", T, 1);
        h.answer_all(CallbackResult::Delivered);
    }
    assert_eq!(h.broker.stats().dedup_settled, 2);
    let c = h.publish("c", "s", T, 1);
    assert_eq!(published(&h, c), (MsgId(3), true));
    let a = h.publish("a", "s", T, 1);
    assert_eq!(published(&h, a), (MsgId(4), false), "a was forgotten: stored anew");
}

#[test]
fn malformed_requests_are_rejected_with_the_reason() {
    let mut h = with_stock(small_config());
    h.advance_to(ms(10));
    let subscribe = |url: String, expire_time| {
        move |h: &mut Harness| {
            let req = h.req();
            let subscribe = SubscribeRequest {
                client_id: ClientId::lit("x"),
                topic: Topic::lit(T),
                notify_url: url,
                expire_time,
            };
            h.input(BrokerInput::Subscribe { req, subscribe });
            req
        }
    };
    let empty = assert_rejected_and_nothing_stored(&mut h, subscribe(String::new(), LONG));
    assert_eq!(empty, BrokerError::InvalidUrl);
    let long = assert_rejected_and_nothing_stored(&mut h, subscribe("h".repeat(URL_LEN_MAX + 1), LONG));
    assert_eq!(long, BrokerError::InvalidUrl);
    let past = assert_rejected_and_nothing_stored(&mut h, subscribe(URL.into(), ms(10)));
    assert_eq!(past, BrokerError::AlreadyExpired);
    let content = "c".repeat(CONTENT_LEN_MAX + 1);
    let e = assert_rejected_and_nothing_stored(&mut h, |h| h.publish_req(publication("g", "s", T, 1, &content)));
    assert_eq!(
        e,
        BrokerError::ContentTooLong {
            len: CONTENT_LEN_MAX + 1
        }
    );
    let ok = h.publish_req(publication("g", "s", T, 1, &content[1..]));
    assert!(!published(&h, ok).1, "exactly CONTENT_LEN_MAX is fine");
}

// ----- Recovery -----

#[test]
fn recovery_truncates_a_torn_tail_and_continues() {
    let mut h = with_stock(small_config());
    let kept = h.publish("m1", "s", T, 1);
    let durable_len = h.disk.len() as u64;
    h.auto_sync = false;
    h.publish("m2", "s", T, 2);
    h.crash_torn(10);
    let report = h.last_recovery.clone().unwrap();
    assert_eq!(report.torn_bytes, 10);
    assert_eq!(report.valid_len, durable_len);
    h.auto_sync = true;
    h.sync();
    let again = h.publish("m2", "s", T, 2);
    assert!(!published(&h, again).1, "the torn publish was never stored");
    let dup = h.publish("m1", "s", T, 1);
    assert_eq!(published(&h, dup), (published(&h, kept).0, true));
    // The truncated log appends cleanly: the next recovery finds no damage.
    h.crash();
    assert_eq!(h.last_recovery.as_ref().unwrap().torn_bytes, 0);
    assert_eq!(h.broker.stats().messages_live, 2);
}

#[test]
fn recovery_refuses_corruption_in_the_middle_naming_the_offset() {
    let mut h = with_stock(small_config());
    h.publish("m1", "s", T, 1);
    h.publish("m2", "s", T, 2);
    let mut image = h.disk.read_all();
    let second = decode_all(&image).unwrap().records[1].0;
    image[FILE_HEADER_LEN + FRAME_HEADER_LEN + 2] ^= 0x40; // inside the first record's payload
    let err = Broker::recover(small_config(), 7, &image).err().expect("refused");
    assert_eq!(
        err,
        LogError::CorruptMiddle {
            offset: FILE_HEADER_LEN as u64,
            reason: "payload checksum mismatch",
            next_valid: second,
        }
    );

    // A frame that passes its checksum but holds no valid record is refused too.
    let mut image = h.disk.read_all();
    let offset = image.len() as u64;
    encode_frame(&[0xFF], &mut image);
    let err = Broker::recover(small_config(), 7, &image).err().expect("refused");
    assert_eq!(
        err,
        LogError::BadRecord {
            offset,
            reason: "unknown record tag 255".into()
        }
    );
    // So is a well-formed record that contradicts the state before it.
    let mut image = h.disk.read_all();
    BrokerRecord::Acked {
        client: ClientId::lit(STOCK),
        msg_id: MsgId(99),
    }
    .encode_framed(&mut Vec::new(), &mut image);
    let err = Broker::recover(small_config(), 7, &image).err().expect("refused");
    assert!(err.to_string().contains("msg#99 is not stored"), "{err}");
}

#[test]
fn recovery_rebuilds_the_dedup_index_and_refuses_a_key_stored_twice() {
    let client = ClientId::lit(STOCK);
    let subscribed = BrokerRecord::Subscribed {
        client: client.clone(),
        topic: Topic::lit(T),
        url: URL.into(),
        expire_time: LONG,
    };
    let published = |id| BrokerRecord::Published {
        message: Message::from_publish(MsgId(id), publication("g", "s", T, 1, "x")),
        entitled: vec![client.clone()],
    };
    let image = |records: &[BrokerRecord]| {
        let (mut out, mut scratch) = (empty_log(), Vec::new());
        for r in records {
            r.encode_framed(&mut scratch, &mut out);
        }
        out
    };
    let twice = image(&[subscribed.clone(), published(1), published(2)]);
    let err = Broker::recover(small_config(), 7, &twice).err().expect("refused");
    assert!(
        err.to_string().contains("msg#1 and msg#2 are both stored under g/s"),
        "{err}"
    );

    // Written by a broker that had already forgotten msg#1's key (a smaller
    // `dedup_settled_max`): msg#2 supersedes it, and dedup answers msg#2.
    let acked = BrokerRecord::Acked {
        client: client.clone(),
        msg_id: MsgId(1),
    };
    let superseded = image(&[subscribed, published(1), acked, published(2)]);
    let (mut broker, _) = Broker::recover(small_config(), 7, &superseded).unwrap();
    assert_eq!(broker.stats().dedup_settled, 0);
    assert_eq!(broker.stats().messages_live, 1);
    broker.handle(
        Time::ZERO,
        BrokerInput::Publish {
            req: RequestId(1),
            publish: publication("g", "s", T, 1, "x"),
        },
    );
    let replies: Vec<BrokerOutput> = std::iter::from_fn(|| broker.poll_output()).collect();
    assert!(
        replies.contains(&BrokerOutput::Reply {
            req: RequestId(1),
            reply: Reply::Published {
                msg_id: MsgId(2),
                duplicate: true
            }
        }),
        "{replies:?}"
    );
}

#[test]
fn callback_answers_addressed_to_an_earlier_incarnation_are_ignored() {
    let mut h = with_stock(small_config());
    h.publish("m1", "s", T, 1);
    let old = h.take_callbacks().remove(0);
    h.crash();
    let new = h.callbacks[0].clone();
    assert_ne!(old.delivery, new.delivery);
    h.input(BrokerInput::CallbackResult {
        delivery: old.delivery,
        result: CallbackResult::Delivered,
    });
    assert_eq!(h.broker.stats().messages_live, 1, "a stale answer settles nothing");
    h.answer(new.delivery, CallbackResult::Delivered);
    assert_eq!(h.broker.stats().messages_live, 0);
}

#[test]
fn compaction_keeps_recovery_proportional_to_live_state() {
    let config = BrokerConfig {
        compact_garbage_records_min: 100,
        ..small_config()
    };
    let mut h = with_stock(config);
    h.tracing = false;
    for i in 0..10_000 {
        h.publish(&format!("order-{i}"), "created", T, i);
        h.answer_all(CallbackResult::Delivered);
    }
    for i in 0..3 {
        h.publish(&format!("open-{i}"), "created", T, i);
    }
    let stats = h.broker.stats();
    assert_eq!(stats.messages_live, 3);
    assert!(stats.log_records < 200, "log holds {} records", stats.log_records);
    assert_eq!(stats.log_bytes, h.disk.len() as u64);
    h.crash();
    let report = h.last_recovery.clone().unwrap();
    assert!(
        report.records < 200,
        "replayed {} records for 3 live messages",
        report.records
    );
    assert_eq!(h.callbacks.len(), 3, "the live messages survived compaction");
    let dup = h.publish("order-0", "created", T, 0);
    assert_eq!(published(&h, dup), (MsgId(1), true), "so did the settled dedup keys");
}

// ----- Readable trace -----

#[test]
fn inputs_and_outputs_read_as_one_line_each() {
    let publish = BrokerInput::Publish {
        req: RequestId(3),
        publish: publication("order-1", "created", T, 5, "{\"qty\":1}"),
    };
    assert_eq!(
        publish.to_string(),
        r#"publish req=3 order-1/created topic=sale-order.created from=sender content="{\"qty\":1}""#
    );
    let message = Message::from_publish(MsgId(3), publication("order-1", "created", T, 5, "x"));
    let callback = BrokerOutput::Callback(Callback {
        delivery: DeliveryId((1 << 40) | 7),
        client: ClientId::lit(STOCK),
        url: URL.into(),
        message,
        attempt: 2,
    });
    assert_eq!(
        callback.to_string(),
        "callback msg#3 order-1/created -> stock-service attempt=2 dlv#1.7"
    );
    let reply = BrokerOutput::Reply {
        req: RequestId(4),
        reply: Reply::Rejected(BrokerError::TooManyMessages),
    };
    assert_eq!(
        reply.to_string(),
        "reply req=4 rejected: broker holds its maximum number of live messages"
    );
    let long = BrokerInput::Publish {
        req: RequestId(5),
        publish: publication("g", "s", T, 5, &"y".repeat(100)),
    };
    assert!(
        long.to_string()
            .ends_with(r#"content="yyyyyyyyyyyyyyyyyyyyyyyy"…(100B)"#),
        "{long}"
    );
}

#[test]
fn scripted_scenario_trace() {
    let config = BrokerConfig {
        attempts_max: 2,
        compact_garbage_records_min: 1_000,
        ..small_config()
    };
    let mut h = Harness::new(config, 42);
    h.subscribe(STOCK, T, ms(1_000));
    h.subscribe(AUDIT, T, LONG);
    h.note("order-1 is created; the order service retries its publish");
    h.publish_req(publication("order-1", "created", T, 100, "{\"qty\":1}"));
    h.publish_req(publication("order-1", "created", T, 100, "{\"qty\":1}"));
    let cbs = h.take_callbacks();
    h.answer(cbs[0].delivery, CallbackResult::Delivered);
    h.note("stock fails once, then succeeds");
    h.answer(cbs[1].delivery, CallbackResult::Failed);
    h.advance(20);
    h.answer_all(CallbackResult::Delivered);
    h.note("order-2: stock stays silent until it is dead-lettered");
    h.advance_to(ms(200));
    h.publish_req(publication("order-2", "created", T, 200, "{\"qty\":10}"));
    h.answer_client(AUDIT, CallbackResult::Delivered);
    h.advance(300);
    h.note("stock's subscription expires; order-3 goes to audit only");
    h.advance_to(ms(1_100));
    h.publish_req(publication("order-3", "created", T, 1_100, "{\"qty\":2}"));
    h.answer_client(AUDIT, CallbackResult::Delivered);
    h.note("the broker crashes and recovers; the operator redrives stock after it renews");
    h.crash();
    h.subscribe(STOCK, T, LONG);
    h.redrive(STOCK);
    h.answer_all(CallbackResult::Delivered);
    let stats = h.broker.stats();
    h.note(format!(
        "live messages {}, subscriptions {}, log {} records",
        stats.messages_live, stats.subscriptions, stats.log_records
    ));
    insta::with_settings!({snapshot_path => "../../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("broker_scripted_scenario_trace", h.trace_text());
    });
}

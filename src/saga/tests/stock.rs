//! Stock: deduction, refusals, redeliveries, null compensation, hanging, crash.

use super::*;
use crate::saga::stock::{Deduction, RefuseReason, Release, Stock};
use crate::saga::{ProductId, topics};
use std::collections::BTreeMap;

fn bench(units: u64) -> Bench<Stock> {
    let stock = Stock::new(BTreeMap::from([(ProductId::lit("p1"), units)]));
    Bench::new(topics::STOCK_SERVICE, stock)
}

fn created(b: &mut Bench<Stock>, order: &str, quantity: u64) -> Message {
    let body = order_json(order, "c1", "p1", quantity, 100);
    b.message(topics::SALE_ORDER_CREATED, order, "created", &body)
}

fn release(b: &mut Bench<Stock>, order: &str) -> Message {
    let body = order_json(order, "c1", "p1", 1, 100);
    b.message(topics::STOCK_RELEASE, order, "release", &body)
}

fn p1() -> ProductId {
    ProductId::lit("p1")
}

#[test]
fn deducts_and_answers_only_after_the_record_is_durable() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 1);
    let (token, outs) = b.deliver(&m);
    assert_eq!(persists(&outs), 1);
    assert!(answers(&outs).is_empty(), "answered before durable");
    assert!(publishes(&outs).is_empty(), "published before durable");
    let outs = b.sync();
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(
        published(&outs),
        vec![(topics::STOCK_OUTBOUND.into(), "o1.outbound".into(), "1".into())]
    );
    assert_eq!(b.host.logic().level(&p1()), 9);
}

#[test]
fn redelivery_is_answered_without_a_second_effect() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 2);
    b.deliver(&m);
    b.sync();
    let (token, outs) = b.deliver(&m);
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(persists(&outs), 0);
    assert!(publishes(&outs).is_empty());
    assert_eq!(b.host.logic().level(&p1()), 8);
    assert_eq!(b.host.stats().redeliveries, 1);
}

#[test]
fn redelivery_before_durable_is_answered_when_the_original_is() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 1);
    let (t1, _) = b.deliver(&m);
    let (t2, outs) = b.deliver(&m);
    assert!(
        answers(&outs).is_empty(),
        "the duplicate must wait for the original's record"
    );
    assert_eq!(persists(&outs), 0);
    let outs = b.sync();
    assert_eq!(answers(&outs), vec![(t1, true), (t2, true)]);
    assert_eq!(publishes(&outs).len(), 1);
    assert_eq!(b.host.logic().level(&p1()), 9);
}

#[test]
fn same_order_under_another_key_deducts_once() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 3);
    b.deliver(&m);
    b.sync();
    let mut again = m.clone();
    again.sub_id = SubId::lit("o1.created-again");
    let (token, outs) = b.deliver(&again);
    assert_eq!(persists(&outs), 0);
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(b.host.logic().level(&p1()), 7);
}

#[test]
fn insufficient_stock_is_refused_with_zero() {
    let mut b = bench(5);
    let m = created(&mut b, "o1", 6);
    b.deliver(&m);
    let outs = b.sync();
    assert_eq!(published(&outs)[0].2, "0");
    assert_eq!(b.host.logic().level(&p1()), 5);
    let m = b.message(
        topics::SALE_ORDER_CREATED,
        "o2",
        "created",
        &order_json("o2", "c", "nope", 1, 1),
    );
    b.deliver(&m);
    assert_eq!(published(&b.sync())[0].2, "0", "an unknown product is refused");
}

#[test]
fn release_restocks_once() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 4);
    b.deliver(&m);
    b.sync();
    let r = release(&mut b, "o1");
    b.deliver(&r);
    let outs = b.sync();
    assert_eq!(
        published(&outs),
        vec![(
            topics::STOCK_RELEASED.into(),
            "o1.released".into(),
            r#"{"OrderID":"o1","Restocked":4}"#.into()
        )]
    );
    assert_eq!(b.host.logic().level(&p1()), 10);
    // A re-sent release (a new SubID) gives nothing back twice but is confirmed
    // again, under the matching SubID, with what the first one restocked.
    let mut again = r.clone();
    again.sub_id = SubId::lit("o1.release.2");
    b.deliver(&again);
    let outs = b.sync();
    assert_eq!(
        published(&outs),
        vec![(
            topics::STOCK_RELEASED.into(),
            "o1.released.2".into(),
            r#"{"OrderID":"o1","Restocked":4}"#.into()
        )]
    );
    assert_eq!(b.host.logic().level(&p1()), 10);
    // The same re-send redelivered is caught by the inbox: nothing at all.
    let (_, outs) = b.deliver(&again);
    assert_eq!(persists(&outs), 0);
    assert_eq!(b.host.logic().order(&GlobalId::lit("o1")).unwrap().held(), 0);
}

#[test]
fn null_compensation_then_hanging_deduction_is_refused() {
    let mut b = bench(10);
    let r = release(&mut b, "o1");
    let (token, _) = b.deliver(&r);
    let outs = b.sync();
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(published(&outs)[0].2, r#"{"OrderID":"o1","Restocked":0}"#);
    let entry = b.host.logic().order(&GlobalId::lit("o1")).unwrap().clone();
    assert_eq!(entry.release, Release::Null);
    // The deduction arrives after its release: refuse it.
    let m = created(&mut b, "o1", 1);
    b.deliver(&m);
    let outs = b.sync();
    assert_eq!(published(&outs)[0].2, "0");
    assert_eq!(b.host.logic().level(&p1()), 10);
    let entry = b.host.logic().order(&GlobalId::lit("o1")).unwrap();
    assert!(matches!(
        entry.deduction,
        Deduction::Refused {
            reason: RefuseReason::AfterRelease,
            ..
        }
    ));
}

#[test]
fn release_after_a_refusal_is_a_null_compensation() {
    let mut b = bench(1);
    let m = created(&mut b, "o1", 5);
    b.deliver(&m);
    b.sync();
    let r = release(&mut b, "o1");
    b.deliver(&r);
    b.sync();
    assert_eq!(b.host.logic().level(&p1()), 1);
    assert_eq!(
        b.host.logic().order(&GlobalId::lit("o1")).unwrap().release,
        Release::Null
    );
}

#[test]
fn crash_before_durable_loses_the_effect_and_the_redelivery_applies_it_once() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 1);
    b.deliver(&m);
    b.crash(None);
    assert_eq!(b.host.logic().level(&p1()), 10);
    assert!(!b.host.consumed(&m.key()));
    let (token, _) = b.deliver(&m);
    let outs = b.sync();
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(b.host.logic().level(&p1()), 9);
}

#[test]
fn crash_after_durable_republishes_the_unacked_reply_and_dedups() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 1);
    b.deliver(&m);
    let first = publishes(&b.sync());
    // The broker never acknowledged the reply; the process dies.
    let report = b.crash(None);
    assert_eq!(report.outbox_unacked, 1);
    assert_eq!(b.host.logic().level(&p1()), 9);
    assert_eq!(b.host.poll_timeout(), Some(Time::ZERO));
    let outs = b.tick();
    assert_eq!(publishes(&outs), first, "the same entry, same (GlobalID, SubID)");
    let (token, outs) = b.deliver(&m);
    assert_eq!(answers(&outs), vec![(token, true)]);
    assert_eq!(persists(&outs), 0);
    assert_eq!(b.host.logic().level(&p1()), 9);
}

#[test]
fn acked_entries_are_not_republished_after_restart() {
    let mut b = bench(10);
    let m = created(&mut b, "o1", 1);
    b.deliver(&m);
    let outs = b.sync();
    b.ack_all(&outs);
    b.sync();
    let report = b.crash(None);
    assert_eq!(report.outbox_unacked, 0);
    let outs = b.tick();
    assert!(publishes(&outs).is_empty());
}

#[test]
fn torn_write_is_truncated_and_the_lost_effect_redone_once() {
    let mut b = bench(10);
    let m1 = created(&mut b, "o1", 1);
    b.deliver(&m1);
    b.sync();
    let m2 = created(&mut b, "o2", 2);
    b.deliver(&m2);
    let report = b.crash(Some(5));
    assert_eq!(report.records, 1);
    assert_eq!(report.torn_bytes, 5);
    assert_eq!(b.disk.len() as u64, report.valid_len);
    assert_eq!(b.host.logic().level(&p1()), 9);
    b.deliver(&m2);
    b.sync();
    assert_eq!(b.host.logic().level(&p1()), 7);
    // The log is whole again: a second recovery sees both records.
    let report = b.crash(None);
    assert_eq!((report.records, report.torn_bytes), (2, 0));
    assert_eq!(b.host.logic().level(&p1()), 7);
}

#[test]
fn corruption_in_the_middle_is_refused() {
    let mut b = bench(10);
    for o in ["o1", "o2"] {
        let m = created(&mut b, o, 1);
        b.deliver(&m);
    }
    b.sync();
    let mut image = b.disk.read_all();
    // Inside the first record's payload (after the file and frame headers).
    image[crate::log::FILE_HEADER_LEN + crate::log::FRAME_HEADER_LEN] ^= 0xFF;
    let err = ParticipantHost::recover(b.host.initial().clone(), b.host.config().clone(), &image).unwrap_err();
    assert!(
        matches!(err, crate::log::LogError::CorruptMiddle { offset: 12, .. }),
        "{err}"
    );
}

#[test]
fn trace_of_deduction_redelivery_null_compensation_and_hanging() {
    let mut b = bench(10);
    b.note("start: subscribe to both topics");
    b.tick();
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit(topics::SALE_ORDER_CREATED),
    });
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit(topics::STOCK_RELEASE),
    });
    b.note("o1 deducts; the callback is answered once its record is durable");
    let m = created(&mut b, "o1", 1);
    b.deliver(&m);
    let outs = b.sync();
    b.ack_all(&outs);
    b.note("the broker redelivers o1 (its answer was lost): no second effect");
    b.deliver(&m);
    b.at_ms(5);
    b.note("o2's release overtakes its creation: null compensation");
    let r = release(&mut b, "o2");
    b.deliver(&r);
    b.sync();
    b.note("o2's creation arrives after its release: hanging, refused");
    let m = created(&mut b, "o2", 1);
    b.deliver(&m);
    b.sync();
    b.note("o1 is compensated: restock");
    let r = release(&mut b, "o1");
    b.deliver(&r);
    b.sync();
    b.note("the process crashes with acked and unacked outbox entries");
    b.crash(None);
    b.tick();
    assert_eq!(b.host.logic().level(&p1()), 10);
    snapshot("saga_stock_trace", &b.trace());
}

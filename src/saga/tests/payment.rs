//! Payment: charge, refusal, redeliveries, refund, null cancel, hanging, crash.

use super::*;
use crate::saga::payment::{Charge, ChargeRefusal, Payment, Refund};
use crate::saga::{CustomerId, PaymentBody, topics};
use std::collections::BTreeMap;

fn bench(balance: u64) -> Bench<Payment> {
    let payment = Payment::new(BTreeMap::from([(CustomerId::lit("c1"), balance)]));
    Bench::new(topics::PAYMENT_SERVICE, payment)
}

fn body(order: &str, amount: u64) -> String {
    serde_json::to_string(&PaymentBody {
        order_id: GlobalId::lit(order),
        customer_id: CustomerId::lit("c1"),
        amount,
    })
    .unwrap()
}

fn requested(b: &mut Bench<Payment>, order: &str, amount: u64) -> Message {
    let body = body(order, amount);
    b.message(topics::PAYMENT_REQUESTED, order, "payment-requested", &body)
}

fn cancel(b: &mut Bench<Payment>, order: &str, amount: u64) -> Message {
    let body = body(order, amount);
    b.message(topics::PAYMENT_CANCEL, order, "payment-cancel", &body)
}

fn c1() -> CustomerId {
    CustomerId::lit("c1")
}

#[test]
fn charges_once_and_answers_after_durable() {
    let mut b = bench(500);
    let m = requested(&mut b, "o1", 200);
    let (t1, outs) = b.deliver(&m);
    assert!(answers(&outs).is_empty());
    let (t2, _) = b.deliver(&m);
    let outs = b.sync();
    assert_eq!(answers(&outs), vec![(t1, true), (t2, true)]);
    assert_eq!(
        published(&outs),
        vec![(topics::PAYMENT_RESULT.into(), "o1.payment".into(), "1".into())]
    );
    let (t3, outs) = b.deliver(&m);
    assert_eq!(answers(&outs), vec![(t3, true)]);
    assert_eq!(persists(&outs), 0);
    assert_eq!(b.host.logic().balance(&c1()), 300);
}

#[test]
fn refuses_when_the_balance_is_short() {
    let mut b = bench(100);
    let m = requested(&mut b, "o1", 101);
    b.deliver(&m);
    let outs = b.sync();
    assert_eq!(published(&outs)[0].2, "0");
    assert_eq!(b.host.logic().balance(&c1()), 100);
    let o = b.host.logic().order(&GlobalId::lit("o1")).unwrap();
    assert!(matches!(
        o.charge,
        Charge::Refused {
            reason: ChargeRefusal::Insufficient,
            ..
        }
    ));
}

#[test]
fn cancel_refunds_the_charge_once() {
    let mut b = bench(500);
    let m = requested(&mut b, "o1", 200);
    b.deliver(&m);
    b.sync();
    let c = cancel(&mut b, "o1", 200);
    b.deliver(&c);
    let outs = b.sync();
    assert_eq!(
        published(&outs),
        vec![(
            topics::PAYMENT_CANCELLED.into(),
            "o1.payment-cancelled".into(),
            r#"{"OrderID":"o1","Refunded":200}"#.into()
        )]
    );
    b.deliver(&c);
    // A re-sent cancel (a new SubID) refunds nothing twice but is confirmed again.
    let mut again = c.clone();
    again.sub_id = SubId::lit("o1.payment-cancel.3");
    b.deliver(&again);
    let outs = b.sync();
    assert_eq!(
        published(&outs),
        vec![(
            topics::PAYMENT_CANCELLED.into(),
            "o1.payment-cancelled.3".into(),
            r#"{"OrderID":"o1","Refunded":200}"#.into()
        )]
    );
    assert_eq!(b.host.logic().balance(&c1()), 500);
}

#[test]
fn null_cancel_then_hanging_charge_is_refused() {
    let mut b = bench(500);
    let c = cancel(&mut b, "o1", 200);
    b.deliver(&c);
    let outs = b.sync();
    assert_eq!(published(&outs)[0].2, r#"{"OrderID":"o1","Refunded":0}"#);
    assert_eq!(b.host.logic().order(&GlobalId::lit("o1")).unwrap().refund, Refund::Null);
    let m = requested(&mut b, "o1", 200);
    b.deliver(&m);
    let outs = b.sync();
    assert_eq!(published(&outs)[0].2, "0");
    assert_eq!(b.host.logic().balance(&c1()), 500);
}

#[test]
fn recovers_charges_from_its_records_and_republishes() {
    let mut b = bench(500);
    let m1 = requested(&mut b, "o1", 200);
    b.deliver(&m1);
    let outs = b.sync();
    b.ack_all(&outs);
    let m2 = requested(&mut b, "o2", 250);
    b.deliver(&m2);
    b.sync();
    let m3 = requested(&mut b, "o3", 10);
    b.deliver(&m3); // never durable
    let report = b.crash(None);
    assert_eq!(report.records, 3, "effect o1, acked o1's reply, effect o2");
    assert_eq!(report.outbox_unacked, 1);
    assert_eq!(b.host.logic().balance(&c1()), 50);
    let outs = b.tick();
    assert_eq!(
        published(&outs),
        vec![(topics::PAYMENT_RESULT.into(), "o2.payment".into(), "1".into())]
    );
    for m in [&m1, &m2] {
        let (t, outs) = b.deliver(m);
        assert_eq!(answers(&outs), vec![(t, true)]);
    }
    b.deliver(&m3);
    b.sync();
    assert_eq!(b.host.logic().balance(&c1()), 40);
}

#[test]
fn trace_of_charge_refusal_refund_and_crash() {
    let mut b = bench(300);
    b.note("o1 is charged; a duplicate arrives before the record is durable");
    let m = requested(&mut b, "o1", 200);
    b.deliver(&m);
    b.deliver(&m);
    b.sync();
    b.note("o2 exceeds the balance left");
    let m = requested(&mut b, "o2", 150);
    b.deliver(&m);
    b.sync();
    b.note("o1 is cancelled: refund; then a crash before the cancel's record is durable");
    let c = cancel(&mut b, "o1", 200);
    b.deliver(&c);
    b.crash(None);
    b.note("the broker redelivers the cancel: applied once, from the recovered state");
    b.deliver(&c);
    b.sync();
    assert_eq!(b.host.logic().balance(&c1()), 300);
    snapshot("saga_payment_trace", &b.trace());
}

//! Order: commands, the seed and saga flows, compensation, deadlines, crash.

use super::*;
use crate::saga::order::{CompensationReason, Order, OrderFlow, OrderStatus};
use crate::saga::{Command, CommandOutcome, OrderSpec, topics};
use std::time::Duration;

const DEADLINE_MS: u64 = 1_000;

/// A started order service: subscribed, as after a broker's confirmations.
fn bench(flow: OrderFlow) -> Bench<Order> {
    let mut b = Bench::new(
        topics::ORDER_SERVICE,
        Order::new(flow, Some(Duration::from_millis(DEADLINE_MS))),
    );
    b.tick();
    for topic in b.host.logic().topics() {
        b.feed(ParticipantInput::Subscribed { topic });
    }
    assert!(b.host.subscribed());
    b
}

fn spec(order: &str, quantity: u64) -> OrderSpec {
    OrderSpec {
        order_id: order.to_string(),
        customer_id: "c1".to_string(),
        product_id: "p1".to_string(),
        quantity,
        price: 100,
    }
}

fn create(b: &mut Bench<Order>, order: &str, quantity: u64) -> Vec<ParticipantOutput> {
    let mut outs = b.feed(ParticipantInput::Command(Command::CreateOrder(spec(order, quantity))));
    outs.extend(b.sync());
    b.ack_all(&outs);
    outs
}

/// Delivers a reply and makes it durable; returns everything that came out.
fn reply(b: &mut Bench<Order>, topic: &str, order: &str, step: &str, content: &str) -> Vec<ParticipantOutput> {
    let m = b.message(topic, order, step, content);
    let (_, mut outs) = b.deliver(&m);
    outs.extend(b.sync());
    b.ack_all(&outs);
    outs
}

fn status(b: &Bench<Order>, order: &str) -> OrderStatus {
    b.host.logic().status(&GlobalId::lit(order)).unwrap()
}

fn command_outcomes(outs: &[ParticipantOutput]) -> Vec<CommandOutcome> {
    outs.iter()
        .filter_map(|o| match o {
            ParticipantOutput::CommandDone { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn create_is_committed_durably_before_anything_is_published() {
    let mut b = bench(OrderFlow::Seed);
    let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(spec("o1", 1))));
    assert_eq!(persists(&outs), 1);
    assert!(publishes(&outs).is_empty());
    assert!(command_outcomes(&outs).is_empty());
    let outs = b.sync();
    assert_eq!(command_outcomes(&outs), vec![CommandOutcome::Committed]);
    assert_eq!(
        published(&outs),
        vec![(
            topics::SALE_ORDER_CREATED.into(),
            "o1.created".into(),
            r#"{"OrderID":"o1","CustomerID":"c1","ProductID":"p1","Quantity":1,"Price":100,"Amount":100}"#.into()
        )]
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Pending);
}

#[test]
fn repeated_command_is_idempotent_and_a_conflicting_one_refused() {
    let mut b = bench(OrderFlow::Seed);
    create(&mut b, "o1", 1);
    let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(spec("o1", 1))));
    assert_eq!(persists(&outs), 0);
    assert_eq!(command_outcomes(&outs), vec![CommandOutcome::Committed]);
    let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(spec("o1", 2))));
    assert!(matches!(&command_outcomes(&outs)[..], [CommandOutcome::Refused(_)]));
    for bad in [spec("o2", 0), spec("", 1), spec(&"x".repeat(300), 1)] {
        let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(bad)));
        assert_eq!(persists(&outs), 0);
        assert!(matches!(&command_outcomes(&outs)[..], [CommandOutcome::Refused(_)]));
    }
    assert_eq!(b.host.logic().orders().len(), 1);
}

#[test]
fn seed_flow_ends_done_or_failed() {
    let mut b = bench(OrderFlow::Seed);
    create(&mut b, "o1", 1);
    create(&mut b, "o2", 10);
    let outs = reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    assert!(publishes(&outs).is_empty(), "the seed flow stops at stock");
    reply(&mut b, topics::STOCK_OUTBOUND, "o2", "outbound", "0");
    assert_eq!(status(&b, "o1"), OrderStatus::StockOutboundDone);
    assert_eq!(status(&b, "o2"), OrderStatus::StockOutboundFailed);
    assert!(b.host.logic().all_terminal());
    assert_eq!(
        b.host.poll_timeout().map(|t| t > Time::from_millis(DEADLINE_MS)),
        Some(true)
    );
}

#[test]
fn redelivered_reply_has_no_second_effect() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    let m = b.message(topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    b.deliver(&m);
    let first = b.sync();
    assert_eq!(publishes(&first).len(), 1);
    let (t, outs) = b.deliver(&m);
    assert_eq!(answers(&outs), vec![(t, true)]);
    assert_eq!(persists(&outs), 0);
    assert_eq!(b.host.stats().effects, 2);
}

#[test]
fn saga_flow_completes_when_paid() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 2);
    let outs = reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    assert_eq!(
        published(&outs),
        vec![(
            topics::PAYMENT_REQUESTED.into(),
            "o1.payment-requested".into(),
            r#"{"OrderID":"o1","CustomerID":"c1","Amount":200}"#.into()
        )]
    );
    assert_eq!(status(&b, "o1"), OrderStatus::StockOutboundDone);
    reply(&mut b, topics::PAYMENT_RESULT, "o1", "payment", "1");
    assert_eq!(status(&b, "o1"), OrderStatus::Completed);
    // Past the deadline nothing happens to a completed order.
    b.at_ms(DEADLINE_MS * 2);
    let outs = b.tick();
    assert_eq!(persists(&outs), 0);
}

#[test]
fn refused_payment_releases_stock_then_compensated() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    let outs = reply(&mut b, topics::PAYMENT_RESULT, "o1", "payment", "0");
    assert_eq!(published(&outs)[0].0, topics::STOCK_RELEASE);
    assert_eq!(status(&b, "o1"), OrderStatus::Compensating);
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o1",
        "released",
        r#"{"OrderID":"o1","Restocked":1}"#,
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Compensated);
    let c = b
        .host
        .logic()
        .order(&GlobalId::lit("o1"))
        .unwrap()
        .compensation
        .clone()
        .unwrap();
    assert_eq!(c.reason, CompensationReason::PaymentRefused);
}

#[test]
fn deadline_while_pending_releases_and_ignores_the_late_reply() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    assert_eq!(b.host.poll_timeout(), Some(Time::from_millis(DEADLINE_MS)));
    b.at_ms(DEADLINE_MS);
    let mut outs = b.tick();
    assert_eq!(persists(&outs), 1);
    outs.extend(b.sync());
    b.ack_all(&outs);
    assert_eq!(
        published(&outs).iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        vec![topics::STOCK_RELEASE],
        "payment was never requested, so only stock is released"
    );
    let outs = reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    assert_eq!(persists(&outs), 0, "a reply after the deadline changes nothing");
    assert_eq!(status(&b, "o1"), OrderStatus::Compensating);
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o1",
        "released",
        r#"{"OrderID":"o1","Restocked":1}"#,
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Compensated);
}

#[test]
fn deadline_after_payment_request_cancels_both() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    b.at_ms(DEADLINE_MS + 1);
    let mut outs = b.tick();
    outs.extend(b.sync());
    b.ack_all(&outs);
    let topics_out: Vec<String> = published(&outs).into_iter().map(|p| p.0).collect();
    assert_eq!(topics_out, vec![topics::STOCK_RELEASE, topics::PAYMENT_CANCEL]);
    reply(&mut b, topics::PAYMENT_RESULT, "o1", "payment", "1");
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o1",
        "released",
        r#"{"OrderID":"o1","Restocked":1}"#,
    );
    assert_eq!(
        status(&b, "o1"),
        OrderStatus::Compensating,
        "the payment cancel is not confirmed yet"
    );
    reply(
        &mut b,
        topics::PAYMENT_CANCELLED,
        "o1",
        "payment-cancelled",
        r#"{"OrderID":"o1","Refunded":100}"#,
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Compensated);
}

/// A compensation whose confirmation never comes (lost, dead-lettered, or its
/// subscriber cut off) is re-sent under a new SubID at doubling intervals,
/// only the unconfirmed ones, until confirmed; then the re-sends stop.
#[test]
fn unconfirmed_compensations_are_resent_until_confirmed() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    b.at_ms(DEADLINE_MS);
    let mut outs = b.tick();
    outs.extend(b.sync());
    b.ack_all(&outs);
    assert_eq!(published(&outs).len(), 2, "release and payment cancel");
    // Re-sends at 1x, then 2x the interval after each send.
    let mut sent_at = DEADLINE_MS;
    for (attempt, wait) in [(2, DEADLINE_MS), (3, 2 * DEADLINE_MS)] {
        assert_eq!(b.host.poll_timeout(), Some(Time::from_millis(sent_at + wait)));
        b.at_ms(sent_at + wait - 1);
        assert!(published(&b.tick()).is_empty(), "nothing before the re-send time");
        sent_at += wait;
        b.at_ms(sent_at);
        let mut outs = b.tick();
        outs.extend(b.sync());
        b.ack_all(&outs);
        let subs: Vec<String> = published(&outs).into_iter().map(|p| p.1).collect();
        assert_eq!(
            subs,
            vec![format!("o1.release.{attempt}"), format!("o1.payment-cancel.{attempt}")]
        );
    }
    // The release is confirmed (by the answer to any send): only the cancel goes again.
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o1",
        "released.2",
        r#"{"OrderID":"o1","Restocked":1}"#,
    );
    sent_at += 4 * DEADLINE_MS;
    b.at_ms(sent_at);
    let mut outs = b.tick();
    outs.extend(b.sync());
    b.ack_all(&outs);
    let subs: Vec<String> = published(&outs).into_iter().map(|p| p.1).collect();
    assert_eq!(subs, vec!["o1.payment-cancel.4".to_string()]);
    reply(
        &mut b,
        topics::PAYMENT_CANCELLED,
        "o1",
        "payment-cancelled",
        r#"{"OrderID":"o1","Refunded":100}"#,
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Compensated);
    assert_eq!(
        b.host.logic().next_deadline(),
        None,
        "no re-send once every compensation is confirmed"
    );
    let c = b
        .host
        .logic()
        .order(&GlobalId::lit("o1"))
        .unwrap()
        .compensation
        .clone()
        .unwrap();
    assert_eq!(c.attempt, 4);
}

/// Ticks at `ms`, makes everything durable and acknowledged; returns the SubIDs published.
fn tick_at(b: &mut Bench<Order>, ms: u64) -> Vec<String> {
    b.at_ms(ms);
    let mut outs = b.tick();
    outs.extend(b.sync());
    b.ack_all(&outs);
    published(&outs).into_iter().map(|p| p.1).collect()
}

/// A re-send waits for twice the slowest confirmation delay observed: once a
/// release took 5 s to be confirmed, a re-send scheduled on the 1 s interval
/// is postponed (no copy goes out) until 4 x 2 x 5 s after the latest send.
#[test]
fn resend_waits_for_twice_the_slowest_observed_confirmation_delay() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    create(&mut b, "o2", 1);
    assert_eq!(tick_at(&mut b, DEADLINE_MS), vec!["o1.release", "o2.release"]);
    assert_eq!(tick_at(&mut b, 2 * DEADLINE_MS), vec!["o1.release.2", "o2.release.2"]);
    assert_eq!(tick_at(&mut b, 4 * DEADLINE_MS), vec!["o1.release.3", "o2.release.3"]);
    // o1's first release is confirmed 5 s after it was sent.
    b.at_ms(6 * DEADLINE_MS);
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o1",
        "released",
        r#"{"OrderID":"o1","Restocked":1}"#,
    );
    assert_eq!(status(&b, "o1"), OrderStatus::Compensated);
    let order = b.host.logic();
    assert_eq!(order.confirmation_delay_slowest(), Duration::from_secs(5));
    assert_eq!(order.resend_interval(3), Duration::from_secs(40));
    // o2's third send (at 4 s) was due again at 4 + 4 x 1 s; now it waits.
    assert_eq!(b.host.logic().next_deadline(), Some(Time::from_millis(8 * DEADLINE_MS)));
    assert!(tick_at(&mut b, 8 * DEADLINE_MS).is_empty(), "postponed, not re-sent");
    assert_eq!(
        b.host.logic().next_deadline(),
        Some(Time::from_millis(44 * DEADLINE_MS))
    );
    assert_eq!(tick_at(&mut b, 44 * DEADLINE_MS), vec!["o2.release.4"]);
    // A confirmation of a send in between (not the first, not the latest) is no sample.
    b.at_ms(45 * DEADLINE_MS);
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o2",
        "released.2",
        r#"{"OrderID":"o2","Restocked":1}"#,
    );
    assert_eq!(b.host.logic().confirmation_delay_slowest(), Duration::from_secs(5));
    assert_eq!(b.host.logic().next_deadline(), None);
}

/// At most `COMPENSATIONS_RESENDING_MAX` compensations are re-sent at once;
/// an overdue one beyond them waits (no copy, no timer) until one of them is
/// confirmed, then goes out at once. Recovery rebuilds the same window.
#[test]
fn at_most_a_window_of_compensations_is_resent_at_once() {
    use crate::saga::order::COMPENSATIONS_RESENDING_MAX;
    let mut b = bench(OrderFlow::Saga);
    let orders: Vec<String> = (0..COMPENSATIONS_RESENDING_MAX + 3)
        .map(|i| format!("o{i:02}"))
        .collect();
    for o in &orders {
        create(&mut b, o, 1);
    }
    assert_eq!(tick_at(&mut b, DEADLINE_MS).len(), orders.len());
    let resent = tick_at(&mut b, 2 * DEADLINE_MS);
    let expected: Vec<String> = orders[..COMPENSATIONS_RESENDING_MAX]
        .iter()
        .map(|o| format!("{o}.release.2"))
        .collect();
    assert_eq!(resent, expected, "the first ones by due time, then id");
    // The three beyond the window have no timer: the next is the window's re-send.
    assert_eq!(b.host.logic().next_deadline(), Some(Time::from_millis(4 * DEADLINE_MS)));
    b.crash(None);
    let mut outs = b.tick(); // recovery re-publishes what was not durably acknowledged
    outs.extend(b.sync());
    b.ack_all(&outs);
    assert_eq!(b.host.logic().next_deadline(), Some(Time::from_millis(4 * DEADLINE_MS)));
    // One in the window is confirmed: the longest-waiting one goes out at once.
    b.at_ms(3 * DEADLINE_MS);
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o05",
        "released.2",
        r#"{"OrderID":"o05","Restocked":1}"#,
    );
    let first_waiting = &orders[COMPENSATIONS_RESENDING_MAX];
    assert_eq!(
        tick_at(&mut b, 3 * DEADLINE_MS),
        vec![format!("{first_waiting}.release.2")]
    );
    // One beyond the window is confirmed by its first send: it leaves the queue, frees nothing.
    let last = orders.last().unwrap();
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        last,
        "released",
        &format!(r#"{{"OrderID":"{last}","Restocked":1}}"#),
    );
    assert_eq!(status(&b, last), OrderStatus::Compensated);
    assert!(tick_at(&mut b, 3 * DEADLINE_MS + 1).is_empty());
}

#[test]
fn recovery_keeps_orders_deadlines_and_unacked_publishes() {
    let mut b = bench(OrderFlow::Saga);
    create(&mut b, "o1", 1);
    b.feed(ParticipantInput::Command(Command::CreateOrder(spec("o2", 1)))); // never durable
    let report = b.crash(None);
    assert_eq!((report.records, report.outbox_unacked), (1, 1));
    assert_eq!(b.host.logic().orders().len(), 1);
    let outs = b.tick();
    assert_eq!(published(&outs)[0].1, "o1.created");
    b.at_ms(DEADLINE_MS);
    b.tick();
    b.sync();
    assert_eq!(status(&b, "o1"), OrderStatus::Compensating);
}

#[test]
fn trace_of_the_saga_flows() {
    let mut b = bench(OrderFlow::Saga);
    b.note("three orders; the commands are answered once durable");
    for o in ["o1", "o2", "o3"] {
        b.feed(ParticipantInput::Command(Command::CreateOrder(spec(o, 1))));
    }
    let outs = b.sync();
    b.ack_all(&outs);
    b.note("o1: stock, then payment -> Completed");
    reply(&mut b, topics::STOCK_OUTBOUND, "o1", "outbound", "1");
    reply(&mut b, topics::PAYMENT_RESULT, "o1", "payment", "1");
    b.note("o2: stock, payment refused -> release -> Compensated");
    reply(&mut b, topics::STOCK_OUTBOUND, "o2", "outbound", "1");
    reply(&mut b, topics::PAYMENT_RESULT, "o2", "payment", "0");
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o2",
        "released",
        r#"{"OrderID":"o2","Restocked":1}"#,
    );
    b.note("o3 hears nothing: its deadline cancels it; the late stock reply is ignored");
    b.at_ms(DEADLINE_MS);
    b.tick();
    b.sync();
    reply(&mut b, topics::STOCK_OUTBOUND, "o3", "outbound", "1");
    reply(
        &mut b,
        topics::STOCK_RELEASED,
        "o3",
        "released",
        r#"{"OrderID":"o3","Restocked":1}"#,
    );
    for (o, s) in [
        ("o1", OrderStatus::Completed),
        ("o2", OrderStatus::Compensated),
        ("o3", OrderStatus::Compensated),
    ] {
        assert_eq!(status(&b, o), s);
    }
    snapshot("saga_order_trace", &b.trace());
}

//! The checker on hand-written histories: a clean story passes, and each
//! invariant fires on the one event that breaks it. (The realistic bugs in
//! `scripts/realistic_bugs.py` and the planted bugs in `bugs.rs` show the same
//! invariants firing from the whole simulated world.)

use sagamq::broker::{Callback, DeliveryId, Reply};
use sagamq::saga::order::OrderFlow;
use sagamq::saga::topics as t;
use sagamq::{ClientId, GlobalId, Message, MsgId, PublishRequest, SenderId, SubId, Time, Topic};
use sagamq_sim::check::{BrokerSnapshot, Checker, OrderFacts, Snapshot, Spec, View};
use sagamq_sim::history::Event;
use sagamq_sim::topology::{ORDER, PAYMENT, STOCK};
use std::collections::BTreeMap;
use std::time::Duration;

const ORDER_JSON: &str = r#"{"OrderID":"o1","CustomerID":"c1","ProductID":"p1","Quantity":2,"Price":10,"Amount":20}"#;

fn spec() -> Spec {
    Spec {
        flow: OrderFlow::Saga,
        orders: BTreeMap::from([(
            "o1".to_string(),
            OrderFacts {
                customer: "c1".into(),
                product: "p1".into(),
                quantity: 2,
                price: 10,
                amount: 20,
            },
        )]),
        stock: BTreeMap::from([("p1".to_string(), 5)]),
        balances: BTreeMap::from([("c1".to_string(), 100)]),
        attempts_max: 3,
        grace: Duration::ZERO,
        dispatch_gap_max: Duration::from_millis(800),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        inflight_max: 2,
        callback_timeout: Duration::from_millis(1_000),
        pending_max: 2,
        messages_max: 100,
        unsynced_max: 100,
    }
}

fn publish(sub: &str, topic: &str, content: &str, sender: &str) -> PublishRequest {
    PublishRequest {
        global_id: GlobalId::lit("o1"),
        sub_id: SubId::lit(sub),
        sender_id: SenderId::lit(sender),
        create_time: 1_000,
        topic: Topic::lit(topic),
        content: content.to_string(),
    }
}

fn message(p: &PublishRequest, id: u64) -> Message {
    Message {
        msg_id: MsgId(id),
        global_id: p.global_id.clone(),
        sub_id: p.sub_id.clone(),
        sender_id: p.sender_id.clone(),
        create_time: p.create_time,
        topic: p.topic.clone(),
        content: p.content.clone(),
    }
}

/// Attempt `delivery` of `m` (the tests number deliveries as attempts).
fn callback(client: &str, m: &Message, delivery: u64) -> Callback {
    Callback {
        delivery: DeliveryId(delivery),
        client: ClientId::lit(client),
        url: "sim://x".into(),
        message: m.clone(),
        attempt: delivery as u32,
    }
}

/// A checker with stock subscribed to `sale-order.created` until 10 s.
fn subscribed() -> Checker {
    subscribed_on(Checker::new(spec()))
}

fn subscribed_with(spec: Spec) -> Checker {
    subscribed_on(Checker::new(spec))
}

fn subscribed_on(mut c: Checker) -> Checker {
    let (client, topic) = (ClientId::lit(t::STOCK_SERVICE), Topic::lit(t::SALE_ORDER_CREATED));
    let expire = Time::from_millis(10_000);
    let now = Time::from_millis(1);
    c.observe(
        1,
        Event::SubscribeReceived {
            client: &client,
            topic: &topic,
            expire,
            now,
        },
    );
    c.observe(
        2,
        Event::Subscribed {
            client: &client,
            topic: &topic,
            until: expire,
        },
    );
    c
}

/// The order's `created` for o1, emitted, received, acknowledged as msg#1.
fn created(c: &mut Checker) -> Message {
    let p = publish("o1.created", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: ORDER,
            publish: &p,
        },
    );
    c.observe(
        11,
        Event::PublishReceived {
            publish: &p,
            now: Time::from_millis(11),
        },
    );
    let reply = Reply::Published {
        msg_id: MsgId(1),
        duplicate: false,
    };
    c.observe(
        12,
        Event::PublishAnswered {
            key: &p.key(),
            reply: &reply,
        },
    );
    message(&p, 1)
}

/// The broker sends attempt `delivery` of `m` to `client` at `at_ms` (its clock too).
fn sent(c: &mut Checker, at_ms: u64, client: &str, m: &Message, delivery: u64) {
    sent_as(c, at_ms, client, m, delivery, delivery as u32);
}

/// [`sent`] with the attempt number on the wire given apart from the delivery.
fn sent_as(c: &mut Checker, at_ms: u64, client: &str, m: &Message, delivery: u64, attempt: u32) {
    let mut callback = callback(client, m, delivery);
    callback.attempt = attempt;
    c.observe(
        at_ms,
        Event::CallbackSent {
            callback: &callback,
            now: Time::from_millis(at_ms),
        },
    );
}

fn first(c: &Checker) -> Option<&'static str> {
    c.violations().first().map(|v| v.invariant)
}

#[test]
fn a_clean_delivery_passes() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    c.observe(
        14,
        Event::Processed {
            node: STOCK,
            client: &stock,
            key: &m.key(),
        },
    );
    assert_eq!(c.violations(), &[]);
}

#[test]
fn dedup_one_message_id_for_two_keys() {
    let mut c = subscribed();
    created(&mut c);
    let other = publish("o1.release", t::STOCK_RELEASE, ORDER_JSON, t::ORDER_SERVICE);
    let reply = Reply::Published {
        msg_id: MsgId(1),
        duplicate: true,
    };
    c.observe(
        20,
        Event::PublishAnswered {
            key: &other.key(),
            reply: &reply,
        },
    );
    assert_eq!(first(&c), Some("dedup"));
}

#[test]
fn dedup_one_key_two_message_ids() {
    let mut c = subscribed();
    let m = created(&mut c);
    let reply = Reply::Published {
        msg_id: MsgId(2),
        duplicate: false,
    };
    c.observe(
        20,
        Event::PublishAnswered {
            key: &m.key(),
            reply: &reply,
        },
    );
    assert_eq!(first(&c), Some("dedup"));
}

#[test]
fn fidelity_content_changed_in_delivery() {
    let mut c = subscribed();
    let mut m = created(&mut c);
    m.content = "{}".into();
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    assert_eq!(first(&c), Some("fidelity"));
}

#[test]
fn fidelity_a_message_nobody_published() {
    let mut c = subscribed();
    let p = publish("o1.ghost", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        13,
        Event::CallbackSent {
            callback: &callback(t::STOCK_SERVICE, &message(&p, 9), 1),
            now: Time::from_millis(13),
        },
    );
    assert_eq!(first(&c), Some("fidelity"));
    assert_eq!(c.account().unexpected, 1);
}

#[test]
fn entitlement_a_client_that_never_subscribed() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::PAYMENT_SERVICE, &m, 1);
    assert_eq!(first(&c), Some("entitlement"));
}

#[test]
fn redelivery_after_the_broker_got_its_2xx() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    c.observe(
        14,
        Event::AnswerReceived {
            delivery: DeliveryId(1),
            ok: true,
        },
    );
    sent(&mut c, 200, t::STOCK_SERVICE, &m, 2);
    assert_eq!(first(&c), Some("redelivery"));
}

#[test]
fn redelivery_after_a_broker_crash_is_fine() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    c.observe(
        14,
        Event::AnswerReceived {
            delivery: DeliveryId(1),
            ok: true,
        },
    );
    c.observe(15, Event::Crashed { node: 0 });
    c.observe(
        16,
        Event::Booted {
            node: 0,
            records: 3,
            torn_bytes: 0,
        },
    );
    sent(&mut c, 17, t::STOCK_SERVICE, &m, 2);
    assert_eq!(c.violations(), &[]);
}

#[test]
fn delivery_order_skips_an_older_stored_message() {
    let mut c = subscribed();
    let older = created(&mut c);
    let mut newer = publish("o1.again", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    newer.create_time = 2_000;
    c.observe(
        20,
        Event::PublishReceived {
            publish: &newer,
            now: Time::from_millis(20),
        },
    );
    let reply = Reply::Published {
        msg_id: MsgId(2),
        duplicate: false,
    };
    c.observe(
        21,
        Event::PublishAnswered {
            key: &newer.key(),
            reply: &reply,
        },
    );
    let m = message(&newer, 2);
    sent(&mut c, 22, t::STOCK_SERVICE, &m, 1);
    assert_eq!(
        first(&c),
        Some("delivery-order"),
        "{} should have gone first",
        older.msg_id
    );
}

/// In a cluster each partition is one broker core: a first attempt of a
/// newer message ahead of an older one is out of order within one partition
/// (the same GlobalID), and allowed across partitions.
#[test]
fn delivery_order_is_judged_within_a_partition_in_a_cluster() {
    let parts = sagamq::cluster::Partitions::new(16).unwrap();
    let o1 = parts.of(&GlobalId::lit("o1"));
    let other = (0..100)
        .map(|i| format!("x{i}"))
        .find(|g| parts.of(&GlobalId::lit(g)) != o1)
        .expect("some id lands in another partition");
    for (gid, expected) in [("o1", Some("delivery-order")), (other.as_str(), None)] {
        let mut c = subscribed_on(Checker::new(spec()).order_within_partitions(parts));
        created(&mut c);
        let mut newer = publish("o1.again", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
        newer.global_id = GlobalId::lit(gid);
        newer.create_time = 2_000;
        c.observe(
            20,
            Event::PublishReceived {
                publish: &newer,
                now: Time::from_millis(20),
            },
        );
        let reply = Reply::Published {
            msg_id: MsgId(2),
            duplicate: false,
        };
        c.observe(
            21,
            Event::PublishAnswered {
                key: &newer.key(),
                reply: &reply,
            },
        );
        sent(&mut c, 22, t::STOCK_SERVICE, &message(&newer, 2), 1);
        assert_eq!(first(&c), expected, "newer message of {gid}");
    }
}

/// The operator redrives `client`'s dead letter, message 1 (found dead, moved back).
fn redrive_first_message(c: &mut Checker, at_ms: u64, client: &ClientId) {
    c.observe(
        at_ms,
        Event::Redrive {
            client,
            dead: &[MsgId(1)],
            moved: &[MsgId(1)],
        },
    );
}

#[test]
fn dead_letter_before_the_budget() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    redrive_first_message(&mut c, 20, &stock);
    assert_eq!(first(&c), Some("dead-letter"));
}

#[test]
fn request_content_names_the_wrong_product() {
    let mut c = subscribed();
    let wrong = ORDER_JSON.replace("p1", "p2");
    let p = publish("o1.created", t::SALE_ORDER_CREATED, &wrong, t::ORDER_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: ORDER,
            publish: &p,
        },
    );
    assert_eq!(first(&c), Some("request-content"));
}

#[test]
fn decision_stock_refuses_with_stock_on_the_shelf() {
    let mut c = subscribed();
    let p = publish("o1.outbound", t::STOCK_OUTBOUND, "0", t::STOCK_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: STOCK,
            publish: &p,
        },
    );
    assert_eq!(first(&c), Some("decision"));
}

#[test]
fn decision_payment_charges_more_than_the_balance() {
    let mut s = spec();
    s.balances.insert("c1".into(), 5);
    let mut c = Checker::new(s);
    let p = publish("o1.payment", t::PAYMENT_RESULT, "1", t::PAYMENT_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: PAYMENT,
            publish: &p,
        },
    );
    assert_eq!(first(&c), Some("decision"));
}

#[test]
fn one_answer_a_redelivery_changes_the_decision() {
    let mut c = subscribed();
    let yes = publish("o1.outbound", t::STOCK_OUTBOUND, "1", t::STOCK_SERVICE);
    let no = publish("o1.outbound", t::STOCK_OUTBOUND, "0", t::STOCK_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: STOCK,
            publish: &yes,
        },
    );
    c.observe(
        20,
        Event::Emitted {
            node: STOCK,
            publish: &no,
        },
    );
    assert_eq!(first(&c), Some("one-answer"));
}

#[test]
fn saga_progress_an_order_that_waited_for_nothing() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    c.observe(
        14,
        Event::Processed {
            node: STOCK,
            client: &stock,
            key: &m.key(),
        },
    );
    // Nothing of o1 in flight from t=14 ms; the order gives up at 5 s.
    let release = publish("o1.release", t::STOCK_RELEASE, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        5_000,
        Event::Emitted {
            node: ORDER,
            publish: &release,
        },
    );
    assert_eq!(first(&c), Some("saga-progress"));
}

#[test]
fn saga_progress_an_order_waiting_on_a_queued_reply_may_give_up() {
    let mut c = subscribed();
    let m = created(&mut c);
    // Stock never processed it: it is still owed, so the deadline is legitimate.
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let release = publish("o1.release", t::STOCK_RELEASE, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        5_000,
        Event::Emitted {
            node: ORDER,
            publish: &release,
        },
    );
    assert_eq!(c.violations(), &[]);
}

#[test]
fn progress_a_queue_the_broker_stopped_serving() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let broker = BrokerSnapshot {
        now: Time::from_millis(100),
        queued: BTreeMap::from([(ClientId::lit(t::STOCK_SERVICE), 1)]),
        dead: BTreeMap::new(),
        backlog: 0,
    };
    c.progress(100, &broker);
    assert_eq!(c.violations(), &[], "within the gap");
    c.progress(2_000, &broker);
    assert_eq!(first(&c), Some("progress"));
}

fn judge_end(c: &mut Checker, views: Vec<(usize, View)>) {
    let reflects = |_: usize, _: &Message| Some(true);
    let snap = Snapshot {
        at_ms: 9_000,
        down: vec![],
        broker: Some(BrokerSnapshot::default()),
        views,
        unsettled: vec![],
        workload_waiting: false,
        reflects: &reflects,
        recorded: None,
    };
    c.liveness(&snap);
}

#[test]
fn no_lost_request_a_committed_publish_never_acknowledged() {
    let mut c = subscribed();
    let p = publish("o1.created", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        10,
        Event::Emitted {
            node: ORDER,
            publish: &p,
        },
    );
    judge_end(&mut c, vec![]);
    assert_eq!(first(&c), Some("no-lost-request"));
}

#[test]
fn saga_outcome_a_completion_nobody_paid_for() {
    let mut c = subscribed();
    let orders = BTreeMap::from([(
        "o1".to_string(),
        (sagamq_sim::check::OrderPhase::Completed, "Completed".to_string()),
    )]);
    judge_end(&mut c, vec![(ORDER, View::Order { orders })]);
    assert_eq!(first(&c), Some("saga-outcome"));
}

#[test]
fn no_lost_publish_an_acknowledged_message_never_processed() {
    let mut c = subscribed();
    created(&mut c);
    judge_end(&mut c, vec![]);
    assert_eq!(first(&c), Some("no-lost-publish"));
    assert_eq!(c.account().lost, 1);
}

#[test]
fn redelivery_after_a_redrive_is_fine_even_with_a_late_2xx_of_an_older_attempt() {
    let mut c = subscribed();
    let m = created(&mut c);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    for d in 1..=3 {
        sent(&mut c, 13 + 400 * (d - 1), t::STOCK_SERVICE, &m, d);
    }
    // Dead-lettered after 3 attempts, redriven; then attempt 1's 2xx arrives late
    // (the broker no longer knows that attempt) and the redriven copy goes out.
    redrive_first_message(&mut c, 820, &stock);
    c.observe(
        821,
        Event::AnswerReceived {
            delivery: DeliveryId(1),
            ok: true,
        },
    );
    // a redrive starts the count again
    sent_as(&mut c, 822, t::STOCK_SERVICE, &m, 4, 1);
    assert_eq!(c.violations(), &[]);
}

/// Stock subscribes (broker clock 5 s, until 10 s); the broker crashes and
/// its clock comes back stepped back to 2 s; `created` arrives then.
fn created_after_a_clock_step(subscribe_first: bool) -> Checker {
    let mut c = Checker::new(spec());
    let (client, topic) = (ClientId::lit(t::STOCK_SERVICE), Topic::lit(t::SALE_ORDER_CREATED));
    let subscribe = |c: &mut Checker, at_ms: u64, now_ms: u64| {
        let expire = Time::from_millis(10_000);
        c.observe(
            at_ms,
            Event::SubscribeReceived {
                client: &client,
                topic: &topic,
                expire,
                now: Time::from_millis(now_ms),
            },
        );
        c.observe(
            at_ms,
            Event::Subscribed {
                client: &client,
                topic: &topic,
                until: expire,
            },
        );
    };
    if subscribe_first {
        subscribe(&mut c, 5_000, 5_000);
    }
    let p = publish("o1.created", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(6_000, Event::Crashed { node: 0 });
    c.observe(
        6_500,
        Event::Booted {
            node: 0,
            records: 1,
            torn_bytes: 0,
        },
    );
    // The broker's clock now reads 3.5 s less than the history's.
    c.observe(
        7_000,
        Event::PublishReceived {
            publish: &p,
            now: Time::from_millis(3_500),
        },
    );
    let reply = Reply::Published {
        msg_id: MsgId(1),
        duplicate: false,
    };
    c.observe(
        7_001,
        Event::PublishAnswered {
            key: &p.key(),
            reply: &reply,
        },
    );
    if !subscribe_first {
        // Received after the message was stored (broker time 4 s).
        subscribe(&mut c, 8_000, 4_000);
    }
    let m = message(&p, 1);
    sent(&mut c, 9_000, t::STOCK_SERVICE, &m, 1);
    c
}

#[test]
fn entitlement_survives_a_broker_clock_stepped_back() {
    // Subscribed at broker time 5 s, the message stored at broker time 3.5 s
    // after the step: entitled (the subscription came first in the history
    // and is live on the broker's clock at the receipt).
    let c = created_after_a_clock_step(true);
    assert_eq!(c.violations(), &[]);
}

#[test]
fn entitlement_a_subscription_that_came_after_the_message_was_stored() {
    // Judged by the history's order, a subscription that arrives after the
    // receipt does not entitle, even though it is live on the broker's clock
    // at the receipt's 3.5 s (it asks until 10 s).
    let c = created_after_a_clock_step(false);
    assert_eq!(first(&c), Some("entitlement"));
}

#[test]
fn saga_progress_excuses_an_order_whose_reply_was_published_after_its_subscription_lapsed() {
    let mut c = subscribed();
    // The order's subscription to stock's replies ran out at 1 s (no grace).
    let (order, outbound) = (ClientId::lit(t::ORDER_SERVICE), Topic::lit(t::STOCK_OUTBOUND));
    c.observe(
        3,
        Event::SubscribeReceived {
            client: &order,
            topic: &outbound,
            expire: Time::from_millis(1_000),
            now: Time::from_millis(3),
        },
    );
    c.observe(
        4,
        Event::Subscribed {
            client: &order,
            topic: &outbound,
            until: Time::from_millis(1_000),
        },
    );
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    c.observe(
        14,
        Event::Processed {
            node: STOCK,
            client: &stock,
            key: &m.key(),
        },
    );
    // Stock's reply reaches the broker at 3 s: the order is owed nothing.
    let reply = publish("o1.outbound", t::STOCK_OUTBOUND, "{}", t::STOCK_SERVICE);
    c.observe(
        3_000,
        Event::PublishReceived {
            publish: &reply,
            now: Time::from_millis(3_000),
        },
    );
    assert_eq!(c.coverage()["lapsed_beyond_grace"], 1);
    // The order gives up at 5 s having heard nothing: legitimate, the reply
    // it waited for was lost to the lapse.
    let release = publish("o1.release", t::STOCK_RELEASE, ORDER_JSON, t::ORDER_SERVICE);
    c.observe(
        5_000,
        Event::Emitted {
            node: ORDER,
            publish: &release,
        },
    );
    assert_eq!(c.violations(), &[]);
}

/// Drives `b`: writes what it persists to `disk`, syncs, reports it durable,
/// until it has nothing more to write; returns the callbacks it sent.
fn drive(b: &mut sagamq::broker::Broker, disk: &mut sagamq::log::MemDisk, now: Time) -> Vec<Callback> {
    use sagamq::broker::{BrokerInput, BrokerOutput};
    use sagamq::log::Disk;
    use sagamq::machine::Machine;
    let mut callbacks = Vec::new();
    loop {
        let mut wrote = None;
        while let Some(out) = b.poll_output() {
            match out {
                BrokerOutput::Persist { lsn, frames } => {
                    disk.append(&frames);
                    wrote = Some(lsn);
                }
                BrokerOutput::Rewrite { lsn, frames, .. } => {
                    disk.replace(&frames);
                    wrote = Some(lsn);
                }
                BrokerOutput::Callback(cb) => callbacks.push(cb),
                BrokerOutput::Reply { .. } => {}
            }
        }
        let Some(lsn) = wrote else { return callbacks };
        disk.sync();
        b.handle(now, BrokerInput::Durable { lsn });
    }
}

#[test]
fn recovery_equivalence_a_log_that_forgot_a_dead_letter() {
    use sagamq::broker::{Broker, BrokerConfig, BrokerInput, CallbackResult, RequestId};
    use sagamq::log::Disk;
    use sagamq::machine::Machine;
    use sagamq_sim::check::DurableState;
    let config = BrokerConfig {
        attempts_max: 1,
        ..BrokerConfig::default()
    };
    let mut b = Broker::new(config.clone(), 1);
    let mut disk = sagamq::log::MemDisk::new();
    let now = Time::from_millis(1_000);
    let subscribe = sagamq::SubscribeRequest {
        client_id: ClientId::lit(t::STOCK_SERVICE),
        topic: Topic::lit(t::SALE_ORDER_CREATED),
        notify_url: "sim://stock".into(),
        expire_time: Time::from_millis(1_000_000),
    };
    b.handle(
        now,
        BrokerInput::Subscribe {
            req: RequestId(1),
            subscribe,
        },
    );
    drive(&mut b, &mut disk, now);
    let p = publish("o1.created", t::SALE_ORDER_CREATED, ORDER_JSON, t::ORDER_SERVICE);
    b.handle(
        now,
        BrokerInput::Publish {
            req: RequestId(2),
            publish: p,
        },
    );
    let callbacks = drive(&mut b, &mut disk, now);
    let before_dead_letter = disk.read_all();
    // Its one attempt fails: a dead letter, recorded in the log.
    b.handle(
        now,
        BrokerInput::CallbackResult {
            delivery: callbacks[0].delivery,
            result: CallbackResult::Failed,
        },
    );
    drive(&mut b, &mut disk, now);
    let live = DurableState::of(&b);
    assert_eq!(live.dead[&ClientId::lit(t::STOCK_SERVICE)].len(), 1);
    // Recovered from everything it wrote: the same state.
    let (whole, _) = Broker::recover(config.clone(), 1, &disk.read_all()).expect("recovers");
    assert_eq!(live.differs(&DurableState::of(&whole)), None);
    // Recovered from a log without the dead-lettering (what a compaction that
    // forgets dead letters would leave): the probe names the difference.
    let (forgot, _) = Broker::recover(config, 1, &before_dead_letter).expect("recovers");
    let d = live.differs(&DurableState::of(&forgot)).expect("the states differ");
    assert!(d.contains("dead letters"), "{d}");

    // The stats audit: the live broker's log figures match a recount of what
    // it wrote, and fire when they do not (a miscounted batch, a lost write).
    let image = disk.read_all();
    let (_, report) = Broker::recover(BrokerConfig::default(), 1, &image).expect("recovers");
    let max = BrokerConfig::default().dedup_settled_max;
    assert_eq!(DurableState::audit(&b, max, image.len() as u64, report.records), None);
    let d = DurableState::audit(&b, max, image.len() as u64, report.records + 1).expect("miscounted records");
    assert!(d.contains("log records"), "{d}");
    let d = DurableState::audit(&b, max, before_dead_letter.len() as u64, report.records).expect("miscounted bytes");
    assert!(d.contains("log bytes"), "{d}");
}

#[test]
fn retry_too_soon_after_the_previous_attempt() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    c.observe(
        14,
        Event::AnswerReceived {
            delivery: DeliveryId(1),
            ok: false,
        },
    );
    // The backoff after attempt 1 is at least half of 100 ms.
    sent(&mut c, 40, t::STOCK_SERVICE, &m, 2);
    assert_eq!(first(&c), Some("retry"));
}

#[test]
fn retry_spaced_by_the_backoff_passes_and_a_skipped_number_fails() {
    let mut c = subscribed();
    let m = created(&mut c);
    sent(&mut c, 13, t::STOCK_SERVICE, &m, 1);
    sent(&mut c, 63, t::STOCK_SERVICE, &m, 2);
    // After attempt 2 the floor is half of 200 ms.
    sent(&mut c, 163, t::STOCK_SERVICE, &m, 3);
    assert_eq!(c.violations(), &[]);
    sent_as(&mut c, 1_000, t::STOCK_SERVICE, &m, 5, 5);
    assert_eq!(first(&c), Some("retry"));
}

/// Stock's view with order o1 deducted (2 of p1, level 3 of 5): the
/// conservation holds; `reported` is what stock itself reports as held.
fn stock_view(reported: u64) -> View {
    View::Stock {
        initial: BTreeMap::from([("p1".to_string(), 5)]),
        level: BTreeMap::from([("p1".to_string(), 3)]),
        orders: BTreeMap::from([(
            "o1".to_string(),
            sagamq_sim::view::StockEffects {
                product: "p1".into(),
                deducted: 2,
                restocked: 0,
            },
        )]),
        reported_held: Some(BTreeMap::from([("p1".to_string(), reported)])),
    }
}

#[test]
fn conservation_a_participant_that_misreports_what_it_holds() {
    let judge = |reported: u64| {
        let mut c = subscribed();
        let snap = Snapshot {
            at_ms: 9_000,
            down: vec![],
            broker: Some(BrokerSnapshot::default()),
            views: vec![(sagamq_sim::topology::STOCK, stock_view(reported))],
            unsettled: vec![],
            workload_waiting: false,
            reflects: &|_, _| None,
            recorded: None,
        };
        c.safety(&snap);
        c.violations().iter().map(|v| v.invariant).collect::<Vec<_>>()
    };
    assert_eq!(judge(2), Vec::<&str>::new());
    assert_eq!(judge(0), vec!["conservation"]);
}

/// Three messages for stock, stored at once (ids 1, 2, 3).
fn three_created(c: &mut Checker) -> Vec<Message> {
    (1..=3)
        .map(|n| {
            let p = publish(
                &format!("o{n}.created"),
                t::SALE_ORDER_CREATED,
                ORDER_JSON,
                t::ORDER_SERVICE,
            );
            c.observe(
                10,
                Event::PublishReceived {
                    publish: &p,
                    now: Time::from_millis(10),
                },
            );
            let reply = Reply::Published {
                msg_id: MsgId(n),
                duplicate: false,
            };
            c.observe(
                11,
                Event::PublishAnswered {
                    key: &p.key(),
                    reply: &reply,
                },
            );
            message(&p, n)
        })
        .collect()
}

#[test]
fn window_a_third_callback_while_two_are_outstanding() {
    let mut c = subscribed();
    let m = three_created(&mut c);
    let send =
        |c: &mut Checker, at_ms: u64, m: &Message, delivery: u64| sent_as(c, at_ms, t::STOCK_SERVICE, m, delivery, 1);
    send(&mut c, 20, &m[0], 1);
    send(&mut c, 21, &m[1], 2);
    assert!(!fired(&c, "window"));
    send(&mut c, 22, &m[2], 3);
    assert!(fired(&c, "window"));
}

#[test]
fn window_frees_a_slot_at_an_answer_or_a_deadline() {
    let mut c = subscribed();
    let m = three_created(&mut c);
    let send =
        |c: &mut Checker, at_ms: u64, m: &Message, delivery: u64| sent_as(c, at_ms, t::STOCK_SERVICE, m, delivery, 1);
    send(&mut c, 20, &m[0], 1);
    send(&mut c, 21, &m[1], 2);
    c.observe(
        30,
        Event::AnswerReceived {
            delivery: DeliveryId(1),
            ok: true,
        },
    );
    send(&mut c, 31, &m[2], 3);
    // Delivery 2's deadline (1,021 ms) has passed: its slot is free again.
    sent_as(&mut c, 1_100, t::STOCK_SERVICE, &m[1], 4, 2);
    assert!(!fired(&c, "window"));
}

#[test]
fn queue_bound_a_third_message_stored_for_a_subscriber_with_two_queued() {
    let mut c = subscribed();
    three_created(&mut c);
    assert_eq!(first(&c), Some("queue-bound"));
}

#[test]
fn queue_bound_a_processed_message_leaves_the_queue() {
    let mut c = subscribed();
    let stock = ClientId::lit(t::STOCK_SERVICE);
    for n in 1..=3u64 {
        let p = publish(
            &format!("o{n}.created"),
            t::SALE_ORDER_CREATED,
            ORDER_JSON,
            t::ORDER_SERVICE,
        );
        c.observe(
            10 * n,
            Event::PublishReceived {
                publish: &p,
                now: Time::from_millis(10 * n),
            },
        );
        let reply = Reply::Published {
            msg_id: MsgId(n),
            duplicate: false,
        };
        c.observe(
            10 * n + 1,
            Event::PublishAnswered {
                key: &p.key(),
                reply: &reply,
            },
        );
        c.observe(
            10 * n + 2,
            Event::Processed {
                node: STOCK,
                client: &stock,
                key: &p.key(),
            },
        );
    }
    assert!(!fired(&c, "queue-bound"));
}

fn fired(c: &Checker, invariant: &str) -> bool {
    c.violations().iter().any(|v| v.invariant == invariant)
}

#[test]
fn queue_bound_a_message_stored_beyond_messages_max() {
    let mut c = subscribed_with(Spec {
        messages_max: 2,
        pending_max: 100,
        ..spec()
    });
    three_created(&mut c);
    let v = c
        .violations()
        .iter()
        .find(|v| v.invariant == "queue-bound")
        .expect("fires");
    assert!(v.detail.contains("TooManyMessages"), "{}", v.detail);
}

#[test]
fn queue_bound_a_message_stored_while_too_many_publishes_wait() {
    let mut c = subscribed_with(Spec {
        unsynced_max: 2,
        pending_max: 100,
        ..spec()
    });
    // Three publishes received before any answer: the third should have
    // been refused (two replies already waited for their records).
    let ps: Vec<PublishRequest> = (1..=3)
        .map(|n| {
            publish(
                &format!("o{n}.created"),
                t::SALE_ORDER_CREATED,
                ORDER_JSON,
                t::ORDER_SERVICE,
            )
        })
        .collect();
    for p in &ps {
        c.observe(
            10,
            Event::PublishReceived {
                publish: p,
                now: Time::from_millis(10),
            },
        );
    }
    for (n, p) in ps.iter().enumerate() {
        let reply = Reply::Published {
            msg_id: MsgId(n as u64 + 1),
            duplicate: false,
        };
        c.observe(
            11,
            Event::PublishAnswered {
                key: &p.key(),
                reply: &reply,
            },
        );
    }
    let v = c
        .violations()
        .iter()
        .find(|v| v.invariant == "queue-bound")
        .expect("fires");
    assert!(v.detail.contains("TooManyUnsyncedPublishes"), "{}", v.detail);
    assert!(v.detail.contains("o3.created"), "{}", v.detail);
}

#[test]
fn retry_after_a_redrive_starts_at_attempt_one() {
    let mut c = subscribed();
    let m = created(&mut c);
    let stock = ClientId::lit(t::STOCK_SERVICE);
    for d in 1..=3 {
        sent(&mut c, 13 + 400 * (d - 1), t::STOCK_SERVICE, &m, d);
    }
    redrive_first_message(&mut c, 900, &stock);
    // The redriven message goes out as attempt 3 again: the count kept on.
    sent_as(&mut c, 901, t::STOCK_SERVICE, &m, 4, 3);
    assert!(fired(&c, "retry"));
}

#[test]
fn unsynced_refusal_needs_the_bound_reached() {
    let mut c = Checker::new(spec()); // unsynced_max: 100
    c.unsynced_refusal(100, 5);
    assert_eq!(first(&c), None);
    c.unsynced_refusal(99, 6);
    assert_eq!(first(&c), Some("queue-bound"));
}

#[test]
fn compaction_trigger_needs_more_garbage_than_its_threshold() {
    // 30 records with the batch, 10 kept: 20 of garbage, above max(16, 10).
    let mut c = Checker::new(spec());
    c.compaction_judged(29, 30, 10, 16, 5);
    assert_eq!(first(&c), None);
    // 20 of garbage is not more than the threshold 20: compacted too early.
    c.compaction_judged(29, 30, 10, 20, 6);
    assert_eq!(first(&c), Some("compaction-trigger"));
    // A batch that added no record to the log it replaced.
    let mut c = Checker::new(spec());
    c.compaction_judged(30, 30, 1, 1, 7);
    assert_eq!(first(&c), Some("compaction-trigger"));
}

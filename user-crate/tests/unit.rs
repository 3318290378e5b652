//! The loyalty service at unit level, without madsim: its decisions one by
//! one, then `sagamq::testkit::World` (the shipped saga in-process) with lost
//! answers that the broker redelivers later and a small inbox, which catches
//! the two idempotency bugs the simulator catches.

use loyalty_example::{Change, Loyalty, POINTS, Variant, once_per_order};
use sagamq::saga::{Decision, Participant, scenario, topics};
use sagamq::testkit::{self, World};
use sagamq::{GlobalId, Message, MsgId, SenderId, SubId, Time, Topic};
use std::time::Duration;

fn message(topic: &str, order: &str, sub: &str, content: &str) -> Message {
    Message {
        msg_id: MsgId(1),
        global_id: GlobalId::lit(order),
        sub_id: SubId::lit(&format!("{order}.{sub}")),
        sender_id: SenderId::lit("test"),
        create_time: 0,
        topic: Topic::lit(topic),
        content: content.to_string(),
    }
}

/// Decides and, on a commit, applies (what the host does, minus durability).
fn deliver(l: &mut Loyalty, m: &Message) {
    if let Decision::Commit { change: Some(c), .. } = l.on_message(Time::ZERO, m) {
        l.apply(&c);
    }
}

#[test]
fn a_cancel_before_the_payment_result_prevents_the_award() {
    let paid = message(topics::PAYMENT_RESULT, "o1", "payment", "1");
    let cancel = message(topics::PAYMENT_CANCEL, "o1", "payment-cancel", "{}");
    for (variant, points) in [(Variant::Fixed, 0), (Variant::NoHangingGuard, POINTS)] {
        let mut l = Loyalty::with_variant(variant);
        deliver(&mut l, &cancel);
        deliver(&mut l, &paid);
        assert_eq!(l.points_of("o1"), points, "{variant}");
    }
}

#[test]
fn a_cancel_after_the_award_takes_it_back() {
    let paid = message(topics::PAYMENT_RESULT, "o1", "payment", "1");
    let cancel = message(topics::PAYMENT_CANCEL, "o1", "payment-cancel", "{}");
    for (variant, points) in [(Variant::Fixed, 0), (Variant::ForgetsToRecord, POINTS)] {
        let mut l = Loyalty::with_variant(variant);
        deliver(&mut l, &paid);
        deliver(&mut l, &cancel);
        assert_eq!(l.points_of("o1"), points, "{variant}");
        assert_eq!(
            l.on_message(Time::ZERO, &cancel),
            Decision::Ignore,
            "{variant}: a cancel again decides nothing"
        );
    }
    let mut l = Loyalty::new();
    deliver(&mut l, &paid);
    assert!(matches!(
        l.on_message(Time::ZERO, &cancel),
        Decision::Commit {
            change: Some(Change::Revoke { points: POINTS, .. }),
            ..
        }
    ));
}

/// Runs the 20-order saga in-process with the loyalty service beside it; every
/// third answer is lost (the broker redelivers after its callback timeout,
/// after other messages) and the service's inbox remembers two keys.
fn most_credits(variant: Variant, seed: u64) -> u32 {
    let mut world = World::for_scenario(&scenario::saga(20), seed);
    world.trace_enabled = false;
    world.lose_answer_every = 3;
    let mut config = testkit::host_config("loyalty-service", seed);
    config.inbox_keys_max = 2;
    world.add(Loyalty::with_variant(variant), config);
    world.start().expect("subscribed");
    let limit = world.now().plus(Duration::from_secs(600));
    world.run_until(limit, World::saga_settled).expect("the saga settles");
    let l = world.host::<Loyalty>("loyalty-service").expect("hosted").logic();
    assert!(!l.credits.is_empty(), "some orders were paid");
    if variant == Variant::Fixed {
        once_per_order(l).expect("the fixed service credits once");
    }
    l.credits.values().copied().max().unwrap_or(0)
}

#[test]
fn lost_answers_redelivered_later_catch_the_idempotency_bugs() {
    for variant in [Variant::NoIdempotencyGuard, Variant::ForgetsToRecord] {
        let caught = (0..5).filter(|&seed| most_credits(variant, seed) > 1).count();
        assert!(caught > 0, "{variant}: a redelivery past a 2-key inbox credits twice");
    }
    for seed in 0..5 {
        assert_eq!(most_credits(Variant::Fixed, seed), 1, "seed {seed}");
    }
}

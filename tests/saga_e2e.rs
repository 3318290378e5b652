//! End to end: the broker core and the three participants wired by the
//! testkit (in process, virtual time, auto-durable disks): the `seed` and
//! `saga` scenarios, with and without duplicates and crashes.

use sagamq::saga::order::{Order, OrderStatus};
use sagamq::saga::payment::Payment;
use sagamq::saga::scenario::{self, Scenario};
use sagamq::saga::stock::Stock;
use sagamq::saga::{CommandOutcome, ProductId, topics};
use sagamq::testkit::World;
use sagamq::types::Time;
use std::time::Duration;

fn settle(world: &mut World, within: Duration) {
    let limit = world.now().plus(within);
    if let Err(e) = world.run_until(limit, World::saga_settled) {
        let tail: Vec<&String> = world.trace().iter().rev().take(40).collect();
        panic!("did not settle: {e}\nlast trace lines (newest first):\n{tail:#?}");
    }
}

fn assert_clean(world: &World) {
    let violations = world.audit(true);
    assert!(violations.is_empty(), "violations: {violations:#?}");
}

#[test]
fn seed_scenario_ends_as_the_go_test_expects() {
    let scenario = scenario::seed();
    let mut world = World::for_scenario(&scenario, 1);
    world.start().unwrap();
    settle(&mut world, Duration::from_secs(5));
    let order = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
    for (id, status) in &scenario.expected {
        assert_eq!(order.status(id), Some(*status), "{id}");
    }
    let stock = world.host::<Stock>(topics::STOCK_SERVICE).unwrap().logic();
    assert_eq!(stock.level(&ProductId::lit("test-prod-1")), 9);
    assert!(world.commands().iter().all(|c| c.outcome == CommandOutcome::Committed));
    assert_eq!(world.commands().len(), 2);
    assert_clean(&world);
    // Settled well before the deadline: nothing waits on a timer.
    assert!(world.now() < Time::from_millis(1_000), "took until {}", world.now());
}

fn run_saga(scenario: &Scenario, seed: u64, duplicate_every: u64) -> World {
    let mut world = World::for_scenario(scenario, seed);
    world.trace_enabled = false;
    world.duplicate_every = duplicate_every;
    world.start().unwrap();
    settle(&mut world, Duration::from_secs(120));
    world
}

fn conserved(world: &World, scenario: &Scenario) {
    let stock = world.host::<Stock>(topics::STOCK_SERVICE).unwrap().logic();
    let payment = world.host::<Payment>(topics::PAYMENT_SERVICE).unwrap().logic();
    let order = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
    let held_stock: u64 = stock.orders().values().map(|o| o.held()).sum();
    let held_money: u64 = payment.orders().values().map(|o| o.held()).sum();
    assert_eq!(
        stock.levels().values().sum::<u64>() + held_stock,
        scenario.stock_total()
    );
    assert_eq!(
        payment.balances().values().sum::<u64>() + held_money,
        scenario.money_total()
    );
    assert_eq!(order.orders().len(), scenario.orders.len());
}

#[test]
fn saga_scenario_settles_consistently() {
    for seed in 0..4 {
        let scenario = scenario::saga(seed);
        let world = run_saga(&scenario, seed, 0);
        assert_clean(&world);
        conserved(&world, &scenario);
        let counts = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic().counts();
        // Scarce stock and short balances: both failure paths run.
        assert!(
            counts.get(&OrderStatus::StockOutboundFailed).copied().unwrap_or(0) > 0,
            "seed {seed}: {counts:?}"
        );
        assert!(
            counts.get(&OrderStatus::Completed).copied().unwrap_or(0) > 0,
            "seed {seed}: {counts:?}"
        );
    }
}

#[test]
fn saga_scenario_compensates_refused_payments() {
    let compensated: usize = (0..4)
        .map(|seed| {
            let world = run_saga(&scenario::saga(seed), seed, 0);
            let counts = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic().counts();
            counts.get(&OrderStatus::Compensated).copied().unwrap_or(0)
        })
        .sum();
    assert!(compensated > 0, "no seed exercised compensation");
}

#[test]
fn saga_scenario_with_duplicate_callbacks_has_no_double_effects() {
    let scenario = scenario::saga(11);
    let world = run_saga(&scenario, 11, 3);
    assert!(world.stats().duplicated_callbacks > 10);
    assert_clean(&world);
    conserved(&world, &scenario);
}

#[test]
fn seed_order_that_hears_nothing_cancels_and_ends_compensated() {
    let scenario = scenario::seed();
    let deadline = scenario.order_deadline.unwrap();
    let mut world = World::for_scenario(&scenario, 2);
    world.start().unwrap();
    // Stock is unreachable past the orders' deadlines: the broker's callbacks fail.
    world.pause(topics::STOCK_SERVICE);
    world.run_for(deadline + Duration::from_secs(1)).unwrap();
    let order = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
    for id in scenario.expected.keys() {
        assert_eq!(order.status(id), Some(OrderStatus::Compensating), "{id}");
    }
    world.resume(topics::STOCK_SERVICE);
    settle(&mut world, Duration::from_secs(120));
    let order = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
    for id in scenario.expected.keys() {
        assert_eq!(order.status(id), Some(OrderStatus::Compensated), "{id}");
    }
    let stock = world.host::<Stock>(topics::STOCK_SERVICE).unwrap().logic();
    assert_eq!(
        stock.level(&ProductId::lit("test-prod-1")),
        10,
        "every deduction released"
    );
    assert_clean(&world);
}

#[test]
fn saga_order_waiting_for_payment_cancels_both_steps_at_its_deadline() {
    let scenario = scenario::saga(5);
    let deadline = scenario.order_deadline.unwrap();
    let mut world = World::for_scenario(&scenario, 5);
    world.trace_enabled = false;
    world.start().unwrap();
    world.pause(topics::PAYMENT_SERVICE);
    world.run_for(deadline + Duration::from_secs(3)).unwrap();
    world.resume(topics::PAYMENT_SERVICE);
    settle(&mut world, Duration::from_secs(300));
    let order = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
    let timed_out_after_stock = order
        .orders()
        .values()
        .filter(|o| {
            o.compensation
                .as_ref()
                .is_some_and(|c| c.payment_cancel_confirmed == Some(true))
        })
        .count();
    assert!(timed_out_after_stock > 0, "{:?}", order.counts());
    assert_eq!(
        order.counts().get(&OrderStatus::Completed),
        None,
        "no payment could complete"
    );
    assert_clean(&world);
    conserved(&world, &scenario);
}

/// Crashes a participant or the broker every few dozen steps (sometimes with
/// a torn write), duplicates callbacks and sometimes makes stock unreachable
/// for a while; then heals (redrives dead letters) and lets the run settle:
/// recovery from the records alone must keep every invariant.
#[test]
fn saga_scenario_survives_crashes_of_every_node() {
    use sagamq::rng::Rng;
    let nodes = [
        topics::ORDER_SERVICE,
        topics::STOCK_SERVICE,
        topics::PAYMENT_SERVICE,
        "broker",
    ];
    for seed in 0..12 {
        let scenario = scenario::saga(seed);
        let mut world = World::for_scenario(&scenario, seed);
        world.trace_enabled = false;
        world.duplicate_every = seed % 4;
        world.start().unwrap();
        let mut rng = Rng::new(seed ^ 0xABC);
        for _ in 0..15 {
            let target = world.stats().steps + rng.range_inclusive(5, 150);
            let limit = world.now().plus(Duration::from_secs(60));
            if world
                .run_until(limit, |w| w.stats().steps >= target || w.saga_settled())
                .is_err()
            {
                break;
            }
            let torn = rng.chance(300_000).then(|| rng.below(400) as usize);
            let node = nodes[rng.below(nodes.len() as u64) as usize];
            if node == "broker" {
                world.crash_broker(torn).unwrap();
            } else {
                world.crash(node, torn).unwrap();
            }
            if rng.chance(100_000) {
                world.pause(topics::STOCK_SERVICE);
                world.run_for(Duration::from_secs(25)).unwrap();
                world.resume(topics::STOCK_SERVICE);
            }
        }
        world.redrive_all();
        settle(&mut world, Duration::from_secs(600));
        assert!(world.stats().crashes >= 5, "seed {seed}: {:?}", world.stats());
        assert_clean(&world);
        conserved(&world, &scenario);
    }
}

#[test]
fn seed_scenario_trace() {
    let mut world = World::for_scenario(&scenario::seed(), 1);
    world.start().unwrap();
    settle(&mut world, Duration::from_secs(5));
    // The participants' side of the conversation (the broker's own lines are
    // the broker's snapshots' business).
    let lines: Vec<&str> = world
        .trace()
        .iter()
        .map(String::as_str)
        .filter(|l| !l.contains(" broker "))
        .collect();
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("saga_seed_e2e_trace", lines.join("\n"));
    });
}

#[test]
fn same_seed_same_trace() {
    let run = || {
        let mut world = World::for_scenario(&scenario::saga(9), 9);
        world.duplicate_every = 5;
        world.start().unwrap();
        world.run_for(Duration::from_millis(700)).unwrap();
        world.crash(topics::STOCK_SERVICE, Some(7)).unwrap();
        world.crash_broker(None).unwrap();
        settle(&mut world, Duration::from_secs(300));
        world.trace().to_vec()
    };
    let (a, b) = (run(), run());
    assert!(a.len() > 1000);
    assert_eq!(a, b);
}

mod idempotency {
    //! A participant that trusts the host's inbox (no guard per order) ships
    //! twice once a redelivery outlives the inbox's memory. The simulator
    //! catches it; so does the testkit with lost answers (redelivered later,
    //! after other messages) and a small inbox. Duplicates alone arrive back to
    //! back and the inbox absorbs them.

    use super::*;
    use sagamq::saga::{Decision, Participant};
    use sagamq::testkit;
    use sagamq::{GlobalId, Message, Topic};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Clone, Debug, Default)]
    struct Shipping {
        guarded: bool,
        shipped: BTreeMap<GlobalId, u32>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Shipped {
        order: GlobalId,
    }

    impl Participant for Shipping {
        type Change = Shipped;
        fn topics(&self) -> Vec<Topic> {
            vec![Topic::lit(topics::PAYMENT_RESULT)]
        }
        fn on_message(&self, _now: Time, m: &Message) -> Decision<Shipped> {
            if m.content != "1" || (self.guarded && self.shipped.contains_key(&m.global_id)) {
                return Decision::Ignore;
            }
            Decision::change(Shipped {
                order: m.global_id.clone(),
            })
        }
        fn apply(&mut self, change: &Shipped) {
            *self.shipped.entry(change.order.clone()).or_default() += 1;
        }
    }

    /// Most shipments of one order in a saga run with these faults.
    fn most_shipments(guarded: bool, seed: u64, duplicate_every: u64, lose_answer_every: u64) -> u32 {
        let mut world = World::for_scenario(&scenario::saga(20), seed);
        world.trace_enabled = false;
        world.duplicate_every = duplicate_every;
        world.lose_answer_every = lose_answer_every;
        let mut config = testkit::host_config("shipping-service", seed);
        config.inbox_keys_max = 2;
        world.add(
            Shipping {
                guarded,
                ..Shipping::default()
            },
            config,
        );
        world.start().unwrap();
        settle(&mut world, Duration::from_secs(600));
        let shipping = world.host::<Shipping>("shipping-service").unwrap().logic();
        assert!(!shipping.shipped.is_empty(), "some orders were paid");
        shipping.shipped.values().copied().max().unwrap_or(0)
    }

    #[test]
    fn back_to_back_duplicates_are_absorbed_by_the_inbox() {
        for seed in 0..5 {
            assert_eq!(most_shipments(false, seed, 2, 0), 1, "seed {seed}");
        }
    }

    #[test]
    fn lost_answers_redelivered_later_expose_a_missing_guard() {
        let caught = (0..5).filter(|&seed| most_shipments(false, seed, 0, 3) > 1).count();
        assert!(caught > 0, "a later redelivery past a 2-key inbox ships twice");
        for seed in 0..5 {
            assert_eq!(
                most_shipments(true, seed, 0, 3),
                1,
                "the guarded one ships once (seed {seed})"
            );
        }
    }
}

//! Any explicit fault plan must leave the invariants intact. proptest draws
//! plans (crashes with torn writes, partitions, drops, duplicates, delays,
//! lost answers, callback errors, skewed clocks, short retry budgets, small
//! participant inboxes and a slow operator); a failure shrinks to a minimal
//! plan, printed with its trace.

use proptest::prelude::*;
use sagamq_sim::plan::{FAULTY_NODES, Fault, FaultPlan, FaultProfile};
use sagamq_sim::scenario::Scenario;
use sagamq_sim::trace;
use sagamq_sim::world::{self, RunConfig};

fn fault() -> impl Strategy<Value = Fault> {
    let node = proptest::sample::select(FAULTY_NODES.to_vec());
    prop_oneof![
        (0..400u32).prop_map(|nth| Fault::Drop { nth }),
        (0..200u32).prop_map(|nth| Fault::AckLost { nth }),
        (0..400u32).prop_map(|nth| Fault::Duplicate { nth }),
        (0..400u32, 1..400u32).prop_map(|(nth, ms)| Fault::Delay { nth, ms }),
        (0..200u32, any::<bool>()).prop_map(|(nth, hang)| Fault::CallbackError { nth, hang }),
        (
            0..3_000u32,
            10..2_000u32,
            node.clone(),
            proptest::option::of(node.clone())
        )
            .prop_map(|(at_ms, for_ms, a, b)| Fault::Partition { at_ms, for_ms, a, b }),
        (0..3_000u32, 1..1_500u32, node.clone(), proptest::option::of(1..300u32)).prop_map(
            |(at_ms, down_ms, node, torn_keep)| Fault::Crash {
                at_ms,
                down_ms,
                node,
                torn_keep,
                tail: None
            }
        ),
        (node, -1_000..1_000i32, -1_000..1_000i32).prop_map(|(node, offset_ms, drift_ppm)| Fault::ClockSkew {
            node,
            offset_ms,
            drift_ppm
        }),
        Just(Fault::SlowOperator),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_fault_plan_keeps_the_invariants(
        seed in 0..1_000u64,
        faults in proptest::collection::vec(fault(), 0..30),
        attempts_max in proptest::option::of(1..5u32),
        // Small inboxes on order (1), stock (2), payment (3): part of the plan
        // now, so explicit plans draw them here as the seeds do.
        inbox_keys_max in proptest::collection::btree_map(1u8..=3, 1u32..=8, 0..=3),
        // A short order deadline, as half the saga seeds draw.
        order_deadline_ms in proptest::option::of(300..3_000u32),
    ) {
        let profile = FaultProfile { attempts_max, inbox_keys_max, order_deadline_ms, ..Default::default() };
        let plan = FaultPlan { profile, faults };
        let mut cfg = RunConfig::new(Scenario::Saga { orders: 6 }, None);
        let r = world::run(seed, &plan, &cfg);
        if !r.violations.is_empty() {
            cfg.trace = true;
            let traced = world::run(seed, &plan, &cfg);
            prop_assert!(false, "seed {seed} plan:\n{plan}violations: {:?}\ntrace:\n{}", r.violations, trace::render(&traced.trace));
        }
    }
}

/// The swarm-drawn inbox bounds are part of the plan: printed in its profile
/// line (so a trace shows them), carried by its JSON, and a plan written before
/// they existed still parses (as "every inbox at the host's default").
#[test]
fn inbox_bounds_are_part_of_the_plan() {
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None);
    let (seed, plan) = (0..100u64)
        .map(|s| (s, sagamq_sim::runner::plan_for(s, &cfg)))
        .find(|(_, p)| !p.profile.inbox_keys_max.is_empty())
        .expect("half the seeds draw a small inbox for some node");
    let line = plan.profile.to_string();
    assert!(line.contains("inbox_keys_max=("), "{line}");
    let json = serde_json::to_string(&plan).expect("plan serializes");
    let back: FaultPlan = serde_json::from_str(&json).expect("plan parses");
    assert_eq!(back, plan);

    let mut traced = cfg.clone();
    traced.trace = true;
    let r = world::run(seed, &plan, &traced);
    assert!(
        r.trace[0].contains("inbox_keys_max=("),
        "the trace prints it: {}",
        r.trace[0]
    );

    let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
    old["profile"]
        .as_object_mut()
        .expect("profile object")
        .remove("inbox_keys_max");
    let old: FaultPlan = serde_json::from_value(old).expect("an old plan parses");
    assert!(old.profile.inbox_keys_max.is_empty());
    assert!(old.profile.to_string().contains("inbox_keys_max=default"));
}

/// The swarm-drawn order deadline is part of the plan too: printed in the
/// profile line, carried by the JSON (a replay of the JSON gets it, not the
/// default), and it is what the orders run with.
#[test]
fn the_order_deadline_is_part_of_the_plan() {
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None);
    let (seed, plan) = (0..100u64)
        .map(|s| (s, sagamq_sim::runner::plan_for(s, &cfg)))
        .find(|(_, p)| p.profile.order_deadline_ms.is_some())
        .expect("half the saga seeds draw a short order deadline");
    let ms = plan.profile.order_deadline_ms.expect("drawn");
    assert!((300..=3_000).contains(&ms));
    let line = plan.profile.to_string();
    assert!(line.contains(&format!("order_deadline={ms}ms")), "{line}");
    let json = serde_json::to_string(&plan).expect("plan serializes");
    assert!(json.contains(&format!("\"order_deadline_ms\":{ms}")), "{json}");

    let mut traced = cfg.clone();
    traced.trace = true;
    let r = world::run(seed, &plan, &traced);
    assert!(r.trace[0].contains(&format!("order_deadline={ms}ms")), "{}", r.trace[0]);

    // The world runs with the plan's deadline, not one of its own: a deadline
    // shorter than any saga cancels every order that has not completed.
    let mut short = plan.clone();
    short.profile.order_deadline_ms = Some(1);
    let r = world::run(seed, &short, &traced);
    assert!(
        r.outcomes.get("Completed").copied().unwrap_or(0) == 0,
        "a 1 ms deadline leaves no order time to complete: {:?}",
        r.outcomes
    );

    // A plan written before the field existed: the shipped default.
    let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
    old["profile"]
        .as_object_mut()
        .expect("profile object")
        .remove("order_deadline_ms");
    let old: FaultPlan = serde_json::from_value(old).expect("an old plan parses");
    assert_eq!(old.profile.order_deadline_ms, None);
    assert!(old.profile.to_string().contains("order_deadline=default"));
}

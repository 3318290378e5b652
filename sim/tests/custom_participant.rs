//! A user's own participant plugged into the madsim simulator: a shipping
//! service that ships every paid order exactly once, run on its own node under
//! the same swarm faults as the shipped services (crashes with torn writes,
//! partitions, lost and duplicated callbacks, skewed clocks).

mod common;

use sagamq::saga::{Decision, Outgoing, Participant, topics};
use sagamq::{GlobalId, Message, SubId, Time, Topic};
use sagamq_sim::check::{OrderPhase, View};
use sagamq_sim::custom::CustomNode;
use sagamq_sim::plan::FaultPlan;
use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::RunConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default)]
struct Shipping {
    /// Order -> how many times it was shipped (must stay 1).
    shipped: BTreeMap<GlobalId, u32>,
}

/// The committed change: replayed by `apply` live and after a crash.
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
        if m.content != "1" || self.shipped.contains_key(&m.global_id) {
            return Decision::Ignore;
        }
        let notice = Outgoing {
            topic: Topic::lit("sale-order.shipped"),
            global_id: m.global_id.clone(),
            sub_id: SubId::new(format!("{}.shipped", m.global_id)).expect("short order ids"),
            content: "{}".to_string(),
        };
        Decision::change_and_publish(
            Shipped {
                order: m.global_id.clone(),
            },
            notice,
        )
    }

    fn apply(&mut self, change: &Shipped) {
        *self.shipped.entry(change.order.clone()).or_default() += 1;
    }
}

/// Checked by the simulator whenever it judges safety.
fn shipped_at_most_once(s: &Shipping) -> Result<(), String> {
    match s.shipped.iter().find(|(_, n)| **n > 1) {
        Some((order, n)) => Err(format!("order {order} shipped {n} times")),
        None => Ok(()),
    }
}

#[test]
fn a_custom_participant_survives_the_swarm() {
    let shipping = CustomNode::new("shipping-service", Shipping::default(), shipped_at_most_once);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None).with_custom(shipping);
    let mut completed_total = 0;
    for seed in common::seeds(0..40) {
        let r = runner::run_seed(seed, &cfg);
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {:?}\n{}",
            r.violations,
            runner::replay_command(seed, &cfg)
        );
        let shipping = r.views["shipping-service"]
            .custom_state::<Shipping>()
            .expect("the custom node ran");
        let View::Order { orders } = &r.views["order"] else {
            panic!("order view")
        };
        for (id, (phase, _)) in orders {
            if *phase == OrderPhase::Completed {
                completed_total += 1;
                let id = GlobalId::new(id.clone()).expect("valid order id");
                assert_eq!(
                    shipping.shipped.get(&id),
                    Some(&1),
                    "seed {seed}: completed order {id} shipped once"
                );
            }
        }
    }
    assert!(completed_total > 0, "some orders completed, so shipping had work");
}

#[test]
fn a_broken_custom_invariant_is_reported() {
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(CustomNode::new(
        "shipping-service",
        Shipping::default(),
        never,
    ));
    let r = runner::run_seed(1, &cfg);
    assert_eq!(r.violations.first().map(|v| v.invariant), Some("custom-invariant"));
}

fn never(_: &Shipping) -> Result<(), String> {
    Err("this invariant always fails".to_string())
}

fn panics(_: &Shipping) -> Result<(), String> {
    panic!("a participant's assertion")
}

/// A panic anywhere in a run (here in the checker, through the user's
/// invariant) fails that seed as `panic`, and a sweep goes on and counts it.
#[test]
fn a_panic_fails_its_seed_and_the_sweep_goes_on() {
    let node = CustomNode::new("shipping-service", Shipping::default(), panics);
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(node);
    let r = runner::run_seed(1, &cfg);
    assert!(r.panicked);
    let v = r.violations.first().expect("a violation");
    assert_eq!(v.invariant, "panic");
    assert!(v.detail.contains("a participant's assertion"), "{}", v.detail);
    let s = runner::sweep(&cfg, 0..3, 1, false, &|_, _, _| {});
    assert_eq!((s.seeds, s.failed, s.panics), (3, 3, 3), "{}", s.human());
}

/// The CLI cannot load a user's participant, so a custom configuration's failure
/// must not print `replay` (it would replay a different world, which passes):
/// it prints the user's own command, and the summary says a custom node ran.
#[test]
fn a_custom_failure_prints_a_command_that_reproduces_it() {
    let node = CustomNode::new("shipping-service", Shipping::default(), never);
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(node);

    let plain = runner::sweep(&cfg, 1..2, 1, false, &|_, _, _| {});
    let text = plain.human();
    assert!(
        text.starts_with("scenario saga") && text.contains(" + custom shipping-service: 1 seeds"),
        "{text}"
    );
    assert!(
        !text.contains("replay --seed"),
        "no CLI replay for a custom node: {text}"
    );
    assert!(text.contains("SAGAMQ_SEED=1"), "{text}");
    assert!(
        text.contains("cannot load custom participant shipping-service"),
        "{text}"
    );
    assert!(
        text.contains("runner::explain_failure(1, &cfg)"),
        "names the artifacts call: {text}"
    );

    let cfg = cfg.reproduce_with("SAGAMQ_SEED={seed} cargo test --release -p sagamq-sim --test custom_participant");
    let summary = runner::sweep(&cfg, 1..2, 1, false, &|_, _, _| {});
    assert_eq!(
        summary.failures[0].replay,
        "SAGAMQ_SEED=1 cargo test --release -p sagamq-sim --test custom_participant"
    );
    assert!(
        summary
            .human()
            .contains("reproduce: SAGAMQ_SEED=1 cargo test --release -p sagamq-sim")
    );

    // The shipped configurations keep the CLI's replay.
    let shipped = RunConfig::new(Scenario::Saga { orders: 4 }, None);
    assert!(runner::replay_command(1, &shipped).contains("replay --seed 1 --scenario saga"));
}

/// One call writes what the CLI gives: the trace, the plan, the shrunk plan and
/// its trace, and an SVG diagram; the shrunk plan still fails the same way.
#[test]
fn explain_failure_writes_the_trace_the_diagram_and_the_shrunk_plan() {
    let node = CustomNode::new("shipping-service", Shipping::default(), never);
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(node);
    let a = runner::explain_failure(1, &cfg).expect("artifacts written");
    assert!(a.dir.ends_with("sagamq-sim/1"), "{}", a.dir.display());
    assert_eq!(a.violation.as_ref().map(|v| v.invariant), Some("custom-invariant"));
    let trace = std::fs::read_to_string(&a.trace).expect("trace");
    assert!(trace.contains("VIOLATION"), "the trace shows the failure");
    // The custom node's lane is named by its client id (its index stays `custom`).
    assert!(trace.contains("ms shipping-service "), "a lane named by the client id");
    assert!(!trace.contains("ms custom "), "no lane named `custom`");
    let svg = std::fs::read_to_string(&a.svg).expect("svg");
    assert!(
        svg.contains("<svg") && svg.contains("shipping-service"),
        "an SVG naming the custom node"
    );
    let shrunk_path = a.shrunk_plan.as_ref().expect("a failing seed is shrunk");
    let shrunk: FaultPlan =
        serde_json::from_str(&std::fs::read_to_string(shrunk_path).expect("plan")).expect("plan JSON parses");
    let original: FaultPlan =
        serde_json::from_str(&std::fs::read_to_string(&a.plan).expect("plan")).expect("plan JSON parses");
    assert!(shrunk.faults.len() <= original.faults.len());
    let again = sagamq_sim::world::run(1, &shrunk, &cfg);
    assert_eq!(again.violations.first().map(|v| v.invariant), Some("custom-invariant"));
    assert!(a.describe().contains("diagram.svg"));
}

/// Shipping without its guard: trusts the host's inbox to drop redeliveries.
#[derive(Clone, Debug, Default)]
struct TrustingShipping(Shipping);

impl Participant for TrustingShipping {
    type Change = Shipped;
    fn topics(&self) -> Vec<Topic> {
        self.0.topics()
    }
    fn on_message(&self, _now: Time, m: &Message) -> Decision<Shipped> {
        if m.content != "1" {
            return Decision::Ignore;
        }
        Decision::change(Shipped {
            order: m.global_id.clone(),
        })
    }
    fn apply(&mut self, change: &Shipped) {
        self.0.apply(change);
    }
}

/// The inbox forgets, so a participant that trusts it ships twice; the sweep
/// catches it, prints the user's command and names the artifacts, and the
/// shrunk plan still fails.
#[test]
fn a_participant_that_trusts_the_inbox_is_caught_and_explained() {
    fn at_most_once(s: &TrustingShipping) -> Result<(), String> {
        shipped_at_most_once(&s.0)
    }
    let node = CustomNode::new("shipping-service", TrustingShipping::default(), at_most_once);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None)
        .with_custom(node)
        .reproduce_with("SAGAMQ_SEED={seed} cargo test --release -p sagamq-sim --test custom_participant");
    let summary = runner::sweep(&cfg, common::seeds(0..300), 1, true, &|_, _, _| {});
    let Some(f) = summary.failures.first() else {
        panic!("a forgetting inbox exposes the missing guard:\n{}", summary.human());
    };
    assert!(
        ["custom-invariant", "no-lost-effect"].contains(&f.invariant),
        "{}",
        summary.human()
    );
    assert!(f.replay.starts_with(&format!("SAGAMQ_SEED={} cargo test", f.seed)));
    if f.invariant == "no-lost-effect" {
        // Its log records the effect: the verdict blames the logic, not a lost effect.
        assert!(f.detail.contains("the logic is not idempotent"), "{}", f.detail);
        assert!(!f.detail.contains("effect was lost"), "{}", f.detail);
    }
    let a = runner::explain_failure(f.seed, &cfg).expect("artifacts");
    assert!(a.shrunk_plan.is_some() && a.svg.exists() && a.trace.exists());
}

/// The README's message catalogue names every topic and every SubID step.
#[test]
fn the_readme_catalogue_lists_every_topic_and_step() {
    use sagamq::saga::step;
    let readme = include_str!("../../README.md");
    let at = readme.find("### Message catalogue").expect("a catalogue section");
    let catalogue = &readme[at..];
    for t in topics::ALL {
        assert!(catalogue.contains(&format!("`{t}`")), "topic {t} in the catalogue");
    }
    for s in [
        step::CREATED,
        step::OUTBOUND,
        step::PAYMENT_REQUESTED,
        step::PAYMENT,
        step::RELEASE,
        step::RELEASED,
        step::PAYMENT_CANCEL,
        step::PAYMENT_CANCELLED,
    ] {
        assert!(catalogue.contains(&format!("<order>.{s}")), "step {s} in the catalogue");
    }
}

/// Over the whole world, at the end: every completed order shipped once, none
/// whose stock was refused. (Not "exactly the completed ones": this shipping
/// service acts on `payment.result`, and an order can still end Compensated
/// after a paid result reached shipping: in seed 35 order-007 did. A real
/// service would also listen to `payment.cancel`; a final check over the
/// order's view is what exposed the gap.)
fn completed_orders_shipped_once(s: &Shipping, views: &sagamq_sim::custom::Views) -> Result<(), String> {
    let View::Order { orders } = &views["order"] else {
        return Err("no order view".to_string());
    };
    for (id, (phase, _)) in orders {
        let shipped = s.shipped.iter().find(|(o, _)| o.as_str() == id).map_or(0, |(_, n)| *n);
        let wrong = match phase {
            OrderPhase::Completed => shipped != 1,
            OrderPhase::StockOutboundFailed => shipped != 0,
            _ => shipped > 1,
        };
        if wrong {
            return Err(format!("order {id} is {phase:?} but shipped {shipped} times"));
        }
    }
    Ok(())
}

/// A final check sees every participant's view: it passes for the shipping
/// service, and a wrong one ("ship nothing") is reported as
/// `custom-final-invariant`.
#[test]
fn a_final_check_sees_the_whole_world() {
    let node = CustomNode::new("shipping-service", Shipping::default(), shipped_at_most_once)
        .with_final_check(completed_orders_shipped_once);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None).with_custom(node);
    let summary = runner::sweep(&cfg, common::seeds(0..40), 1, false, &|_, _, _| {});
    assert_eq!(summary.failed, 0, "{}", summary.human());

    fn ships_nothing(s: &Shipping, _: &sagamq_sim::custom::Views) -> Result<(), String> {
        match s.shipped.keys().next() {
            Some(o) => Err(format!("shipped {o}")),
            None => Ok(()),
        }
    }
    let node =
        CustomNode::new("shipping-service", Shipping::default(), shipped_at_most_once).with_final_check(ships_nothing);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None).with_custom(node);
    let summary = runner::sweep(&cfg, 0..10, 1, false, &|_, _, _| {});
    assert!(
        summary.failures.iter().any(|f| f.invariant == "custom-final-invariant"),
        "{}",
        summary.human()
    );
}

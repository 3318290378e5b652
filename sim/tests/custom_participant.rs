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

/// `explain_failure` writes under `target/sagamq-sim/<seed>/`: one test at a
/// time, so two that explain the same seed do not write over each other.
static ARTIFACTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _one = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
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
    let _one = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
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
    // Its line names whose check failed, as a `custom-invariant` line does.
    assert!(
        summary
            .failures
            .iter()
            .any(|f| f.invariant == "custom-final-invariant" && f.detail.starts_with("shipping-service: shipped ")),
        "{}",
        summary.human()
    );
}

/// The plan, the trace and the diagram's hover titles name the custom node by
/// its client id (`crash shipping-service at ...`, `shipping-service down`),
/// never by its index name `custom`.
#[test]
fn the_plan_and_the_diagram_name_the_custom_node_by_its_client_id() {
    let node = CustomNode::new("shipping-service", Shipping::default(), shipped_at_most_once);
    let mut cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(node);
    // A seed that crashes the custom node (index 5) and gives it a small inbox.
    let custom = sagamq_sim::topology::CUSTOM as u8;
    let seed = (0..500)
        .find(|&s| {
            let p = runner::plan_for(s, &cfg);
            p.profile.inbox_keys_max.contains_key(&custom)
                && p.faults
                    .iter()
                    .any(|f| matches!(f, sagamq_sim::plan::Fault::Crash { node, .. } if *node == custom))
        })
        .expect("a seed crashes the custom node");
    let plan = runner::plan_for(seed, &cfg);
    // The plan's own Display (and JSON) keep the index name.
    assert!(plan.to_string().contains("crash custom at"), "{plan}");
    let named = plan.describe(Some(cfg.custom.as_ref().unwrap().client_id()));
    assert!(named.contains("crash shipping-service at"), "{named}");
    assert!(named.contains("shipping-service:"), "the inbox bound: {named}");
    assert!(!named.contains("custom"), "{named}");

    cfg.trace = true;
    let r = sagamq_sim::world::run(seed, &plan, &cfg);
    let trace = sagamq_sim::trace::render(&r.trace);
    assert!(trace.contains("crash shipping-service at"), "{trace}");
    assert!(!trace.contains("crash custom"), "{trace}");
    let svg = sagamq_sim::diagram::svg(&r.events, &sagamq_sim::diagram::Options::default()).expect("svg");
    let titles: Vec<&str> = svg
        .split("<title>")
        .skip(1)
        .map(|t| t.split("</title>").next().unwrap_or(""))
        .collect();
    assert!(
        titles.iter().any(|t| t.contains("shipping-service crashes")),
        "a crash title"
    );
    assert!(
        titles.iter().any(|t| t.contains("-&gt; shipping-service:")),
        "an arrow title"
    );
    for t in &titles {
        for bad in [
            "custom down",
            "custom crashes",
            "custom restarts",
            "-&gt; custom:",
            " custom -&gt;",
            "custom at",
            "custom:",
        ] {
            assert!(!t.contains(bad), "hover title names `custom`: {t}");
        }
    }
}

/// A promotion that ended before the run: the service ships nothing, ever.
/// Its decision depends on `now`; an ignored message records nothing (not
/// even in the inbox), so the checker decides every one again. At
/// `Time::ZERO` (inside the promotion) it would ship, and `no-lost-effect`
/// failed every seed blaming a lost effect. The checker decides a redelivery
/// at the latest time the node has seen, as a real one would meet it, so the
/// service passes.
#[derive(Clone, Debug, Default)]
struct EndedPromotion(Shipping);

impl Participant for EndedPromotion {
    type Change = Shipped;
    fn topics(&self) -> Vec<Topic> {
        self.0.topics()
    }
    fn on_message(&self, now: Time, m: &Message) -> Decision<Shipped> {
        let ended = Time::from_millis(1);
        if now >= ended {
            return Decision::Ignore;
        }
        self.0.on_message(now, m)
    }
    fn apply(&mut self, change: &Shipped) {
        self.0.apply(change);
    }
}

#[test]
fn a_decision_that_depends_on_now_does_not_trip_no_lost_effect() {
    fn fine(_: &EndedPromotion) -> Result<(), String> {
        Ok(())
    }
    let node = CustomNode::new("promo-service", EndedPromotion::default(), fine);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None).with_custom(node);
    let paid = Message {
        msg_id: sagamq::MsgId(1),
        global_id: GlobalId::lit("order-001"),
        sub_id: SubId::lit("order-001.payment"),
        sender_id: sagamq::SenderId::lit("payment-service"),
        create_time: 0,
        topic: Topic::lit(topics::PAYMENT_RESULT),
        content: "1".to_string(),
    };
    // What deciding again at Time::ZERO would have done.
    assert_ne!(
        EndedPromotion::default().on_message(Time::ZERO, &paid),
        Decision::Ignore
    );
    let summary = runner::sweep(&cfg, common::seeds(0..60), 1, false, &|_, _, _| {});
    assert_eq!(summary.failed, 0, "{}", summary.human());
    assert!(summary.outcomes.get("Completed").copied().unwrap_or(0) > 0);
}

/// Shrinking puts every drawn setting the failure does not need back to its
/// default (small inboxes, a short order deadline, a short retry budget, small
/// broker bounds, a short TTL), so the shrunk plan shows only what it fails
/// under. An invariant that always fails needs none of them.
#[test]
fn shrinking_drops_the_drawn_settings_a_failure_does_not_need() {
    let node = CustomNode::new("shipping-service", Shipping::default(), never);
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(node);
    let (seed, plan) = (0..200)
        .map(|s| (s, runner::plan_for(s, &cfg)))
        .find(|(_, p)| {
            p.profile.order_deadline_ms.is_some()
                && !p.profile.inbox_keys_max.is_empty()
                && p.profile.attempts_max.is_some()
        })
        .expect("a seed draws a short deadline, a small inbox and a short retry budget");
    let s = runner::shrink(seed, &cfg, plan, 400).expect("the seed fails");
    assert_eq!(s.invariant, "custom-invariant");
    let p = &s.minimal.profile;
    assert!(s.minimal.faults.is_empty(), "{}", s.minimal);
    assert_eq!(
        (
            p.order_deadline_ms,
            p.inbox_keys_max.len(),
            p.attempts_max,
            p.bounds,
            p.subscription_ttl_ms
        ),
        (None, 0, None, None, None),
        "{}",
        s.minimal
    );
}

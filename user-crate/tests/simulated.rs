//! The loyalty service under the simulator's swarm faults, from a crate of its
//! own: the fixed service survives the sweep; each of its three planted bugs
//! fails it, with a command that reproduces the failing run and the trace,
//! diagram and shrunk plan that `runner::explain_failure` writes.
//!
//! Rerun one seed of one variant (what every failure prints):
//!
//! ```sh
//! SAGAMQ_SEED=<n> LOYALTY_VARIANT=<variant> cargo test --release --test simulated loyalty_survives_the_swarm
//! ```

use loyalty_example::{Loyalty, POINTS, Variant, once_per_order};
use sagamq_sim::check::{OrderPhase, View};
use sagamq_sim::custom::{CustomNode, Views};
use sagamq_sim::runner::{self, Failure, RunConfig};
use sagamq_sim::scenario::Scenario;
use std::ops::Range;
use std::sync::Mutex;

/// Seeds the fixed service must pass (and each bug must fail within).
const SEEDS: Range<u64> = 0..500;

/// Over the whole world at the end: points for exactly the orders that completed.
fn points_for_completed_orders(l: &Loyalty, views: &Views) -> Result<(), String> {
    let View::Order { orders } = &views["order"] else {
        return Err("no order view".to_string());
    };
    for (id, (phase, _)) in orders {
        let points = l.points_of(id);
        let expected = if *phase == OrderPhase::Completed { POINTS } else { 0 };
        if points != expected {
            return Err(format!("order {id} is {phase:?} but holds {points} points"));
        }
    }
    Ok(())
}

/// The command that reruns one seed of `variant`.
fn reproduce(variant: Variant) -> String {
    let env = match variant {
        Variant::Fixed => String::new(),
        v => format!("LOYALTY_VARIANT={v} "),
    };
    format!(
        "SAGAMQ_SEED={{seed}} {env}cargo test --release --test simulated loyalty_survives_the_swarm (in user-crate/)"
    )
}

fn config(variant: Variant) -> RunConfig {
    let node = CustomNode::new("loyalty-service", Loyalty::with_variant(variant), once_per_order)
        .with_final_check(points_for_completed_orders);
    RunConfig::new(Scenario::Saga { orders: 8 }, None)
        .with_custom(node)
        .reproduce_with(&reproduce(variant))
}

/// `SAGAMQ_SEED=<n>`: that seed alone.
fn seeds(default: Range<u64>) -> Range<u64> {
    match std::env::var("SAGAMQ_SEED") {
        Ok(s) => {
            let seed: u64 = s.trim().parse().expect("SAGAMQ_SEED must be an integer");
            seed..seed + 1
        }
        Err(_) => default,
    }
}

/// `LOYALTY_VARIANT=<name>`: run a buggy variant (default: the fixed one).
fn variant() -> Variant {
    std::env::var("LOYALTY_VARIANT").map_or(Variant::Fixed, |v| v.trim().parse().expect("LOYALTY_VARIANT"))
}

/// `explain_failure` writes under `target/sagamq-sim/<seed>/`: one at a time.
static ARTIFACTS: Mutex<()> = Mutex::new(());

#[test]
fn loyalty_survives_the_swarm() {
    let cfg = config(variant());
    let summary = runner::sweep(&cfg, seeds(SEEDS), 2, true, &|_, _, _| {});
    if let Some(f) = summary.failures.first() {
        let _one = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
        let artifacts = runner::explain_failure(f.seed, &cfg).expect("artifacts written");
        panic!("{}\n{}", summary.human(), artifacts.describe());
    }
    let completed = summary.outcomes.get("Completed").copied().unwrap_or(0);
    assert!(
        completed > 0,
        "orders completed, so loyalty had work: {}",
        summary.human()
    );
}

/// Sweeps `variant` until it fails; checks that the failure names the command
/// that reruns it and that the files its artifacts line points to exist; then
/// the fixed service passes the same seed.
fn caught(variant: Variant) -> Failure {
    let cfg = config(variant);
    let summary = runner::sweep(&cfg, SEEDS, 2, true, &|_, _, _| {});
    let Some(f) = summary.failures.first().cloned() else {
        panic!("{variant} was not caught in {SEEDS:?}:\n{}", summary.human());
    };
    let text = summary.human();
    eprintln!(
        "{variant}: caught after {} seeds\n{text}",
        summary.seeds_to_first_failure.unwrap_or(0)
    );
    let command = format!(
        "reproduce: SAGAMQ_SEED={} LOYALTY_VARIANT={variant} cargo test --release --test simulated loyalty_survives_the_swarm",
        f.seed
    );
    assert!(text.contains(&command), "the failure names its command:\n{text}");
    assert!(
        text.contains(&format!("explain_failure({}, &cfg)", f.seed)),
        "and the artifacts call:\n{text}"
    );

    let _one = ARTIFACTS.lock().unwrap_or_else(|e| e.into_inner());
    let a = runner::explain_failure(f.seed, &cfg).expect("artifacts written");
    let pointed = runner::artifacts_root().join(f.seed.to_string());
    assert_eq!(a.dir, pointed);
    assert!(
        text.contains(&pointed.display().to_string()),
        "the failure points at {}:\n{text}",
        pointed.display()
    );
    let shrunk = a.shrunk_plan.as_ref().expect("a failing seed is shrunk");
    for file in [&a.trace, &a.plan, &a.svg, shrunk] {
        assert!(file.is_file(), "{} exists", file.display());
    }
    let svg = std::fs::read_to_string(&a.svg).expect("diagram");
    assert!(
        svg.contains("loyalty-service"),
        "the diagram names the node by its client id"
    );
    assert_eq!(a.violation.as_ref().map(|v| v.invariant), Some(f.invariant));
    eprintln!("{}", a.describe());

    let fixed = runner::run_seed(f.seed, &config(Variant::Fixed));
    assert!(
        fixed.violations.is_empty(),
        "the fixed service passes seed {}: {:?}",
        f.seed,
        fixed.violations
    );
    f
}

#[test]
fn bug_no_idempotency_guard_is_caught() {
    let f = caught(Variant::NoIdempotencyGuard);
    assert!(
        ["no-lost-effect", "custom-invariant"].contains(&f.invariant),
        "{}: {}",
        f.invariant,
        f.detail
    );
    if f.invariant == "no-lost-effect" {
        // Its log records the award: the verdict blames the logic, not a lost effect.
        assert!(f.detail.contains("the logic is not idempotent"), "{}", f.detail);
    }
}

#[test]
fn bug_forgets_to_record_is_caught() {
    let f = caught(Variant::ForgetsToRecord);
    assert!(
        ["no-lost-effect", "custom-invariant", "custom-final-invariant"].contains(&f.invariant),
        "{}: {}",
        f.invariant,
        f.detail
    );
}

#[test]
fn bug_no_hanging_guard_is_caught() {
    let f = caught(Variant::NoHangingGuard);
    // Each redelivery is guarded, so only the end state shows it: points
    // awarded to an order that was cancelled.
    assert_eq!(f.invariant, "custom-final-invariant", "{}", f.detail);
    assert!(f.detail.contains("Compensated but holds 10 points"), "{}", f.detail);
}

//! The loyalty service under the simulator's swarm faults, from a crate of its
//! own. `SAGAMQ_SEED=<n> cargo test --release` reruns one seed.

use loyalty_example::{Loyalty, POINTS, once_per_order};
use sagamq_sim::check::{OrderPhase, View};
use sagamq_sim::custom::{CustomNode, Views};
use sagamq_sim::runner::{self, RunConfig};
use sagamq_sim::scenario::Scenario;

/// Over the whole world at the end: points for exactly the orders that completed.
fn points_for_completed_orders(l: &Loyalty, views: &Views) -> Result<(), String> {
    let View::Order { orders } = &views["order"] else {
        return Err("no order view".to_string());
    };
    for (id, (phase, _)) in orders {
        let points = l
            .accounts
            .iter()
            .find(|(o, _)| o.as_str() == id)
            .map_or(0, |(_, a)| a.points());
        let expected = if *phase == OrderPhase::Completed { POINTS } else { 0 };
        if points != expected {
            return Err(format!("order {id} is {phase:?} but holds {points} points"));
        }
    }
    Ok(())
}

fn config(logic: Loyalty) -> RunConfig {
    let node = CustomNode::new("loyalty-service", logic, once_per_order).with_final_check(points_for_completed_orders);
    RunConfig::new(Scenario::Saga { orders: 8 }, None)
        .with_custom(node)
        .reproduce_with("SAGAMQ_SEED={seed} cargo test --release --test simulated (in user-crate/)")
}

fn seeds(default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    match std::env::var("SAGAMQ_SEED") {
        Ok(s) => {
            let seed: u64 = s.trim().parse().expect("SAGAMQ_SEED must be an integer");
            seed..seed + 1
        }
        Err(_) => default,
    }
}

#[test]
fn loyalty_survives_the_swarm() {
    let cfg = config(Loyalty::new());
    let summary = runner::sweep(&cfg, seeds(0..300), 1, true, &|_, _, _| {});
    if let Some(f) = summary.failures.first() {
        let artifacts = runner::explain_failure(f.seed, &cfg).expect("artifacts written");
        panic!("{}\n{}", summary.human(), artifacts.describe());
    }
}

/// The bug the README warns about (trusting the inbox) is caught, and the
/// failure names this crate's own command.
#[test]
fn trusting_the_inbox_is_caught() {
    let cfg = config(Loyalty::trusting());
    let summary = runner::sweep(&cfg, 0..300, 1, true, &|_, _, _| {});
    let f = summary.failures.first().expect("the missing guard is caught");
    assert!(
        f.replay.contains("cargo test --release --test simulated"),
        "{}",
        f.replay
    );
}

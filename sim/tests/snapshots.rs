//! Traces of a few fixed seeds, snapshotted: a behaviour change shows up as a
//! diff for review (`cargo insta review`).

use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::trace;
use sagamq_sim::world::RunConfig;

fn snapshot(name: &str, scenario: Scenario, seed: u64) {
    let mut cfg = RunConfig::new(scenario, None);
    cfg.trace = true;
    let r = runner::run_seed(seed, &cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, trace::render(&r.trace));
    });
}

#[test]
fn trace_seed_scenario_seed_1() {
    snapshot("sim_trace_seed_scenario_seed_1", Scenario::Seed, 1);
}

#[test]
fn trace_saga_4_orders_seed_42() {
    snapshot("sim_trace_saga4_seed_42", Scenario::Saga { orders: 4 }, 42);
}

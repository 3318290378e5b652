//! The same seed gives the same trace bytes: twice in one process, in another
//! process (the shipped binary), and under madsim's own determinism checker.

mod common;

use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::trace;
use sagamq_sim::world::{self, RunConfig};

fn traced(scenario: Scenario) -> RunConfig {
    let mut cfg = RunConfig::new(scenario, None);
    cfg.trace = true;
    cfg
}

#[test]
fn same_seed_same_trace_in_one_process() {
    for scenario in [Scenario::Seed, Scenario::Saga { orders: 6 }] {
        let cfg = traced(scenario);
        for seed in common::seeds(0..12) {
            let a = trace::render(&runner::run_seed(seed, &cfg).trace);
            let b = trace::render(&runner::run_seed(seed, &cfg).trace);
            assert!(a.lines().count() > 20, "a trace has substance");
            assert_eq!(a, b, "seed {seed} {scenario} diverged within one process");
        }
    }
}

#[test]
fn different_seeds_give_different_traces() {
    let cfg = traced(Scenario::Saga { orders: 6 });
    let a = trace::render(&runner::run_seed(1, &cfg).trace);
    let b = trace::render(&runner::run_seed(2, &cfg).trace);
    assert_ne!(a, b);
}

#[test]
fn same_seed_same_trace_in_another_process() {
    let bin = env!("CARGO_BIN_EXE_sagamq-sim");
    for seed in [3u64, 17] {
        let cfg = traced(Scenario::Saga { orders: 20 });
        let here = trace::render(&runner::run_seed(seed, &cfg).trace);
        let out = std::process::Command::new(bin)
            .args(["replay", "--seed", &seed.to_string(), "--scenario", "saga"])
            .output()
            .expect("run sagamq-sim replay");
        let there = String::from_utf8(out.stdout).expect("utf-8 trace");
        assert!(there.contains("trace-hash: "), "replay printed a trace: {there}");
        assert_eq!(here, there, "seed {seed}: another process produced different bytes");
    }
}

#[test]
fn madsim_determinism_checker_agrees() {
    async fn one() {
        let seed = madsim::runtime::Handle::current().seed();
        let cfg = RunConfig::new(Scenario::Saga { orders: 6 }, None);
        let plan = runner::plan_for(seed, &cfg);
        let r = world::simulate(seed, plan, cfg).await;
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }
    for seed in [5u64, 6] {
        madsim::runtime::Runtime::check_determinism(seed, madsim::Config::default(), one);
    }
}

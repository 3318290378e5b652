//! Measures the planted-bug table for the README: for each bug, the invariant
//! of the first failing seed of a `saga` sweep, the seeds it took (the same
//! figure as `sagamq-sim run --seeds 0..N --scenario saga --bug NAME
//! --stop-at-first`), whether that seed passes without the bug, and how much
//! `shrink` removes from its fault plan (as `sagamq-sim shrink --seed S --bug NAME`).
//!
//! `cargo run --release -p sagamq-sim --example bug_table [-- SEEDS]`

use sagamq_sim::Bug;
use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::RunConfig;

fn main() {
    let seeds: u64 = std::env::args()
        .nth(1)
        .map_or(2_000, |s| s.parse().expect("SEEDS is a number"));
    let scenario: Scenario = "saga".parse().expect("saga");
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "| bug | invariant that fires | seeds to first failure | failing seed | passes without the bug | shrink: faults before -> after (removed) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut removed_pct = Vec::new();
    for bug in Bug::ALL {
        let cfg = RunConfig::new(scenario, Some(bug));
        let s = runner::sweep(&cfg, 0..seeds, jobs, true, &|_, _, _| {});
        let Some(first) = s.failures.first() else {
            println!("| `{bug}` | not caught in {seeds} seeds | - | - | - | - |");
            continue;
        };
        let control = runner::run_seed(first.seed, &RunConfig::new(scenario, None));
        let plan = runner::plan_for(first.seed, &cfg);
        let shrunk = runner::shrink(first.seed, &cfg, plan, 400).expect("the seed fails");
        let (before, after) = (shrunk.original.faults.len(), shrunk.minimal.faults.len());
        let pct = if before == 0 {
            0.0
        } else {
            100.0 * (before - after) as f64 / before as f64
        };
        removed_pct.push(pct);
        println!(
            "| `{bug}` | `{}` | {} | {} | {} | {before} -> {after} ({pct:.0}%, {} runs) |",
            first.invariant,
            s.seeds_to_first_failure.unwrap_or(0),
            first.seed,
            if control.violations.is_empty() { "yes" } else { "no" },
            shrunk.runs,
        );
    }
    let mean = removed_pct.iter().sum::<f64>() / removed_pct.len().max(1) as f64;
    println!(
        "\nshrink removes {mean:.0}% of the fault plan on average over {} bugs",
        removed_pct.len()
    );
}

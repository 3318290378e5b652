//! The saga under load: compensation re-sends must not feed their own delay
//! (issue 17). `saga:1000` seed 16 and `saga:2000` seeds 0..3 collapsed under
//! the old fixed-interval re-send (hundreds of re-sent releases per simulated
//! second, still queued when the liveness verdict came); they settle now, and
//! no compensation is re-sent once the faults have healed.

use sagamq::saga::order::COMPENSATIONS_RESENDING_MAX;
use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::RunConfig;
use std::collections::BTreeSet;

/// Re-sent compensations (SubID `<order>.release.N` / `<order>.payment-cancel.N`)
/// the order service published, each copy once, with the time it first went out.
fn resent_copies(trace: &[String]) -> Vec<(f64, String)> {
    let mut seen = BTreeSet::new();
    let mut copies = Vec::new();
    for line in trace {
        let Some(rest) = line.strip_prefix("t=") else { continue };
        let Some((t, rest)) = rest.split_once("ms order publish outbox#") else {
            continue;
        };
        let Some(sub) = rest
            .split(' ')
            .nth(2)
            .and_then(|key| key.split_once('/'))
            .map(|(_, s)| s)
        else {
            continue;
        };
        let resent = [".release.", ".payment-cancel."]
            .iter()
            .any(|step| sub.split_once(step).is_some_and(|(_, n)| n.parse::<u32>().is_ok()));
        if resent && seen.insert(sub.to_string()) {
            copies.push((t.parse().expect("trace time"), sub.to_string()));
        }
    }
    copies
}

#[test]
fn saga_1000_seed_16_settles_without_a_resend_storm() {
    let mut cfg = RunConfig::new(Scenario::Saga { orders: 1_000 }, None);
    cfg.trace = true;
    let r = runner::run_seed(16, &cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    let copies = resent_copies(&r.trace);
    let heal_ms = f64::from(cfg.chaos_ms);
    let after_heal: Vec<_> = copies.iter().filter(|(t, _)| *t > heal_ms + 5_000.0).collect();
    println!(
        "saga:1000 seed 16: {} re-sent compensations, {} later than 5 s after healing, {} deliveries, settled at {} ms",
        copies.len(),
        after_heal.len(),
        r.deliveries,
        r.sim_ms
    );
    // Before the re-send rule: 6,343 re-sent releases, ~300 per second for 40 s after healing.
    assert!(
        copies.len() <= 4 * COMPENSATIONS_RESENDING_MAX,
        "{} re-sent copies",
        copies.len()
    );
    assert!(after_heal.is_empty(), "re-sent after healing: {after_heal:?}");
}

#[test]
fn saga_2000_settles_on_seeds_that_collapsed_before() {
    let cfg = RunConfig::new(Scenario::Saga { orders: 2_000 }, None);
    let s = runner::sweep(&cfg, 0..3, 1, false, &|_, _, _| {});
    println!("{}", s.human());
    assert_eq!(s.failed, 0, "{}", s.human());
}

//! Shared by the simulator's test files: seeds from the environment.
//!
//! `SAGAMQ_SEED=1234 cargo test` replays one seed; `SAGAMQ_SEEDS=0..100000
//! cargo test --release` widens every sweep.

#![allow(dead_code)]

use std::ops::Range;

pub fn seeds(default: Range<u64>) -> Range<u64> {
    if let Ok(s) = std::env::var("SAGAMQ_SEED") {
        let seed: u64 = s.trim().parse().expect("SAGAMQ_SEED must be an integer");
        return seed..seed + 1;
    }
    if let Ok(s) = std::env::var("SAGAMQ_SEEDS") {
        let (a, b) = s.trim().split_once("..").expect("SAGAMQ_SEEDS must look like A..B");
        return a.parse().expect("range start")..b.parse().expect("range end");
    }
    default
}

/// True when the sweep is the default one (so coverage assertions apply).
pub fn default_seeds() -> bool {
    std::env::var("SAGAMQ_SEED").is_err() && std::env::var("SAGAMQ_SEEDS").is_err()
}

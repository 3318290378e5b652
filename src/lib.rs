//! sagamq: a transactional pub/sub broker and saga participants, written as
//! sans-IO state machines.
//!
//! **Architecture invariant:** nothing under `types`, `machine`, `rng`, `log`,
//! `broker`, `saga` and `cluster` performs IO, reads a clock or an OS random source. Time
//! arrives as an argument, randomness comes from [`rng::Rng`] seeded by the
//! caller, and every side effect leaves as an output value. The simulator
//! (`sim/`) and the real runtime (`src/real/`, feature `real`) are thin drivers
//! around the same code.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cluster;
pub mod log;
pub mod machine;
pub mod rng;
pub mod saga;
pub mod testkit;
pub mod types;

#[cfg(feature = "real")]
pub mod real;

pub use machine::Machine;
pub use types::*;

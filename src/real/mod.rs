//! The real runtime (feature `real`): the broker core driven by tokio, an HTTP
//! API (axum), HTTP callbacks (hyper; reqwest for https) and a log file with group commit.
//!
//! **Invariant:** this module is a thin driver. Every decision (dedup, order,
//! retries, dead letters, compaction) is the core's; this code only moves
//! bytes and timestamps, and never links madsim.
//!
//! Code map: [`server`] assembles a running broker; [`driver`] is the one task
//! owning the [`crate::broker::Broker`]; [`log_writer`] is the fsync thread
//! over [`file_disk`], whose file calls go through [`fs`] (the OS, or the
//! page-cache model [`page_cache`] in the power-loss test); [`listener`] is
//! the accept loop with the connection bounds; [`http`] maps routes to driver
//! requests under [`auth`]'s scopes; [`callbacks`] signs deliveries (key from
//! [`signing_key`]), checks targets by name and resolved address, and POSTs
//! them (plain http over [`http_pool`]); [`cli`] is `sagamq
//! serve|demo|bench|signing-key`; `cluster` (feature `postgres`) serves from
//! PostgreSQL instead of the file log.

pub mod auth;
pub mod bench;
pub mod callbacks;
pub mod cli;
pub mod client;
pub mod clock;
#[cfg(test)]
mod clock_step;
#[cfg(feature = "postgres")]
pub mod cluster;
pub mod cluster_args;
pub mod cpu;
pub mod demo;
pub mod driver;
pub mod file_disk;
pub mod fs;
pub mod http;
pub mod http_pool;
pub mod listener;
pub mod log_writer;
pub mod page_cache;
pub mod participant;
#[cfg(test)]
mod power_loss;
pub mod server;
pub mod signing_key;

pub use callbacks::{
    Allowlist, SIGNATURE_HEADER, SIGNATURE_TOLERANCE_DEFAULT, SignatureError, sign, verify, verify_now,
};
pub use server::{RunningBroker, ServeError, ServeOptions, start};

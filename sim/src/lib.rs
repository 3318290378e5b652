//! sagamq-sim: the deterministic simulation testbed.
//!
//! Code map:
//! - [`topology`], [`view`], [`history`]: node names and ids; what the checker reads of a
//!   participant; the events it judges (the bottom layer).
//! - [`config`]: what a run is configured with (below the world).
//! - [`plan`]: fault plans (swarm profiles drawn from the seed; explicit, printable, shrinkable).
//! - [`world`]: the madsim world: nodes driving the shipped machines, faulty transport,
//!   crash-surviving disks, skewed clocks, the chaos and heal phases.
//! - [`participants`]: which participant implementation each node runs (shipped or a planted bug),
//!   and the swarm-drawn host bounds (a tiny inbox on half the seeds).
//! - [`bugs`]: the planted-bug catalogue (`--bug NAME`): host flaws around the shipped host,
//!   stock/payment logic with one guard left out, the Go seed's naive stock, a broker-driver switch.
//! - [`scenario`]: the `seed` and `saga` workloads (saga order deadlines swarm-drawn: half the
//!   seeds short enough to fire while messages are still in flight).
//! - [`custom`]: plug your own participant into the world, under the same faults.
//! - [`audit`]: the stats audit of a participant host (its counters against a recount of its
//!   inputs and outputs since boot, its bounds and retry schedule judged on that recount).
//! - [`deadlines`]: the orders' deadlines as configured, for the `order-deadline` invariant.
//! - [`probes`]: the broker's API probed on the side at the heal (a subscription's lifecycle,
//!   a dead letter and its redrive): request sequences the participants never make.
//! - [`check`]: the invariant checker (safety during and after chaos, liveness after healing).
//! - [`runner`]: sweeps, summaries, shrinking, the benchmark.
//! - [`trace`]: the canonical trace and its hash.
//! - [`transport`]: the simulated network (a mailbox per node on madsim's clock, partitions).
//! - [`event`]: the structured event stream of a traced run (sends, receives, faults).
//! - [`diagram`]: sequence diagrams (SVG, Mermaid) drawn from those events.
//! - [`cluster`]: the cluster mode (issue 15): several broker instances on a simulated
//!   PostgreSQL (a sans-IO model of its tables, transactions, WAL and clock), instance crashes,
//!   pauses, cuts from the database, database restarts, lost COMMITs, partitions between
//!   instances; its planted bugs; the simulated throughput and failover figures. A leaf: it
//!   feeds the [`check`] checker, which knows nothing of it.
//!
//! **Invariant:** a seed (plus scenario and bug) determines the run: same seed, same build,
//! same trace bytes, in any process.
#![forbid(unsafe_code)]

pub mod audit;
pub mod bugs;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod custom;
pub mod deadlines;
pub mod diagram;
pub mod event;
pub mod history;
pub mod participants;
pub mod plan;
pub mod probes;
pub mod runner;
pub mod scenario;
pub mod topology;
pub mod trace;
pub mod transport;
pub mod view;
pub mod wire;
pub mod world;

pub use bugs::Bug;

//! What a run is configured with, below the world: the scenario, a planted
//! bug, a user's participant, the phases' lengths, and the simulator's broker
//! settings (with what a seed's profile draws on top).

use crate::Bug;
use crate::custom::CustomNode;
use crate::plan::{FaultProfile, PlanShape};
use crate::scenario::Scenario;
use sagamq::broker::BrokerConfig;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub scenario: Scenario,
    pub bug: Option<Bug>,
    /// Record the canonical trace (costs time; sweeps leave it off).
    pub trace: bool,
    /// Length of the chaos phase (faults on), simulated.
    pub chaos_ms: u32,
    /// After healing, every order must be terminal and every delivery settled within this.
    pub heal_ms_max: u32,
    /// A user-written participant on its own node, under the same faults.
    pub custom: Option<CustomNode>,
    /// How a failing seed of this configuration is reproduced, with `{seed}`
    /// standing for the seed (see [`RunConfig::reproduce_with`]); `None`: the
    /// CLI's `replay` command, or for a custom participant (which the CLI
    /// cannot load) a sentence naming the API to call.
    pub reproduce: Option<String>,
}

impl RunConfig {
    pub fn new(scenario: Scenario, bug: Option<Bug>) -> RunConfig {
        RunConfig {
            chaos_ms: scenario.chaos_ms(),
            heal_ms_max: 600_000,
            scenario,
            bug,
            trace: false,
            custom: None,
            reproduce: None,
        }
    }

    /// The same run with a user's participant on its own node (see [`crate::custom`]).
    pub fn with_custom(mut self, custom: CustomNode) -> RunConfig {
        self.custom = Some(custom);
        self
    }

    /// The command that reruns this configuration, printed for each failing
    /// seed; `{seed}` is replaced by the seed. The runner cannot know the name
    /// of the test that built a custom configuration, so that test says it, e.g.
    /// `"SAGAMQ_SEED={seed} cargo test --release -p my-crate --test loyalty"`.
    pub fn reproduce_with(mut self, template: &str) -> RunConfig {
        self.reproduce = Some(template.to_string());
        self
    }

    /// What the summary calls this configuration: the scenario, and the custom
    /// participant's client id when one runs (`saga + custom loyalty-service`).
    pub fn describe(&self) -> String {
        match &self.custom {
            None => self.scenario.to_string(),
            Some(c) => format!("{} + custom {}", self.scenario, c.client_id()),
        }
    }

    pub fn plan_shape(&self) -> PlanShape {
        let mut faulty_nodes = crate::plan::FAULTY_NODES.to_vec();
        if self.custom.is_some() {
            faulty_nodes.push(crate::topology::CUSTOM as u8);
        }
        PlanShape {
            chaos_ms: self.chaos_ms,
            faulty_nodes,
            messages_max: self.scenario.messages_estimate(),
            order_deadline: matches!(self.scenario, Scenario::Saga { .. }),
        }
    }
}

pub use crate::participants::PUBLISH_RETRY_MAX;

/// The liveness bound of a run, derived at healing from the configuration
/// and the work left (ms after healing):
///
/// - `wait_ms`: the latest timer a participant has set (an order's deadline
///   or its next compensation re-send) minus now, plus 2 s of clock skew;
/// - four hops (request, reply, compensation, confirmation), each at most a
///   publish retry, a callback timeout, the backoff cap and the operator's 1 s
///   redrive period;
/// - the work left, `work` messages (held by the broker, in outboxes, and four
///   per order not yet terminal), at 4 ms each: a node sends about one
///   message per simulated ms and a delivery costs the broker four.
pub fn liveness_bound_ms(wait_ms: u64, broker: &BrokerConfig, work: u64) -> u64 {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let hop = ms(PUBLISH_RETRY_MAX) + ms(broker.callback_timeout) + ms(broker.retry_backoff_max) + 1_000;
    // A quarter more for what the terms leave out (a hop's group commits,
    // several re-sends meeting one slow queue); measured, a healthy run uses
    // at most 87% of the unpadded bound over 10,000 saga seeds.
    (wait_ms + 2_000 + 4 * hop + 4 * work) * 5 / 4
}

/// Callback attempts per message unless the plan draws a shorter budget.
pub const ATTEMPTS_MAX_DEFAULT: u32 = 12;
/// How long an expired subscription is still entitled (longer than any outage
/// the chaos phase can cause, so a lapse loses nothing).
pub const SUBSCRIPTION_GRACE: Duration = Duration::from_secs(60);

/// Simulator-tuned broker bounds: short timers so a run settles in simulated seconds.
/// The profile's retry budget and small bounds, when it draws them, apply on top.
pub fn broker_config(profile: &FaultProfile) -> BrokerConfig {
    let mut c = BrokerConfig {
        callback_timeout: Duration::from_millis(300),
        retry_backoff_initial: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(500),
        attempts_max: profile.attempts_max.unwrap_or(ATTEMPTS_MAX_DEFAULT).max(1),
        subscription_grace: SUBSCRIPTION_GRACE,
        compact_garbage_records_min: 256,
        ..BrokerConfig::default()
    };
    if let Some(ms) = profile.subscription_grace_ms {
        c.subscription_grace = Duration::from_millis(u64::from(ms));
    }
    if let Some(b) = profile.bounds {
        c.pending_per_subscriber_max = b.pending_per_subscriber_max.max(1) as usize;
        c.messages_max = b.messages_max.max(1) as usize;
        c.publishes_unsynced_max = b.publishes_unsynced_max.max(1) as usize;
        c.inflight_per_subscriber_max = b.inflight_per_subscriber_max.max(1) as usize;
        c.compact_garbage_records_min = u64::from(b.compact_garbage_records_min);
    }
    c
}

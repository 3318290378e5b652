//! The extension point: what a saga participant decides, separated from how it
//! is hosted. A [`Participant`] holds business state and logic only; the
//! [`super::ParticipantHost`] around it owns inbox, outbox, durability,
//! subscriptions and retries.
//!
//! **Invariant:** decisions are pure functions of (state, `now`, input) and
//! state changes only through [`Participant::apply`], so replaying the
//! committed changes in order rebuilds exactly the state that was live.

use super::Command;
use crate::types::{GlobalId, Message, SubId, Time, Topic};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// A message a participant wants published, committed in the same record as
/// the change that caused it. The host adds `SenderID` and `CreateTime`.
///
/// `(global_id, sub_id)` is the broker's dedup key: a participant that decides
/// the same reply again (say after forgetting an inbox key) must reuse the same
/// pair, so the broker stores it once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: Topic,
    pub global_id: GlobalId,
    pub sub_id: SubId,
    pub content: String,
}

/// What a participant decided about one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<C> {
    /// Commit `change` (if any) and publish `publish`, in one durable record
    /// together with the consumed message's key. The host then calls
    /// [`Participant::apply`] with the change.
    Commit { change: Option<C>, publish: Vec<Outgoing> },
    /// Consumed without effect (a stale reply, a business-level duplicate).
    /// Nothing is recorded; the callback is answered ok once every earlier
    /// record is durable, because the decision was judged against that state.
    Ignore,
    /// Cannot be processed now (a bound is reached, undecodable content): the
    /// callback is answered not-ok so the broker retries and, after its
    /// attempt limit, dead-letters it; a command is refused with this reason.
    Refuse(String),
}

impl<C> Decision<C> {
    /// Commit a change without publishing anything.
    pub fn change(change: C) -> Self {
        Decision::Commit {
            change: Some(change),
            publish: Vec::new(),
        }
    }

    /// Commit a change and publish one message.
    pub fn change_and_publish(change: C, message: Outgoing) -> Self {
        Decision::Commit {
            change: Some(change),
            publish: vec![message],
        }
    }
}

/// A saga participant's business logic. Implement this to plug your own
/// service into the testbed: the drivers (`sagamq_sim::custom::CustomNode`,
/// [`crate::testkit::World::add`], the real runtime) host it for you in a
/// [`super::ParticipantHost`], which adds the inbox, the outbox, durable
/// records, subscriptions and retries; you touch the host only to write a
/// driver of your own.
///
/// Rules that make the host's guarantees hold:
/// - `on_message`, `on_command` and `on_deadline` only decide; they must be
///   deterministic given `self`, `now` and the input (no clock, no OS
///   randomness, no hash-ordered maps).
/// - `apply` is the only way state changes. It runs live (right after the
///   decision) and during recovery (replaying committed records), and must not
///   fail for a change its own decisions produced.
/// - Anything a later decision needs (such as a deadline computed from `now`)
///   must be inside the change, because recovery has only the changes.
/// - Be idempotent per business key (an order, a payment): the host's inbox is
///   bounded ([`super::HostConfig::inbox_keys_max`]) and forgets its oldest
///   keys, so an old message may be delivered again and reach `on_message`. A
///   redelivery must decide nothing new: the simulator's `no-lost-effect`
///   judges every message you answered 2xx (and your inbox has forgotten) by
///   calling `on_message` again on your final state, at the latest time your
///   node's clock showed, and fails the run if that would commit a change. Its
///   message tells "the logic is not idempotent" (your log records the
///   effect) from "the effect was lost" (no record consumed the message). A
///   decision that depends on `now` is judged as a redelivery would meet it,
///   so "award only before the promotion ends" does not trip it.
pub trait Participant: Clone + 'static {
    /// A committed state change, stored (as JSON) in the participant's records.
    type Change: Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned;

    /// Topics the host subscribes to (and keeps renewing).
    fn topics(&self) -> Vec<Topic>;

    /// Decides what a delivered message does. The host drops redeliveries of
    /// the messages its inbox still remembers; the inbox is bounded and
    /// forgets, so an older redelivery arrives here and must change nothing.
    fn on_message(&self, now: Time, message: &Message) -> Decision<Self::Change>;

    /// Decides what a workload command does. Most participants take none.
    fn on_command(&self, now: Time, command: &Command) -> Decision<Self::Change> {
        let _ = now;
        Decision::Refuse(format!("this participant takes no commands ({command})"))
    }

    /// Applies a committed change (live and during recovery).
    fn apply(&mut self, change: &Self::Change);

    /// The earliest time at which `on_deadline` has work (saga timeouts).
    fn next_deadline(&self) -> Option<Time> {
        None
    }

    /// Called when `next_deadline() <= now`. A `Commit` must clear or move
    /// the deadline it handled (its change is applied before the next call).
    fn on_deadline(&self, now: Time) -> Decision<Self::Change> {
        let _ = now;
        Decision::Ignore
    }
}

//! Saga participants (order, stock, payment) as sans-IO state machines, and the
//! extension point for users' own participants.
//!
//! **Invariant:** a participant commits its state change, the messages it will
//! publish (outbox) and the `(GlobalID, SubID)` it consumed (inbox) in one
//! durable record, publishes nothing before that record is durable, and answers
//! a callback only once it is. So a crash can neither lose a reply nor apply an
//! effect twice.
//!
//! Code map:
//! - [`Participant`] (participant.rs): the trait a participant implements —
//!   business logic only (topics, decide, apply, deadlines).
//! - [`ParticipantHost`] (host.rs): the generic [`crate::Machine`] around a
//!   [`Participant`]: inbox, outbox, records, durability, subscriptions, retries.
//! - [`stock`], [`payment`], [`order`]: the shipped participants.
//! - [`scenario`]: the named workloads (`seed`, `saga`); [`audit`]: the saga's
//!   invariants as a function of the participants' state.
//!
//! Drivers (simulator, real runtime, [`crate::testkit`]) speak to every
//! participant through [`ParticipantInput`] / [`ParticipantOutput`] and the
//! [`crate::Machine`] trait.
//!
//! # Writing your own participant
//!
//! Implement [`Participant`] (business logic only) and host it with
//! [`ParticipantHost`]; the host adds the inbox, the outbox, durable records,
//! subscriptions and retries. Here a shipping service ships every paid order
//! exactly once, plugged into a `saga` run of the testkit:
//!
//! ```
//! use sagamq::saga::order::{Order, OrderStatus};
//! use sagamq::saga::{Decision, Outgoing, Participant, scenario, topics};
//! use sagamq::testkit::{self, World};
//! use sagamq::types::{GlobalId, Message, SubId, Time, Topic};
//! use serde::{Deserialize, Serialize};
//! use std::collections::BTreeSet;
//!
//! #[derive(Clone, Debug, Default)]
//! struct Shipping {
//!     shipped: BTreeSet<GlobalId>,
//! }
//!
//! /// The committed change: replayed by `apply` live and after a crash.
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! struct Shipped {
//!     order: GlobalId,
//! }
//!
//! impl Participant for Shipping {
//!     type Change = Shipped;
//!
//!     fn topics(&self) -> Vec<Topic> {
//!         vec![Topic::lit(topics::PAYMENT_RESULT)]
//!     }
//!
//!     /// Decide only: deterministic in (state, message), no side effects.
//!     fn on_message(&self, _now: Time, m: &Message) -> Decision<Shipped> {
//!         if m.content != "1" || self.shipped.contains(&m.global_id) {
//!             return Decision::Ignore;
//!         }
//!         let notice = Outgoing {
//!             topic: Topic::lit("sale-order.shipped"),
//!             global_id: m.global_id.clone(),
//!             sub_id: SubId::new(format!("{}.shipped", m.global_id)).expect("short order ids"),
//!             content: "{}".to_string(),
//!         };
//!         Decision::change_and_publish(Shipped { order: m.global_id.clone() }, notice)
//!     }
//!
//!     fn apply(&mut self, change: &Shipped) {
//!         self.shipped.insert(change.order.clone());
//!     }
//! }
//!
//! let mut world = World::for_scenario(&scenario::saga(1), 1);
//! world.add(Shipping::default(), testkit::host_config("shipping-service", 1));
//! world.start()?;
//! world.run_until(Time::from_millis(120_000), World::saga_settled)?;
//!
//! let shipping = world.host::<Shipping>("shipping-service").unwrap().logic();
//! let orders = world.host::<Order>(topics::ORDER_SERVICE).unwrap().logic();
//! let completed = orders.counts().get(&OrderStatus::Completed).copied().unwrap_or(0);
//! assert!(completed > 0);
//! assert_eq!(shipping.shipped.len(), completed);
//! assert!(world.audit(true).is_empty());
//! # Ok::<(), sagamq::testkit::WorldError>(())
//! ```

pub mod audit;
mod content;
mod host;
mod ids;
pub mod order;
mod participant;
pub mod payment;
pub mod scenario;
pub mod stock;
pub mod topics;

#[cfg(test)]
mod tests;

pub use content::{
    CancelledBody, ORDER_ID_LEN_MAX, OrderBody, PaymentBody, ReleasedBody, attempt_of, attempt_sub_id, step,
};
pub use host::{
    AnyParticipant, HostConfig, HostGauges, HostRecord, HostStats, OutboxEntryRecord, ParticipantHost, RecoveryReport,
    Replay,
};
pub use ids::{CustomerId, ProductId};
pub use participant::{Decision, Outgoing, Participant};

use crate::broker::Lsn;
use crate::types::{Message, MsgId, PublishRequest, SubscribeRequest, Topic};
use std::fmt;

/// Chosen by the driver to match an answer to an incoming callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallbackToken(pub u64);

/// Numbers a participant's outbox entries; stable across restarts (it is durable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct OutboxId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParticipantInput {
    /// A broker callback carrying a message on a subscribed topic.
    Deliver { token: CallbackToken, message: Message },
    /// The broker acknowledged (durably stored) an outbox entry.
    PublishAcked { outbox: OutboxId, msg_id: MsgId },
    /// The broker refused or the request failed; the participant retries later.
    PublishFailed { outbox: OutboxId },
    /// The broker confirmed a subscription (or renewal).
    Subscribed { topic: Topic },
    /// Every `Persist` with `lsn <=` this is synced.
    Durable { lsn: Lsn },
    /// A workload command (the order participant's "create order").
    Command(Command),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    CreateOrder(OrderSpec),
}

/// An order as the workload asks for it. `amount = quantity * price`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderSpec {
    pub order_id: String,
    pub customer_id: String,
    pub product_id: String,
    pub quantity: u64,
    pub price: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParticipantOutput {
    /// Append these framed records; report `Durable { lsn }` once synced.
    Persist { lsn: Lsn, frames: Vec<u8> },
    /// Send this publish to the broker; answer with `PublishAcked`/`PublishFailed`.
    Publish { outbox: OutboxId, publish: PublishRequest },
    /// Subscribe (or renew) at the broker; answer with `Subscribed`.
    Subscribe(SubscribeRequest),
    /// Answer a callback: `ok` means 2xx (processed, durable).
    Answer { token: CallbackToken, ok: bool },
    /// The outcome of a [`ParticipantInput::Command`]: `Committed` once its
    /// record is durable, `Refused` at once (nothing was recorded).
    CommandDone { command: Command, outcome: CommandOutcome },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    Committed,
    Refused(String),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::CreateOrder(o) => write!(
                f,
                "create-order {} customer={} product={} quantity={} price={}",
                o.order_id, o.customer_id, o.product_id, o.quantity, o.price
            ),
        }
    }
}

impl fmt::Display for ParticipantInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParticipantInput::Deliver { token, message } => write!(
                f,
                "deliver token#{} {} {} {}/{} {}",
                token.0, message.msg_id, message.topic, message.global_id, message.sub_id, message.content
            ),
            ParticipantInput::PublishAcked { outbox, msg_id } => {
                write!(f, "publish-acked outbox#{} {msg_id}", outbox.0)
            }
            ParticipantInput::PublishFailed { outbox } => write!(f, "publish-failed outbox#{}", outbox.0),
            ParticipantInput::Subscribed { topic } => write!(f, "subscribed {topic}"),
            ParticipantInput::Durable { lsn } => write!(f, "durable lsn={}", lsn.0),
            ParticipantInput::Command(c) => write!(f, "command {c}"),
        }
    }
}

impl fmt::Display for ParticipantOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParticipantOutput::Persist { lsn, frames } => {
                let records = crate::log::decode_frames(frames).map_or(0, |r| r.records.len());
                write!(f, "persist lsn={} records={records} bytes={}", lsn.0, frames.len())
            }
            ParticipantOutput::Publish { outbox, publish } => write!(
                f,
                "publish outbox#{} {} {}/{} {}",
                outbox.0, publish.topic, publish.global_id, publish.sub_id, publish.content
            ),
            ParticipantOutput::Subscribe(s) => {
                write!(f, "subscribe {} {} expire={}", s.client_id, s.topic, s.expire_time)
            }
            ParticipantOutput::Answer { token, ok } => {
                write!(f, "answer token#{} {}", token.0, if *ok { "ok" } else { "not-ok" })
            }
            ParticipantOutput::CommandDone { command, outcome } => match outcome {
                CommandOutcome::Committed => write!(f, "command-done committed: {command}"),
                CommandOutcome::Refused(why) => write!(f, "command-done refused ({why}): {command}"),
            },
        }
    }
}

//! Saga participants (order, stock, payment) as sans-IO state machines.
//!
//! **Invariant:** a participant commits its state change, the messages it will
//! publish (outbox) and the `(GlobalID, SubID)` it consumed (inbox) in one
//! durable record, and answers a callback only once that record is durable. So
//! a crash can neither lose a reply nor apply an effect twice.
//!
//! Drivers (simulator, real runtime) speak to every participant through
//! [`ParticipantInput`] / [`ParticipantOutput`] and the [`crate::Machine`] trait.
//! TODO(issue 3): the participants and the extension trait.

use crate::broker::Lsn;
use crate::types::{Message, MsgId, PublishRequest, SubscribeRequest, Topic};

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

/// An order as the workload asks for it.
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
}

//! The history the checker judges: what an observer standing on the wire and
//! beside the disks saw, in simulated time order. The world reports each event
//! as it happens ([`crate::check::Checker::observe`]); the checker knows nothing
//! of madsim, nodes' tasks or machines, only these events and, at the points
//! where it judges state, the participants' [`crate::view::View`]s.
//!
//! Times named `now` are the broker's own (skewed) clock, because that is the
//! clock the broker's decisions (entitlement, expiry, ordering) use.

use sagamq::broker::{Callback, DeliveryId, Reply};
use sagamq::{ClientId, Message, MessageKey, MsgId, PublishRequest, Time, Topic};

#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// The broker received a subscription request.
    SubscribeReceived {
        client: &'a ClientId,
        topic: &'a Topic,
        expire: Time,
        now: Time,
    },
    /// The broker confirmed a subscription until `until` (its clock).
    Subscribed {
        client: &'a ClientId,
        topic: &'a Topic,
        until: Time,
    },
    /// A participant on `node` handed its driver a publish: an outbox entry it
    /// committed to send (and will re-send until the broker acknowledges it).
    Emitted { node: usize, publish: &'a PublishRequest },
    /// The broker received a publish.
    PublishReceived { publish: &'a PublishRequest, now: Time },
    /// The broker answered a publish of `key`.
    PublishAnswered { key: &'a MessageKey, reply: &'a Reply },
    /// The broker sent a callback attempt.
    CallbackSent { callback: &'a Callback, now: Time },
    /// The broker received an answer to a callback attempt.
    AnswerReceived { delivery: DeliveryId, ok: bool },
    /// A participant on `node` received a callback (whatever it does next).
    CallbackReceived { node: usize, message: &'a Message },
    /// A participant on `node`, subscribed as `client`, answered 2xx: it
    /// processed the message (its effect is durable).
    Processed {
        node: usize,
        client: &'a ClientId,
        key: &'a MessageKey,
    },
    /// A node was killed (unsynced writes lost).
    Crashed { node: usize },
    /// A node started again; `records` and `torn_bytes` from its disk.
    Booted { node: usize, records: u64, torn_bytes: u64 },
    /// The broker rewrote its log (compaction).
    Compacted,
    /// The operator asked the broker to redrive `client`'s dead letters: its
    /// list before, and those it moved back to the queue (what fits).
    Redrive {
        client: &'a ClientId,
        dead: &'a [MsgId],
        moved: &'a [MsgId],
    },
    /// The chaos phase ended: faults off, everything healed and restarted.
    Healed,
}

//! The broker core: a sans-IO state machine for transactional pub/sub.
//!
//! It owns subscriptions, stored messages, per-subscriber delivery queues,
//! retries, dead letters, dedup by `(GlobalID, SubID)` and compaction. It
//! performs no IO: durable writes leave as [`BrokerOutput::Persist`] /
//! [`BrokerOutput::Rewrite`] and come back as [`BrokerInput::Durable`].
//!
//! **Invariants:** a publish is answered only after its record is durable; a
//! repeated `(GlobalID, SubID)` stores and delivers nothing new (also across a
//! restart); every entitled subscriber eventually gets each acknowledged
//! message (2xx) or finds it in its dead-letter list; every queue and map is
//! bounded by a named [`BrokerConfig`] field and answers "full" when reached.
//!
//! Map: `core.rs` (state, requests, persistence protocol, and the documented
//! choices: retries do not block the line, expiry pauses delivery, attempt
//! counts restart after a crash), `apply.rs` (records -> state, shared by live
//! operation and recovery), `delivery.rs` (window, timeouts, backoff, dead
//! letters), `dedup.rs`, `compact.rs` (snapshot), `record.rs` (the one binary
//! encoding), `display.rs` (one-line trace renderings).

mod apply;
mod compact;
mod config;
mod core;
mod dedup;
mod delivery;
mod display;
mod record;
#[cfg(test)]
mod tests;

pub use self::config::BrokerConfig;
pub use self::core::{Broker, BrokerStats, Recovery, RecoveryReport, SubscriberStats};
pub use self::record::BrokerRecord;

use crate::types::{ClientId, Message, MsgId, PublishRequest, SubscribeRequest, Time, Topic};
use std::fmt;

/// Chosen by the driver to match a reply to its request (an HTTP connection, a sim RPC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// One callback attempt. Unique per attempt, so a late answer to an attempt
/// that already timed out is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryId(pub u64);

/// Numbers the durable writes the broker asks for, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerInput {
    Publish {
        req: RequestId,
        publish: PublishRequest,
    },
    /// Subscribing again renews (and may change the URL).
    Subscribe {
        req: RequestId,
        subscribe: SubscribeRequest,
    },
    Unsubscribe {
        req: RequestId,
        client: ClientId,
        topic: Topic,
    },
    /// The subscriber's answer to a callback (or the driver's verdict that none came).
    CallbackResult {
        delivery: DeliveryId,
        result: CallbackResult,
    },
    /// Every `Persist`/`Rewrite` with `lsn <=` this is synced.
    Durable {
        lsn: Lsn,
    },
    /// Operator: move every dead letter of `client` back to its queue.
    Redrive {
        req: RequestId,
        client: ClientId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackResult {
    /// The subscriber answered 2xx.
    Delivered,
    /// The subscriber answered an error (or the connection failed).
    Failed,
    /// No answer within the callback timeout.
    TimedOut,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerOutput {
    /// Append these framed records (see `log`) and report `Durable { lsn }` once synced.
    Persist { lsn: Lsn, frames: Vec<u8> },
    /// Compaction: atomically replace the whole log with these framed records
    /// (the live state), then report `Durable { lsn }` once synced. Later
    /// `Persist` outputs append after it. `replaced`: the records the log
    /// held with this call's batch, which the snapshot replaces (what the
    /// compaction trigger judged; for checkers).
    Rewrite { lsn: Lsn, frames: Vec<u8>, replaced: u64 },
    /// The answer to a request.
    Reply { req: RequestId, reply: Reply },
    /// POST `message` to `url`; answer with `CallbackResult { delivery, .. }`.
    Callback(Callback),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Callback {
    pub delivery: DeliveryId,
    pub client: ClientId,
    pub url: String,
    pub message: Message,
    /// 1 for the first attempt.
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `duplicate` is true when `(GlobalID, SubID)` was already stored; `msg_id` is the original.
    Published {
        msg_id: MsgId,
        duplicate: bool,
    },
    Subscribed {
        expire_time: Time,
    },
    Unsubscribed,
    Redriven {
        count: usize,
    },
    Rejected(BrokerError),
}

/// Why a request was refused. Nothing is stored when a request is rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerError {
    /// A subscriber's pending queue is at `pending_per_subscriber_max`.
    QueueFull {
        client: ClientId,
    },
    /// A subscriber's dead letters plus queued messages (each may still become
    /// one) reached `dead_letters_per_subscriber_max`: redrive them first.
    DeadLettersFull {
        client: ClientId,
    },
    /// `messages_max` live messages are stored.
    TooManyMessages,
    /// `subscriptions_max` subscriptions exist.
    TooManySubscriptions,
    /// `publishes_unsynced_max` requests are waiting for their fsync.
    TooManyUnsyncedPublishes,
    /// The subscription's `NotifyUrl` is empty or longer than `URL_LEN_MAX`.
    InvalidUrl,
    /// `Content` longer than `CONTENT_LEN_MAX`.
    ContentTooLong {
        len: usize,
    },
    /// `ExpireTime` already passed.
    AlreadyExpired,
    NotSubscribed,
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::QueueFull { client } => write!(f, "queue of subscriber {client} is full"),
            BrokerError::DeadLettersFull { client } => {
                write!(f, "dead-letter list of subscriber {client} is full; redrive it first")
            }
            BrokerError::TooManyMessages => write!(f, "broker holds its maximum number of live messages"),
            BrokerError::TooManySubscriptions => write!(f, "broker holds its maximum number of subscriptions"),
            BrokerError::TooManyUnsyncedPublishes => write!(f, "too many requests waiting for fsync; retry"),
            BrokerError::InvalidUrl => write!(f, "NotifyUrl is empty or too long"),
            BrokerError::ContentTooLong { len } => {
                write!(
                    f,
                    "Content is {len} bytes, longer than the limit of {}",
                    crate::types::CONTENT_LEN_MAX
                )
            }
            BrokerError::AlreadyExpired => write!(f, "ExpireTime is in the past"),
            BrokerError::NotSubscribed => write!(f, "no such subscription"),
        }
    }
}

impl std::error::Error for BrokerError {}

//! One-line, human-readable renderings of the broker's inputs, outputs and
//! records, for the traces drivers print (never `Debug` dumps).

use super::*;
use crate::log::decode_frames;
use std::fmt;

/// Longest `Content` shown in a trace line, in characters.
const CONTENT_SHOWN_MAX: usize = 24;
/// Records of one `Persist` listed in a trace line; the rest are counted.
const PERSIST_SHOWN_MAX: usize = 4;

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for DeliveryId {
    /// `dlv#1.7`: incarnation 1, seventh attempt of that incarnation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = super::core::DELIVERY_SEQ_BITS;
        write!(f, "dlv#{}.{}", self.0 >> bits, self.0 & ((1 << bits) - 1))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for CallbackResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallbackResult::Delivered => "delivered",
            CallbackResult::Failed => "failed",
            CallbackResult::TimedOut => "timed-out",
        })
    }
}

/// `"text"`, escaped and cut to `CONTENT_SHOWN_MAX` characters.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        let head: String = chars.by_ref().take(CONTENT_SHOWN_MAX).collect();
        if chars.next().is_some() {
            write!(f, "{head:?}…({}B)", self.0.len())
        } else {
            write!(f, "{head:?}")
        }
    }
}

impl fmt::Display for BrokerInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerInput::Publish { req, publish: p } => write!(
                f,
                "publish req={req} {}/{} topic={} from={} content={}",
                p.global_id,
                p.sub_id,
                p.topic,
                p.sender_id,
                Shown(&p.content)
            ),
            BrokerInput::Subscribe { req, subscribe: s } => write!(
                f,
                "subscribe req={req} {} topic={} url={} until={}",
                s.client_id, s.topic, s.notify_url, s.expire_time
            ),
            BrokerInput::Unsubscribe { req, client, topic } => {
                write!(f, "unsubscribe req={req} {client} topic={topic}")
            }
            BrokerInput::CallbackResult { delivery, result } => write!(f, "callback-result {delivery} {result}"),
            BrokerInput::Durable { lsn } => write!(f, "durable lsn={lsn}"),
            BrokerInput::Redrive { req, client } => write!(f, "redrive req={req} {client}"),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Published { msg_id, duplicate } => {
                write!(f, "published {msg_id}{}", if *duplicate { " duplicate" } else { "" })
            }
            Reply::Subscribed { expire_time } => write!(f, "subscribed until={expire_time}"),
            Reply::Unsubscribed => write!(f, "unsubscribed"),
            Reply::Redriven { count } => write!(f, "redriven count={count}"),
            Reply::Rejected(e) => write!(f, "rejected: {e}"),
        }
    }
}

impl fmt::Display for BrokerOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerOutput::Persist { lsn, frames } => {
                let records = decoded(frames);
                write!(f, "persist lsn={lsn} records={} bytes={}:", records.len(), frames.len())?;
                for (i, r) in records.iter().take(PERSIST_SHOWN_MAX).enumerate() {
                    write!(f, "{} {r}", if i == 0 { "" } else { ";" })?;
                }
                if records.len() > PERSIST_SHOWN_MAX {
                    write!(f, "; +{} more", records.len() - PERSIST_SHOWN_MAX)?;
                }
                Ok(())
            }
            BrokerOutput::Rewrite { lsn, frames, .. } => {
                let records = decoded(frames);
                write!(
                    f,
                    "rewrite lsn={lsn} records={} bytes={} (compaction)",
                    records.len(),
                    frames.len()
                )
            }
            BrokerOutput::Reply { req, reply } => write!(f, "reply req={req} {reply}"),
            BrokerOutput::Callback(cb) => write!(
                f,
                "callback {} {} -> {} attempt={} {}",
                cb.message.msg_id,
                cb.message.key(),
                cb.client,
                cb.attempt,
                cb.delivery
            ),
        }
    }
}

/// The records in `frames`, or a placeholder naming what could not be read.
fn decoded(frames: &[u8]) -> Vec<String> {
    match decode_frames(frames) {
        Ok(r) => r
            .records
            .iter()
            .map(|(_, payload)| match BrokerRecord::decode(payload) {
                Ok(record) => record.to_string(),
                Err(e) => format!("<undecodable: {e}>"),
            })
            .collect(),
        Err(e) => vec![format!("<undecodable: {e}>")],
    }
}

impl fmt::Display for BrokerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerRecord::Epoch {
                incarnation,
                next_msg_id,
            } => write!(f, "epoch incarnation={incarnation} next={next_msg_id}"),
            BrokerRecord::Subscribed {
                client,
                topic,
                url,
                expire_time,
            } => write!(f, "subscribed {client} topic={topic} url={url} until={expire_time}"),
            BrokerRecord::Unsubscribed { client, topic } => write!(f, "unsubscribed {client} topic={topic}"),
            BrokerRecord::Published { message, entitled } => {
                write!(
                    f,
                    "published {} {} topic={} ->",
                    message.msg_id,
                    message.key(),
                    message.topic
                )?;
                if entitled.is_empty() {
                    write!(f, " nobody")?;
                }
                for (i, c) in entitled.iter().enumerate() {
                    write!(f, "{}{c}", if i == 0 { " " } else { "," })?;
                }
                Ok(())
            }
            BrokerRecord::Acked { client, msg_id } => write!(f, "acked {msg_id} by {client}"),
            BrokerRecord::DeadLettered { client, msg_id } => write!(f, "dead-lettered {msg_id} for {client}"),
            BrokerRecord::Redriven { client } => write!(f, "redriven {client}"),
            BrokerRecord::RedrivenOldest { client, count } => write!(f, "redriven {count} oldest of {client}"),
            BrokerRecord::Settled { keys } => write!(f, "settled-keys count={}", keys.len()),
        }
    }
}

//! The broker's durable records (the payloads inside log frames) and their one
//! binary encoding.
//!
//! **Invariant:** the broker's whole durable state is the result of applying
//! these records in log order; a compaction snapshot is itself a (shorter)
//! sequence of the same records. The encoding lives only here.
//!
//! Encoding: one tag byte, then the fields in declaration order; integers are
//! little-endian (`u64`/`i64`: 8 bytes, counts and lengths: `u32`), strings are
//! a `u32` length and UTF-8 bytes. It is hand-written rather than JSON because
//! recovery replays every record at start and must run at well over a million
//! records per second (see `examples/broker_recovery.rs`).

use crate::log::encode_frame;
use crate::types::{ClientId, GlobalId, Message, MessageKey, MsgId, SenderId, SubId, Time, Topic};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerRecord {
    /// Written when a broker starts from a log (and first in a snapshot): the
    /// incarnation numbers callback deliveries so a late answer addressed to
    /// an earlier incarnation is never mistaken for a current one; `next_msg_id`
    /// keeps message ids unique after compaction dropped the newest message.
    Epoch { incarnation: u64, next_msg_id: MsgId },
    /// A subscription or its renewal (which may change the URL).
    Subscribed {
        client: ClientId,
        topic: Topic,
        url: String,
        expire_time: Time,
    },
    /// No new entitlements; queued messages stay until delivered or dead-lettered.
    Unsubscribed { client: ClientId, topic: Topic },
    /// A stored message and the subscribers entitled to it (fixed at publish).
    Published { message: Message, entitled: Vec<ClientId> },
    /// `client` answered 2xx for `msg_id`: settled for that subscriber.
    Acked { client: ClientId, msg_id: MsgId },
    /// `client` exhausted its attempts for `msg_id`.
    DeadLettered { client: ClientId, msg_id: MsgId },
    /// Every dead letter of `client` went back to its queue.
    Redriven { client: ClientId },
    /// The `count` oldest dead letters of `client` went back to its queue (a
    /// redrive of more than the queue has room for moves what fits).
    RedrivenOldest { client: ClientId, count: u32 },
    /// Dedup keys of settled messages, oldest first (snapshots only).
    Settled { keys: Vec<(MessageKey, MsgId)> },
}

/// A record as recovery's replay needs it. A message nobody was entitled to
/// settled at once, and replay keeps only its key: its sender, topic and
/// content are skipped, not decoded and dropped (in a long log, most records).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReplayRecord {
    Full(BrokerRecord),
    SettledAtOnce { msg_id: MsgId, key: MessageKey },
}

const TAG_EPOCH: u8 = 1;
const TAG_SUBSCRIBED: u8 = 2;
const TAG_UNSUBSCRIBED: u8 = 3;
const TAG_PUBLISHED: u8 = 4;
const TAG_ACKED: u8 = 5;
const TAG_DEAD_LETTERED: u8 = 6;
const TAG_REDRIVEN: u8 = 7;
const TAG_SETTLED: u8 = 8;
const TAG_REDRIVEN_OLDEST: u8 = 9;

impl BrokerRecord {
    /// Appends this record's payload (no frame) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            BrokerRecord::Epoch {
                incarnation,
                next_msg_id,
            } => {
                w.u8(TAG_EPOCH);
                w.u64(*incarnation);
                w.u64(next_msg_id.0);
            }
            BrokerRecord::Subscribed {
                client,
                topic,
                url,
                expire_time,
            } => {
                w.u8(TAG_SUBSCRIBED);
                w.str(client.as_str());
                w.str(topic.as_str());
                w.str(url);
                w.u64(expire_time.0);
            }
            BrokerRecord::Unsubscribed { client, topic } => {
                w.u8(TAG_UNSUBSCRIBED);
                w.str(client.as_str());
                w.str(topic.as_str());
            }
            BrokerRecord::Published { message, entitled } => {
                w.u8(TAG_PUBLISHED);
                w.u64(message.msg_id.0);
                w.str(message.global_id.as_str());
                w.str(message.sub_id.as_str());
                w.str(message.sender_id.as_str());
                w.u64(message.create_time as u64);
                w.str(message.topic.as_str());
                w.str(&message.content);
                w.count(entitled.len());
                for c in entitled {
                    w.str(c.as_str());
                }
            }
            BrokerRecord::Acked { client, msg_id } => {
                w.u8(TAG_ACKED);
                w.str(client.as_str());
                w.u64(msg_id.0);
            }
            BrokerRecord::DeadLettered { client, msg_id } => {
                w.u8(TAG_DEAD_LETTERED);
                w.str(client.as_str());
                w.u64(msg_id.0);
            }
            BrokerRecord::Redriven { client } => {
                w.u8(TAG_REDRIVEN);
                w.str(client.as_str());
            }
            BrokerRecord::RedrivenOldest { client, count } => {
                w.u8(TAG_REDRIVEN_OLDEST);
                w.str(client.as_str());
                w.u64(u64::from(*count));
            }
            BrokerRecord::Settled { keys } => {
                w.u8(TAG_SETTLED);
                w.count(keys.len());
                for (key, msg_id) in keys {
                    w.str(key.global_id.as_str());
                    w.str(key.sub_id.as_str());
                    w.u64(msg_id.0);
                }
            }
        }
    }

    /// Appends this record as one log frame to `out`.
    pub fn encode_framed(&self, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
        scratch.clear();
        self.encode(scratch);
        encode_frame(scratch, out);
    }

    /// Decodes one payload; the error says what was wrong (the caller adds the offset).
    pub fn decode(bytes: &[u8]) -> Result<BrokerRecord, String> {
        Self::decode_cached(bytes, &mut IdCache::default())
    }

    /// [`BrokerRecord::decode`], sharing the ids it decoded before through
    /// `ids` (the same record either way).
    pub(super) fn decode_cached(bytes: &[u8], ids: &mut IdCache) -> Result<BrokerRecord, String> {
        let mut r = Reader { bytes, pos: 0, ids };
        let record = match r.u8()? {
            TAG_EPOCH => BrokerRecord::Epoch {
                incarnation: r.u64()?,
                next_msg_id: MsgId(r.u64()?),
            },
            TAG_SUBSCRIBED => BrokerRecord::Subscribed {
                client: r.client()?,
                topic: r.topic()?,
                url: r.string()?,
                expire_time: Time(r.u64()?),
            },
            TAG_UNSUBSCRIBED => BrokerRecord::Unsubscribed {
                client: r.client()?,
                topic: r.topic()?,
            },
            TAG_PUBLISHED => {
                let message = Message {
                    msg_id: MsgId(r.u64()?),
                    global_id: r.global()?,
                    sub_id: r.id(|s| SubId::new(s))?,
                    sender_id: r.sender()?,
                    create_time: r.u64()? as i64,
                    topic: r.topic()?,
                    content: r.string()?,
                };
                let n = r.count()?;
                let mut entitled = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    entitled.push(r.client()?);
                }
                BrokerRecord::Published { message, entitled }
            }
            TAG_ACKED => BrokerRecord::Acked {
                client: r.client()?,
                msg_id: MsgId(r.u64()?),
            },
            TAG_DEAD_LETTERED => BrokerRecord::DeadLettered {
                client: r.client()?,
                msg_id: MsgId(r.u64()?),
            },
            TAG_REDRIVEN => BrokerRecord::Redriven { client: r.client()? },
            TAG_REDRIVEN_OLDEST => BrokerRecord::RedrivenOldest {
                client: r.client()?,
                count: u32::try_from(r.u64()?).map_err(|_| "redrive count out of range".to_string())?,
            },
            TAG_SETTLED => {
                let n = r.count()?;
                let mut keys = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let key = MessageKey {
                        global_id: r.global()?,
                        sub_id: r.id(|s| SubId::new(s))?,
                    };
                    keys.push((key, MsgId(r.u64()?)));
                }
                BrokerRecord::Settled { keys }
            }
            tag => return Err(format!("unknown record tag {tag}")),
        };
        r.end()?;
        Ok(record)
    }

    /// Like [`BrokerRecord::decode`], for replay (see [`ReplayRecord`]).
    pub(super) fn decode_for_replay(bytes: &[u8], ids: &mut IdCache) -> Result<ReplayRecord, String> {
        if bytes.first() != Some(&TAG_PUBLISHED) {
            return BrokerRecord::decode_cached(bytes, ids).map(ReplayRecord::Full);
        }
        let mut r = Reader { bytes, pos: 1, ids };
        let msg_id = MsgId(r.u64()?);
        let global_id = r.raw_str()?;
        let sub_id = r.raw_str()?;
        r.raw_str()?; // sender
        r.u64()?; // create time
        r.raw_str()?; // topic
        r.raw_str()?; // content
        if r.count()? != 0 {
            // Entitled subscribers: the message lives on, decode it whole.
            return BrokerRecord::decode_cached(bytes, r.ids).map(ReplayRecord::Full);
        }
        r.end()?;
        let key = MessageKey {
            global_id: r.ids.globals.get(global_id)?,
            sub_id: Reader::id_of(sub_id, |s| SubId::new(s))?,
        };
        Ok(ReplayRecord::SettledAtOnce { msg_id, key })
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, n: usize) {
        let n = u32::try_from(n).expect("record field count fits u32 (bounded by the frame size)");
        self.0.extend_from_slice(&n.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.count(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Ids decoded recently, by kind, so that a replay shares one allocation
/// among the records that name the same subscriber, topic, sender or saga
/// (most of them) instead of allocating and validating the text again.
#[derive(Clone, Default)]
pub(super) struct IdCache {
    clients: Recent<ClientId>,
    topics: Recent<Topic>,
    senders: Recent<SenderId>,
    globals: Recent<GlobalId>,
}

/// At most [`Recent::KEPT`] ids, the newest replacing the oldest.
#[derive(Clone)]
struct Recent<T> {
    ids: Vec<T>,
    next: usize,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            ids: Vec::new(),
            next: 0,
        }
    }
}

trait CachedId: Clone {
    fn text(&self) -> &str;
    fn parse(s: &str) -> Result<Self, crate::types::IdError>;
}

macro_rules! cached_id {
    ($($t:ty),*) => {$(
        impl CachedId for $t {
            fn text(&self) -> &str {
                self.as_str()
            }
            fn parse(s: &str) -> Result<Self, crate::types::IdError> {
                <$t>::new(s)
            }
        }
    )*};
}
cached_id!(ClientId, Topic, SenderId, GlobalId);

impl<T: CachedId> Recent<T> {
    const KEPT: usize = 16;

    /// The id whose text is `raw`: a kept one (already validated), or one
    /// parsed as the record decoder always did.
    fn get(&mut self, raw: &[u8]) -> Result<T, String> {
        if let Some(id) = self.ids.iter().find(|id| id.text().as_bytes() == raw) {
            return Ok(id.clone());
        }
        let id = Reader::id_of(raw, |s| T::parse(s))?;
        if self.ids.len() < Self::KEPT {
            self.ids.push(id.clone());
        } else {
            self.ids[self.next] = id.clone();
            self.next = (self.next + 1) % Self::KEPT;
        }
        Ok(id)
    }
}

struct Reader<'a, 'c> {
    bytes: &'a [u8],
    pos: usize,
    ids: &'c mut IdCache,
}

impl<'a> Reader<'a, '_> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("record truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn count(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let raw = self.raw_str()?;
        Self::string_of(raw)
    }
    fn string_of(raw: &[u8]) -> Result<String, String> {
        Self::str_of(raw).map(str::to_owned)
    }
    fn str_of(raw: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(raw).map_err(|e| format!("invalid UTF-8 in a string field: {e}"))
    }
    /// A string field's bytes, not yet checked.
    fn raw_str(&mut self) -> Result<&'a [u8], String> {
        let n = self.count()?;
        self.take(n)
    }
    fn end(&self) -> Result<(), String> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            n => Err(format!("{n} trailing bytes after the record")),
        }
    }
    fn client(&mut self) -> Result<ClientId, String> {
        let raw = self.raw_str()?;
        self.ids.clients.get(raw)
    }
    fn topic(&mut self) -> Result<Topic, String> {
        let raw = self.raw_str()?;
        self.ids.topics.get(raw)
    }
    fn sender(&mut self) -> Result<SenderId, String> {
        let raw = self.raw_str()?;
        self.ids.senders.get(raw)
    }
    fn global(&mut self) -> Result<GlobalId, String> {
        let raw = self.raw_str()?;
        self.ids.globals.get(raw)
    }
    fn id<T, E: std::fmt::Display>(&mut self, new: impl FnOnce(&str) -> Result<T, E>) -> Result<T, String> {
        let raw = self.raw_str()?;
        Self::id_of(raw, new)
    }
    fn id_of<T, E: std::fmt::Display>(raw: &[u8], new: impl FnOnce(&str) -> Result<T, E>) -> Result<T, String> {
        new(Self::str_of(raw)?).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<BrokerRecord> {
        let client = ClientId::lit("stock-service");
        let topic = Topic::lit("sale-order.created");
        vec![
            BrokerRecord::Epoch {
                incarnation: 3,
                next_msg_id: MsgId(42),
            },
            BrokerRecord::Subscribed {
                client: client.clone(),
                topic: topic.clone(),
                url: "http://stock/cb".into(),
                expire_time: Time(123),
            },
            BrokerRecord::Unsubscribed {
                client: client.clone(),
                topic: topic.clone(),
            },
            BrokerRecord::Published {
                message: Message {
                    msg_id: MsgId(7),
                    global_id: GlobalId::lit("order-1"),
                    sub_id: SubId::lit("created"),
                    sender_id: SenderId::lit("order-service"),
                    create_time: -5,
                    topic,
                    content: "{\"qty\":1} é".into(),
                },
                entitled: vec![client.clone(), ClientId::lit("audit")],
            },
            BrokerRecord::Published {
                message: Message {
                    msg_id: MsgId(8),
                    global_id: GlobalId::lit("order-2"),
                    sub_id: SubId::lit("created"),
                    sender_id: SenderId::lit("order-service"),
                    create_time: 9,
                    topic: Topic::lit("nobody-listens"),
                    content: "ignored".into(),
                },
                entitled: vec![],
            },
            BrokerRecord::Acked {
                client: client.clone(),
                msg_id: MsgId(7),
            },
            BrokerRecord::DeadLettered {
                client: client.clone(),
                msg_id: MsgId(7),
            },
            BrokerRecord::Redriven { client: client.clone() },
            BrokerRecord::RedrivenOldest { client, count: 3 },
            BrokerRecord::Settled {
                keys: vec![(
                    MessageKey {
                        global_id: GlobalId::lit("g"),
                        sub_id: SubId::lit("s"),
                    },
                    MsgId(1),
                )],
            },
        ]
    }

    #[test]
    fn every_record_round_trips() {
        for record in samples() {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            assert_eq!(BrokerRecord::decode(&bytes), Ok(record));
        }
    }

    #[test]
    fn damaged_payloads_are_refused_with_a_reason() {
        for record in samples() {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            for cut in 0..bytes.len() {
                assert!(BrokerRecord::decode(&bytes[..cut]).is_err(), "{record:?} cut at {cut}");
            }
            bytes.push(0);
            assert!(BrokerRecord::decode(&bytes).unwrap_err().contains("trailing"));
        }
        assert_eq!(BrokerRecord::decode(&[99]).unwrap_err(), "unknown record tag 99");
        // An id that fails validation (empty ClientID) is refused, not smuggled in.
        let mut bytes = vec![TAG_REDRIVEN];
        bytes.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(BrokerRecord::decode(&bytes).unwrap_err(), "ClientID must not be empty");
    }

    /// Replay reads a message that entitled nobody as its key alone and every
    /// other record as `decode` does; damage is refused the same way.
    #[test]
    fn replay_decoding_keeps_only_the_key_of_a_message_settled_at_once() {
        for record in samples() {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let expected = match &record {
                BrokerRecord::Published { message, entitled } if entitled.is_empty() => ReplayRecord::SettledAtOnce {
                    msg_id: message.msg_id,
                    key: message.key(),
                },
                _ => ReplayRecord::Full(record.clone()),
            };
            assert_eq!(
                BrokerRecord::decode_for_replay(&bytes, &mut IdCache::default()),
                Ok(expected)
            );
            for cut in 0..bytes.len() {
                assert!(
                    BrokerRecord::decode_for_replay(&bytes[..cut], &mut IdCache::default()).is_err(),
                    "{record:?} cut at {cut}"
                );
            }
            bytes.push(0);
            assert!(
                BrokerRecord::decode_for_replay(&bytes, &mut IdCache::default())
                    .unwrap_err()
                    .contains("trailing")
            );
        }
        assert!(
            samples()
                .iter()
                .any(|r| matches!(r, BrokerRecord::Published { entitled, .. } if entitled.is_empty())),
            "the samples include a message settled at once"
        );
    }

    /// Ids shared through one cache (a replay's) decode to the same records,
    /// past the cache's capacity too; damage is still refused.
    #[test]
    fn decoding_through_a_shared_id_cache_gives_the_same_records() {
        let mut ids = IdCache::default();
        let mut records = samples();
        for n in 0..40 {
            records.push(BrokerRecord::Acked {
                client: ClientId::new(format!("client-{}", n % 20)).unwrap(),
                msg_id: MsgId(n),
            });
        }
        for _ in 0..2 {
            for record in &records {
                let mut bytes = Vec::new();
                record.encode(&mut bytes);
                assert_eq!(BrokerRecord::decode_cached(&bytes, &mut ids).as_ref(), Ok(record));
                bytes.push(0);
                assert!(BrokerRecord::decode_cached(&bytes, &mut ids).is_err());
            }
        }
        let mut bad = Vec::new();
        BrokerRecord::Redriven {
            client: ClientId::lit("client-1"),
        }
        .encode(&mut bad);
        let at = bad.len() - 1;
        bad[at] = b'\n';
        assert!(
            BrokerRecord::decode_cached(&bad, &mut ids).is_err(),
            "a control character is refused"
        );
    }
}

//! Compaction: the live state written as a short sequence of ordinary records,
//! which replaces the whole log (`BrokerOutput::Rewrite`).
//!
//! **Invariant:** replaying the snapshot yields the current durable state
//! (subscriptions, live messages with the subscribers still holding them, dead
//! letters, remembered dedup keys, the next message id and incarnation), so
//! recovery costs O(live state), not O(history).

use super::*;
use crate::types::MessageKey;
use std::collections::BTreeMap;

/// Dedup keys per `Settled` record (keeps frames far below `FRAME_PAYLOAD_MAX`:
/// at most 512 x ~530 bytes).
pub(super) const SETTLED_PER_RECORD: usize = 512;

impl Broker {
    /// The snapshot's frames and its record count.
    pub(super) fn snapshot(&self) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let mut records = 0u64;
        let mut put = |record: BrokerRecord| {
            record.encode_framed(&mut scratch, &mut out);
            records += 1;
        };
        put(BrokerRecord::Epoch {
            incarnation: self.incarnation,
            next_msg_id: MsgId(self.next_msg_id),
        });
        // Each key is cloned once, straight into its record.
        let mut settled = self.dedup.settled().peekable();
        while settled.peek().is_some() {
            let keys: Vec<(MessageKey, MsgId)> = settled
                .by_ref()
                .take(SETTLED_PER_RECORD)
                .map(|s| (s.key.clone(), s.msg_id))
                .collect();
            put(BrokerRecord::Settled { keys });
        }
        for (topic, by_client) in &self.subs {
            for (client, sub) in by_client {
                put(BrokerRecord::Subscribed {
                    client: client.clone(),
                    topic: topic.clone(),
                    url: sub.url.clone(),
                    expire_time: sub.expire_time,
                });
            }
        }
        // Who still holds each message: queued or dead-lettered.
        let mut holders: BTreeMap<MsgId, Vec<ClientId>> = BTreeMap::new();
        for (client, q) in &self.clients {
            for (_, msg_id) in q.entries.keys().chain(q.dead.iter()) {
                holders.entry(*msg_id).or_default().push(client.clone());
            }
        }
        for (msg_id, stored) in &self.messages {
            let entitled = holders.remove(msg_id).unwrap_or_default();
            assert_eq!(entitled.len(), stored.holders, "holder count of {msg_id}");
            put(BrokerRecord::Published {
                message: stored.message.clone(),
                entitled,
            });
        }
        for (client, q) in &self.clients {
            for (_, msg_id) in &q.dead {
                put(BrokerRecord::DeadLettered {
                    client: client.clone(),
                    msg_id: *msg_id,
                });
            }
        }
        // Last: an unsubscribed subscription survives only while referenced.
        for (topic, by_client) in &self.subs {
            for (client, _) in by_client.iter().filter(|(_, s)| s.retired) {
                put(BrokerRecord::Unsubscribed {
                    client: client.clone(),
                    topic: topic.clone(),
                });
            }
        }
        (out, records)
    }
}

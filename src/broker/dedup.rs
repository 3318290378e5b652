//! The dedup index: `(GlobalID, SubID)` to message id, for live messages and
//! for remembered settled ones.
//!
//! **Invariant:** a key maps to at most one live message, and a remembered
//! settled key to one message; at most `dedup_settled_max` settled keys are
//! remembered, the oldest forgotten first. Keys are indexed by a 64-bit hash
//! (ordered sets, no allocation per lookup, which recovery needs to be fast);
//! every hash hit is confirmed by comparing the key itself.

use super::core::StoredMessage;
use crate::broker::Lsn;
use crate::types::{GlobalId, Message, MessageKey, MsgId, SubId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Default)]
pub(super) struct Dedup {
    /// Live messages by key hash; the key itself is in the stored message.
    live: BTreeSet<(u64, MsgId)>,
    /// Settled keys, oldest first. `None` once forgotten out of order (see `forget`).
    settled: VecDeque<Option<SettledKey>>,
    /// Sequence number of `settled.front()`.
    settled_base: u64,
    /// `(key hash, sequence number)` of every remembered settled key.
    settled_index: BTreeSet<(u64, u64)>,
}

pub(super) struct SettledKey {
    pub(super) key: MessageKey,
    pub(super) msg_id: MsgId,
    /// The write that stored its message (`Lsn(0)`: recovered, durable).
    pub(super) lsn: Lsn,
}

/// FNV-1a over both ids with a separator that cannot occur in UTF-8.
pub(super) fn key_hash(global_id: &GlobalId, sub_id: &SubId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = global_id.as_str().bytes().chain([0xFF]).chain(sub_id.as_str().bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn same_key(m: &Message, global_id: &GlobalId, sub_id: &SubId) -> bool {
    m.global_id == *global_id && m.sub_id == *sub_id
}

impl Dedup {
    /// Remembered settled keys.
    pub(super) fn settled_len(&self) -> usize {
        self.settled_index.len()
    }

    /// The message stored (live) or remembered (settled) under `key`, with the
    /// lsn of the write that stored it.
    pub(super) fn find(
        &self,
        global_id: &GlobalId,
        sub_id: &SubId,
        messages: &BTreeMap<MsgId, StoredMessage>,
    ) -> Option<(MsgId, Lsn)> {
        let h = key_hash(global_id, sub_id);
        self.find_live(h, global_id, sub_id, messages)
            .map(|id| (id, messages[&id].lsn))
            .or_else(|| {
                self.find_settled(h, global_id, sub_id)
                    .and_then(|seq| self.entry(seq))
                    .map(|s| (s.msg_id, s.lsn))
            })
    }

    pub(super) fn find_live(
        &self,
        h: u64,
        global_id: &GlobalId,
        sub_id: &SubId,
        messages: &BTreeMap<MsgId, StoredMessage>,
    ) -> Option<MsgId> {
        self.live
            .range((h, MsgId(0))..=(h, MsgId(u64::MAX)))
            .map(|(_, id)| *id)
            .find(|id| same_key(&messages[id].message, global_id, sub_id))
    }

    fn find_settled(&self, h: u64, global_id: &GlobalId, sub_id: &SubId) -> Option<u64> {
        self.settled_index
            .range((h, 0)..=(h, u64::MAX))
            .map(|(_, seq)| *seq)
            .find(|seq| {
                self.entry(*seq)
                    .is_some_and(|s| s.key.global_id == *global_id && s.key.sub_id == *sub_id)
            })
    }

    fn entry(&self, seq: u64) -> Option<&SettledKey> {
        let i = usize::try_from(seq - self.settled_base).expect("in range");
        self.settled[i].as_ref()
    }

    pub(super) fn insert_live(&mut self, h: u64, msg_id: MsgId) {
        self.live.insert((h, msg_id));
    }

    pub(super) fn remove_live(&mut self, h: u64, msg_id: MsgId) {
        self.live.remove(&(h, msg_id));
    }

    /// Remembers a settled key, forgetting the oldest beyond `max`.
    pub(super) fn remember(&mut self, key: MessageKey, msg_id: MsgId, lsn: Lsn, max: usize) {
        if max == 0 {
            return;
        }
        let h = key_hash(&key.global_id, &key.sub_id);
        let seq = self.settled_base + self.settled.len() as u64;
        self.settled.push_back(Some(SettledKey { key, msg_id, lsn }));
        self.settled_index.insert((h, seq));
        while self.settled.len() > max {
            let front = self.settled.pop_front().expect("longer than max");
            if let Some(old) = front {
                let oh = key_hash(&old.key.global_id, &old.key.sub_id);
                self.settled_index.remove(&(oh, self.settled_base));
            }
            self.settled_base += 1;
        }
    }

    /// Forgets a settled key now (a new message with the same key is being stored).
    pub(super) fn forget(&mut self, h: u64, global_id: &GlobalId, sub_id: &SubId) {
        if let Some(seq) = self.find_settled(h, global_id, sub_id) {
            self.settled_index.remove(&(h, seq));
            let i = usize::try_from(seq - self.settled_base).expect("in range");
            self.settled[i] = None;
        }
    }

    /// Remembered settled keys, oldest first.
    pub(super) fn settled(&self) -> impl Iterator<Item = &SettledKey> {
        self.settled.iter().flatten()
    }
}

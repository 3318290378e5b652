//! The dedup index: `(GlobalID, SubID)` to message id, for live messages and
//! for remembered settled ones.
//!
//! **Invariant:** a key maps to at most one live message, and a remembered
//! settled key to one message; at most `dedup_settled_max` settled keys are
//! remembered, the oldest forgotten first. Keys are indexed by a 64-bit hash
//! (ordered maps, no allocation per lookup, which recovery needs to be fast);
//! every hash hit is confirmed by comparing the key itself.

use super::core::StoredMessage;
use crate::broker::Lsn;
use crate::types::{GlobalId, Message, MessageKey, MsgId, SubId};
use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Default)]
pub(super) struct Dedup {
    /// Live messages by key hash; the key itself is in the stored message.
    live: HashIndex<MsgId>,
    /// Settled keys, oldest first. `None` once forgotten out of order (see `forget`).
    settled: VecDeque<Option<SettledKey>>,
    /// Sequence number of `settled.front()`.
    settled_base: u64,
    /// The `Some` entries of `settled`.
    settled_count: usize,
    /// Key hash -> sequence number of every remembered settled key.
    settled_index: HashIndex<u64>,
    /// Recovery is replaying: the hash indexes are not maintained record by
    /// record (random inserts into large ordered maps dominate the replay
    /// cost) but built once, sorted, by `end_bulk`.
    bulk: bool,
}

/// A multimap from a 64-bit hash to values, tuned for "almost never two values
/// per hash": one point lookup in the common case (a range scan over a
/// `(hash, value)` set costs several times more, and recovery does one per record).
#[derive(Clone)]
struct HashIndex<V> {
    first: BTreeMap<u64, V>,
    /// Further values sharing a hash with the one in `first` (collisions).
    more: BTreeMap<u64, Vec<V>>,
}

impl<V> Default for HashIndex<V> {
    fn default() -> Self {
        HashIndex {
            first: BTreeMap::new(),
            more: BTreeMap::new(),
        }
    }
}

impl<V: Copy + PartialEq> HashIndex<V> {
    /// From `(hash, value)` pairs sorted by hash (bulk-built, no random inserts).
    fn from_sorted(pairs: Vec<(u64, V)>) -> HashIndex<V> {
        let mut first = Vec::with_capacity(pairs.len());
        let mut more: BTreeMap<u64, Vec<V>> = BTreeMap::new();
        for (h, v) in pairs {
            if first.last().is_some_and(|(last, _)| *last == h) {
                more.entry(h).or_default().push(v);
            } else {
                first.push((h, v));
            }
        }
        HashIndex {
            first: first.into_iter().collect(),
            more,
        }
    }

    fn get(&self, h: u64) -> impl Iterator<Item = V> + '_ {
        let more = self.more.get(&h).map(|v| v.as_slice()).unwrap_or_default();
        self.first.get(&h).copied().into_iter().chain(more.iter().copied())
    }

    fn insert(&mut self, h: u64, v: V) {
        match self.first.entry(h) {
            std::collections::btree_map::Entry::Occupied(_) => self.more.entry(h).or_default().push(v),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(v);
            }
        }
    }

    fn remove(&mut self, h: u64, v: V) {
        if self.first.get(&h) == Some(&v) {
            match self.more.get_mut(&h) {
                Some(more) => {
                    let promoted = more.pop().expect("empty lists are removed");
                    if more.is_empty() {
                        self.more.remove(&h);
                    }
                    self.first.insert(h, promoted);
                }
                None => {
                    self.first.remove(&h);
                }
            }
        } else if let Some(more) = self.more.get_mut(&h)
            && let Some(i) = more.iter().position(|x| *x == v)
        {
            more.swap_remove(i);
            if more.is_empty() {
                self.more.remove(&h);
            }
        }
    }
}

#[derive(Clone)]
pub(super) struct SettledKey {
    hash: u64,
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
        self.settled_count
    }

    /// The message stored (live) or remembered (settled) under `key`, with the
    /// lsn of the write that stored it.
    pub(super) fn find(
        &self,
        global_id: &GlobalId,
        sub_id: &SubId,
        messages: &BTreeMap<MsgId, Box<StoredMessage>>,
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

    /// The live message stored under the key (`None` while bulk loading).
    pub(super) fn find_live(
        &self,
        h: u64,
        global_id: &GlobalId,
        sub_id: &SubId,
        messages: &BTreeMap<MsgId, Box<StoredMessage>>,
    ) -> Option<MsgId> {
        self.live
            .get(h)
            .find(|id| same_key(&messages[id].message, global_id, sub_id))
    }

    fn find_settled(&self, h: u64, global_id: &GlobalId, sub_id: &SubId) -> Option<u64> {
        self.settled_index.get(h).find(|seq| {
            self.entry(*seq)
                .is_some_and(|s| s.key.global_id == *global_id && s.key.sub_id == *sub_id)
        })
    }

    fn entry(&self, seq: u64) -> Option<&SettledKey> {
        let i = usize::try_from(seq - self.settled_base).expect("in range");
        self.settled[i].as_ref()
    }

    pub(super) fn insert_live(&mut self, h: u64, msg_id: MsgId) {
        if !self.bulk {
            self.live.insert(h, msg_id);
        }
    }

    pub(super) fn remove_live(&mut self, h: u64, msg_id: MsgId) {
        if !self.bulk {
            self.live.remove(h, msg_id);
        }
    }

    /// Remembers a settled key, forgetting the oldest beyond `max`.
    pub(super) fn remember(&mut self, key: MessageKey, msg_id: MsgId, lsn: Lsn, max: usize) {
        if max == 0 {
            return;
        }
        let hash = key_hash(&key.global_id, &key.sub_id);
        let seq = self.settled_base + self.settled.len() as u64;
        self.settled.push_back(Some(SettledKey { hash, key, msg_id, lsn }));
        self.settled_count += 1;
        if !self.bulk {
            self.settled_index.insert(hash, seq);
        }
        while self.settled.len() > max {
            if let Some(old) = self.settled.pop_front().expect("longer than max") {
                self.settled_count -= 1;
                if !self.bulk {
                    self.settled_index.remove(old.hash, self.settled_base);
                }
            }
            self.settled_base += 1;
        }
    }

    /// Forgets a settled key now (a new message with the same key is being
    /// stored). While bulk loading, `end_bulk` does it.
    pub(super) fn forget(&mut self, h: u64, global_id: &GlobalId, sub_id: &SubId) {
        if let Some(seq) = self.find_settled(h, global_id, sub_id) {
            self.settled_index.remove(h, seq);
            let i = usize::try_from(seq - self.settled_base).expect("in range");
            self.settled[i] = None;
            self.settled_count -= 1;
        }
    }

    /// Remembered settled keys, oldest first.
    pub(super) fn settled(&self) -> impl Iterator<Item = &SettledKey> {
        self.settled.iter().flatten()
    }

    pub(super) fn begin_bulk(&mut self) {
        assert!(
            self.live.first.is_empty() && self.settled.is_empty(),
            "bulk loading starts empty"
        );
        self.bulk = true;
    }

    /// Builds the indexes after a replay. Two live messages with one key are
    /// an error; a settled key also stored later (live, or settled again) was
    /// superseded and is forgotten, as `forget` would have done during replay.
    pub(super) fn end_bulk(&mut self, messages: &BTreeMap<MsgId, Box<StoredMessage>>) -> Result<(), String> {
        self.bulk = false;
        let mut live: Vec<(u64, MsgId)> = messages
            .iter()
            .map(|(id, m)| (key_hash(&m.message.global_id, &m.message.sub_id), *id))
            .collect();
        live.sort_unstable();
        for run in live.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
            for (i, (_, a)) in run.iter().enumerate() {
                for (_, b) in &run[i + 1..] {
                    let (ma, mb) = (&messages[a].message, &messages[b].message);
                    if same_key(ma, &mb.global_id, &mb.sub_id) {
                        return Err(format!("{a} and {b} are both stored under {}", ma.key()));
                    }
                }
            }
        }
        self.live = HashIndex::from_sorted(live);

        let base = self.settled_base;
        let mut settled: Vec<(u64, u64)> = self
            .settled
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.hash, base + i as u64)))
            .collect();
        settled.sort_unstable();
        let mut superseded = Vec::new();
        for run in settled.chunk_by(|a, b| a.0 == b.0) {
            for (i, &(h, seq)) in run.iter().enumerate() {
                let s = self.entry(seq).expect("listed");
                let (g, sub) = (&s.key.global_id, &s.key.sub_id);
                let later = run[i + 1..].iter().any(|&(_, other)| {
                    let o = self.entry(other).expect("listed");
                    o.key.global_id == *g && o.key.sub_id == *sub
                });
                if later || self.find_live(h, g, sub, messages).is_some() {
                    superseded.push(seq);
                }
            }
        }
        for seq in &superseded {
            self.settled[usize::try_from(seq - base).expect("in range")] = None;
            self.settled_count -= 1;
        }
        settled.retain(|(_, seq)| !superseded.contains(seq));
        self.settled_index = HashIndex::from_sorted(settled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_index_keeps_every_value_of_a_colliding_hash() {
        let mut ix = HashIndex::default();
        for v in [1u64, 2, 3] {
            ix.insert(7, v);
        }
        ix.insert(8, 4);
        assert_eq!(ix.get(7).collect::<Vec<_>>(), [1, 2, 3]);
        ix.remove(7, 1);
        let mut left: Vec<u64> = ix.get(7).collect();
        left.sort();
        assert_eq!(left, [2, 3]);
        ix.remove(7, 3);
        ix.remove(7, 9); // absent: no effect
        assert_eq!(ix.get(7).collect::<Vec<_>>(), [2]);
        ix.remove(7, 2);
        assert_eq!(ix.get(7).count(), 0);
        assert!(ix.more.is_empty());
        assert_eq!(ix.get(8).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn settled_keys_are_forgotten_oldest_first_and_on_demand() {
        let key = |g: &str| MessageKey {
            global_id: GlobalId::lit(g),
            sub_id: SubId::lit("s"),
        };
        let none = BTreeMap::new();
        let find = |d: &Dedup, g: &str| d.find(&GlobalId::lit(g), &SubId::lit("s"), &none).map(|(id, _)| id);
        let mut d = Dedup::default();
        for (i, g) in ["a", "b", "c"].into_iter().enumerate() {
            d.remember(key(g), MsgId(i as u64 + 1), Lsn(0), 2);
        }
        assert_eq!(
            (find(&d, "a"), find(&d, "b"), find(&d, "c")),
            (None, Some(MsgId(2)), Some(MsgId(3)))
        );
        let b = key("b");
        d.forget(key_hash(&b.global_id, &b.sub_id), &b.global_id, &b.sub_id);
        assert_eq!(find(&d, "b"), None);
        assert_eq!(d.settled_len(), 1);
        assert_eq!(d.settled().map(|s| s.msg_id).collect::<Vec<_>>(), [MsgId(3)]);
        d.remember(key("d"), MsgId(4), Lsn(0), 2);
        d.remember(key("e"), MsgId(5), Lsn(0), 2);
        assert_eq!(d.settled().map(|s| s.msg_id).collect::<Vec<_>>(), [MsgId(4), MsgId(5)]);
    }
}

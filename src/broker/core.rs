//! The broker state machine: its state, its constructors (fresh and recovered),
//! request handling and the persistence protocol (batch, `Persist`, `Durable`).
//!
//! **Invariant:** every state change that must survive a crash is made by
//! applying a [`BrokerRecord`] (see `apply.rs`), the same function recovery
//! replays, and that record goes into the current batch; a reply that depends
//! on it waits until `Durable` covers the batch's lsn.
//!
//! Choices this file and its siblings implement (documented for users):
//! - **Retries do not block the line.** A message backing off leaves its window
//!   slot free and later messages of the same subscriber proceed. Each dispatch
//!   picks the earliest ready message in `(CreateTime, MsgId)` order, so first
//!   attempts (and retries that are due) go out in that order.
//! - **Expiry pauses delivery.** An expired subscription gets no callbacks;
//!   its queued messages and dead letters are kept and delivery resumes when
//!   the client subscribes again. Callbacks already in flight finish normally.
//!   It is still entitled to new messages for `subscription_grace` after its
//!   `ExpireTime` (queued, paused), then gets nothing new; an unsubscribed one
//!   gets nothing new at once.
//! - **Unsubscribe** ends new entitlements at once; already queued messages
//!   are still delivered until the subscription's `ExpireTime`.
//! - **After a restart** in-flight and backing-off deliveries are simply
//!   pending again and their attempt counts start over (attempts are not
//!   logged); dead letters, acks, subscriptions and dedup keys are durable.

use super::dedup::Dedup;
use super::record::{IdCache, ReplayRecord};
use super::*;
use crate::log::{FrameStream, LogError};
use crate::machine::Machine;
use crate::rng::Rng;
use crate::types::{CONTENT_LEN_MAX, URL_LEN_MAX};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Per subscriber, messages are ordered by `(CreateTime, MsgId)`.
pub(super) type OrderKey = (i64, MsgId);

/// Bits of a [`DeliveryId`] below the incarnation number.
pub(super) const DELIVERY_SEQ_BITS: u32 = 40;

#[derive(Clone)]
pub struct Broker {
    pub(super) config: BrokerConfig,
    pub(super) rng: Rng,

    // --- State rebuilt from the records (plus each entry's volatile phase).
    /// topic -> client -> subscription. Bounded by `subscriptions_max`.
    pub(super) subs: BTreeMap<Topic, BTreeMap<ClientId, Subscription>>,
    pub(super) subs_count: usize,
    /// Unsubscribed subscriptions kept because messages still reference them.
    pub(super) subs_retired: usize,
    /// Every client with at least one subscription entry.
    pub(super) clients: BTreeMap<ClientId, ClientQueue>,
    /// Live messages. Bounded by `messages_max`. Boxed: B-tree nodes then hold
    /// small values, so inserting and removing does not shift whole messages.
    pub(super) messages: BTreeMap<MsgId, Box<StoredMessage>>,
    /// Dedup keys of live messages and of settled ones (bounded by `dedup_settled_max`).
    pub(super) dedup: Dedup,
    pub(super) dead_total: usize,
    pub(super) next_msg_id: u64,
    pub(super) incarnation: u64,

    // --- Volatile delivery state (lost on restart by design).
    /// Callback deadlines and backoff ends. One per in-flight or backing-off entry.
    pub(super) timers: BTreeSet<(Time, ClientId, OrderKey)>,
    /// Every attempt of every queued entry, so a late answer is recognised.
    /// Bounded by queued entries x `attempts_max`.
    pub(super) deliveries: BTreeMap<DeliveryId, (ClientId, OrderKey)>,
    pub(super) next_delivery_seq: u64,
    /// Clients whose queue may be able to dispatch.
    pub(super) dirty: BTreeSet<ClientId>,

    // --- Persistence protocol.
    /// The lsn the current batch will carry.
    pub(super) next_lsn: u64,
    pub(super) durable: Lsn,
    /// No callback goes out before this lsn is durable (the `Epoch` of a recovered broker).
    pub(super) dispatch_after: Lsn,
    /// Framed records produced by the current `handle`/`handle_timeout` call.
    pub(super) batch: Vec<u8>,
    pub(super) batch_records: u64,
    pub(super) scratch: Vec<u8>,
    /// Replies waiting for their lsn to be durable. Bounded by `publishes_unsynced_max`.
    pub(super) waiting: BTreeMap<Lsn, Vec<(RequestId, Reply)>>,
    pub(super) waiting_count: usize,
    /// Published messages whose record is not durable yet, with their entitled subscribers.
    pub(super) unsynced: VecDeque<(Lsn, MsgId, Vec<ClientId>)>,
    pub(super) log_records: u64,
    pub(super) log_bytes: u64,

    pub(super) outputs: VecDeque<BrokerOutput>,
}

#[derive(Clone)]
pub(super) struct Subscription {
    pub(super) url: String,
    pub(super) expire_time: Time,
    /// Unsubscribed: no new entitlements; kept while `refs > 0`.
    pub(super) retired: bool,
    /// Queued entries and dead letters of this client on this topic.
    pub(super) refs: usize,
}

impl Subscription {
    /// Gets new messages published at `now`: until `grace` after its expiry
    /// (queued while expired, delivered once it renews).
    pub(super) fn entitles(&self, now: Time, grace: std::time::Duration) -> bool {
        !self.retired && now < self.expire_time.plus(grace)
    }
    /// Gets callbacks for queued messages at `now` (paused once expired).
    pub(super) fn deliverable(&self, now: Time) -> bool {
        now < self.expire_time
    }
}

#[derive(Clone)]
pub(super) struct StoredMessage {
    pub(super) message: Message,
    /// Subscribers still holding it (queued or dead-lettered). Settled at 0.
    pub(super) holders: usize,
    /// The write that stores it (`Lsn(0)` when recovered: already durable).
    pub(super) lsn: Lsn,
}

#[derive(Clone, Default)]
pub(super) struct ClientQueue {
    /// Messages not yet delivered (nor dead-lettered) to this client.
    /// Bounded by `pending_per_subscriber_max`.
    pub(super) entries: BTreeMap<OrderKey, Entry>,
    /// The entries in phase `Ready`, per topic (so a paused topic costs nothing to skip).
    pub(super) ready: BTreeMap<Topic, BTreeSet<OrderKey>>,
    pub(super) in_flight: usize,
    /// Bounded by `dead_letters_per_subscriber_max` (checked at publish and redrive).
    pub(super) dead: BTreeSet<OrderKey>,
    /// Subscription entries (live or retired) of this client.
    pub(super) subscriptions: usize,
}

#[derive(Clone)]
pub(super) struct Entry {
    pub(super) phase: Phase,
    /// Attempts made since it was queued (or redriven, or the broker restarted).
    pub(super) attempts: u32,
    /// Every attempt's id (at most `attempts_max`).
    pub(super) deliveries: Vec<DeliveryId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Its `Published` record is not durable yet: not deliverable.
    Unsynced,
    Ready,
    InFlight {
        delivery: DeliveryId,
        deadline: Time,
    },
    Backoff {
        until: Time,
    },
}

/// What recovery found in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: u64,
    /// The driver truncates the log to this length before appending.
    pub valid_len: u64,
    pub torn_bytes: u64,
}

/// A recovery in progress (see [`Broker::recovery`]): records are applied as
/// their frames arrive.
#[derive(Clone)]
pub struct Recovery {
    broker: Broker,
    frames: FrameStream,
    ids: IdCache,
}

impl Recovery {
    /// The next bytes of the log.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), LogError> {
        let broker = &mut self.broker;
        let ids = &mut self.ids;
        self.frames.feed(chunk, |offset, payload| {
            let record = BrokerRecord::decode_for_replay(payload, ids)
                .map_err(|reason| LogError::BadRecord { offset, reason })?;
            match record {
                ReplayRecord::Full(record) => broker.apply(record, Origin::Replay),
                ReplayRecord::SettledAtOnce { msg_id, key } => broker.replay_settled_at_once(msg_id, key),
            }
            .map_err(|reason| LogError::BadRecord { offset, reason })
        })
    }

    /// How many bytes of the log were fed so far.
    pub fn fed(&self) -> u64 {
        self.frames.fed()
    }

    /// Lets this recovery go on with a longer log of `log_len` bytes that
    /// begins with the bytes fed so far (the caller's to check), so that a
    /// log recovered again and again as it grows (the simulator's probes)
    /// is replayed once: see [`FrameStream::resume`]. False, and nothing
    /// changed, when that is not possible.
    pub fn resume(&mut self, log_len: u64) -> bool {
        self.frames.resume(log_len)
    }

    /// The recovered broker, once every byte was fed.
    pub fn finish(self) -> Result<(Broker, RecoveryReport), LogError> {
        let Recovery { mut broker, frames, .. } = self;
        let found = frames.finish();
        // A duplicate key cannot be pinned to one record: name the log's start.
        broker
            .dedup
            .end_bulk(&broker.messages)
            .map_err(|reason| LogError::BadRecord { offset: 0, reason })?;
        let report = RecoveryReport {
            records: found.records,
            valid_len: found.valid_len,
            torn_bytes: found.torn_bytes,
        };
        broker.log_records = report.records;
        broker.log_bytes = report.valid_len;
        broker.incarnation += 1;
        let epoch = BrokerRecord::Epoch {
            incarnation: broker.incarnation,
            next_msg_id: MsgId(broker.next_msg_id),
        };
        broker.persist(epoch);
        broker.dispatch_after = Lsn(broker.next_lsn);
        broker.dirty = broker.clients.keys().cloned().collect();
        broker.flush();
        Ok((broker, report))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Queued and not in flight (waiting, backing off, or not yet durable).
    pub pending: usize,
    pub in_flight: usize,
    pub dead_letters: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub messages_live: usize,
    /// Subscription entries, including unsubscribed ones still referenced by queued messages.
    pub subscriptions: usize,
    /// Records in the log (since the last compaction, which counts its snapshot).
    pub log_records: u64,
    pub log_bytes: u64,
    /// Dedup keys of settled messages remembered.
    pub dedup_settled: usize,
    pub subscribers: BTreeMap<ClientId, SubscriberStats>,
}

impl Broker {
    /// A fresh broker with an empty log. `seed` drives retry jitter.
    pub fn new(config: BrokerConfig, seed: u64) -> Broker {
        Broker {
            config,
            rng: Rng::new(seed),
            subs: BTreeMap::new(),
            subs_count: 0,
            subs_retired: 0,
            clients: BTreeMap::new(),
            messages: BTreeMap::new(),
            dedup: Dedup::default(),
            dead_total: 0,
            next_msg_id: 1,
            incarnation: 0,
            timers: BTreeSet::new(),
            deliveries: BTreeMap::new(),
            next_delivery_seq: 1,
            dirty: BTreeSet::new(),
            next_lsn: 1,
            durable: Lsn(0),
            dispatch_after: Lsn(0),
            batch: Vec::new(),
            batch_records: 0,
            scratch: Vec::new(),
            waiting: BTreeMap::new(),
            waiting_count: 0,
            unsynced: VecDeque::new(),
            log_records: 0,
            log_bytes: 0,
            outputs: VecDeque::new(),
        }
    }

    /// Rebuilds the whole state from a log image (the durable records alone).
    ///
    /// A torn tail is reported in [`RecoveryReport`] (the driver truncates the
    /// log to `valid_len` before appending); damage followed by more data, or
    /// a record that does not decode or contradicts the state before it, is
    /// refused with the offset. The recovered broker first persists an `Epoch`
    /// record (its first output) and sends no callback until that is durable.
    pub fn recover(config: BrokerConfig, seed: u64, image: &[u8]) -> Result<(Broker, RecoveryReport), LogError> {
        let mut recovery = Broker::recovery(config, seed, image.len() as u64);
        recovery.feed(image)?;
        recovery.finish()
    }

    /// [`Broker::recover`] for a log fed in chunks (a driver reading a large
    /// file need not hold its image): feed every byte, then `finish`.
    pub fn recovery(config: BrokerConfig, seed: u64, log_len: u64) -> Recovery {
        let mut broker = Broker::new(config, seed);
        broker.dedup.begin_bulk();
        Recovery {
            broker,
            frames: FrameStream::new(log_len),
            ids: IdCache::default(),
        }
    }

    pub fn stats(&self) -> BrokerStats {
        BrokerStats {
            messages_live: self.messages.len(),
            subscriptions: self.subs_count,
            log_records: self.log_records,
            log_bytes: self.log_bytes,
            dedup_settled: self.dedup.settled_len(),
            subscribers: self
                .clients
                .iter()
                .map(|(client, q)| {
                    let stats = SubscriberStats {
                        pending: q.entries.len() - q.in_flight,
                        in_flight: q.in_flight,
                        dead_letters: q.dead.len(),
                    };
                    (client.clone(), stats)
                })
                .collect(),
        }
    }

    /// The dead letters of `client`, in `(CreateTime, MsgId)` order.
    pub fn dead_letters(&self, client: &ClientId) -> Vec<Message> {
        let Some(q) = self.clients.get(client) else {
            return Vec::new();
        };
        q.dead.iter().map(|(_, id)| self.messages[id].message.clone()).collect()
    }

    // ----- Requests -----

    fn handle_publish(&mut self, now: Time, req: RequestId, publish: PublishRequest) {
        if publish.content.len() > CONTENT_LEN_MAX {
            let len = publish.content.len();
            return self.reject(req, BrokerError::ContentTooLong { len });
        }
        // Dedup first: a retried publish is answered even when the broker is full.
        let original = self.dedup.find(&publish.global_id, &publish.sub_id, &self.messages);
        if let Some((msg_id, lsn)) = original {
            let reply = Reply::Published {
                msg_id,
                duplicate: true,
            };
            if lsn <= self.durable {
                self.reply(req, reply);
            } else if self.waiting_count >= self.config.publishes_unsynced_max {
                self.reject(req, BrokerError::TooManyUnsyncedPublishes);
            } else {
                self.wait(lsn, req, reply);
            }
            return;
        }
        if self.waiting_count >= self.config.publishes_unsynced_max {
            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);
        }
        if self.messages.len() >= self.config.messages_max {
            return self.reject(req, BrokerError::TooManyMessages);
        }
        let entitled: Vec<ClientId> = match self.subs.get(&publish.topic) {
            Some(subs) => subs
                .iter()
                .filter(|(_, s)| s.entitles(now, self.config.subscription_grace))
                .map(|(c, _)| c.clone())
                .collect(),
            None => Vec::new(),
        };
        for client in &entitled {
            let q = &self.clients[client];
            if q.entries.len() >= self.config.pending_per_subscriber_max {
                let client = client.clone();
                return self.reject(req, BrokerError::QueueFull { client });
            }
            // Every queued entry may still become a dead letter: admitting only
            // while queued + dead is below the bound keeps the dead list bounded.
            if q.entries.len() + q.dead.len() >= self.config.dead_letters_per_subscriber_max {
                let client = client.clone();
                return self.reject(req, BrokerError::DeadLettersFull { client });
            }
        }
        let msg_id = MsgId(self.next_msg_id);
        let message = Message::from_publish(msg_id, publish);
        let lsn = self.batch_lsn();
        if !entitled.is_empty() {
            self.unsynced.push_back((lsn, msg_id, entitled.clone()));
        }
        self.record(BrokerRecord::Published { message, entitled });
        self.wait(
            lsn,
            req,
            Reply::Published {
                msg_id,
                duplicate: false,
            },
        );
    }

    fn handle_subscribe(&mut self, now: Time, req: RequestId, s: SubscribeRequest) {
        if s.notify_url.is_empty() || s.notify_url.len() > URL_LEN_MAX {
            return self.reject(req, BrokerError::InvalidUrl);
        }
        if s.expire_time <= now {
            return self.reject(req, BrokerError::AlreadyExpired);
        }
        if self.waiting_count >= self.config.publishes_unsynced_max {
            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);
        }
        let exists = self.subs.get(&s.topic).is_some_and(|m| m.contains_key(&s.client_id));
        if !exists && self.subs_count >= self.config.subscriptions_max {
            self.purge_expired_subscriptions(now);
            if self.subs_count >= self.config.subscriptions_max {
                return self.reject(req, BrokerError::TooManySubscriptions);
            }
        }
        // A renewal never shortens a live subscription: a delayed or duplicated
        // older request that arrives after a newer one must not cut it short
        // (found by the simulator: a late duplicate renewal paused delivery
        // and the next publish entitled nobody).
        let current = self
            .subs
            .get(&s.topic)
            .and_then(|m| m.get(&s.client_id))
            .filter(|sub| !sub.retired)
            .map(|sub| sub.expire_time);
        let expire_time = current.map_or(s.expire_time, |c| c.max(s.expire_time));
        let lsn = self.batch_lsn();
        self.record(BrokerRecord::Subscribed {
            client: s.client_id,
            topic: s.topic,
            url: s.notify_url,
            expire_time,
        });
        self.wait(lsn, req, Reply::Subscribed { expire_time });
    }

    /// Drops expired subscriptions that no message references (with a record
    /// each, so recovery agrees), to make room when `subscriptions_max` is reached.
    fn purge_expired_subscriptions(&mut self, now: Time) {
        let expired: Vec<(ClientId, Topic)> = self
            .subs
            .iter()
            .flat_map(|(topic, m)| {
                m.iter()
                    .filter(|(_, s)| !s.retired && s.refs == 0 && !s.entitles(now, self.config.subscription_grace))
                    .map(|(client, _)| (client.clone(), topic.clone()))
            })
            .collect();
        for (client, topic) in expired {
            self.record(BrokerRecord::Unsubscribed { client, topic });
        }
    }

    fn handle_unsubscribe(&mut self, req: RequestId, client: ClientId, topic: Topic) {
        let live = self
            .subs
            .get(&topic)
            .and_then(|m| m.get(&client))
            .is_some_and(|s| !s.retired);
        if !live {
            return self.reject(req, BrokerError::NotSubscribed);
        }
        if self.waiting_count >= self.config.publishes_unsynced_max {
            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);
        }
        let lsn = self.batch_lsn();
        self.record(BrokerRecord::Unsubscribed { client, topic });
        self.wait(lsn, req, Reply::Unsubscribed);
    }

    fn handle_redrive(&mut self, req: RequestId, client: ClientId) {
        let (queued, dead) = match self.clients.get(&client) {
            Some(q) => (q.entries.len(), q.dead.len()),
            None => (0, 0),
        };
        if dead == 0 {
            return self.reply(req, Reply::Redriven { count: 0 });
        }
        // Move what the queue has room for, oldest first: refusing the whole
        // redrive whenever there are more dead letters than the queue bound
        // would leave them stuck forever (found by the simulator's small bounds).
        let room = self.config.pending_per_subscriber_max.saturating_sub(queued);
        if room == 0 {
            return self.reject(req, BrokerError::QueueFull { client });
        }
        if self.waiting_count >= self.config.publishes_unsynced_max {
            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);
        }
        let lsn = self.batch_lsn();
        let count = dead.min(room);
        if count == dead {
            self.record(BrokerRecord::Redriven { client });
        } else {
            let n = u32::try_from(count).expect("bounded by the queue bound");
            self.record(BrokerRecord::RedrivenOldest { client, count: n });
        }
        self.wait(lsn, req, Reply::Redriven { count });
    }

    fn handle_durable(&mut self, lsn: Lsn) {
        // Never believe more than was asked for (a stale report from an earlier run).
        let lsn = lsn.min(Lsn(self.next_lsn - 1));
        if lsn <= self.durable {
            return;
        }
        self.durable = lsn;
        let later = self.waiting.split_off(&Lsn(lsn.0 + 1));
        let done = std::mem::replace(&mut self.waiting, later);
        for (_, replies) in done {
            self.waiting_count -= replies.len();
            for (req, reply) in replies {
                self.outputs.push_back(BrokerOutput::Reply { req, reply });
            }
        }
        while self.unsynced.front().is_some_and(|(l, _, _)| *l <= lsn) {
            let (_, msg_id, entitled) = self.unsynced.pop_front().expect("checked non-empty");
            self.mark_durable(msg_id, &entitled);
        }
    }

    // ----- Persistence protocol -----

    /// The lsn of the batch being built by the current call.
    pub(super) fn batch_lsn(&self) -> Lsn {
        Lsn(self.next_lsn)
    }

    /// Applies a new record to the state and adds it to the current batch.
    pub(super) fn record(&mut self, record: BrokerRecord) {
        self.persist_ref(&record);
        self.apply(record, Origin::Live)
            .unwrap_or_else(|e| panic!("the broker produced a record it cannot apply: {e}"));
    }

    /// Adds a record to the batch without applying it (it describes state already there).
    fn persist(&mut self, record: BrokerRecord) {
        self.persist_ref(&record);
    }

    fn persist_ref(&mut self, record: &BrokerRecord) {
        record.encode_framed(&mut self.scratch, &mut self.batch);
        self.batch_records += 1;
    }

    fn wait(&mut self, lsn: Lsn, req: RequestId, reply: Reply) {
        self.waiting.entry(lsn).or_default().push((req, reply));
        self.waiting_count += 1;
    }

    fn reply(&mut self, req: RequestId, reply: Reply) {
        self.outputs.push_back(BrokerOutput::Reply { req, reply });
    }

    fn reject(&mut self, req: RequestId, error: BrokerError) {
        self.reply(req, Reply::Rejected(error));
    }

    /// Records that a snapshot would hold now.
    pub(super) fn live_records(&self) -> u64 {
        let settled_chunks = self.dedup.settled_len().div_ceil(super::compact::SETTLED_PER_RECORD);
        (1 + settled_chunks + self.subs_count + self.subs_retired + self.messages.len() + self.dead_total) as u64
    }

    /// Ends a call: emits the batch as one `Persist` (so the driver can
    /// group-commit), or as a compacting `Rewrite` when the log holds enough
    /// garbage, then dispatches what can go.
    fn finish(&mut self, now: Time) {
        // Records first: a trace then reads cause (persist) before effect (callback).
        self.flush();
        self.pump(now);
    }

    fn flush(&mut self) {
        if self.batch_records == 0 {
            return;
        }
        let lsn = Lsn(self.next_lsn);
        self.next_lsn += 1;
        self.log_records += self.batch_records;
        if self.log_bytes == 0 {
            // The disk opens a new log with its file header.
            self.log_bytes = crate::log::FILE_HEADER_LEN as u64;
        }
        self.log_bytes += self.batch.len() as u64;
        self.batch_records = 0;
        let frames = std::mem::take(&mut self.batch);
        let live = self.live_records();
        // Compacting only once the garbage also exceeds the live state keeps the
        // snapshot cost amortised (O(1) per record) however large the state is.
        let garbage = self.log_records.saturating_sub(live);
        if garbage > self.config.compact_garbage_records_min.max(live) {
            // The snapshot already holds this batch's effects.
            let replaced = self.log_records;
            let (frames, records) = self.snapshot();
            self.log_records = records;
            self.log_bytes = (crate::log::FILE_HEADER_LEN + frames.len()) as u64;
            self.outputs.push_back(BrokerOutput::Rewrite { lsn, frames, replaced });
        } else {
            self.outputs.push_back(BrokerOutput::Persist { lsn, frames });
        }
    }
}

/// Where a record being applied comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// Made just now; not durable until its batch is.
    Live,
    /// Read back from a durable log.
    Replay,
}

impl Machine for Broker {
    type Input = BrokerInput;
    type Output = BrokerOutput;

    fn handle(&mut self, now: Time, input: BrokerInput) {
        match input {
            BrokerInput::Publish { req, publish } => self.handle_publish(now, req, publish),
            BrokerInput::Subscribe { req, subscribe } => self.handle_subscribe(now, req, subscribe),
            BrokerInput::Unsubscribe { req, client, topic } => self.handle_unsubscribe(req, client, topic),
            BrokerInput::CallbackResult { delivery, result } => self.handle_callback_result(now, delivery, result),
            BrokerInput::Durable { lsn } => self.handle_durable(lsn),
            BrokerInput::Redrive { req, client } => self.handle_redrive(req, client),
        }
        self.finish(now);
    }

    fn handle_timeout(&mut self, now: Time) {
        self.fire_timers(now);
        self.finish(now);
    }

    fn poll_output(&mut self) -> Option<BrokerOutput> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        self.timers.first().map(|(t, _, _)| *t)
    }
}

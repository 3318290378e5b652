//! The generic host around a [`Participant`]: the inbox, the outbox, the
//! participant's records and their durability, subscriptions, publish retries
//! and deadlines. It is the [`crate::Machine`] a driver runs.
//!
//! **Invariants:** each effect is one record `{inbox key, change, outbox
//! entries}`; nothing an effect publishes leaves before that record is
//! durable, and its callback (or command) is answered only then; a message
//! whose key is in the inbox is answered without a second effect; recovery
//! rebuilds the state from the records alone and re-publishes every outbox
//! entry the broker has not acknowledged. Every map and queue has a named bound
//! in [`HostConfig`] with a defined answer when reached.

use super::participant::{Decision, Outgoing, Participant};
use super::{CallbackToken, Command, CommandOutcome, OutboxId, ParticipantInput, ParticipantOutput};
use crate::broker::Lsn;
use crate::log::{FRAME_HEADER_LEN, FrameStream, LogError, decode_all, decode_frames, seal_frame};
use crate::machine::Machine;
use crate::rng::Rng;
use crate::types::{ClientId, Message, MessageKey, PublishRequest, SenderId, SubscribeRequest, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Identity, bounds and timing of a hosted participant (most significant word first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Subscriber id at the broker; also the `SenderID` of every publish.
    pub client_id: ClientId,
    /// Where the broker sends callbacks (an HTTP URL in the real runtime; any
    /// non-empty string the driver understands in the simulator).
    pub notify_url: String,
    /// Seeds the publish retry jitter.
    pub seed: u64,
    /// A subscription asks for `ExpireTime = now + subscription_ttl` and is
    /// renewed at half of it, so clock skew up to half the TTL between this
    /// participant and the broker never lets it lapse.
    pub subscription_ttl: Duration,
    /// A subscribe the broker has not confirmed is sent again after this.
    pub subscribe_retry: Duration,
    /// Unacknowledged publishes are sent again after this, doubling per attempt
    /// up to `publish_retry_max`, plus seeded jitter.
    pub publish_retry_initial: Duration,
    pub publish_retry_max: Duration,
    /// Consumed `(GlobalID, SubID)` keys remembered. Past it the oldest key is
    /// forgotten: a redelivery that old is decided again, so participants keep
    /// business-level idempotency (the shipped ones key their state by order).
    pub inbox_keys_max: usize,
    /// Outbox entries not yet acknowledged by the broker. When reached, new
    /// deliveries are answered not-ok (the broker retries) and commands refused.
    pub outbox_entries_max: usize,
    /// Records written but not yet durable. When reached, same answer as above.
    pub records_unsynced_max: u64,
    /// Callbacks and commands waiting for their record to become durable.
    /// When reached, same answer as above.
    pub answers_waiting_max: usize,
    /// Deadline effects handled per `handle_timeout` call (the rest next call).
    pub deadline_effects_per_tick_max: usize,
}

impl HostConfig {
    pub fn new(client_id: ClientId, notify_url: impl Into<String>) -> HostConfig {
        HostConfig {
            client_id,
            notify_url: notify_url.into(),
            seed: 0,
            subscription_ttl: Duration::from_secs(60),
            subscribe_retry: Duration::from_secs(1),
            publish_retry_initial: Duration::from_millis(200),
            publish_retry_max: Duration::from_secs(10),
            inbox_keys_max: 100_000,
            outbox_entries_max: 10_000,
            records_unsynced_max: 10_000,
            answers_waiting_max: 10_000,
            deadline_effects_per_tick_max: 1_000,
        }
    }

    fn validate(&self) {
        assert!(!self.notify_url.is_empty(), "HostConfig::notify_url must not be empty");
        assert!(
            !self.publish_retry_initial.is_zero() && self.publish_retry_initial <= self.publish_retry_max,
            "HostConfig: need 0 < publish_retry_initial <= publish_retry_max"
        );
        assert!(
            !self.subscribe_retry.is_zero() && self.subscription_ttl >= Duration::from_millis(2),
            "HostConfig: subscribe_retry and subscription_ttl must be positive"
        );
        assert!(
            self.inbox_keys_max > 0
                && self.outbox_entries_max > 0
                && self.records_unsynced_max > 0
                && self.answers_waiting_max > 0
                && self.deadline_effects_per_tick_max > 0,
            "HostConfig: every bound must be positive"
        );
    }
}

/// One record of a participant's log (JSON inside a [`crate::log`] frame).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HostRecord<C> {
    /// One effect: the consumed key (none for commands and deadlines), the
    /// state change and the messages to publish, committed together.
    Effect {
        inbox: Option<MessageKey>,
        change: Option<C>,
        outbox: Vec<OutboxEntryRecord>,
    },
    /// The broker acknowledged this outbox entry; recovery need not re-publish it.
    Acked { outbox: OutboxId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntryRecord {
    pub id: OutboxId,
    pub publish: PublishRequest,
}

/// What recovery found in a participant's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: u64,
    /// The driver truncates the log to this length before appending.
    pub valid_len: u64,
    pub torn_bytes: u64,
    /// Outbox entries to re-publish.
    pub outbox_unacked: usize,
}

/// Counters for reports and tests (not part of any decision).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Records of type `Effect` written.
    pub effects: u64,
    /// Deliveries recognised from the inbox.
    pub redeliveries: u64,
    /// Deliveries and commands consumed without effect.
    pub ignored: u64,
    /// Deliveries answered not-ok and commands refused.
    pub refused: u64,
    /// `Publish` outputs, first attempts and retries.
    pub publishes: u64,
    pub publish_retries: u64,
    pub publish_failures: u64,
    pub acks: u64,
}

/// What a host holds right now, beside its counters ([`HostStats`]): the
/// levels its bounds (`answers_waiting_max`, `records_unsynced_max`,
/// `outbox_entries_max`) judge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostGauges {
    /// Callbacks and commands waiting for their record to become durable.
    pub answers_waiting: usize,
    /// Records written, not yet reported durable.
    pub records_unsynced: u64,
    /// Outbox entries not yet acknowledged by the broker.
    pub outbox_entries: usize,
}

#[derive(Clone, Debug)]
struct OutboxEntry {
    publish: PublishRequest,
    /// Publish attempts so far (0: waiting for its record to become durable).
    attempts: u32,
    retry_at: Option<Time>,
}

#[derive(Clone, Debug)]
enum Waiter {
    Answer(CallbackToken),
    Command(Command),
}

#[derive(Clone, Debug)]
struct SubscriptionState {
    next_at: Time,
    sent_at: Option<Time>,
    confirmed: bool,
}

/// A participant's log replayed up to some record, before recovery's last
/// step (every outbox entry scheduled for re-publishing):
/// [`ParticipantHost::recover`] is one [`Replay::feed`] of the whole image,
/// then [`Replay::finish`]. A caller that recovers the same growing log again
/// and again (the simulator's disk probes) keeps a clone and feeds it a later
/// image that begins with the same [`Replay::end`] bytes: only the records
/// after them are parsed and replayed.
#[derive(Clone, Debug)]
pub struct Replay<P: Participant> {
    host: ParticipantHost<P>,
    records: u64,
    /// Offset just past the last record replayed (0: none yet).
    end: u64,
    valid_len: u64,
    torn_bytes: u64,
    /// The frames judged so far, kept to resume on a longer image (None:
    /// judge the next image from its start).
    frames: Option<FrameStream>,
}

impl<P: Participant> Replay<P> {
    /// Nothing replayed: `logic` is the participant as configured.
    pub fn new(logic: P, config: HostConfig) -> Self {
        Replay {
            host: ParticipantHost::new(logic, config),
            records: 0,
            end: 0,
            valid_len: 0,
            torn_bytes: 0,
            frames: None,
        }
    }

    /// How many bytes of the log the records replayed so far came from.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Replays the records of `image` that start at or after [`Replay::end`];
    /// `image` must begin with the bytes fed before (the caller's to check).
    /// Damage is judged on the whole image, as by [`ParticipantHost::recover`].
    /// After an error the replay is part-way: drop it.
    pub fn feed(&mut self, image: &[u8]) -> Result<(), LogError> {
        // The frames before `end` were judged already (and `image` begins
        // with them): a stream that stopped there, at a frame boundary with
        // no damage, resumes (`FrameStream::resume`, the same verdict as
        // `decode_all` of the whole image); otherwise the image is judged
        // from its start. Damage is judged before any record is parsed.
        let len = image.len() as u64;
        let end = self.end;
        let mut stream = self
            .frames
            .take()
            .filter(|f| end > 0 && f.fed() == end)
            .and_then(|mut f| f.resume(len).then_some(f))
            .unwrap_or_else(|| FrameStream::new(len));
        let from = usize::try_from(stream.fed()).expect("a log in memory");
        let mut found = Vec::new();
        stream.feed(&image[from..], |offset, payload| {
            found.push((offset, payload.len()));
            Ok(())
        })?;
        let summary = stream.finish();
        self.frames = Some(stream);
        let replayed = self.end;
        let records = found.into_iter().map(|(offset, len)| {
            let at = offset as usize + FRAME_HEADER_LEN;
            (offset, &image[at..at + len])
        });
        for (offset, payload) in records.filter(|(offset, _)| *offset >= replayed) {
            // UTF-8 checked once for the whole record, not string by string;
            // a record that is not UTF-8 gets serde's own error, as before.
            let parsed = match std::str::from_utf8(payload) {
                Ok(text) => serde_json::from_str::<HostRecord<P::Change>>(text),
                Err(_) => serde_json::from_slice(payload),
            };
            let record = parsed.map_err(|e| LogError::BadRecord {
                offset,
                reason: e.to_string(),
            })?;
            self.records += 1;
            self.host.replay(Lsn(self.records), record);
            self.end = offset + (FRAME_HEADER_LEN + payload.len()) as u64;
        }
        self.valid_len = summary.valid_len;
        self.torn_bytes = summary.torn_bytes;
        Ok(())
    }

    /// The recovered participant: everything replayed is durable and possibly
    /// unacknowledged, so it publishes every outbox entry again on its first
    /// timeout (the broker dedups by `(GlobalID, SubID)`).
    pub fn finish(self) -> (ParticipantHost<P>, RecoveryReport) {
        let Replay {
            mut host,
            records,
            valid_len,
            torn_bytes,
            ..
        } = self;
        host.lsn_last = Lsn(records);
        host.lsn_effect_last = Lsn(records);
        host.lsn_durable = Lsn(records);
        for (id, entry) in host.outbox.iter_mut() {
            entry.retry_at = Some(Time::ZERO);
            host.retries.insert((Time::ZERO, *id));
        }
        let report = RecoveryReport {
            records,
            valid_len,
            torn_bytes,
            outbox_unacked: host.outbox.len(),
        };
        (host, report)
    }
}

/// A [`Participant`] made into a [`crate::Machine`] with inbox, outbox and durable records.
#[derive(Clone, Debug)]
pub struct ParticipantHost<P: Participant> {
    config: HostConfig,
    sender: SenderId,
    /// The participant as configured, before any record: recovery starts here.
    genesis: P,
    logic: P,
    inbox: BTreeMap<MessageKey, Lsn>,
    /// Inbox keys in the order they were recorded, for eviction at `inbox_keys_max`.
    inbox_order: VecDeque<MessageKey>,
    outbox: BTreeMap<OutboxId, OutboxEntry>,
    /// Outbox entries whose record is not yet durable, in record order.
    outbox_unreleased: VecDeque<(Lsn, OutboxId)>,
    retries: BTreeSet<(Time, OutboxId)>,
    outbox_id_next: u64,
    lsn_last: Lsn,
    /// The last `Effect` record: what decisions are judged against (acks are not).
    lsn_effect_last: Lsn,
    lsn_durable: Lsn,
    waiting: BTreeMap<Lsn, Vec<Waiter>>,
    waiting_len: usize,
    subscriptions: BTreeMap<Topic, SubscriptionState>,
    deadline_blocked_until: Time,
    rng: Rng,
    out: VecDeque<ParticipantOutput>,
    stats: HostStats,
}

impl<P: Participant> ParticipantHost<P> {
    /// A participant with an empty log. It subscribes on its first `handle_timeout`
    /// (its `poll_timeout` is `Time::ZERO` until then).
    pub fn new(logic: P, config: HostConfig) -> Self {
        config.validate();
        let sender = SenderId::new(config.client_id.as_str()).expect("a ClientId is a valid SenderId");
        let subscriptions = logic
            .topics()
            .into_iter()
            .map(|t| {
                let s = SubscriptionState {
                    next_at: Time::ZERO,
                    sent_at: None,
                    confirmed: false,
                };
                (t, s)
            })
            .collect();
        ParticipantHost {
            rng: Rng::new(config.seed),
            config,
            sender,
            genesis: logic.clone(),
            logic,
            inbox: BTreeMap::new(),
            inbox_order: VecDeque::new(),
            outbox: BTreeMap::new(),
            outbox_unreleased: VecDeque::new(),
            retries: BTreeSet::new(),
            outbox_id_next: 0,
            lsn_last: Lsn(0),
            lsn_effect_last: Lsn(0),
            lsn_durable: Lsn(0),
            waiting: BTreeMap::new(),
            waiting_len: 0,
            subscriptions,
            deadline_blocked_until: Time::ZERO,
            out: VecDeque::new(),
            stats: HostStats::default(),
        }
    }

    /// Rebuilds a participant from its log image alone: `logic` is the
    /// participant as configured (initial amounts), the records replay every
    /// committed change. A torn tail is dropped (truncate the log to
    /// `valid_len`); corruption followed by more data is refused.
    pub fn recover(logic: P, config: HostConfig, image: &[u8]) -> Result<(Self, RecoveryReport), LogError> {
        let mut replay = Replay::new(logic, config);
        replay.feed(image)?;
        Ok(replay.finish())
    }

    fn replay(&mut self, lsn: Lsn, record: HostRecord<P::Change>) {
        match record {
            HostRecord::Effect { inbox, change, outbox } => {
                if let Some(change) = &change {
                    self.logic.apply(change);
                }
                if let Some(key) = inbox {
                    self.remember(key, lsn);
                }
                for e in outbox {
                    self.outbox_id_next = self.outbox_id_next.max(e.id.0 + 1);
                    let entry = OutboxEntry {
                        publish: e.publish,
                        attempts: 0,
                        retry_at: None,
                    };
                    self.outbox.insert(e.id, entry);
                }
            }
            HostRecord::Acked { outbox } => {
                self.outbox.remove(&outbox);
            }
        }
    }

    /// The participant's current state (read-only, for checkers and tests).
    pub fn logic(&self) -> &P {
        &self.logic
    }

    /// The participant as configured, before any effect (initial amounts).
    pub fn initial(&self) -> &P {
        &self.genesis
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    pub fn stats(&self) -> &HostStats {
        &self.stats
    }

    pub fn gauges(&self) -> HostGauges {
        HostGauges {
            answers_waiting: self.waiting_len,
            records_unsynced: self.lsn_last.0 - self.lsn_durable.0,
            outbox_entries: self.outbox.len(),
        }
    }

    /// Outbox entries the broker has not acknowledged, in outbox order.
    pub fn unacked(&self) -> impl Iterator<Item = (OutboxId, &PublishRequest)> {
        self.outbox.iter().map(|(id, e)| (*id, &e.publish))
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether a message with this key was consumed with a recorded effect.
    pub fn consumed(&self, key: &MessageKey) -> bool {
        self.inbox.contains_key(key)
    }

    /// Whether every subscription is confirmed by the broker.
    pub fn subscribed(&self) -> bool {
        self.subscriptions.values().all(|s| s.confirmed)
    }

    /// The last record written and the last one known durable.
    pub fn lsns(&self) -> (Lsn, Lsn) {
        (self.lsn_last, self.lsn_durable)
    }

    /// Readable lines for the records in `frames` (a `Persist` output, or a
    /// whole log image: it starts with the file header), for traces and
    /// debugging.
    pub fn describe_frames(frames: &[u8]) -> Vec<String> {
        let decoded = if frames.starts_with(crate::log::FILE_MAGIC) {
            decode_all(frames)
        } else {
            decode_frames(frames)
        };
        let recovered = match decoded {
            Ok(r) => r,
            Err(e) => return vec![format!("undecodable frames: {e}")],
        };
        recovered
            .records
            .iter()
            .map(
                |(_, payload)| match serde_json::from_slice::<HostRecord<P::Change>>(payload) {
                    Ok(HostRecord::Effect { inbox, change, outbox }) => {
                        let mut line = String::from("effect");
                        if let Some(k) = inbox {
                            line.push_str(&format!(" inbox={k}"));
                        }
                        if let Some(c) = change {
                            let json = serde_json::to_string(&c).unwrap_or_else(|e| format!("<{e}>"));
                            line.push_str(&format!(" change={json}"));
                        }
                        for e in outbox {
                            line.push_str(&format!(
                                " outbox#{}={} {}/{} {}",
                                e.id.0, e.publish.topic, e.publish.global_id, e.publish.sub_id, e.publish.content
                            ));
                        }
                        line
                    }
                    Ok(HostRecord::Acked { outbox }) => format!("acked outbox#{}", outbox.0),
                    Err(e) => format!("undecodable record: {e}"),
                },
            )
            .collect()
    }

    fn on_deliver(&mut self, now: Time, token: CallbackToken, message: Message) {
        let key = message.key();
        if let Some(&lsn) = self.inbox.get(&key) {
            // A redelivery: answer as the original will be answered, no second effect.
            self.stats.redeliveries += 1;
            self.answer_at(lsn, Waiter::Answer(token));
            return;
        }
        if self.busy().is_some() {
            self.stats.refused += 1;
            self.out.push_back(ParticipantOutput::Answer { token, ok: false });
            return;
        }
        match self.logic.on_message(now, &message) {
            Decision::Commit { change, publish } => {
                if self.outbox.len() + publish.len() > self.config.outbox_entries_max {
                    self.stats.refused += 1;
                    self.out.push_back(ParticipantOutput::Answer { token, ok: false });
                    return;
                }
                let lsn = self.commit(now, Some(key), change, publish);
                self.answer_at(lsn, Waiter::Answer(token));
            }
            Decision::Ignore => {
                self.stats.ignored += 1;
                self.answer_at(self.lsn_effect_last, Waiter::Answer(token));
            }
            Decision::Refuse(_) => {
                self.stats.refused += 1;
                self.out.push_back(ParticipantOutput::Answer { token, ok: false });
            }
        }
    }

    fn on_command(&mut self, now: Time, command: Command) {
        if let Some(why) = self.busy() {
            self.refuse_command(command, why);
            return;
        }
        // A saga started before every reply topic is subscribed could publish a
        // request whose answer goes to nobody (the broker delivers only to
        // subscriptions live at publish time): the simulator found exactly that.
        if !self.subscribed() {
            self.refuse_command(
                command,
                "subscriptions not yet confirmed by the broker; retry".to_string(),
            );
            return;
        }
        match self.logic.on_command(now, &command) {
            Decision::Commit { change, publish } => {
                if self.outbox.len() + publish.len() > self.config.outbox_entries_max {
                    self.refuse_command(command, "outbox_entries_max reached".to_string());
                    return;
                }
                let lsn = self.commit(now, None, change, publish);
                self.answer_at(lsn, Waiter::Command(command));
            }
            Decision::Ignore => {
                self.stats.ignored += 1;
                self.answer_at(self.lsn_effect_last, Waiter::Command(command));
            }
            Decision::Refuse(why) => self.refuse_command(command, why),
        }
    }

    fn refuse_command(&mut self, command: Command, why: String) {
        self.stats.refused += 1;
        self.out.push_back(ParticipantOutput::CommandDone {
            command,
            outcome: CommandOutcome::Refused(why),
        });
    }

    /// Why no new effect can be taken now (a bound is reached), if so.
    fn busy(&self) -> Option<String> {
        if self.lsn_last.0 - self.lsn_durable.0 >= self.config.records_unsynced_max {
            return Some("records_unsynced_max reached".to_string());
        }
        if self.waiting_len >= self.config.answers_waiting_max {
            return Some("answers_waiting_max reached".to_string());
        }
        if self.outbox.len() >= self.config.outbox_entries_max {
            return Some("outbox_entries_max reached".to_string());
        }
        None
    }

    /// Writes one effect record, then applies it to the live state.
    fn commit(
        &mut self,
        now: Time,
        inbox: Option<MessageKey>,
        change: Option<P::Change>,
        publish: Vec<Outgoing>,
    ) -> Lsn {
        let create_time = i64::try_from(now.as_nanos()).unwrap_or(i64::MAX);
        let entries: Vec<OutboxEntryRecord> = publish
            .into_iter()
            .map(|o| {
                let id = OutboxId(self.outbox_id_next);
                self.outbox_id_next += 1;
                let publish = PublishRequest {
                    global_id: o.global_id,
                    sub_id: o.sub_id,
                    sender_id: self.sender.clone(),
                    create_time,
                    topic: o.topic,
                    content: o.content,
                };
                OutboxEntryRecord { id, publish }
            })
            .collect();
        let record = HostRecord::Effect {
            inbox: inbox.clone(),
            change,
            outbox: entries,
        };
        let lsn = self.persist(&record);
        self.lsn_effect_last = lsn;
        let HostRecord::Effect { change, outbox, .. } = record else {
            unreachable!("built as an Effect above")
        };
        if let Some(change) = &change {
            self.logic.apply(change);
        }
        if let Some(key) = inbox {
            self.remember(key, lsn);
        }
        for e in outbox {
            let entry = OutboxEntry {
                publish: e.publish,
                attempts: 0,
                retry_at: None,
            };
            self.outbox.insert(e.id, entry);
            self.outbox_unreleased.push_back((lsn, e.id));
        }
        self.stats.effects += 1;
        lsn
    }

    fn persist(&mut self, record: &HostRecord<P::Change>) -> Lsn {
        // Serialized straight after the frame header's place, then sealed:
        // the bytes `encode_frame` makes, without a payload buffer and its copy.
        let mut frames = Vec::with_capacity(512);
        frames.resize(FRAME_HEADER_LEN, 0);
        serde_json::to_writer(&mut frames, record).expect("host records serialize");
        seal_frame(&mut frames, 0);
        self.lsn_last = Lsn(self.lsn_last.0 + 1);
        self.out.push_back(ParticipantOutput::Persist {
            lsn: self.lsn_last,
            frames,
        });
        self.lsn_last
    }

    fn remember(&mut self, key: MessageKey, lsn: Lsn) {
        if self.inbox.len() >= self.config.inbox_keys_max
            && let Some(oldest) = self.inbox_order.pop_front()
        {
            self.inbox.remove(&oldest);
        }
        self.inbox.insert(key.clone(), lsn);
        self.inbox_order.push_back(key);
    }

    /// Answers once record `lsn` is durable (now, if it already is).
    fn answer_at(&mut self, lsn: Lsn, waiter: Waiter) {
        if lsn <= self.lsn_durable {
            self.answer(waiter);
        } else if self.waiting_len >= self.config.answers_waiting_max {
            // Only a redelivery can get here (fresh work checks `busy` first);
            // not-ok makes the broker try again later.
            self.stats.refused += 1;
            match waiter {
                Waiter::Answer(token) => self.out.push_back(ParticipantOutput::Answer { token, ok: false }),
                Waiter::Command(command) => self.out.push_back(ParticipantOutput::CommandDone {
                    command,
                    outcome: CommandOutcome::Refused("answers_waiting_max reached".to_string()),
                }),
            }
        } else {
            self.waiting.entry(lsn).or_default().push(waiter);
            self.waiting_len += 1;
        }
    }

    fn answer(&mut self, waiter: Waiter) {
        self.out.push_back(match waiter {
            Waiter::Answer(token) => ParticipantOutput::Answer { token, ok: true },
            Waiter::Command(command) => ParticipantOutput::CommandDone {
                command,
                outcome: CommandOutcome::Committed,
            },
        });
    }

    fn on_durable(&mut self, now: Time, lsn: Lsn) {
        assert!(
            lsn <= self.lsn_last,
            "Durable {{ lsn: {} }} for a record never written (last is {})",
            lsn.0,
            self.lsn_last.0
        );
        if lsn <= self.lsn_durable {
            return;
        }
        self.lsn_durable = lsn;
        while let Some(&(record, id)) = self.outbox_unreleased.front() {
            if record > lsn {
                break;
            }
            self.outbox_unreleased.pop_front();
            if self.outbox.contains_key(&id) {
                self.send(now, id);
            }
        }
        let later = self.waiting.split_off(&Lsn(lsn.0 + 1));
        let ready = std::mem::replace(&mut self.waiting, later);
        for waiter in ready.into_values().flatten() {
            self.waiting_len -= 1;
            self.answer(waiter);
        }
    }

    /// Emits a publish attempt of outbox entry `id` and schedules the next one.
    fn send(&mut self, now: Time, id: OutboxId) {
        let backoff = {
            let entry = self.outbox.get(&id).expect("send of a live outbox entry");
            self.backoff(entry.attempts + 1)
        };
        let entry = self.outbox.get_mut(&id).expect("send of a live outbox entry");
        if let Some(at) = entry.retry_at.take() {
            self.retries.remove(&(at, id));
        }
        if entry.attempts > 0 {
            self.stats.publish_retries += 1;
        }
        entry.attempts = entry.attempts.saturating_add(1);
        let at = now.plus(backoff);
        entry.retry_at = Some(at);
        self.retries.insert((at, id));
        self.stats.publishes += 1;
        self.out.push_back(ParticipantOutput::Publish {
            outbox: id,
            publish: entry.publish.clone(),
        });
    }

    /// The wait after attempt `attempt` (1-based): doubling, capped, plus up to
    /// a quarter of jitter so that many participants do not retry in lockstep.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let initial = self.config.publish_retry_initial;
        let max = self.config.publish_retry_max;
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        let base = initial.saturating_mul(factor).min(max);
        let base_ns = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let jitter = self.rng.below(base_ns / 4 + 1);
        Duration::from_nanos(base_ns.saturating_add(jitter)).min(max)
    }

    fn on_acked(&mut self, id: OutboxId) {
        let Some(entry) = self.outbox.remove(&id) else {
            return; // a duplicate ack, or one for an entry acknowledged before a restart
        };
        if let Some(at) = entry.retry_at {
            self.retries.remove(&(at, id));
        }
        self.stats.acks += 1;
        self.persist(&HostRecord::Acked { outbox: id });
    }

    fn on_subscribed(&mut self, topic: Topic) {
        let half = self.config.subscription_ttl / 2;
        if let Some(s) = self.subscriptions.get_mut(&topic)
            && let Some(sent) = s.sent_at
        {
            s.confirmed = true;
            s.next_at = sent.plus(half);
        }
    }

    fn renew_subscriptions(&mut self, now: Time) {
        let ttl = self.config.subscription_ttl;
        let retry = self.config.subscribe_retry.min(ttl / 2);
        for (topic, s) in self.subscriptions.iter_mut() {
            if s.next_at > now {
                continue;
            }
            s.sent_at = Some(now);
            s.next_at = now.plus(retry);
            self.out.push_back(ParticipantOutput::Subscribe(SubscribeRequest {
                client_id: self.config.client_id.clone(),
                topic: topic.clone(),
                notify_url: self.config.notify_url.clone(),
                expire_time: now.plus(ttl),
            }));
        }
    }

    fn fire_deadlines(&mut self, now: Time) {
        if self.deadline_blocked_until > now {
            return;
        }
        for _ in 0..self.config.deadline_effects_per_tick_max {
            match self.logic.next_deadline() {
                Some(d) if d <= now => {}
                _ => return,
            }
            if self.busy().is_some() {
                self.deadline_blocked_until = now.plus(self.config.publish_retry_initial);
                return;
            }
            match self.logic.on_deadline(now) {
                Decision::Commit { change, publish } => {
                    if self.outbox.len() + publish.len() > self.config.outbox_entries_max {
                        self.deadline_blocked_until = now.plus(self.config.publish_retry_initial);
                        return;
                    }
                    self.commit(now, None, change, publish);
                }
                Decision::Ignore => panic!(
                    "Participant::on_deadline returned Ignore while next_deadline() <= now; \
                     it must commit a change that clears or moves the deadline"
                ),
                Decision::Refuse(_) => {
                    self.deadline_blocked_until = now.plus(self.config.publish_retry_initial);
                    return;
                }
            }
        }
    }
}

impl<P: Participant> Machine for ParticipantHost<P> {
    type Input = ParticipantInput;
    type Output = ParticipantOutput;

    fn handle(&mut self, now: Time, input: ParticipantInput) {
        match input {
            ParticipantInput::Deliver { token, message } => self.on_deliver(now, token, message),
            ParticipantInput::PublishAcked { outbox, msg_id: _ } => self.on_acked(outbox),
            // The retry timer set when the attempt was sent covers this.
            ParticipantInput::PublishFailed { outbox: _ } => self.stats.publish_failures += 1,
            ParticipantInput::Subscribed { topic } => self.on_subscribed(topic),
            ParticipantInput::Durable { lsn } => self.on_durable(now, lsn),
            ParticipantInput::Command(command) => self.on_command(now, command),
        }
    }

    fn handle_timeout(&mut self, now: Time) {
        self.renew_subscriptions(now);
        while let Some(&(at, id)) = self.retries.first() {
            if at > now {
                break;
            }
            // `send` moves the entry at least `publish_retry_initial` ahead, so this ends.
            self.send(now, id);
        }
        self.fire_deadlines(now);
    }

    fn poll_output(&mut self) -> Option<ParticipantOutput> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        let subscriptions = self.subscriptions.values().map(|s| s.next_at).min();
        let retries = self.retries.first().map(|(at, _)| *at);
        let deadline = self.logic.next_deadline().map(|d| d.max(self.deadline_blocked_until));
        [subscriptions, retries, deadline].into_iter().flatten().min()
    }
}

/// A hosted participant with its concrete type erased, for drivers that run
/// several kinds side by side (the simulator, [`crate::testkit`]).
pub trait AnyParticipant: Machine<Input = ParticipantInput, Output = ParticipantOutput> {
    fn client_id(&self) -> &ClientId;
    /// Replaces this participant by the one recovered from `image` (its durable
    /// records), as after a crash and restart.
    fn restart(&mut self, image: &[u8]) -> Result<RecoveryReport, LogError>;
    /// For checkers: downcast to `ParticipantHost<YourParticipant>`.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Readable lines for the records in `frames` (see [`ParticipantHost::describe_frames`]).
    fn describe_frames(&self, frames: &[u8]) -> Vec<String>;
    /// Whether the broker confirmed every subscription.
    fn subscribed(&self) -> bool;
    /// Outbox entries the broker has not acknowledged.
    fn outbox_len(&self) -> usize;
}

impl<P: Participant> AnyParticipant for ParticipantHost<P> {
    fn client_id(&self) -> &ClientId {
        &self.config.client_id
    }

    fn restart(&mut self, image: &[u8]) -> Result<RecoveryReport, LogError> {
        let (host, report) = Self::recover(self.genesis.clone(), self.config.clone(), image)?;
        *self = host;
        Ok(report)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe_frames(&self, frames: &[u8]) -> Vec<String> {
        Self::describe_frames(frames)
    }

    fn subscribed(&self) -> bool {
        ParticipantHost::subscribed(self)
    }

    fn outbox_len(&self) -> usize {
        ParticipantHost::outbox_len(self)
    }
}

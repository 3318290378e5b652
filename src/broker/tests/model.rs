//! Property: random histories of publishes (with repeated ids), subscriptions,
//! expiries, callback answers, time steps, held syncs and crashes (plain and
//! torn), checked after every step against a small model:
//!
//! - no acknowledged publish is lost: each entitled subscriber has it queued,
//!   dead-lettered, or answered 2xx for it (and after healing, every one did);
//! - at most one stored message per `(GlobalID, SubID)`, and every answer for
//!   a key names the same message;
//! - nothing is delivered before it is durable, nor to a subscriber that was
//!   not entitled when it was published;
//! - every bound of the config holds.
//!
//! The model knows subscriptions only from the requests it made: an operation
//! whose answer was lost in a torn crash is "in doubt" (maybe applied). So the
//! entitlement checks use an upper bound (`may`: some possibly-applied
//! subscription was live and nothing certain ended it) and a lower bound
//! (`sure`: every operation is certain and the last one is a live subscription).

use super::harness::*;
use crate::Machine;
use crate::broker::*;
use crate::log::{Recovered, decode_all, decode_frames};
use crate::types::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const CLIENTS: [&str; 3] = ["c0", "c1", "c2"];
const TOPICS: [&str; 2] = ["t0", "t1"];

#[derive(Clone, Debug)]
enum Action {
    Subscribe {
        client: usize,
        topic: usize,
        ttl_ms: u64,
    },
    Unsubscribe {
        client: usize,
        topic: usize,
    },
    Publish {
        gid: u8,
        sid: u8,
        topic: usize,
        create: i64,
    },
    /// Answer one outstanding callback; `again` keeps it to answer twice.
    Answer {
        pick: prop::sample::Index,
        result: CallbackResult,
        again: bool,
    },
    Advance {
        ms: u64,
    },
    /// Stop syncing: writes stay volatile until `Sync`.
    Hold,
    Sync,
    Crash,
    CrashTorn {
        keep: usize,
    },
    Redrive {
        client: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let result = prop_oneof![
        3 => Just(CallbackResult::Delivered),
        1 => Just(CallbackResult::Failed),
        1 => Just(CallbackResult::TimedOut),
    ];
    prop_oneof![
        3 => (0..3usize, 0..2usize, 0..400u64).prop_map(|(client, topic, ttl_ms)| Action::Subscribe { client, topic, ttl_ms }),
        1 => (0..3usize, 0..2usize).prop_map(|(client, topic)| Action::Unsubscribe { client, topic }),
        6 => (0..5u8, 0..2u8, 0..2usize, 0..4i64).prop_map(|(gid, sid, topic, create)| Action::Publish { gid, sid, topic, create }),
        6 => (any::<prop::sample::Index>(), result, prop::bool::weighted(0.1)).prop_map(|(pick, result, again)| Action::Answer { pick, result, again }),
        3 => (1..150u64).prop_map(|ms| Action::Advance { ms }),
        1 => Just(Action::Hold),
        1 => Just(Action::Sync),
        1 => Just(Action::Crash),
        1 => (0..300usize).prop_map(|keep| Action::CrashTorn { keep }),
        1 => (0..3usize).prop_map(|client| Action::Redrive { client }),
    ]
}

/// An expired subscription stays entitled this long (delivery paused).
const GRACE: Duration = Duration::from_millis(20);

fn config() -> BrokerConfig {
    BrokerConfig {
        subscriptions_max: 4,
        messages_max: 4,
        pending_per_subscriber_max: 4,
        dead_letters_per_subscriber_max: 5,
        inflight_per_subscriber_max: 2,
        publishes_unsynced_max: 3,
        dedup_settled_max: 10_000,
        callback_timeout: Duration::from_millis(50),
        retry_backoff_initial: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        attempts_max: 3,
        subscription_grace: GRACE,
        compact_garbage_records_min: 8,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Applied in the running broker, not yet answered.
    Pending,
    Confirmed,
    /// Rejected, or lost by a crash that kept no unsynced byte.
    NoEffect,
    /// Unanswered when a torn crash kept some unsynced bytes: maybe applied.
    InDoubt,
}

#[derive(Debug)]
struct SubOp {
    client: ClientId,
    topic: Topic,
    /// `None` for an unsubscribe.
    expire: Option<Time>,
    status: Status,
}

#[derive(Default)]
struct Model {
    /// Subscription operations in the order they were made.
    ops: Vec<SubOp>,
    op_of_req: BTreeMap<RequestId, usize>,
    /// Publish requests: key, and the entitlement bounds when they were handled.
    publishes: BTreeMap<RequestId, (MessageKey, BTreeSet<ClientId>, BTreeSet<ClientId>)>,
    /// Union of `may` over every publish request of a key.
    may_by_key: BTreeMap<MessageKey, BTreeSet<ClientId>>,
    /// Messages whose records were written but are not yet durable / durable.
    written: BTreeMap<MsgId, Written>,
    durable: BTreeMap<MsgId, Written>,
    /// Acknowledged messages (a `Published` answer named them).
    acked: BTreeSet<MsgId>,
    msg_of_key: BTreeMap<MessageKey, MsgId>,
    /// Callbacks sent and not answered (kept across crashes: stale answers).
    outstanding: Vec<Callback>,
    /// (subscriber, message) answered 2xx.
    delivered: BTreeSet<(ClientId, MsgId)>,
}

impl Model {
    fn ops_for<'a>(&'a self, client: &'a ClientId, topic: &'a Topic) -> impl Iterator<Item = &'a SubOp> + 'a {
        self.ops
            .iter()
            .filter(move |o| &o.client == client && &o.topic == topic && o.status != Status::NoEffect)
    }

    /// Could the broker entitle `client` to a publish on `topic` at `t`? A
    /// renewal never shortens a subscription, so any subscribe not followed by
    /// a certain unsubscribe may still be in force.
    fn may(&self, client: &ClientId, topic: &Topic, t: Time) -> bool {
        let ops: Vec<&SubOp> = self.ops_for(client, topic).collect();
        ops.iter().enumerate().any(|(i, e)| {
            e.expire.is_some_and(|x| x.plus(GRACE) > t)
                && !ops[i + 1..].iter().any(|o| {
                    let certain = matches!(o.status, Status::Pending | Status::Confirmed);
                    certain && o.expire.is_none()
                })
        })
    }

    /// Must the broker entitle `client` to a publish on `topic` at `t`? With
    /// every operation certain, the subscription's expiry is the latest of the
    /// requests since the last unsubscribe.
    fn sure(&self, client: &ClientId, topic: &Topic, t: Time) -> bool {
        let ops: Vec<&SubOp> = self.ops_for(client, topic).collect();
        let since_unsubscribe = ops.iter().rposition(|o| o.expire.is_none()).map_or(0, |i| i + 1);
        ops.iter().all(|o| o.status != Status::InDoubt)
            && ops[since_unsubscribe..]
                .iter()
                .filter_map(|o| o.expire)
                .max()
                .is_some_and(|x| x.plus(GRACE) > t)
    }

    /// Follows what the harness saw since the last call, checking as it goes.
    fn observe(&mut self, h: &mut Harness) -> Result<(), TestCaseError> {
        for event in std::mem::take(&mut h.observed) {
            match event {
                Observed::Output(BrokerOutput::Persist { frames, .. }) => {
                    for record in records(decode_frames(&frames)) {
                        if let BrokerRecord::Published { message, entitled } = record {
                            let written = Written {
                                id: message.msg_id,
                                key: message.key(),
                                message: Some(message),
                                entitled,
                            };
                            self.written.insert(written.id, written);
                        }
                    }
                }
                Observed::Output(BrokerOutput::Rewrite { frames, .. }) => {
                    for record in records(decode_frames(&frames)) {
                        match record {
                            BrokerRecord::Published { message, .. } => {
                                let id = message.msg_id;
                                prop_assert!(
                                    self.written.contains_key(&id) || self.durable.contains_key(&id),
                                    "snapshot holds {id}, never published"
                                );
                            }
                            // A message published and settled within the batch
                            // the snapshot replaced (nobody was entitled).
                            BrokerRecord::Settled { keys } => {
                                for (key, id) in keys {
                                    if !self.written.contains_key(&id) && !self.durable.contains_key(&id) {
                                        let written = Written {
                                            id,
                                            key,
                                            message: None,
                                            entitled: Vec::new(),
                                        };
                                        self.written.insert(id, written);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Observed::Output(BrokerOutput::Reply { req, reply }) => self.on_reply(req, reply)?,
                Observed::Output(BrokerOutput::Callback(cb)) => {
                    let id = cb.message.msg_id;
                    let Some(w) = self.durable.get(&id) else {
                        return Err(TestCaseError::fail(format!("callback for {id} before it was durable")));
                    };
                    prop_assert_eq!(w.message.as_ref(), Some(&cb.message));
                    prop_assert!(w.entitled.contains(&cb.client), "{} got {id}, not entitled", cb.client);
                    let may = self.may_by_key.get(&w.key).is_some_and(|m| m.contains(&cb.client));
                    prop_assert!(
                        may,
                        "{} got {id} but never had a live subscription when it was published",
                        cb.client
                    );
                    self.outstanding.push(cb);
                }
                Observed::Synced => {
                    for (_, written) in std::mem::take(&mut self.written) {
                        self.promote(written)?;
                    }
                }
                Observed::Restarted { image } => {
                    // Unanswered requests: lost, or maybe kept by a torn write.
                    let mut written = std::mem::take(&mut self.written);
                    for record in records(decode_all(&image)) {
                        let kept: Vec<MsgId> = match record {
                            BrokerRecord::Published { message, .. } => vec![message.msg_id],
                            BrokerRecord::Settled { keys } => keys.into_iter().map(|(_, id)| id).collect(),
                            _ => Vec::new(),
                        };
                        for id in kept {
                            if let Some(w) = written.remove(&id) {
                                self.promote(w)?;
                            }
                            prop_assert!(self.durable.contains_key(&id), "recovered {id}, never written");
                        }
                    }
                    for op in &mut self.ops {
                        if op.status == Status::Pending {
                            op.status = if h.last_torn { Status::InDoubt } else { Status::NoEffect };
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn promote(&mut self, written: Written) -> Result<(), TestCaseError> {
        let id = written.id;
        if let Some(old) = self.durable.get(&id) {
            prop_assert_eq!(&old.key, &written.key, "{} reused for another message", id);
        } else {
            self.durable.insert(id, written);
        }
        Ok(())
    }

    fn on_reply(&mut self, req: RequestId, reply: Reply) -> Result<(), TestCaseError> {
        if let Some(&i) = self.op_of_req.get(&req) {
            let op = &mut self.ops[i];
            op.status = match reply {
                Reply::Subscribed { .. } | Reply::Unsubscribed => Status::Confirmed,
                Reply::Rejected(_) => Status::NoEffect,
                other => return Err(TestCaseError::fail(format!("subscription answered {other}"))),
            };
            return Ok(());
        }
        let Some((key, may, sure)) = self.publishes.get(&req) else {
            return Ok(()); // a redrive
        };
        let Reply::Published { msg_id, duplicate } = reply else {
            return Ok(()); // rejected: nothing stored (the bounds are checked on the state)
        };
        let original = *self.msg_of_key.entry(key.clone()).or_insert(msg_id);
        prop_assert_eq!(original, msg_id, "{} answered with two message ids", key);
        let Some(w) = self.durable.get(&msg_id) else {
            return Err(TestCaseError::fail(format!("{msg_id} acknowledged before durable")));
        };
        prop_assert_eq!(&w.key, key);
        let entitled: BTreeSet<ClientId> = w.entitled.iter().cloned().collect();
        if !duplicate {
            prop_assert!(
                entitled.is_subset(may),
                "{msg_id} entitles {entitled:?}, at most {may:?}"
            );
            prop_assert!(
                sure.is_subset(&entitled),
                "{msg_id} entitles {entitled:?}, at least {sure:?}"
            );
        }
        self.acked.insert(msg_id);
        Ok(())
    }

    /// The invariants that hold after every step.
    fn check(&self, h: &Harness) -> Result<(), TestCaseError> {
        let b = &h.broker;
        let c = &h.config;
        let stats = b.stats();
        prop_assert!(stats.subscriptions <= c.subscriptions_max);
        prop_assert!(stats.messages_live <= c.messages_max);
        prop_assert!(stats.dedup_settled <= c.dedup_settled_max);
        prop_assert!(b.waiting_count <= c.publishes_unsynced_max);
        for (client, s) in &stats.subscribers {
            prop_assert!(
                s.pending + s.in_flight <= c.pending_per_subscriber_max,
                "{client}: {s:?}"
            );
            prop_assert!(s.in_flight <= c.inflight_per_subscriber_max, "{client}: {s:?}");
            prop_assert!(s.dead_letters <= c.dead_letters_per_subscriber_max, "{client}: {s:?}");
        }
        let keys: BTreeSet<MessageKey> = b.messages.values().map(|m| m.message.key()).collect();
        prop_assert_eq!(keys.len(), b.messages.len(), "two stored messages share a key");
        for id in &self.acked {
            let w = &self.durable[id];
            for client in &w.entitled {
                let create = w
                    .message
                    .as_ref()
                    .expect("a message with subscribers is published")
                    .create_time;
                let order = (create, *id);
                let held = b
                    .clients
                    .get(client)
                    .is_some_and(|q| q.entries.contains_key(&order) || q.dead.contains(&order));
                prop_assert!(
                    held || self.delivered.contains(&(client.clone(), *id)),
                    "acknowledged {id} lost for {client}"
                );
            }
        }
        Ok(())
    }
}

/// A message as the model learnt it from the records.
#[derive(Clone, Debug)]
struct Written {
    id: MsgId,
    key: MessageKey,
    /// `None` when only its settled dedup key was seen (nobody was entitled).
    message: Option<Message>,
    entitled: Vec<ClientId>,
}

/// The records of decoded frames (a `Persist`/`Rewrite` output, or a log image).
fn records(decoded: Result<Recovered<'_>, crate::log::LogError>) -> Vec<BrokerRecord> {
    let decoded = decoded.expect("the broker writes valid frames");
    decoded
        .records
        .iter()
        .map(|(_, p)| BrokerRecord::decode(p).expect("the broker writes valid records"))
        .collect()
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut h = Harness::new(config(), 11);
    h.tracing = false;
    h.observe = true;
    let mut m = Model::default();
    for action in actions {
        step(&mut h, &mut m, action)?;
        m.observe(&mut h)?;
        m.check(&h)?;
    }
    heal(&mut h, &mut m)
}

fn step(h: &mut Harness, m: &mut Model, action: Action) -> Result<(), TestCaseError> {
    match action {
        Action::Subscribe { client, topic, ttl_ms } => {
            let (client, topic) = (ClientId::lit(CLIENTS[client]), Topic::lit(TOPICS[topic]));
            let expire = h.now.plus(Duration::from_millis(ttl_ms));
            let req = h.req();
            m.op_of_req.insert(req, m.ops.len());
            m.ops.push(SubOp {
                client: client.clone(),
                topic: topic.clone(),
                expire: Some(expire),
                status: Status::Pending,
            });
            let subscribe = SubscribeRequest {
                client_id: client,
                topic,
                notify_url: URL.into(),
                expire_time: expire,
            };
            h.input(BrokerInput::Subscribe { req, subscribe });
        }
        Action::Unsubscribe { client, topic } => {
            let (client, topic) = (ClientId::lit(CLIENTS[client]), Topic::lit(TOPICS[topic]));
            let req = h.req();
            m.op_of_req.insert(req, m.ops.len());
            m.ops.push(SubOp {
                client: client.clone(),
                topic: topic.clone(),
                expire: None,
                status: Status::Pending,
            });
            h.input(BrokerInput::Unsubscribe { req, client, topic });
        }
        Action::Publish {
            gid,
            sid,
            topic,
            create,
        } => {
            let publish = publication(&format!("g{gid}"), &format!("s{sid}"), TOPICS[topic], create, "x");
            let key = publish.key();
            let clients = CLIENTS.map(ClientId::lit);
            let may: BTreeSet<ClientId> = clients
                .iter()
                .filter(|c| m.may(c, &publish.topic, h.now))
                .cloned()
                .collect();
            let sure = clients
                .iter()
                .filter(|c| m.sure(c, &publish.topic, h.now))
                .cloned()
                .collect();
            m.may_by_key.entry(key.clone()).or_default().extend(may.iter().cloned());
            let req = h.req();
            m.publishes.insert(req, (key, may, sure));
            h.input(BrokerInput::Publish { req, publish });
        }
        Action::Answer { pick, result, again } => {
            if m.outstanding.is_empty() {
                return Ok(());
            }
            let i = pick.index(m.outstanding.len());
            let cb = if again {
                m.outstanding[i].clone()
            } else {
                m.outstanding.remove(i)
            };
            if result == CallbackResult::Delivered {
                m.delivered.insert((cb.client.clone(), cb.message.msg_id));
            }
            h.input(BrokerInput::CallbackResult {
                delivery: cb.delivery,
                result,
            });
        }
        Action::Advance { ms } => h.advance(ms),
        Action::Hold => h.auto_sync = false,
        Action::Sync => {
            h.auto_sync = true;
            h.sync();
        }
        Action::Crash => h.crash(),
        Action::CrashTorn { keep } => h.crash_torn(keep),
        Action::Redrive { client } => {
            h.redrive(CLIENTS[client]);
        }
    }
    Ok(())
}

/// Faults off: sync, renew every subscription, redrive, answer everything 2xx
/// until quiet. Then every acknowledged message reached every entitled subscriber.
fn heal(h: &mut Harness, m: &mut Model) -> Result<(), TestCaseError> {
    h.auto_sync = true;
    h.sync();
    m.observe(h)?;
    let pairs: Vec<(ClientId, Topic)> = h
        .broker
        .subs
        .iter()
        .flat_map(|(t, by_client)| by_client.keys().map(move |c| (c.clone(), t.clone())))
        .collect();
    let forever = h.now.plus(Duration::from_secs(1_000_000));
    for (client, topic) in pairs {
        h.subscribe(client.as_str(), topic.as_str(), forever);
    }
    for _ in 0..200 {
        for client in CLIENTS {
            h.redrive(client);
        }
        m.observe(h)?;
        for cb in std::mem::take(&mut m.outstanding) {
            m.delivered.insert((cb.client.clone(), cb.message.msg_id));
            h.input(BrokerInput::CallbackResult {
                delivery: cb.delivery,
                result: CallbackResult::Delivered,
            });
        }
        h.advance(100);
        m.observe(h)?;
        m.check(h)?;
        if m.outstanding.is_empty() && h.broker.messages.is_empty() && h.broker.poll_timeout().is_none() {
            break;
        }
    }
    prop_assert!(
        h.broker.messages.is_empty(),
        "not quiet after healing: {:?}",
        h.broker.stats()
    );
    for id in &m.acked {
        for client in &m.durable[id].entitled {
            prop_assert!(
                m.delivered.contains(&(client.clone(), *id)),
                "{id} never reached {client}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_with_crashes_keep_the_broker_invariants(actions in prop::collection::vec(action(), 1..80)) {
        run(actions)?;
    }
}

//! Applying a record to the broker state: the one place where durable state
//! changes, used alike by live operation and by recovery's replay.
//!
//! **Invariant:** replaying the durable records yields the state the running
//! broker had when they were written (minus volatile delivery phases). Records
//! are never checked against bounds here (they were accepted when written); a
//! record that contradicts the state before it is an error naming what is wrong.

use super::core::{Entry, OrderKey, Origin, Phase, StoredMessage, Subscription};
use super::dedup::key_hash;
use super::*;
use crate::types::MessageKey;
use std::collections::{BTreeMap, BTreeSet};

impl Broker {
    pub(super) fn apply(&mut self, record: BrokerRecord, origin: Origin) -> Result<(), String> {
        match record {
            BrokerRecord::Epoch {
                incarnation,
                next_msg_id,
            } => {
                self.incarnation = self.incarnation.max(incarnation);
                self.next_msg_id = self.next_msg_id.max(next_msg_id.0);
                Ok(())
            }
            BrokerRecord::Subscribed {
                client,
                topic,
                url,
                expire_time,
            } => {
                self.apply_subscribed(client, topic, url, expire_time);
                Ok(())
            }
            BrokerRecord::Unsubscribed { client, topic } => self.apply_unsubscribed(client, topic),
            BrokerRecord::Published { message, entitled } => self.apply_published(message, entitled, origin),
            BrokerRecord::Acked { client, msg_id } => {
                self.remove_entry(&client, msg_id)?;
                self.release_hold(&client, msg_id)?;
                self.dirty.insert(client);
                Ok(())
            }
            BrokerRecord::DeadLettered { client, msg_id } => {
                let key = self.remove_entry(&client, msg_id)?;
                let q = self.clients.get_mut(&client).expect("remove_entry found the client");
                q.dead.insert(key);
                self.dead_total += 1;
                self.dirty.insert(client);
                Ok(())
            }
            BrokerRecord::Redriven { client } => self.apply_redriven(client, usize::MAX),
            BrokerRecord::RedrivenOldest { client, count } => self.apply_redriven(client, count as usize),
            BrokerRecord::Settled { keys } => {
                for (key, msg_id) in keys {
                    self.dedup.remember(key, msg_id, Lsn(0), self.config.dedup_settled_max);
                }
                Ok(())
            }
        }
    }

    fn apply_subscribed(&mut self, client: ClientId, topic: Topic, url: String, expire_time: Time) {
        let by_client = self.subs.entry(topic).or_default();
        match by_client.get_mut(&client) {
            Some(sub) => {
                sub.url = url;
                sub.expire_time = expire_time;
                if sub.retired {
                    sub.retired = false;
                    self.subs_retired -= 1;
                }
            }
            None => {
                let sub = Subscription {
                    url,
                    expire_time,
                    retired: false,
                    refs: 0,
                };
                by_client.insert(client.clone(), sub);
                self.subs_count += 1;
                self.clients.entry(client.clone()).or_default().subscriptions += 1;
            }
        }
        // A renewal resumes a paused queue.
        self.dirty.insert(client);
    }

    fn apply_unsubscribed(&mut self, client: ClientId, topic: Topic) -> Result<(), String> {
        let sub = self
            .subs
            .get_mut(&topic)
            .and_then(|m| m.get_mut(&client))
            .ok_or_else(|| format!("unsubscribe of unknown subscription {client} on {topic}"))?;
        if sub.retired {
            return Err(format!("{client} on {topic} unsubscribed twice"));
        }
        if sub.refs > 0 {
            sub.retired = true;
            self.subs_retired += 1;
        } else {
            self.remove_subscription(&client, &topic);
        }
        Ok(())
    }

    fn remove_subscription(&mut self, client: &ClientId, topic: &Topic) {
        let by_client = self.subs.get_mut(topic).expect("subscription exists");
        let sub = by_client.remove(client).expect("subscription exists");
        assert_eq!(sub.refs, 0, "removing a subscription that messages still reference");
        if sub.retired {
            self.subs_retired -= 1;
        }
        if by_client.is_empty() {
            self.subs.remove(topic);
        }
        self.subs_count -= 1;
        let q = self.clients.get_mut(client).expect("a subscription implies its client");
        q.subscriptions -= 1;
        if q.subscriptions == 0 {
            assert!(
                q.entries.is_empty() && q.dead.is_empty(),
                "{client} has messages but no subscription"
            );
            self.clients.remove(client);
            self.dirty.remove(client);
        }
    }

    fn apply_published(&mut self, message: Message, entitled: Vec<ClientId>, origin: Origin) -> Result<(), String> {
        let msg_id = message.msg_id;
        if self.messages.contains_key(&msg_id) {
            return Err(format!("{msg_id} published twice"));
        }
        let h = key_hash(&message.global_id, &message.sub_id);
        if self
            .dedup
            .find_live(h, &message.global_id, &message.sub_id, &self.messages)
            .is_some()
        {
            return Err(format!("{} stored twice", message.key()));
        }
        // A key still remembered here but forgotten when this record was
        // written (a run with a smaller `dedup_settled_max`): the new message wins.
        self.dedup.forget(h, &message.global_id, &message.sub_id);
        let (lsn, phase) = match origin {
            Origin::Live => (self.batch_lsn(), Phase::Unsynced),
            Origin::Replay => (Lsn(0), Phase::Ready),
        };
        self.next_msg_id = self.next_msg_id.max(msg_id.0 + 1);
        let order: OrderKey = (message.create_time, msg_id);
        for client in &entitled {
            let sub = self
                .subs
                .get_mut(&message.topic)
                .and_then(|m| m.get_mut(client))
                .ok_or_else(|| {
                    format!(
                        "{msg_id} entitles {client}, which has no subscription to {}",
                        message.topic
                    )
                })?;
            sub.refs += 1;
            let q = self.clients.get_mut(client).expect("a subscription implies its client");
            let entry = Entry {
                phase,
                attempts: 0,
                deliveries: Vec::new(),
            };
            if q.entries.insert(order, entry).is_some() {
                return Err(format!("{msg_id} entitles {client} twice"));
            }
            if phase == Phase::Ready {
                ready_insert(&mut q.ready, &message.topic, order);
            }
        }
        if entitled.is_empty() {
            // Nobody to deliver to: settled at once (its dedup key still counts).
            let key = MessageKey {
                global_id: message.global_id,
                sub_id: message.sub_id,
            };
            self.dedup.remember(key, msg_id, lsn, self.config.dedup_settled_max);
        } else {
            let holders = entitled.len();
            self.messages
                .insert(msg_id, Box::new(StoredMessage { message, holders, lsn }));
            self.dedup.insert_live(h, msg_id);
        }
        Ok(())
    }

    /// Replay of a Published record that entitled nobody: what
    /// `apply_published` does for it, from its key alone. Bulk loading keeps no
    /// hash index, so the live-duplicate and superseded-key checks are
    /// `end_bulk`'s.
    pub(super) fn replay_settled_at_once(&mut self, msg_id: MsgId, key: MessageKey) -> Result<(), String> {
        if self.messages.contains_key(&msg_id) {
            return Err(format!("{msg_id} published twice"));
        }
        self.next_msg_id = self.next_msg_id.max(msg_id.0 + 1);
        self.dedup.remember(key, msg_id, Lsn(0), self.config.dedup_settled_max);
        Ok(())
    }

    /// Moves the `count` oldest dead letters of `client` (all of them with
    /// `usize::MAX`) back to its queue.
    fn apply_redriven(&mut self, client: ClientId, count: usize) -> Result<(), String> {
        let q = self
            .clients
            .get_mut(&client)
            .ok_or_else(|| format!("redrive of unknown subscriber {client}"))?;
        let dead = if count >= q.dead.len() {
            std::mem::take(&mut q.dead)
        } else {
            let rest = q
                .dead
                .split_off(&q.dead.iter().nth(count).copied().expect("count < len"));
            std::mem::replace(&mut q.dead, rest)
        };
        self.dead_total -= dead.len();
        for key in dead {
            let entry = Entry {
                phase: Phase::Ready,
                attempts: 0,
                deliveries: Vec::new(),
            };
            q.entries.insert(key, entry);
            ready_insert(&mut q.ready, &self.messages[&key.1].message.topic, key);
        }
        self.dirty.insert(client);
        Ok(())
    }

    /// A Published record's entries become deliverable once it is durable.
    pub(super) fn mark_durable(&mut self, msg_id: MsgId, entitled: &[ClientId]) {
        let Some(stored) = self.messages.get(&msg_id) else {
            return;
        };
        let key = (stored.message.create_time, msg_id);
        for client in entitled {
            let Some(q) = self.clients.get_mut(client) else {
                continue;
            };
            if let Some(entry) = q.entries.get_mut(&key)
                && entry.phase == Phase::Unsynced
            {
                entry.phase = Phase::Ready;
                ready_insert(&mut q.ready, &stored.message.topic, key);
                self.dirty.insert(client.clone());
            }
        }
    }

    /// Removes `client`'s queued entry for `msg_id` together with its volatile
    /// traces (timer, window slot, attempt ids, so a late answer is ignored).
    fn remove_entry(&mut self, client: &ClientId, msg_id: MsgId) -> Result<OrderKey, String> {
        let stored = self
            .messages
            .get(&msg_id)
            .ok_or_else(|| format!("{msg_id} is not stored"))?;
        let key = (stored.message.create_time, msg_id);
        let q = self
            .clients
            .get_mut(client)
            .ok_or_else(|| format!("unknown subscriber {client}"))?;
        let entry = q
            .entries
            .remove(&key)
            .ok_or_else(|| format!("{msg_id} is not queued for {client}"))?;
        match entry.phase {
            Phase::Unsynced => {}
            Phase::Ready => {
                let topic = &stored.message.topic;
                let set = q
                    .ready
                    .get_mut(topic)
                    .expect("a ready entry is in its topic's ready set");
                set.remove(&key);
                if set.is_empty() {
                    q.ready.remove(topic);
                }
            }
            Phase::InFlight { deadline, .. } => {
                q.in_flight -= 1;
                // Absent when the deadline just fired and this is its consequence.
                self.timers.remove(&(deadline, client.clone(), key));
            }
            Phase::Backoff { until } => {
                self.timers.remove(&(until, client.clone(), key));
            }
        }
        for delivery in entry.deliveries {
            self.deliveries.remove(&delivery);
        }
        Ok(key)
    }

    /// `client` no longer holds `msg_id` (delivered): drops the references,
    /// a retired subscription nobody needs, and the message once nobody holds it.
    fn release_hold(&mut self, client: &ClientId, msg_id: MsgId) -> Result<(), String> {
        let stored = self.messages.get_mut(&msg_id).expect("remove_entry found the message");
        let topic = &stored.message.topic;
        let sub = self
            .subs
            .get_mut(topic)
            .and_then(|m| m.get_mut(client))
            .ok_or_else(|| format!("{client} holds {msg_id} without a subscription to {topic}"))?;
        sub.refs -= 1;
        let retire = sub.retired && sub.refs == 0;
        stored.holders -= 1;
        let settle = stored.holders == 0;
        if retire {
            let topic = topic.clone();
            self.remove_subscription(client, &topic);
        }
        if settle {
            let stored = self.messages.remove(&msg_id).expect("present");
            let m = stored.message;
            self.dedup.remove_live(key_hash(&m.global_id, &m.sub_id), msg_id);
            let key = MessageKey {
                global_id: m.global_id,
                sub_id: m.sub_id,
            };
            self.dedup
                .remember(key, msg_id, stored.lsn, self.config.dedup_settled_max);
        }
        Ok(())
    }
}

pub(super) fn ready_insert(ready: &mut BTreeMap<Topic, BTreeSet<OrderKey>>, topic: &Topic, key: OrderKey) {
    match ready.get_mut(topic) {
        Some(set) => {
            set.insert(key);
        }
        None => {
            ready.insert(topic.clone(), BTreeSet::from([key]));
        }
    }
}

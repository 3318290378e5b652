//! Delivery: dispatching callbacks within each subscriber's window, callback
//! results, callback deadlines, retry backoff and dead-lettering.
//!
//! **Invariant:** an entry is in exactly one phase; an `InFlight` entry holds
//! one window slot and one deadline timer, a `Backoff` entry one timer, a
//! `Ready` entry sits in its topic's ready set; nothing else holds a timer or
//! a slot. Every attempt id of a queued entry maps back to it, so a late
//! `Delivered` still settles the message.

use super::apply::ready_insert;
use super::core::{DELIVERY_SEQ_BITS, OrderKey, Phase};
use super::*;
use std::time::Duration;

impl Broker {
    pub(super) fn handle_callback_result(&mut self, now: Time, delivery: DeliveryId, result: CallbackResult) {
        // Unknown: the message was settled or dead-lettered since, or the
        // answer is addressed to an earlier incarnation. Nothing to do.
        let Some((client, key)) = self.deliveries.get(&delivery).cloned() else {
            return;
        };
        match result {
            CallbackResult::Delivered => {
                // Also for an attempt that already timed out: the message is
                // still queued, so this answer spares a needless redelivery.
                self.record(BrokerRecord::Acked { client, msg_id: key.1 });
            }
            CallbackResult::Failed | CallbackResult::TimedOut => {
                let entry = &self.clients[&client].entries[&key];
                // Only the current attempt's failure counts; an older attempt's
                // failure was already counted when its deadline passed.
                if let Phase::InFlight {
                    delivery: current,
                    deadline,
                } = entry.phase
                    && current == delivery
                {
                    self.timers.remove(&(deadline, client.clone(), key));
                    self.attempt_failed(now, client, key);
                }
            }
        }
    }

    /// The current attempt of an in-flight entry failed (its timer is already
    /// gone): back off, or dead-letter once `attempts_max` attempts were made.
    fn attempt_failed(&mut self, now: Time, client: ClientId, key: OrderKey) {
        let attempts = self.clients[&client].entries[&key].attempts;
        if attempts >= self.config.attempts_max {
            self.record(BrokerRecord::DeadLettered { client, msg_id: key.1 });
            return;
        }
        let until = now.plus(self.backoff(attempts));
        let q = self.clients.get_mut(&client).expect("entry's client");
        q.in_flight -= 1;
        q.entries.get_mut(&key).expect("entry").phase = Phase::Backoff { until };
        self.timers.insert((until, client.clone(), key));
        self.dirty.insert(client);
    }

    /// The delay after the `attempts`-th failed attempt: `initial * 2^(attempts-1)`
    /// capped at `retry_backoff_max`, then "equal jitter" (uniform in the upper
    /// half), so retries of many messages spread out and never exceed the cap.
    pub(super) fn backoff(&mut self, attempts: u32) -> Duration {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let initial = nanos(self.config.retry_backoff_initial);
        let cap = nanos(self.config.retry_backoff_max);
        let doublings = attempts.saturating_sub(1).min(63);
        let full = initial.saturating_mul(1u64 << doublings).min(cap);
        let half = full / 2;
        // Whole microseconds: finer jitter buys nothing and reads badly in traces.
        let jitter = self.rng.below(half / 1_000 + 1) * 1_000;
        Duration::from_nanos(full - half + jitter)
    }

    pub(super) fn fire_timers(&mut self, now: Time) {
        while let Some(&(at, _, _)) = self.timers.first() {
            if at > now {
                break;
            }
            let (at, client, key) = self.timers.pop_first().expect("checked non-empty");
            let phase = self.clients[&client].entries[&key].phase;
            match phase {
                Phase::InFlight { deadline, .. } => {
                    assert_eq!(deadline, at, "timer out of step with its entry");
                    self.attempt_failed(now, client, key);
                }
                Phase::Backoff { until } => {
                    assert_eq!(until, at, "timer out of step with its entry");
                    let q = self.clients.get_mut(&client).expect("entry's client");
                    q.entries.get_mut(&key).expect("entry").phase = Phase::Ready;
                    ready_insert(&mut q.ready, &self.messages[&key.1].message.topic, key);
                    self.dirty.insert(client);
                }
                Phase::Unsynced | Phase::Ready => unreachable!("a {phase:?} entry holds no timer"),
            }
        }
    }

    /// Sends callbacks for every dirty subscriber while its window has room.
    pub(super) fn pump(&mut self, now: Time) {
        if self.durable < self.dispatch_after {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        for client in dirty {
            self.pump_client(now, &client);
        }
    }

    fn pump_client(&mut self, now: Time, client: &ClientId) {
        // Bounded by the window: each round fills one slot or stops.
        loop {
            let Some(q) = self.clients.get_mut(client) else {
                return;
            };
            if q.in_flight >= self.config.inflight_per_subscriber_max {
                return;
            }
            // The earliest ready message among topics whose subscription is not expired.
            let mut best: Option<(OrderKey, &Topic)> = None;
            for (topic, set) in &q.ready {
                let first = *set.first().expect("empty ready sets are removed");
                let sub = &self.subs[topic][client];
                if sub.deliverable(now) && best.is_none_or(|(k, _)| first < k) {
                    best = Some((first, topic));
                }
            }
            let Some((key, topic)) = best else {
                return;
            };
            let url = self.subs[topic][client].url.clone();
            let topic = topic.clone();
            let set = q.ready.get_mut(&topic).expect("chosen from it");
            set.remove(&key);
            if set.is_empty() {
                q.ready.remove(&topic);
            }
            assert!(
                self.next_delivery_seq < 1 << DELIVERY_SEQ_BITS,
                "delivery ids exhausted"
            );
            let delivery = DeliveryId((self.incarnation << DELIVERY_SEQ_BITS) | self.next_delivery_seq);
            self.next_delivery_seq += 1;
            let deadline = now.plus(self.config.callback_timeout);
            let entry = q.entries.get_mut(&key).expect("ready entries are queued");
            entry.attempts += 1;
            entry.deliveries.push(delivery);
            entry.phase = Phase::InFlight { delivery, deadline };
            let attempt = entry.attempts;
            q.in_flight += 1;
            self.timers.insert((deadline, client.clone(), key));
            self.deliveries.insert(delivery, (client.clone(), key));
            let message = self.messages[&key.1].message.clone();
            self.outputs.push_back(BrokerOutput::Callback(Callback {
                delivery,
                client: client.clone(),
                url,
                message,
                attempt,
            }));
        }
    }
}

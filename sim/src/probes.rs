//! Probes of the broker's API on the side: a broker (recovered at the heal
//! from its own log) is taken through request sequences the sweep's
//! participants never make, and must answer each as documented. The world
//! runs them in its disk probe; they know nothing of the world.
//!
//! **Invariant:** a probe only adds its own clients and topics to the broker
//! it is given (so the other probes on the same broker are unaffected), and
//! a refusal by one of the broker's bounds makes it inapplicable (`Ok(false)`),
//! never a failure, unless the probe's own state proves the bound had room.

use sagamq::broker::{Broker, BrokerConfig, BrokerInput, BrokerOutput, Lsn, Reply, RequestId};
use sagamq::machine::Machine;
use sagamq::{ClientId, Time, Topic};

/// One request to a broker on the side, its records made durable at once:
/// the reply and the callbacks it caused.
pub fn side_step(b: &mut Broker, now: Time, input: BrokerInput) -> (Option<Reply>, Vec<sagamq::broker::Callback>) {
    let mut reply = None;
    let mut callbacks = Vec::new();
    b.handle(now, input);
    loop {
        let mut written = None;
        while let Some(out) = b.poll_output() {
            match out {
                BrokerOutput::Reply { reply: r, .. } => reply = Some(r),
                BrokerOutput::Persist { lsn, .. } | BrokerOutput::Rewrite { lsn, .. } => written = Some(lsn),
                BrokerOutput::Callback(cb) => callbacks.push(cb),
            }
        }
        match written {
            Some(lsn) => b.handle(now, BrokerInput::Durable { lsn }),
            None => return (reply, callbacks),
        }
    }
}

/// The subscription-lifecycle probe (on the recovered broker at the heal,
/// after the hostile-input probe): a probe client subscribes to a topic of
/// its own, gets a message published there and answers it, unsubscribes,
/// and a later message must not reach it while a retry of the first is
/// answered as its duplicate. The sweep's participants never unsubscribe.
/// None when the broker does all that, or when one of its bounds refuses a
/// step (the probe does not apply); else what went wrong.
pub fn unsubscribe_misbehaves(b: &mut Broker, now: Time) -> Result<bool, String> {
    let client = ClientId::lit("probe-client");
    let topic = Topic::lit("sagamq.probe");
    let publish = |n: u32| sagamq::PublishRequest {
        global_id: sagamq::GlobalId::lit("probe"),
        sub_id: sagamq::SubId::new(format!("probe.{n}")).expect("a short SubID"),
        sender_id: sagamq::SenderId::lit("probe-client"),
        create_time: 0,
        topic: topic.clone(),
        content: format!("probe {n}"),
    };
    let req = RequestId(u64::MAX - 2);
    let subscribe = BrokerInput::Subscribe {
        req,
        subscribe: sagamq::SubscribeRequest {
            client_id: client.clone(),
            topic: topic.clone(),
            notify_url: "sim://probe".to_string(),
            expire_time: Time(now.0 + 60_000_000_000),
        },
    };
    let refused = |r: &Option<Reply>| matches!(r, Some(Reply::Rejected(_)));
    let (r, _) = side_step(b, now, subscribe);
    if refused(&r) {
        return Ok(false);
    }
    let (r, callbacks) = side_step(
        b,
        now,
        BrokerInput::Publish {
            req,
            publish: publish(1),
        },
    );
    let Some(Reply::Published { msg_id: first, .. }) = r else {
        return if refused(&r) {
            Ok(false)
        } else {
            Err(format!("a publish to a fresh subscription was answered {r:?}"))
        };
    };
    let Some(cb) = callbacks.iter().find(|cb| cb.client == client) else {
        return Err(format!(
            "a message published to {topic} right after {client} subscribed was never sent to it"
        ));
    };
    let owed = |b: &Broker| {
        b.stats()
            .subscribers
            .get(&client)
            .map_or(0, |st| st.pending + st.in_flight)
    };
    // Unsubscribed while its message is still in flight: that message is
    // still its to receive, nothing published later is.
    let unsubscribe = BrokerInput::Unsubscribe {
        req,
        client: client.clone(),
        topic: topic.clone(),
    };
    let (r, _) = side_step(b, now, unsubscribe);
    if r != Some(Reply::Unsubscribed) {
        return if refused(&r) {
            Ok(false)
        } else {
            Err(format!("an unsubscribe of a live subscription was answered {r:?}"))
        };
    }
    let (r, callbacks) = side_step(
        b,
        now,
        BrokerInput::Publish {
            req,
            publish: publish(2),
        },
    );
    if refused(&r) {
        return Ok(false);
    }
    if callbacks.iter().any(|cb| cb.client == client) || owed(b) != 1 {
        return Err(format!(
            "a message published to {topic} after {client} unsubscribed was queued for it ({} owed, 1 expected)",
            owed(b)
        ));
    }
    let (_, _) = side_step(
        b,
        now,
        BrokerInput::CallbackResult {
            delivery: cb.delivery,
            result: sagamq::broker::CallbackResult::Delivered,
        },
    );
    if owed(b) != 0 {
        return Err(format!(
            "{client} answered its only message 2xx, yet the broker still holds {} for it",
            owed(b)
        ));
    }
    let (r, _) = side_step(
        b,
        now,
        BrokerInput::Publish {
            req,
            publish: publish(1),
        },
    );
    match r {
        Some(Reply::Published {
            msg_id,
            duplicate: true,
        }) if msg_id == first => Ok(true),
        r if refused(&r) => Ok(false),
        r => Err(format!(
            "a retry of the first probe message ({first}), settled, was answered {r:?}"
        )),
    }
}

/// The dedup-bound probe: `b` was recovered with `dedup_settled_max = max`
/// from a log whose recovery under the run's roomy bound remembers
/// `settled_in_log` settled keys (the run's bound never forgets one). It must
/// remember exactly the newest `min(max, settled_in_log)` of them (replay
/// forgets the oldest first), then, taking `max + 1` fresh messages that
/// settle at once (a topic nobody subscribes to), exactly the newest `max`:
/// a retry of each of those is its duplicate, a retry of the first a new
/// message. The sweep's bound is never reached, so forgetting is judged
/// here. Ok(false): a bound refused a step (the probe does not apply).
pub fn dedup_bound_misbehaves(b: &mut Broker, max: usize, settled_in_log: usize, now: Time) -> Result<bool, String> {
    let remembered = b.stats().dedup_settled;
    if remembered != settled_in_log.min(max) {
        return Err(format!(
            "recovered with dedup_settled_max {max} from a log holding {settled_in_log} settled keys, the broker remembers {remembered}"
        ));
    }
    let req = RequestId(u64::MAX - 4);
    let publish = |n: usize| sagamq::PublishRequest {
        global_id: sagamq::GlobalId::lit("probe-dedup"),
        sub_id: sagamq::SubId::new(format!("{n}")).expect("a short SubID"),
        sender_id: sagamq::SenderId::lit("probe-client"),
        create_time: 0,
        topic: Topic::lit("sagamq.probe.dedup"),
        content: format!("probe {n}"),
    };
    let mut ids = Vec::new();
    for n in 0..=max {
        match side_step(
            b,
            now,
            BrokerInput::Publish {
                req,
                publish: publish(n),
            },
        )
        .0
        {
            Some(Reply::Published {
                msg_id,
                duplicate: false,
            }) => ids.push(msg_id),
            Some(Reply::Rejected(_)) => return Ok(false),
            r => {
                return Err(format!(
                    "a fresh publish to a topic nobody subscribes to was answered {r:?}"
                ));
            }
        }
    }
    let remembered = b.stats().dedup_settled;
    if remembered != max {
        return Err(format!(
            "after {} messages settled at once, the broker remembers {remembered} settled keys; its bound is {max}",
            max + 1
        ));
    }
    // Newest first: a duplicate changes nothing, the forgotten one is stored again.
    for n in (0..=max).rev() {
        let r = side_step(
            b,
            now,
            BrokerInput::Publish {
                req,
                publish: publish(n),
            },
        )
        .0;
        let expected_dup = n > 0;
        match r {
            Some(Reply::Published { msg_id, duplicate }) if duplicate == expected_dup => {
                if duplicate && msg_id != ids[n] {
                    return Err(format!(
                        "a retry of settled key {n} was answered as {msg_id}, stored as {}",
                        ids[n]
                    ));
                }
            }
            Some(Reply::Rejected(_)) => return Ok(false),
            r => {
                let what = if expected_dup {
                    "one of the newest settled keys, within the bound"
                } else {
                    "the oldest settled key, beyond the bound"
                };
                return Err(format!(
                    "a retry of {what} (dedup_settled_max {max}) was answered {r:?}"
                ));
            }
        }
    }
    Ok(true)
}

/// The dead-letter probe (after the lifecycle probe, on the same recovered
/// broker): a probe client fails every attempt of one message until the
/// broker dead-letters it, which must take exactly `attempts_max` attempts
/// spaced by the backoff; the operator's redrive then moves it back, it goes
/// out again as attempt 1, and a 2xx settles it. The sweep's operator meets
/// few dead letters and the recovered broker none. Ok(false): a bound
/// refused a step (the probe does not apply).
pub fn dead_letter_misbehaves(b: &mut Broker, config: &BrokerConfig, now: Time) -> Result<bool, String> {
    let mut now = now;
    let client = ClientId::lit("probe-dead-letters");
    let topic = Topic::lit("sagamq.probe.dead");
    let req = RequestId(u64::MAX - 3);
    let subscribe = sagamq::SubscribeRequest {
        client_id: client.clone(),
        topic: topic.clone(),
        notify_url: "sim://probe".to_string(),
        expire_time: Time(now.0 + 3_600_000_000_000),
    };
    let refused = |r: &Option<Reply>| matches!(r, Some(Reply::Rejected(_)));
    let (r, _) = side_step(b, now, BrokerInput::Subscribe { req, subscribe });
    if refused(&r) {
        return Ok(false);
    }
    let publish = sagamq::PublishRequest {
        global_id: sagamq::GlobalId::lit("probe-dead"),
        sub_id: sagamq::SubId::lit("1"),
        sender_id: sagamq::SenderId::lit("probe-client"),
        create_time: 0,
        topic: topic.clone(),
        content: "probe".to_string(),
    };
    let (r, mut callbacks) = side_step(b, now, BrokerInput::Publish { req, publish });
    if refused(&r) {
        return Ok(false);
    }
    let dead = |b: &Broker| b.stats().subscribers.get(&client).map_or(0, |st| st.dead_letters);
    let max = config.attempts_max;
    let mut attempts = 0;
    while dead(b) == 0 {
        let Some(cb) = callbacks.iter().find(|cb| cb.client == client).cloned() else {
            // Backing off: the next attempt is due after at most the cap.
            now = now.plus(config.retry_backoff_max);
            b.handle_timeout(now);
            callbacks = side_step(b, now, BrokerInput::Durable { lsn: Lsn(0) }).1;
            if callbacks.iter().all(|cb| cb.client != client) {
                return Err(format!(
                    "{client}'s message, failed {attempts} times, is neither retried nor dead-lettered"
                ));
            }
            continue;
        };
        attempts += 1;
        if cb.attempt != attempts {
            return Err(format!(
                "{client} got attempt number {} for its attempt {attempts}",
                cb.attempt
            ));
        }
        let failed = sagamq::broker::CallbackResult::Failed;
        callbacks = side_step(
            b,
            now,
            BrokerInput::CallbackResult {
                delivery: cb.delivery,
                result: failed,
            },
        )
        .1;
        if attempts > max {
            return Err(format!(
                "{client}'s message failed {attempts} attempts and is still not a dead letter (budget {max})"
            ));
        }
    }
    if attempts != max {
        return Err(format!(
            "{client}'s message became a dead letter after {attempts} failed attempts; the budget is {max}"
        ));
    }
    let (r, callbacks) = side_step(
        b,
        now,
        BrokerInput::Redrive {
            req,
            client: client.clone(),
        },
    );
    match r {
        Some(Reply::Redriven { count: 1 }) => {}
        // Its queue is empty: only the unsynced bound may refuse.
        Some(Reply::Rejected(sagamq::broker::BrokerError::TooManyUnsyncedPublishes)) => return Ok(false),
        r => {
            return Err(format!(
                "a redrive of {client}'s one dead letter, with room in its queue, was answered {r:?}"
            ));
        }
    }
    let Some(cb) = callbacks.iter().find(|cb| cb.client == client) else {
        return Err(format!("{client}'s redriven message was not sent again"));
    };
    if cb.attempt != 1 {
        return Err(format!(
            "{client}'s redriven message went out as attempt {}, not 1",
            cb.attempt
        ));
    }
    let delivered = sagamq::broker::CallbackResult::Delivered;
    side_step(
        b,
        now,
        BrokerInput::CallbackResult {
            delivery: cb.delivery,
            result: delivered,
        },
    );
    let owed = b
        .stats()
        .subscribers
        .get(&client)
        .map_or(0, |st| st.pending + st.in_flight + st.dead_letters);
    if owed != 0 {
        return Err(format!(
            "{client} answered its redriven message 2xx, yet the broker still holds {owed} for it"
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BrokerConfig {
        BrokerConfig {
            attempts_max: 3,
            retry_backoff_initial: std::time::Duration::from_millis(20),
            retry_backoff_max: std::time::Duration::from_millis(500),
            ..BrokerConfig::default()
        }
    }

    #[test]
    fn the_shipped_broker_passes_both_probes() {
        let mut b = Broker::new(config(), 7);
        let now = Time::from_millis(1_000);
        assert_eq!(unsubscribe_misbehaves(&mut b, now), Ok(true));
        assert_eq!(dead_letter_misbehaves(&mut b, &config(), now), Ok(true));
    }

    #[test]
    fn a_budget_other_than_the_documented_one_fails_the_dead_letter_probe() {
        // The broker dead-letters after its own 3 attempts; told the budget
        // is 5, the probe names the difference (as it would for a broker
        // that miscounts its budget).
        let mut b = Broker::new(config(), 7);
        let told = BrokerConfig {
            attempts_max: 5,
            ..config()
        };
        let e = dead_letter_misbehaves(&mut b, &told, Time::from_millis(1_000)).expect_err("fires");
        assert!(e.contains("after 3 failed attempts; the budget is 5"), "{e}");
    }

    fn bounded(max: usize) -> Broker {
        let config = BrokerConfig {
            dedup_settled_max: max,
            ..config()
        };
        Broker::new(config, 7)
    }

    #[test]
    fn the_shipped_broker_forgets_the_oldest_settled_key_beyond_its_bound() {
        for max in [1, 3, 8] {
            let mut b = bounded(max);
            assert_eq!(
                dedup_bound_misbehaves(&mut b, max, 0, Time::from_millis(1_000)),
                Ok(true)
            );
        }
    }

    #[test]
    fn a_broker_keeping_other_than_its_bound_fails_the_dedup_bound_probe() {
        // A broker that keeps 4 settled keys, judged against a bound of 3 (as
        // a broker that miscounts its bound would be): it remembers one too many.
        let e = dedup_bound_misbehaves(&mut bounded(4), 3, 0, Time::from_millis(1_000)).expect_err("fires");
        assert!(e.contains("remembers 4 settled keys; its bound is 3"), "{e}");
        // One that forgot a key its log held.
        let e = dedup_bound_misbehaves(&mut bounded(3), 3, 2, Time::from_millis(1_000)).expect_err("fires");
        assert!(e.contains("holding 2 settled keys, the broker remembers 0"), "{e}");
    }

    #[test]
    fn a_broker_at_its_subscription_bound_makes_the_probe_inapplicable() {
        let mut b = Broker::new(
            BrokerConfig {
                subscriptions_max: 0,
                ..config()
            },
            7,
        );
        assert_eq!(unsubscribe_misbehaves(&mut b, Time::from_millis(1_000)), Ok(false));
    }
}

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

//! The host's own duties, with a minimal participant: subscriptions and
//! renewal, publish retries with backoff, named bounds, inbox eviction.

use super::*;
use crate::saga::{Command, CommandOutcome, Decision, OrderSpec, Outgoing};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Counts pings and answers each with a pong.
#[derive(Clone, Debug, Default)]
struct Echo {
    pings: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Pinged;

impl Participant for Echo {
    type Change = Pinged;

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::lit("ping")]
    }

    fn on_message(&self, _now: Time, m: &Message) -> Decision<Pinged> {
        let pong = Outgoing {
            topic: Topic::lit("pong"),
            global_id: m.global_id.clone(),
            sub_id: SubId::lit(&format!("{}.pong", m.sub_id)),
            content: "pong".to_string(),
        };
        Decision::change_and_publish(Pinged, pong)
    }

    fn apply(&mut self, _: &Pinged) {
        self.pings += 1;
    }
}

fn config() -> HostConfig {
    HostConfig::new(ClientId::lit("echo"), "test://echo")
}

fn ping(b: &mut Bench<Echo>, id: &str) -> Message {
    b.message("ping", id, "ping", "ping")
}

fn subscribes(outs: &[ParticipantOutput]) -> Vec<(String, Time)> {
    outs.iter()
        .filter_map(|o| match o {
            ParticipantOutput::Subscribe(s) => Some((s.topic.to_string(), s.expire_time)),
            _ => None,
        })
        .collect()
}

#[test]
fn subscribes_at_start_and_renews_at_half_the_ttl() {
    let mut b = Bench::with_config(Echo::default(), config());
    assert_eq!(b.host.poll_timeout(), Some(Time::ZERO));
    b.at_ms(7);
    let outs = b.tick();
    assert_eq!(subscribes(&outs), vec![("ping".to_string(), Time::from_millis(60_007))]);
    // Unconfirmed: asked again after subscribe_retry.
    assert_eq!(b.host.poll_timeout(), Some(Time::from_millis(1_007)));
    b.at_ms(1_007);
    assert_eq!(subscribes(&b.tick()).len(), 1);
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit("ping"),
    });
    assert!(b.host.subscribed());
    // Confirmed: renewed at half the TTL after the request that was confirmed.
    assert_eq!(b.host.poll_timeout(), Some(Time::from_millis(31_007)));
    b.at_ms(31_007);
    assert_eq!(
        subscribes(&b.tick()),
        vec![("ping".to_string(), Time::from_millis(91_007))]
    );
}

#[test]
fn unacknowledged_publish_is_retried_with_growing_backoff_until_acked() {
    let mut c = config();
    c.subscription_ttl = Duration::from_secs(3600); // keep renewals out of the way
    let mut b = Bench::with_config(Echo::default(), c);
    b.tick();
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit("ping"),
    });
    let m = ping(&mut b, "g1");
    b.deliver(&m);
    let first = publishes(&b.sync());
    assert_eq!(first.len(), 1);
    let mut gaps = Vec::new();
    let mut last = b.now;
    for _ in 0..8 {
        let at = b.host.poll_timeout().unwrap();
        b.now = at;
        let outs = b.tick();
        assert_eq!(publishes(&outs), first, "the same entry again");
        gaps.push(at.since(last));
        last = at;
    }
    assert!(gaps.windows(2).all(|w| w[0] <= w[1]), "backoff never shrinks: {gaps:?}");
    assert!(gaps[0] >= Duration::from_millis(200) && gaps[0] < Duration::from_millis(251));
    assert_eq!(
        *gaps.last().unwrap(),
        Duration::from_secs(10),
        "capped at publish_retry_max"
    );
    b.feed(ParticipantInput::PublishFailed { outbox: first[0].0 });
    b.feed(ParticipantInput::PublishAcked {
        outbox: first[0].0,
        msg_id: MsgId(1),
    });
    assert_eq!(b.host.outbox_len(), 0);
    assert!(
        b.host.poll_timeout().unwrap() > b.now.plus(Duration::from_secs(10)),
        "only the renewal is left"
    );
}

#[test]
fn full_outbox_answers_not_ok_and_refuses_nothing_silently() {
    let mut c = config();
    c.outbox_entries_max = 2;
    let mut b = Bench::with_config(Echo::default(), c);
    for id in ["g1", "g2"] {
        let m = ping(&mut b, id);
        b.deliver(&m);
    }
    b.sync();
    let m = ping(&mut b, "g3");
    let (token, outs) = b.deliver(&m);
    assert_eq!(answers(&outs), vec![(token, false)]);
    assert_eq!(persists(&outs), 0);
    let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(OrderSpec {
        order_id: "o".into(),
        customer_id: "c".into(),
        product_id: "p".into(),
        quantity: 1,
        price: 1,
    })));
    assert!(matches!(
        &outs[..],
        [ParticipantOutput::CommandDone { outcome: CommandOutcome::Refused(why), .. }] if why.contains("outbox_entries_max")
    ));
    // Once the broker acknowledges, there is room again.
    let acks: Vec<ParticipantOutput> = b
        .host
        .unacked()
        .map(|(outbox, p)| ParticipantOutput::Publish {
            outbox,
            publish: p.clone(),
        })
        .collect();
    b.ack_all(&acks);
    let (token, _) = b.deliver(&m);
    assert_eq!(answers(&b.sync()), vec![(token, true)]);
    assert_eq!(b.host.logic().pings, 3);
}

#[test]
fn unsynced_records_are_bounded() {
    let mut c = config();
    c.records_unsynced_max = 2;
    let mut b = Bench::with_config(Echo::default(), c);
    let mut oks = 0;
    for i in 0..4 {
        let m = ping(&mut b, &format!("g{i}"));
        let (_, outs) = b.deliver(&m);
        oks += persists(&outs);
        if i >= 2 {
            assert_eq!(answers(&outs).len(), 1);
            assert!(!answers(&outs)[0].1);
        }
    }
    assert_eq!(oks, 2);
}

#[test]
fn inbox_forgets_the_oldest_key_at_its_bound() {
    let mut c = config();
    c.inbox_keys_max = 2;
    let mut b = Bench::with_config(Echo::default(), c);
    let msgs: Vec<Message> = (0..3).map(|i| ping(&mut b, &format!("g{i}"))).collect();
    for m in &msgs {
        b.deliver(m);
    }
    b.sync();
    assert!(!b.host.consumed(&msgs[0].key()));
    assert!(b.host.consumed(&msgs[1].key()) && b.host.consumed(&msgs[2].key()));
    // Recovery replays the same window.
    b.crash(None);
    assert!(!b.host.consumed(&msgs[0].key()));
    assert!(b.host.consumed(&msgs[2].key()));
}

#[test]
fn a_participant_without_commands_refuses_them() {
    let mut b = Bench::with_config(Echo::default(), config());
    let outs = b.feed(ParticipantInput::Command(Command::CreateOrder(OrderSpec {
        order_id: "o".into(),
        customer_id: "c".into(),
        product_id: "p".into(),
        quantity: 1,
        price: 1,
    })));
    assert!(matches!(
        &outs[..],
        [ParticipantOutput::CommandDone {
            outcome: CommandOutcome::Refused(_),
            ..
        }]
    ));
}

#[test]
#[should_panic(expected = "Durable { lsn: 5 } for a record never written")]
fn durable_for_an_unwritten_record_is_a_driver_bug() {
    let mut b = Bench::with_config(Echo::default(), config());
    b.feed(ParticipantInput::Durable {
        lsn: crate::broker::Lsn(5),
    });
}

#[test]
fn a_replay_resumed_on_a_longer_log_recovers_what_one_recovery_does() {
    use crate::saga::Replay;
    let mut b = Bench::with_config(Echo::default(), config());
    b.tick();
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit("ping"),
    });
    let mut images = Vec::new();
    for id in ["g1", "g2", "g3"] {
        let m = ping(&mut b, id);
        b.deliver(&m);
        let outs = b.sync();
        b.ack_all(&outs);
        b.sync();
        images.push(b.disk.read_all());
    }
    let whole = images.last().unwrap();
    let (once, once_report) = ParticipantHost::recover(Echo::default(), config(), whole).unwrap();
    let mut replay = Replay::new(Echo::default(), config());
    for image in &images {
        replay.feed(image).unwrap();
        assert!(replay.end() > 0 && whole.starts_with(&image[..replay.end() as usize]));
    }
    let (resumed, resumed_report) = replay.finish();
    assert_eq!(resumed_report, once_report);
    assert_eq!(format!("{resumed:?}"), format!("{once:?}"));
    assert_eq!(resumed_report.records, 6, "three effects, three acks");
    let consumed = ["g1", "g2", "g3"].map(|id| resumed.consumed(&ping(&mut b, id).key()));
    assert_eq!(consumed, [true; 3]);
}

/// A replay resumed on an image with a torn tail, then on one where the
/// tail is cut off and the log goes on, judges each as one recovery does.
#[test]
fn a_resumed_replay_judges_a_torn_tail_as_one_recovery_does() {
    use crate::saga::Replay;
    let mut b = Bench::with_config(Echo::default(), config());
    b.tick();
    b.feed(ParticipantInput::Subscribed {
        topic: Topic::lit("ping"),
    });
    let mut replay = Replay::new(Echo::default(), config());
    let m = ping(&mut b, "g1");
    b.deliver(&m);
    let outs = b.sync();
    b.ack_all(&outs);
    b.sync();
    let first = b.disk.read_all();
    replay.feed(&first).unwrap();
    let mut torn = first.clone();
    torn.extend_from_slice(&[9, 0, 0]);
    let mut again = replay.clone();
    again.feed(&torn).unwrap();
    let (_, torn_report) = again.finish();
    let (_, once_torn) = ParticipantHost::recover(Echo::default(), config(), &torn).unwrap();
    assert_eq!(torn_report, once_torn);
    assert!(torn_report.torn_bytes > 0);
    let m = ping(&mut b, "g2");
    b.deliver(&m);
    let outs = b.sync();
    b.ack_all(&outs);
    b.sync();
    let longer = b.disk.read_all();
    replay.feed(&longer).unwrap();
    let (resumed, report) = replay.finish();
    let (once, once_report) = ParticipantHost::recover(Echo::default(), config(), &longer).unwrap();
    assert_eq!(report, once_report);
    assert_eq!(format!("{resumed:?}"), format!("{once:?}"));
}

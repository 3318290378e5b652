//! The stats audit of a participant host: the counters it reports
//! ([`HostStats`], what an operator reads and a report prints) and the levels
//! its bounds judge ([`HostGauges`]) against a recount of what the world
//! handed it and took from it since its last boot.
//!
//! **Invariant:** every counter and gauge is recounted from the host's inputs
//! and outputs alone (its records by their type and lsn, its answers by their
//! verdict, its publish attempts by outbox id, the durability reports it was
//! given), never from the counter itself, so a miscount fails the audit
//! however the rest of the run goes. (A host that miscounts what waits for
//! durability refuses work it has room for, or takes in more than its bound.)

use sagamq::Time;
use sagamq::saga::{CommandOutcome, HostGauges, HostStats, ParticipantInput, ParticipantOutput};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a host took in and put out since it booted.
#[derive(Clone, Debug, Default)]
pub struct HostTally {
    publishes: u64,
    /// Per outbox id published since boot: its attempts and the host's clock
    /// at the last one (every attempt after an id's first is a retry).
    attempts: BTreeMap<u64, (u32, Time)>,
    /// The host's publish retry schedule (initial wait, cap), when known.
    schedule: Option<(Duration, Duration)>,
    /// A retry that left before its backoff floor, not yet reported.
    early: Option<String>,
    /// Retries judged since `take_judged` last asked.
    judged: u64,
    failures: u64,
    /// Deliveries of a key the host had already consumed.
    redeliveries: u64,
    /// Answers not-ok and refused commands.
    refused: u64,
    /// `Effect` and `Acked` records written.
    effects: u64,
    acks: u64,
    /// Deliveries and commands handed in, answers and command results given
    /// out: the difference is what waits for durability (an answer given at
    /// once leaves in the step that took it in).
    taken: u64,
    given: u64,
    /// The lsns of the first and last record written since boot, and the
    /// last one reported durable.
    persisted: Option<(u64, u64)>,
    durable: u64,
}

impl HostTally {
    /// The tally of a host just booted, whose publishes retry after `initial`,
    /// doubling up to `max` (None: not judged).
    pub fn new(schedule: Option<(Duration, Duration)>) -> HostTally {
        HostTally {
            schedule,
            ..HostTally::default()
        }
    }
    /// A message about to be delivered to the host; `consumed`: whether the
    /// host had already consumed its key (a redelivery).
    pub fn delivered(&mut self, consumed: bool) {
        self.redeliveries += u64::from(consumed);
        self.taken += 1;
    }

    /// A command about to be handed to the host.
    pub fn commanded(&mut self) {
        self.taken += 1;
    }

    /// The host is about to be told that every record up to `lsn` is durable.
    pub fn durable(&mut self, lsn: u64) {
        self.durable = self.durable.max(lsn);
    }

    /// A publish reply about to be handed to the host.
    pub fn replied(&mut self, input: &ParticipantInput) {
        if let ParticipantInput::PublishFailed { .. } = input {
            self.failures += 1;
        }
    }

    /// An output the host produced.
    pub fn output(&mut self, out: &ParticipantOutput, now: Time) {
        match out {
            ParticipantOutput::Persist { frames, lsn } => {
                self.persisted = Some(self.persisted.map_or((lsn.0, lsn.0), |(first, _)| (first, lsn.0)));
                let payload = frames.get(sagamq::log::FRAME_HEADER_LEN..).unwrap_or_default();
                if payload.starts_with(b"{\"Effect\"") {
                    self.effects += 1;
                } else if payload.starts_with(b"{\"Acked\"") {
                    self.acks += 1;
                }
            }
            ParticipantOutput::Publish { outbox, .. } => {
                self.publishes += 1;
                let (n, last) = self.attempts.get(&outbox.0).copied().unwrap_or((0, now));
                self.attempts.insert(outbox.0, (n + 1, now));
                if n > 0 {
                    self.retried(outbox.0, n, now.as_nanos().saturating_sub(last.as_nanos()));
                }
            }
            ParticipantOutput::Answer { ok, .. } => {
                self.given += 1;
                self.refused += u64::from(!ok);
            }
            ParticipantOutput::CommandDone { outcome, .. } => {
                self.given += 1;
                self.refused += u64::from(matches!(outcome, CommandOutcome::Refused(_)));
            }
            _ => {}
        }
    }

    /// Attempt `n + 1` of outbox entry `id`, `waited_ns` after attempt `n`
    /// on the host's clock: no sooner than the documented floor (the initial
    /// wait doubled per attempt, capped). (Its jitter is not judged: which
    /// retries happen at all depends on when acks come back, so the waits
    /// seen are a biased sample; a 12-retry "no jitter at all" test fired on
    /// the shipped host at `saga:2000`, where acks take about the first wait.)
    fn retried(&mut self, id: u64, n: u32, waited_ns: u64) {
        let Some((initial, max)) = self.schedule else { return };
        self.judged += 1;
        let floor = initial.saturating_mul(1u32 << n.saturating_sub(1).min(20)).min(max);
        let floor_ns = u64::try_from(floor.as_nanos()).unwrap_or(u64::MAX);
        if waited_ns < floor_ns && self.early.is_none() {
            self.early = Some(format!(
                "outbox entry {id} was published again {waited_ns} ns after its attempt {n}, before the backoff floor {floor:?}"
            ));
        }
    }

    /// The first retry that left before its floor, since the last call
    /// (the checker keeps one violation per invariant).
    pub fn retry_violation(&mut self) -> Option<String> {
        self.early.take()
    }

    /// Retries judged since the last call (the sweep's coverage).
    pub fn take_judged(&mut self) -> u64 {
        std::mem::take(&mut self.judged)
    }

    /// Records written since boot and not yet reported durable (a host boots
    /// with every record durable).
    fn unsynced(&self) -> u64 {
        self.persisted
            .map_or(0, |(first, last)| last - self.durable.max(first - 1).min(last))
    }

    /// None when `stats` matches the recount; else what differs.
    pub fn audit(&self, stats: &HostStats, gauges: &HostGauges) -> Option<String> {
        let retries = self.publishes - self.attempts.len() as u64;
        let pairs = [
            (
                "answers_waiting",
                gauges.answers_waiting as u64,
                self.taken.wrapping_sub(self.given),
            ),
            ("records_unsynced", gauges.records_unsynced, self.unsynced()),
            ("effects", stats.effects, self.effects),
            ("acks", stats.acks, self.acks),
            ("publishes", stats.publishes, self.publishes),
            ("publish_retries", stats.publish_retries, retries),
            ("publish_failures", stats.publish_failures, self.failures),
            ("redeliveries", stats.redeliveries, self.redeliveries),
            ("refused", stats.refused, self.refused),
        ];
        let wrong: Vec<String> = pairs
            .iter()
            .filter(|(_, reported, recounted)| reported != recounted)
            .map(|(name, reported, recounted)| format!("{name} {reported} reported, {recounted} recounted"))
            .collect();
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamq::broker::Lsn;
    use sagamq::saga::{CallbackToken, OutboxId};
    use sagamq::{GlobalId, PublishRequest, SenderId, SubId, Topic};

    fn publish(outbox: u64) -> ParticipantOutput {
        ParticipantOutput::Publish {
            outbox: OutboxId(outbox),
            publish: PublishRequest {
                global_id: GlobalId::lit("o1"),
                sub_id: SubId::lit("s1"),
                sender_id: SenderId::lit("order-service"),
                create_time: 0,
                topic: Topic::lit("t"),
                content: "{}".into(),
            },
        }
    }

    #[test]
    fn the_recount_matches_and_each_miscount_fails() {
        let mut t = HostTally::default();
        for payload in [&br#"{"Effect":{}}"#[..], &br#"{"Acked":{"outbox":1}}"#[..]] {
            let mut frames = Vec::new();
            sagamq::log::encode_frame(payload, &mut frames);
            let lsn = Lsn(1 + t.persisted.map_or(0, |(_, last)| last));
            t.output(&ParticipantOutput::Persist { lsn, frames }, Time::ZERO);
        }
        t.output(&publish(1), Time::ZERO);
        t.output(&publish(1), Time::ZERO); // a retry (no schedule given: not judged)
        t.output(&publish(2), Time::ZERO);
        t.output(
            &ParticipantOutput::Answer {
                token: CallbackToken(1),
                ok: false,
            },
            Time::ZERO,
        );
        t.output(
            &ParticipantOutput::Answer {
                token: CallbackToken(2),
                ok: true,
            },
            Time::ZERO,
        );
        t.delivered(true);
        t.delivered(false);
        t.delivered(false); // not answered yet: its record waits for durability
        t.durable(1);
        t.replied(&ParticipantInput::PublishFailed { outbox: OutboxId(2) });
        let right = HostStats {
            effects: 1,
            acks: 1,
            publishes: 3,
            publish_retries: 1,
            publish_failures: 1,
            redeliveries: 1,
            refused: 1,
            ignored: 7, // not audited: a delivery or a command may be ignored
        };
        let gauges = HostGauges {
            answers_waiting: 1,
            records_unsynced: 1, // lsn 2 written, lsn 1 reported durable
        };
        assert_eq!(t.audit(&right, &gauges), None);
        for (name, wrong) in [
            (
                "answers_waiting",
                HostGauges {
                    answers_waiting: 0,
                    ..gauges
                },
            ),
            (
                "records_unsynced",
                HostGauges {
                    records_unsynced: 2,
                    ..gauges
                },
            ),
        ] {
            let d = t
                .audit(&right, &wrong)
                .unwrap_or_else(|| panic!("a wrong {name} passed"));
            assert!(d.starts_with(name), "{d}");
        }
        type Spoil = fn(&mut HostStats);
        let wrong: [(&str, Spoil); 7] = [
            ("effects", |s| s.effects += 1),
            ("acks", |s| s.acks = 0),
            ("publishes", |s| s.publishes -= 1),
            ("publish_retries", |s| s.publish_retries = 0),
            ("publish_failures", |s| s.publish_failures += 1),
            ("redeliveries", |s| s.redeliveries = 0),
            ("refused", |s| s.refused = 2),
        ];
        for (name, spoil) in wrong {
            let mut stats = right.clone();
            spoil(&mut stats);
            let d = t
                .audit(&stats, &gauges)
                .unwrap_or_else(|| panic!("a wrong {name} passed"));
            assert!(d.starts_with(name), "{d}");
        }
    }

    #[test]
    fn a_retry_before_its_backoff_floor_fails() {
        let ms = Duration::from_millis;
        let at = |ms: u64| Time::from_millis(ms);
        let schedule = Some((ms(100), ms(10_000)));
        // Attempt 2 waits at least 100 ms, attempt 3 at least 200 ms.
        let mut t = HostTally::new(schedule);
        t.output(&publish(1), at(0));
        t.output(&publish(1), at(110));
        assert_eq!(t.retry_violation(), None);
        t.output(&publish(1), at(300)); // 190 ms after attempt 2
        let e = t.retry_violation().expect("fires");
        assert!(e.contains("after its attempt 2, before the backoff floor 200ms"), "{e}");
    }
}

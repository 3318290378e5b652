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

use sagamq::saga::{CommandOutcome, HostGauges, HostStats, ParticipantInput, ParticipantOutput};
use std::collections::BTreeSet;

/// What a host took in and put out since it booted.
#[derive(Clone, Debug, Default)]
pub struct HostTally {
    publishes: u64,
    /// Outbox ids published since boot: every attempt after an id's first is a retry.
    outbox_ids: BTreeSet<u64>,
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
    pub fn output(&mut self, out: &ParticipantOutput) {
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
                self.outbox_ids.insert(outbox.0);
            }
            ParticipantOutput::Answer { .. } | ParticipantOutput::CommandDone { .. } => {
                self.given += 1;
                if matches!(
                    out,
                    ParticipantOutput::Answer { ok: false, .. }
                        | ParticipantOutput::CommandDone {
                            outcome: CommandOutcome::Refused(_),
                            ..
                        }
                ) {
                    self.refused += 1;
                }
            }
            _ => {}
        }
    }

    /// Records written since boot and not yet reported durable (a host boots
    /// with every record durable).
    fn unsynced(&self) -> u64 {
        self.persisted
            .map_or(0, |(first, last)| last - self.durable.max(first - 1).min(last))
    }

    /// None when `stats` matches the recount; else what differs.
    pub fn audit(&self, stats: &HostStats, gauges: &HostGauges) -> Option<String> {
        let retries = self.publishes - self.outbox_ids.len() as u64;
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
            t.output(&ParticipantOutput::Persist { lsn, frames });
        }
        t.output(&publish(1));
        t.output(&publish(1)); // a retry
        t.output(&publish(2));
        t.output(&ParticipantOutput::Answer {
            token: CallbackToken(1),
            ok: false,
        });
        t.output(&ParticipantOutput::Answer {
            token: CallbackToken(2),
            ok: true,
        });
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
}

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
//!
//! **Invariant `host-bounds`:** judged on those recounts, a host takes a new
//! effect (a record of a delivery, a command or a deadline) only while every
//! level is below its bound (records not yet durable, answers waiting for
//! durability, outbox entries not yet acknowledged) and the effect's messages
//! fit the outbox; and it refuses work only when a bound says so: a command
//! refused for a bound names one that is reached, and a shipped participant
//! (whose logic never refuses a message) answers a delivery not-ok only when a
//! bound is reached or an effect's messages might not fit the outbox.

use sagamq::Time;
use sagamq::saga::{CommandOutcome, HostConfig, HostGauges, HostStats, ParticipantInput, ParticipantOutput};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::collections::BTreeMap;
use std::time::Duration;

/// The most messages one decision of a shipped participant publishes (the
/// order's cancellation: a stock release and a payment cancel). A delivery
/// refused while the outbox has fewer free places than this is justified.
const DECISION_PUBLISH_MAX: u64 = 2;

/// How late a retry may leave past its ceiling: a drifting node clock's
/// wake-up lands a few nanoseconds past its deadline (50 ns seen at saga
/// seed 6); a millisecond is far below any backoff the host promises.
const LATE_SLACK_NS: u64 = 1_000_000;

/// What a host was configured with at boot, as the tally judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTerms {
    /// The publish retry schedule: the initial wait, doubling up to the cap.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub outbox_entries_max: u64,
    pub records_unsynced_max: u64,
    pub answers_waiting_max: u64,
    /// Outbox entries the host recovered (it re-publishes them).
    pub outbox_at_boot: u64,
    /// Whether a not-ok answer to a delivery must be a bound's (shipped
    /// participants; a user's logic may refuse a message).
    pub judge_refused_answers: bool,
}

impl HostTerms {
    pub fn new(config: &HostConfig, outbox_at_boot: usize, judge_refused_answers: bool) -> HostTerms {
        HostTerms {
            retry_initial: config.publish_retry_initial,
            retry_max: config.publish_retry_max,
            outbox_entries_max: config.outbox_entries_max as u64,
            records_unsynced_max: config.records_unsynced_max,
            answers_waiting_max: config.answers_waiting_max as u64,
            outbox_at_boot: outbox_at_boot as u64,
            judge_refused_answers,
        }
    }
}

/// A host record as far as the tally reads it: its type, and an effect's
/// outbox entries.
#[derive(Deserialize)]
enum RecordShape {
    Effect { outbox: Vec<IgnoredAny> },
    Acked(IgnoredAny),
}

/// What a host took in and put out since it booted.
#[derive(Clone, Debug, Default)]
pub struct HostTally {
    publishes: u64,
    /// Per outbox id published since boot: its attempts, the host's clock
    /// at the last one (every attempt after an id's first is a retry), and
    /// whether the host ran without a pause since (its retry's lateness is
    /// then judged too).
    attempts: BTreeMap<u64, (u32, Time, bool)>,
    /// The host's configuration, when known (a planted flaw's host is not judged).
    terms: Option<HostTerms>,
    /// A retry that left before its backoff floor or after its ceiling,
    /// not yet reported.
    mistimed: Option<String>,
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
    /// Outbox entries recovered, written in effects and acknowledged since.
    outbox_written: u64,
    /// Whether the step under way took a delivery or a command in (its
    /// waiter is not yet one that waited before the step).
    taking: bool,
    /// A breach of a bound or a refusal without one, not yet reported.
    breach: Option<String>,
    /// Refusals judged justified by a reached bound since `take_at_bound`.
    at_bound: u64,
}

impl HostTally {
    /// The tally of a host just booted with `terms` (None: not judged).
    pub fn new(terms: Option<HostTerms>) -> HostTally {
        HostTally {
            terms,
            outbox_written: terms.map_or(0, |t| t.outbox_at_boot),
            ..HostTally::default()
        }
    }
    /// A message about to be delivered to the host; `consumed`: whether the
    /// host had already consumed its key (a redelivery).
    pub fn delivered(&mut self, consumed: bool) {
        self.redeliveries += u64::from(consumed);
        self.taken += 1;
        self.taking = true;
    }

    /// A command about to be handed to the host.
    pub fn commanded(&mut self) {
        self.taken += 1;
        self.taking = true;
    }

    /// The host's step is over and its outputs are all counted: what waits
    /// for durability is within its bound.
    pub fn step_done(&mut self) {
        self.taking = false;
        let waiting = self.taken.wrapping_sub(self.given);
        if let Some(t) = self.terms
            && waiting > t.answers_waiting_max
        {
            self.breach.get_or_insert(format!(
                "{waiting} answers wait for durability (answers_waiting_max {})",
                t.answers_waiting_max
            ));
        }
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
                let payload = frames.get(sagamq::log::FRAME_HEADER_LEN..).unwrap_or_default();
                match serde_json::from_slice::<RecordShape>(payload) {
                    Ok(RecordShape::Effect { outbox }) => {
                        self.effect_taken(lsn.0, outbox.len() as u64);
                        self.effects += 1;
                        self.outbox_written += outbox.len() as u64;
                    }
                    Ok(RecordShape::Acked(_)) => {
                        self.acks += 1;
                        self.outbox_written = self.outbox_written.wrapping_sub(1);
                    }
                    Err(_) => {} // a record the host's stats do not count
                }
                self.persisted = Some(self.persisted.map_or((lsn.0, lsn.0), |(first, _)| (first, lsn.0)));
            }
            ParticipantOutput::Publish { outbox, .. } => {
                self.publishes += 1;
                let (n, last, ran) = self.attempts.get(&outbox.0).copied().unwrap_or((0, now, true));
                self.attempts.insert(outbox.0, (n + 1, now, true));
                if n > 0 {
                    self.retried(outbox.0, n, now.as_nanos().saturating_sub(last.as_nanos()), ran);
                }
            }
            ParticipantOutput::Answer { ok, .. } => {
                if !ok && self.terms.is_some_and(|t| t.judge_refused_answers) {
                    self.refusal_judged("a delivery answered not-ok", None);
                }
                self.given += 1;
                self.refused += u64::from(!ok);
            }
            ParticipantOutput::CommandDone { outcome, .. } => {
                if let CommandOutcome::Refused(why) = outcome
                    && why.contains("_max reached")
                {
                    self.refusal_judged(&format!("a command refused ({why})"), Some(why));
                }
                self.given += 1;
                self.refused += u64::from(matches!(outcome, CommandOutcome::Refused(_)));
            }
            _ => {}
        }
    }

    /// The levels before the output being counted: records not durable,
    /// answers that waited before this step, outbox entries not acknowledged.
    fn levels(&self) -> (u64, u64, u64) {
        let waiting = self
            .taken
            .wrapping_sub(self.given)
            .saturating_sub(u64::from(self.taking));
        (self.unsynced(), waiting, self.outbox_written)
    }

    /// An effect record `lsn` with `publishes` outbox entries: taken only
    /// below every bound, its messages fitting the outbox.
    fn effect_taken(&mut self, lsn: u64, publishes: u64) {
        let Some(t) = self.terms else { return };
        let (unsynced, waiting, outbox) = self.levels();
        let over = if unsynced >= t.records_unsynced_max {
            Some(format!(
                "{unsynced} records not yet durable (records_unsynced_max {})",
                t.records_unsynced_max
            ))
        } else if waiting >= t.answers_waiting_max {
            Some(format!(
                "{waiting} answers waiting (answers_waiting_max {})",
                t.answers_waiting_max
            ))
        } else if outbox + publishes.max(1) > t.outbox_entries_max {
            Some(format!(
                "{outbox} outbox entries and {publishes} more (outbox_entries_max {})",
                t.outbox_entries_max
            ))
        } else {
            None
        };
        if let Some(over) = over {
            self.breach
                .get_or_insert(format!("effect record {lsn} taken with {over}"));
        }
    }

    /// A refusal (`why`: the bound a command's refusal names): justified
    /// only by a reached bound.
    fn refusal_judged(&mut self, what: &str, why: Option<&str>) {
        let Some(t) = self.terms else { return };
        let (unsynced, waiting, outbox) = self.levels();
        let unsynced_full = unsynced >= t.records_unsynced_max;
        let waiting_full = waiting >= t.answers_waiting_max;
        let outbox_full = outbox + DECISION_PUBLISH_MAX > t.outbox_entries_max;
        let justified = match why {
            Some(w) if w.starts_with("records_unsynced_max") => unsynced_full,
            Some(w) if w.starts_with("answers_waiting_max") => waiting_full,
            Some(w) if w.starts_with("outbox_entries_max") => outbox_full,
            _ => unsynced_full || waiting_full || outbox_full,
        };
        if justified {
            self.at_bound += 1;
        } else {
            self.breach.get_or_insert(format!(
                "{what} with room: {unsynced} records not yet durable (max {}), {waiting} answers waiting (max {}), \
                 {outbox} outbox entries (max {})",
                t.records_unsynced_max, t.answers_waiting_max, t.outbox_entries_max
            ));
        }
    }

    /// The first breach of `host-bounds` since the last call.
    pub fn bounds_violation(&mut self) -> Option<String> {
        self.breach.take()
    }

    /// Refusals justified by a reached bound since the last call (coverage).
    pub fn take_at_bound(&mut self) -> u64 {
        std::mem::take(&mut self.at_bound)
    }

    /// Attempt `n + 1` of outbox entry `id`, `waited_ns` after attempt `n`
    /// on the host's clock: no sooner than the documented floor (the initial
    /// wait doubled per attempt, capped), and, when the host `ran` without a
    /// pause since, no later than the ceiling (the floor plus a quarter of
    /// jitter, capped). (The jitter within is not judged: which retries
    /// happen at all depends on when acks come back, so the waits seen are a
    /// biased sample; a 12-retry "no jitter at all" test fired on the shipped
    /// host at `saga:2000`, where acks take about the first wait.)
    fn retried(&mut self, id: u64, n: u32, waited_ns: u64, ran: bool) {
        let Some(HostTerms {
            retry_initial: initial,
            retry_max: max,
            ..
        }) = self.terms
        else {
            return;
        };
        self.judged += 1;
        let floor = initial.saturating_mul(1u32 << n.saturating_sub(1).min(20)).min(max);
        let ceiling = floor.saturating_add(floor / 4).min(max);
        let (floor_ns, ceiling_ns) = (floor.as_nanos() as u64, ceiling.as_nanos() as u64);
        if waited_ns < floor_ns && self.mistimed.is_none() {
            self.mistimed = Some(format!(
                "outbox entry {id} was published again {waited_ns} ns after its attempt {n}, before the backoff floor {floor:?}"
            ));
        }
        if ran && waited_ns > ceiling_ns + LATE_SLACK_NS && self.mistimed.is_none() {
            self.mistimed = Some(format!(
                "outbox entry {id} was published again {waited_ns} ns after its attempt {n}, after the backoff ceiling {ceiling:?}"
            ));
        }
    }

    /// The host was paused (its timers could not fire): the next retry of
    /// each entry is not judged late.
    pub fn paused(&mut self) {
        for (_, _, ran) in self.attempts.values_mut() {
            *ran = false;
        }
    }

    /// The first retry that left before its floor or after its ceiling, since the last call
    /// (the checker keeps one violation per invariant).
    pub fn retry_violation(&mut self) -> Option<String> {
        self.mistimed.take()
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
            ("outbox_entries", gauges.outbox_entries as u64, self.outbox_written),
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
    use sagamq::saga::{CallbackToken, Command, OutboxId};
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

    /// An effect record with `n` outbox entries, as the host writes it.
    fn effect(n: usize) -> Vec<u8> {
        let entries = vec![r#"{"id":1,"publish":{"GlobalID":"o1"}}"#; n].join(",");
        format!(r#"{{"Effect":{{"inbox":null,"change":null,"outbox":[{entries}]}}}}"#).into_bytes()
    }

    /// The host writes `payload` as its next record.
    fn persist(t: &mut HostTally, payload: Vec<u8>) {
        let mut frames = Vec::new();
        sagamq::log::encode_frame(&payload, &mut frames);
        let lsn = Lsn(1 + t.persisted.map_or(0, |(_, last)| last));
        t.output(&ParticipantOutput::Persist { lsn, frames }, Time::ZERO);
    }

    fn terms(unsynced: u64, waiting: u64, outbox: u64) -> Option<HostTerms> {
        Some(HostTerms {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            outbox_entries_max: outbox,
            records_unsynced_max: unsynced,
            answers_waiting_max: waiting,
            outbox_at_boot: 0,
            judge_refused_answers: true,
        })
    }

    /// A tally whose host retries after `initial_ms`, doubling up to `max_ms`.
    fn retrying(initial_ms: u64, max_ms: u64) -> HostTally {
        HostTally::new(terms(10, 10, 10).map(|t| HostTerms {
            retry_initial: Duration::from_millis(initial_ms),
            retry_max: Duration::from_millis(max_ms),
            ..t
        }))
    }

    fn not_ok() -> ParticipantOutput {
        ParticipantOutput::Answer {
            token: CallbackToken(1),
            ok: false,
        }
    }

    #[test]
    fn an_effect_past_a_bound_fails_host_bounds() {
        // Two records may wait for durability: a third effect breaks the bound.
        let mut t = HostTally::new(terms(2, 10, 10));
        for _ in 0..2 {
            t.commanded();
            persist(&mut t, effect(1));
            t.step_done();
        }
        assert_eq!(t.bounds_violation(), None);
        t.delivered(false);
        persist(&mut t, effect(1));
        let e = t.bounds_violation().expect("fires");
        assert!(e.contains("2 records not yet durable (records_unsynced_max 2)"), "{e}");
        // One answer may wait: the delivery that finds one waiting is refused,
        // and an effect taken for it breaks the bound.
        let mut t = HostTally::new(terms(10, 1, 10));
        t.delivered(false);
        persist(&mut t, effect(1));
        t.step_done();
        t.delivered(false);
        persist(&mut t, effect(1));
        let e = t.bounds_violation().expect("fires");
        assert!(e.contains("1 answers waiting (answers_waiting_max 1)"), "{e}");
        // Two outbox entries fit: an effect of two more does not.
        let mut t = HostTally::new(terms(10, 10, 3));
        persist(&mut t, effect(2));
        assert_eq!(t.bounds_violation(), None);
        persist(&mut t, effect(2));
        let e = t.bounds_violation().expect("fires");
        assert!(e.contains("2 outbox entries and 2 more (outbox_entries_max 3)"), "{e}");
    }

    #[test]
    fn a_refusal_is_judged_by_the_bound_it_needs() {
        // A delivery answered not-ok with room everywhere.
        let mut t = HostTally::new(terms(2, 2, 10));
        t.delivered(false);
        t.output(&not_ok(), Time::ZERO);
        let e = t.bounds_violation().expect("fires");
        assert!(e.starts_with("a delivery answered not-ok with room"), "{e}");
        assert_eq!(t.take_at_bound(), 0);
        // The same answer with two records not yet durable is backpressure.
        t.step_done();
        persist(&mut t, effect(0));
        persist(&mut t, effect(0));
        t.delivered(false);
        t.output(&not_ok(), Time::ZERO);
        assert_eq!(t.bounds_violation(), None);
        assert_eq!(t.take_at_bound(), 1);
        // A command refused for a bound other than the one reached.
        t.step_done();
        t.commanded();
        let refused = |why: &str| ParticipantOutput::CommandDone {
            command: Command::CreateOrder(sagamq::saga::OrderSpec {
                order_id: "o1".into(),
                customer_id: "c1".into(),
                product_id: "p1".into(),
                quantity: 1,
                price: 1,
            }),
            outcome: CommandOutcome::Refused(why.to_string()),
        };
        t.output(&refused("answers_waiting_max reached"), Time::ZERO);
        let e = t.bounds_violation().expect("fires");
        assert!(
            e.starts_with("a command refused (answers_waiting_max reached) with room"),
            "{e}"
        );
        t.output(&refused("records_unsynced_max reached"), Time::ZERO);
        assert_eq!(t.bounds_violation(), None);
        // A user's participant may refuse a message by its logic.
        let user = terms(2, 2, 10).map(|t| HostTerms {
            judge_refused_answers: false,
            ..t
        });
        let mut t = HostTally::new(user);
        t.delivered(false);
        t.output(&not_ok(), Time::ZERO);
        assert_eq!(t.bounds_violation(), None);
    }

    #[test]
    fn the_recount_matches_and_each_miscount_fails() {
        let mut t = HostTally::default();
        persist(&mut t, effect(2));
        persist(&mut t, br#"{"Acked":{"outbox":1}}"#.to_vec());
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
            outbox_entries: 1,   // two written, one acknowledged
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
            (
                "outbox_entries",
                HostGauges {
                    outbox_entries: 2,
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
        let at = Time::from_millis;
        // Attempt 2 waits at least 100 ms, attempt 3 at least 200 ms.
        let mut t = retrying(100, 10_000);
        t.output(&publish(1), at(0));
        t.output(&publish(1), at(110));
        assert_eq!(t.retry_violation(), None);
        t.output(&publish(1), at(300)); // 190 ms after attempt 2
        let e = t.retry_violation().expect("fires");
        assert!(e.contains("after its attempt 2, before the backoff floor 200ms"), "{e}");
    }

    #[test]
    fn a_retry_after_its_backoff_ceiling_fails_unless_the_host_was_paused() {
        let at = Time::from_millis;
        // Attempt 2 waits at most 125 ms; attempt 4's 400 ms is capped at 300.
        let mut t = retrying(100, 300);
        t.output(&publish(1), at(0));
        t.output(&publish(1), at(125));
        t.output(&publish(1), at(375)); // 250: attempt 2's wait, 200 ms plus jitter
        t.output(&publish(1), at(675)); // 300: the cap, no jitter beyond it
        assert_eq!(t.retry_violation(), None);
        t.output(&publish(1), at(977)); // 302 ms: past the cap and the 1 ms slack
        let e = t.retry_violation().expect("fires");
        assert!(
            e.contains("after its attempt 4, after the backoff ceiling 300ms"),
            "{e}"
        );
        t.paused();
        t.output(&publish(1), at(3_000));
        assert_eq!(t.retry_violation(), None);
        t.output(&publish(1), at(3_302));
        assert!(t.retry_violation().is_some());
    }
}

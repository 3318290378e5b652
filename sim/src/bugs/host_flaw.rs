//! Mistakes in *how* a participant is hosted: where its messages and answers
//! go relative to the durability of its effects, and what its inbox keys on.
//! Each is planted around the shipped [`ParticipantHost`] by rewriting what
//! crosses its boundary (outputs, `Persist` frames, callback keys), so the
//! business logic and the rest of the host are exactly the shipped ones.
//!
//! **Invariant:** with a flaw the wrapper changes only the one thing the flaw
//! names; everything else reaches the host and the driver unchanged.

use crate::participants::SimParticipant;
use crate::view::View;
use sagamq::log::{decode_frames, encode_frame};
use sagamq::machine::Machine;
use sagamq::saga::{CallbackToken, HostRecord, Participant, ParticipantHost, ParticipantInput, ParticipantOutput};
use sagamq::{SubId, Time};
use std::collections::{BTreeSet, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFlaw {
    /// Publishes each outbox entry as soon as its record is *written*, not once it is durable.
    PublishBeforeCommit,
    /// Leaves the outbox out of the durable record: the state change is durable,
    /// the messages it causes live only in memory until the broker acknowledges them.
    CommitWithoutOutbox,
    /// Answers every callback 2xx the moment it arrives, before its effect is durable.
    AckBeforeEffect,
    /// Keys the inbox on the delivery attempt instead of `(GlobalID, SubID)`, so
    /// no redelivery is ever recognised: in effect, no inbox.
    NoInbox,
    /// Reports the timeout it last handled as its next one (a timer wheel
    /// that never advances past a fired slot): the node wakes again at once,
    /// every time, with nothing to do.
    StaleTimer,
}

/// A shipped host with one [`HostFlaw`].
pub struct Flawed<P: Participant> {
    host: ParticipantHost<P>,
    flaw: HostFlaw,
    out: VecDeque<ParticipantOutput>,
    /// `AckBeforeEffect`: callbacks already answered; the host's own answer is
    /// swallowed. Bounded by the host's `answers_waiting_max` (each entry waits
    /// for the host's answer, which the host gives or refuses).
    answered: BTreeSet<CallbackToken>,
    /// `NoInbox`: deliveries seen by this incarnation (the key it wrongly dedups
    /// on), salted with the records it recovered so incarnations differ.
    deliveries: u64,
    salt: u64,
    /// `StaleTimer`: the last timeout handled.
    handled: Option<Time>,
}

impl<P: Participant> Flawed<P> {
    /// `records`: how many records the host recovered (0 on a fresh start).
    pub fn new(host: ParticipantHost<P>, flaw: HostFlaw, records: u64) -> Flawed<P> {
        Flawed {
            host,
            flaw,
            out: VecDeque::new(),
            answered: BTreeSet::new(),
            deliveries: 0,
            salt: records,
            handled: None,
        }
    }

    /// Moves the host's outputs to `out`, applying the flaw.
    fn pump(&mut self) {
        while let Some(o) = self.host.poll_output() {
            match (self.flaw, o) {
                (HostFlaw::PublishBeforeCommit, ParticipantOutput::Persist { lsn, frames }) => {
                    // The publish leaves with the write instead of after the sync.
                    // The host publishes again once durable; the broker dedups that.
                    let early = effect_outbox::<P>(&frames);
                    self.out.push_back(ParticipantOutput::Persist { lsn, frames });
                    for (outbox, publish) in early {
                        self.out.push_back(ParticipantOutput::Publish { outbox, publish });
                    }
                }
                (HostFlaw::CommitWithoutOutbox, ParticipantOutput::Persist { lsn, frames }) => {
                    let frames = without_outbox::<P>(&frames);
                    self.out.push_back(ParticipantOutput::Persist { lsn, frames });
                }
                (HostFlaw::AckBeforeEffect, ParticipantOutput::Answer { token, ok }) => {
                    if !self.answered.remove(&token) {
                        self.out.push_back(ParticipantOutput::Answer { token, ok });
                    }
                }
                (_, o) => self.out.push_back(o),
            }
        }
    }
}

/// The outbox entries of the `Effect` records in `frames`.
fn effect_outbox<P: Participant>(frames: &[u8]) -> Vec<(sagamq::saga::OutboxId, sagamq::PublishRequest)> {
    let Ok(recovered) = decode_frames(frames) else {
        return Vec::new();
    };
    recovered
        .records
        .iter()
        .filter_map(|(_, payload)| serde_json::from_slice::<HostRecord<P::Change>>(payload).ok())
        .flat_map(|r| match r {
            HostRecord::Effect { outbox, .. } => outbox.into_iter().map(|e| (e.id, e.publish)).collect(),
            HostRecord::Acked { .. } => Vec::new(),
        })
        .collect()
}

/// `frames` with every `Effect` record's outbox emptied (same records, same order).
fn without_outbox<P: Participant>(frames: &[u8]) -> Vec<u8> {
    let recovered = decode_frames(frames).expect("the host writes whole frames");
    let mut out = Vec::with_capacity(frames.len());
    for (_, payload) in &recovered.records {
        let record: HostRecord<P::Change> = serde_json::from_slice(payload).expect("the host's own record");
        let record = match record {
            HostRecord::Effect { inbox, change, .. } => HostRecord::Effect {
                inbox,
                change,
                outbox: Vec::new(),
            },
            acked @ HostRecord::Acked { .. } => acked,
        };
        encode_frame(&serde_json::to_vec(&record).expect("host records serialize"), &mut out);
    }
    out
}

impl<P: Participant> Machine for Flawed<P> {
    type Input = ParticipantInput;
    type Output = ParticipantOutput;

    fn handle(&mut self, now: Time, input: ParticipantInput) {
        match (self.flaw, input) {
            (HostFlaw::AckBeforeEffect, ParticipantInput::Deliver { token, message }) => {
                self.out.push_back(ParticipantOutput::Answer { token, ok: true });
                self.answered.insert(token);
                self.host.handle(now, ParticipantInput::Deliver { token, message });
            }
            (HostFlaw::NoInbox, ParticipantInput::Deliver { token, mut message }) => {
                self.deliveries += 1;
                // Order ids leave 32 bytes of room after the SubID; this suffix fits.
                message.sub_id = SubId::new(format!("{}#{}.{}", message.sub_id, self.salt, self.deliveries))
                    .expect("the suffix fits the SubID bound");
                self.host.handle(now, ParticipantInput::Deliver { token, message });
            }
            (_, input) => self.host.handle(now, input),
        }
        self.pump();
    }

    fn handle_timeout(&mut self, now: Time) {
        self.host.handle_timeout(now);
        if self.flaw == HostFlaw::StaleTimer {
            self.handled = Some(now);
        }
        self.pump();
    }

    fn poll_output(&mut self) -> Option<ParticipantOutput> {
        self.pump();
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        match (self.host.poll_timeout(), self.handled) {
            (Some(next), Some(stale)) => Some(next.min(stale)),
            (next, stale) => next.or(stale),
        }
    }
}

impl<P> SimParticipant for Flawed<P>
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    fn view(&self) -> View {
        self.host.view()
    }
    fn settled(&self) -> bool {
        self.host.settled()
    }
    fn ready(&self) -> bool {
        self.host.ready()
    }
    fn reflects(&self, message: &sagamq::Message) -> bool {
        self.host.reflects(message)
    }
    fn latest_timer(&self) -> Option<Time> {
        self.host.latest_timer()
    }
    fn outbox(&self) -> usize {
        self.host.outbox()
    }
}

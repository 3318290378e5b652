//! Your own participant in the simulator: implement [`sagamq::saga::Participant`]
//! (business logic only), state the invariant it must keep, and run it on its
//! own node beside the shipped services, under the same swarm faults (it is
//! crashed, partitioned, skewed; its callbacks are dropped, duplicated, delayed).
//!
//! See `sim/tests/custom_participant.rs` (and the README) for a complete example:
//! a shipping service that must ship every paid order exactly once; and
//! `user-crate/`, a crate of its own with a loyalty service, its final check
//! over the whole world, and its three realistic bugs, each caught.
//!
//! The node is shown by its client id (trace lanes, views, diagrams). A
//! failing seed of a custom configuration prints the command given to
//! [`crate::config::RunConfig::reproduce_with`] (the CLI cannot load your
//! participant), and [`crate::runner::explain_failure`] writes its trace,
//! diagram and shrunk plan.

use crate::participants::{Built, SimParticipant};
use crate::view::View;
use sagamq::machine::Machine;
use sagamq::saga::{HostConfig, Participant, ParticipantHost, ParticipantInput, ParticipantOutput};
use sagamq::{ClientId, Time};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

type Factory = dyn Fn(HostConfig, &[u8]) -> Built + Send + Sync;

/// The final views of a run, by node name (the custom node by its client id).
pub type Views = BTreeMap<String, View>;

type FinalCheck = dyn Fn(&View, &Views) -> Result<(), String> + Send + Sync;

/// A user's participant for the simulator's `custom` node.
#[derive(Clone)]
pub struct CustomNode {
    client_id: ClientId,
    factory: Arc<Factory>,
    final_check: Option<Arc<FinalCheck>>,
}

impl fmt::Debug for CustomNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomNode({})", self.client_id)
    }
}

impl CustomNode {
    /// `logic` is the participant as it starts (recovery replays its records on a
    /// copy); `invariant` judges its state whenever the checker runs: `Err` is a
    /// safety violation named `custom-invariant`.
    pub fn new<P>(client_id: &str, logic: P, invariant: fn(&P) -> Result<(), String>) -> CustomNode
    where
        P: Participant + Send + Sync,
    {
        let factory = move |config: HostConfig, image: &[u8]| -> Built {
            let (host, valid_len, records) = if image.is_empty() {
                (ParticipantHost::new(logic.clone(), config), 0, 0)
            } else {
                let (h, r) = ParticipantHost::recover(logic.clone(), config, image).map_err(|e| e.to_string())?;
                (h, r.valid_len, r.records)
            };
            Ok((
                Box::new(Checked {
                    host,
                    invariant,
                    now: Time::ZERO,
                }) as Box<dyn SimParticipant>,
                valid_len,
                records,
            ))
        };
        CustomNode {
            client_id: ClientId::lit(client_id),
            factory: Arc::new(factory),
            final_check: None,
        }
    }

    /// An invariant over the whole world, judged once at the end of a run that
    /// settled with no other violation: your participant's final state and
    /// every participant's final view (`views["order"]`, `views["stock"]`,
    /// `views["payment"]`, and yours under its client id). `Err` is a safety
    /// violation named `custom-final-invariant`. For example: "points were
    /// awarded for exactly the orders that completed". `P` must be the
    /// participant type given to [`CustomNode::new`].
    pub fn with_final_check<P: 'static>(mut self, check: fn(&P, &Views) -> Result<(), String>) -> CustomNode {
        let client = self.client_id.to_string();
        self.final_check = Some(Arc::new(move |mine: &View, views: &Views| {
            match mine.custom_state::<P>() {
                Some(state) => check(state, views),
                None => Err(format!(
                    "{client}: the final check expects a participant of type {}, which this node does not run",
                    std::any::type_name::<P>()
                )),
            }
        }));
        self
    }

    /// Runs the final check, if any, on the run's final views.
    pub(crate) fn judge_final(&self, views: &Views) -> Option<Result<(), String>> {
        let check = self.final_check.as_ref()?;
        Some(match views.get(self.client_id.as_str()) {
            // Named like a `custom-invariant` line: whose check it is, then why.
            Some(mine) => check(mine, views).map_err(|e| format!("{}: {e}", self.client_id)),
            None => Err(format!(
                "{}: no final view (the node was down at the end)",
                self.client_id
            )),
        })
    }

    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    pub(crate) fn build(&self, config: HostConfig, image: &[u8]) -> Built {
        (self.factory)(config, image)
    }
}

/// A hosted user participant with its invariant.
struct Checked<P: Participant> {
    host: ParticipantHost<P>,
    invariant: fn(&P) -> Result<(), String>,
    /// The latest time the node's clock showed it (the host's inputs and
    /// timers): a redelivery would arrive no earlier, so the `no-lost-effect`
    /// judgement decides it again at this time (see [`Checked::reflects`]).
    now: Time,
}

impl<P: Participant + Send> Machine for Checked<P> {
    type Input = ParticipantInput;
    type Output = ParticipantOutput;
    fn handle(&mut self, now: Time, input: ParticipantInput) {
        self.now = self.now.max(now);
        self.host.handle(now, input);
    }
    fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        self.host.handle_timeout(now);
    }
    fn poll_output(&mut self) -> Option<ParticipantOutput> {
        self.host.poll_output()
    }
    fn poll_timeout(&self) -> Option<Time> {
        self.host.poll_timeout()
    }
}

impl<P: Participant + Send + Sync> SimParticipant for Checked<P> {
    fn view(&self) -> View {
        View::Custom {
            client: self.host.config().client_id.to_string(),
            problem: (self.invariant)(self.host.logic()).err(),
            state: std::sync::Arc::new(self.host.logic().clone()),
        }
    }
    fn settled(&self) -> bool {
        self.host.outbox_len() == 0
    }
    fn ready(&self) -> bool {
        self.host.subscribed()
    }
    /// Remembered by the inbox, or a redelivery would decide nothing new: the
    /// `no-lost-effect` contract. The redelivery is decided at the latest
    /// time the node has seen (a real one arrives no earlier), so a decision
    /// that depends on `now` (a promotion that has ended, a window that has
    /// closed) is judged as a redelivery would meet it, not at a time that
    /// never comes again. (It was `Time::ZERO`, at which "award only before
    /// the promotion ends" awarded again and was blamed for a lost effect.)
    fn reflects(&self, message: &sagamq::Message) -> bool {
        self.host.consumed(&message.key())
            || crate::participants::decides_nothing_at(self.host.logic(), self.now, message)
    }
    fn outbox(&self) -> usize {
        self.host.outbox_len()
    }
    fn stats(&self) -> Option<&sagamq::saga::HostStats> {
        Some(self.host.stats())
    }
    fn gauges(&self) -> Option<sagamq::saga::HostGauges> {
        Some(self.host.gauges())
    }
    /// A user's logic may refuse a message: only a command refused for a
    /// bound is judged.
    fn terms(&self) -> Option<crate::audit::HostTerms> {
        let config = self.host.config();
        Some(crate::audit::HostTerms::new(config, self.host.outbox_len(), false))
    }
    fn consumed(&self, key: &sagamq::MessageKey) -> bool {
        self.host.consumed(key)
    }
}

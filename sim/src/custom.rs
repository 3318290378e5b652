//! Your own participant in the simulator: implement [`sagamq::saga::Participant`]
//! (business logic only), state the invariant it must keep, and run it on its
//! own node beside the shipped services, under the same swarm faults (it is
//! crashed, partitioned, skewed; its callbacks are dropped, duplicated, delayed).
//!
//! See `sim/tests/custom_participant.rs` (and the README) for a complete example:
//! a shipping service that must ship every paid order exactly once.

use crate::participants::{Built, SimParticipant};
use crate::view::View;
use sagamq::machine::Machine;
use sagamq::saga::{HostConfig, Participant, ParticipantHost, ParticipantInput, ParticipantOutput};
use sagamq::{ClientId, Time};
use std::fmt;
use std::sync::Arc;

type Factory = dyn Fn(HostConfig, &[u8]) -> Built + Send + Sync;

/// A user's participant for the simulator's `custom` node.
#[derive(Clone)]
pub struct CustomNode {
    client_id: ClientId,
    factory: Arc<Factory>,
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
                Box::new(Checked { host, invariant }) as Box<dyn SimParticipant>,
                valid_len,
                records,
            ))
        };
        CustomNode {
            client_id: ClientId::lit(client_id),
            factory: Arc::new(factory),
        }
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
}

impl<P: Participant + Send> Machine for Checked<P> {
    type Input = ParticipantInput;
    type Output = ParticipantOutput;
    fn handle(&mut self, now: Time, input: ParticipantInput) {
        self.host.handle(now, input);
    }
    fn handle_timeout(&mut self, now: Time) {
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
    /// Remembered by the inbox, or a decision that would change nothing now.
    fn reflects(&self, message: &sagamq::Message) -> bool {
        self.host.consumed(&message.key()) || crate::participants::decides_nothing(self.host.logic(), message)
    }
    fn outbox(&self) -> usize {
        self.host.outbox_len()
    }
}

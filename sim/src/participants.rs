//! Which participant implementation each simulated node runs: the shipped
//! participants, or a planted bug's variant (see `bugs`).

use crate::check::View;
use crate::world::RunConfig;
use sagamq::machine::Machine;
use sagamq::saga::{ParticipantInput, ParticipantOutput};
use sagamq::Time;

/// A participant as the world drives and the checker reads it.
pub trait SimParticipant: Machine<Input = ParticipantInput, Output = ParticipantOutput> + Send {
    /// The participant's state, for the invariant checker.
    fn view(&self) -> View;
    /// Nothing left to do: no unacknowledged outbox entry, no unanswered callback.
    fn settled(&self) -> bool;
}

/// Builds node `node`'s participant from its disk image.
/// Returns the participant, the valid log length and the record count.
pub fn build(
    node: usize,
    cfg: &RunConfig,
    image: &[u8],
    now: Time,
) -> Result<(Box<dyn SimParticipant>, u64, u64), String> {
    let _ = (node, cfg, image, now);
    todo!()
}

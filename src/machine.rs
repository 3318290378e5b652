//! The one call shape every sans-IO state machine in sagamq shares (broker,
//! participants): feed an input with `now`, drain outputs, ask for the next
//! deadline. Drivers own IO and time; machines own decisions.

use crate::types::Time;

pub trait Machine {
    type Input;
    type Output;

    /// Feeds one input that happened at `now`.
    fn handle(&mut self, now: Time, input: Self::Input);

    /// Tells the machine that time has reached `now`; it acts on every deadline
    /// that has passed (retries, callback timeouts, expiries, saga deadlines).
    fn handle_timeout(&mut self, now: Time);

    /// Drains the next output, in the order the machine decided them.
    fn poll_output(&mut self) -> Option<Self::Output>;

    /// The earliest time at which `handle_timeout` has work to do.
    fn poll_timeout(&self) -> Option<Time>;
}

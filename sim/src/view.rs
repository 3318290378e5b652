//! What the checker reads of each participant: its state as a [`View`]
//! (orders and their phases, stock levels and per-order effects, balances and
//! per-order effects, or a user's own state), taken at a point in time.

use std::collections::BTreeMap;

/// Where an order stands, as the checker needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderPhase {
    InProgress,
    /// `seed` scenario success: stock deducted, saga ends here.
    StockOutboundDone,
    StockOutboundFailed,
    Completed,
    Compensated,
}

/// A participant's state, read by the checker.
#[derive(Clone, Debug)]
pub enum View {
    Order {
        orders: BTreeMap<String, (OrderPhase, String)>,
    },
    Stock {
        initial: BTreeMap<String, u64>,
        level: BTreeMap<String, u64>,
        /// order -> what stock did for it (only orders with an effect).
        orders: BTreeMap<String, StockEffects>,
    },
    Payment {
        initial: BTreeMap<String, u64>,
        balance: BTreeMap<String, u64>,
        /// order -> what payment did for it (only orders with an effect).
        orders: BTreeMap<String, PaymentEffects>,
    },
    /// A user's participant: its own invariant's verdict and a copy of its state.
    Custom {
        client: String,
        problem: Option<String>,
        state: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    },
}

impl View {
    /// The state of a custom participant of type `P` (see [`crate::custom`]).
    pub fn custom_state<P: 'static>(&self) -> Option<&P> {
        match self {
            View::Custom { state, .. } => state.downcast_ref::<P>(),
            _ => None,
        }
    }
}

/// Units stock took from and gave back to the shelf for one order, summed over
/// every time it did so: a participant that applies an effect twice shows it
/// here (the shipped one cannot, by construction, and reports 0 or the quantity).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StockEffects {
    pub product: String,
    pub deducted: u64,
    pub restocked: u64,
}

impl StockEffects {
    pub fn held(&self) -> u64 {
        self.deducted.saturating_sub(self.restocked)
    }
}

/// Money payment took from and gave back to a customer for one order, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PaymentEffects {
    pub customer: String,
    pub charged: u64,
    pub refunded: u64,
}

impl PaymentEffects {
    pub fn held(&self) -> u64 {
        self.charged.saturating_sub(self.refunded)
    }
}

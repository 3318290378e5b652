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
        /// product -> units held by orders as the participant itself reports
        /// them (its `held` accessor, what its users read); None when it has
        /// no such report. Judged against the recount from `orders`.
        reported_held: Option<BTreeMap<String, u64>>,
    },
    Payment {
        initial: BTreeMap<String, u64>,
        balance: BTreeMap<String, u64>,
        /// order -> what payment did for it (only orders with an effect).
        orders: BTreeMap<String, PaymentEffects>,
        /// customer -> money held by orders as the participant reports it.
        reported_held: Option<BTreeMap<String, u64>>,
    },
    /// A user's participant: its own invariant's verdict and a copy of its state.
    Custom {
        client: String,
        problem: Option<String>,
        state: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    },
}

impl View {
    /// Where two views of the same participant differ (None: they agree; a
    /// custom participant's state is opaque and always agrees).
    pub fn differs(&self, other: &View) -> Option<String> {
        match (self, other) {
            (View::Order { orders: a }, View::Order { orders: b }) => {
                let id = a.keys().chain(b.keys()).find(|id| a.get(*id) != b.get(*id))?;
                Some(format!(
                    "order {id}: {} vs {}",
                    a.get(id).map_or("absent", |(_, st)| st.as_str()),
                    b.get(id).map_or("absent", |(_, st)| st.as_str())
                ))
            }
            (
                View::Stock {
                    level: la, orders: oa, ..
                },
                View::Stock {
                    level: lb, orders: ob, ..
                },
            ) => {
                if la != lb {
                    Some(format!("levels {la:?} vs {lb:?}"))
                } else {
                    let id = oa.keys().chain(ob.keys()).find(|id| oa.get(*id) != ob.get(*id))?;
                    Some(format!("effects of order {id}: {:?} vs {:?}", oa.get(id), ob.get(id)))
                }
            }
            (
                View::Payment {
                    balance: ba,
                    orders: oa,
                    ..
                },
                View::Payment {
                    balance: bb,
                    orders: ob,
                    ..
                },
            ) => {
                if ba != bb {
                    Some(format!("balances {ba:?} vs {bb:?}"))
                } else {
                    let id = oa.keys().chain(ob.keys()).find(|id| oa.get(*id) != ob.get(*id))?;
                    Some(format!("effects of order {id}: {:?} vs {:?}", oa.get(id), ob.get(id)))
                }
            }
            (View::Custom { .. }, View::Custom { .. }) => None,
            _ => Some("a different kind of participant".to_string()),
        }
    }

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

//! A loyalty service: awards points when an order is paid, takes them back
//! when its payment is cancelled, once per order. Business logic only: the
//! host (in the simulator, `testkit` or the real runtime) adds the inbox,
//! the outbox, durable records, subscriptions and retries.
//!
//! It listens to two messages of the shipped saga (see the README's message
//! catalogue): `sale-order.payment.result` (payment-service; `"1"` charged)
//! and `sale-order.payment.cancel` (order-service, when an order that asked
//! for payment times out). Both carry the order id as their `GlobalID`.
//!
//! [`Variant`] plants the three mistakes a participant author makes, one at a
//! time, so the tests can show each caught and then fixed.

use sagamq::saga::{Decision, Participant, topics};
use sagamq::{GlobalId, Message, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Points per paid order.
pub const POINTS: u64 = 10;

/// The service as written, or with one realistic bug.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// All three guards in place.
    #[default]
    Fixed,
    /// No idempotency guard: trusts the host's inbox to drop redeliveries,
    /// which it does only for the keys it still remembers, so a redelivered
    /// "paid" awards the order again.
    NoIdempotencyGuard,
    /// Credits the points but forgets to record that the order was awarded:
    /// the guard reads the record (so a redelivery awards again) and so does
    /// the cancel (which takes back nothing, thinking the order never earned any).
    ForgetsToRecord,
    /// No hanging guard: a cancel that arrives before the award is recorded
    /// (a null compensation, nothing to take back) but does not stop a later
    /// "paid" from awarding points to an order that was cancelled.
    NoHangingGuard,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Fixed,
        Variant::NoIdempotencyGuard,
        Variant::ForgetsToRecord,
        Variant::NoHangingGuard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Fixed => "fixed",
            Variant::NoIdempotencyGuard => "no-idempotency-guard",
            Variant::ForgetsToRecord => "forgets-to-record",
            Variant::NoHangingGuard => "no-hanging-guard",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Variant, String> {
        Variant::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| {
            format!("unknown variant {s:?}: one of fixed, no-idempotency-guard, forgets-to-record, no-hanging-guard")
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Loyalty {
    variant: Variant,
    /// Points each order holds (what its customer sees).
    pub points: BTreeMap<GlobalId, u64>,
    /// The record of orders awarded: the idempotency guard and the cancel read it.
    pub awarded: BTreeSet<GlobalId>,
    /// Orders whose payment was cancelled, before or after an award: the
    /// hanging guard reads it.
    pub cancelled: BTreeSet<GlobalId>,
    /// How many times each order was credited (the invariant: at most once).
    pub credits: BTreeMap<GlobalId, u32>,
}

/// The committed changes, replayed by `apply` live and after a crash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Award {
        order: GlobalId,
    },
    /// Takes back `points` (0: the order was never awarded, a null
    /// compensation, recorded so a late "paid" awards nothing).
    Revoke {
        order: GlobalId,
        points: u64,
    },
}

impl Loyalty {
    pub fn new() -> Loyalty {
        Loyalty::with_variant(Variant::Fixed)
    }

    pub fn with_variant(variant: Variant) -> Loyalty {
        Loyalty {
            variant,
            ..Loyalty::default()
        }
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Points order `order` holds.
    pub fn points_of(&self, order: &str) -> u64 {
        self.points
            .iter()
            .find(|(o, _)| o.as_str() == order)
            .map_or(0, |(_, p)| *p)
    }
}

impl Participant for Loyalty {
    type Change = Change;

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::lit(topics::PAYMENT_RESULT), Topic::lit(topics::PAYMENT_CANCEL)]
    }

    /// Decides only; the guards read state that `apply` recorded, never the
    /// inbox and never `now`.
    fn on_message(&self, _now: Time, m: &Message) -> Decision<Change> {
        let order = m.global_id.clone();
        match m.topic.as_str() {
            topics::PAYMENT_RESULT if m.content == "1" => {
                // Idempotency guard: once per order.
                if self.awarded.contains(&order) && self.variant != Variant::NoIdempotencyGuard {
                    return Decision::Ignore;
                }
                // Hanging guard: a cancel that came first wins.
                if self.cancelled.contains(&order) && self.variant != Variant::NoHangingGuard {
                    return Decision::Ignore;
                }
                Decision::change(Change::Award { order })
            }
            topics::PAYMENT_CANCEL => {
                if self.cancelled.contains(&order) && self.variant != Variant::NoIdempotencyGuard {
                    return Decision::Ignore;
                }
                // What to take back: what the record says the order earned.
                let points = if self.awarded.contains(&order) { POINTS } else { 0 };
                Decision::change(Change::Revoke { order, points })
            }
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Award { order } => {
                *self.points.entry(order.clone()).or_default() += POINTS;
                *self.credits.entry(order.clone()).or_default() += 1;
                if self.variant != Variant::ForgetsToRecord {
                    self.awarded.insert(order.clone());
                }
            }
            Change::Revoke { order, points } => {
                let held = self.points.entry(order.clone()).or_default();
                *held = held.saturating_sub(*points);
                self.cancelled.insert(order.clone());
            }
        }
    }
}

/// Its own invariant, judged whenever the simulator judges safety: every
/// order credited at most once.
pub fn once_per_order(l: &Loyalty) -> Result<(), String> {
    match l.credits.iter().find(|(_, n)| **n > 1) {
        Some((order, n)) => Err(format!("order {order} was credited {n} times")),
        None => Ok(()),
    }
}

//! A loyalty service: awards points when an order is paid, takes them back
//! when its payment is cancelled, once per order. Business logic only: the
//! host (in the simulator, `testkit` or the real runtime) adds the inbox,
//! the outbox, durable records, subscriptions and retries.
//!
//! `Loyalty::trusting()` is the same service with the bug the README warns
//! about: it trusts the host's inbox to drop redeliveries, which it does only
//! for the keys it still remembers.

use sagamq::saga::{Decision, Participant, topics};
use sagamq::{GlobalId, Message, Time, Topic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Points per paid order.
pub const POINTS: u64 = 10;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Account {
    /// Times points were awarded and taken back (each must stay at most 1).
    pub awarded: u32,
    pub revoked: u32,
}

impl Account {
    pub fn points(&self) -> u64 {
        if self.awarded > 0 && self.revoked == 0 {
            POINTS
        } else {
            0
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Loyalty {
    /// Off: the planted bug (no guard per order).
    guarded: bool,
    pub accounts: BTreeMap<GlobalId, Account>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Award {
        order: GlobalId,
    },
    /// Also recorded for a cancel that arrives before the payment result (a
    /// null compensation), so a late "paid" awards nothing.
    Revoke {
        order: GlobalId,
    },
}

impl Loyalty {
    pub fn new() -> Loyalty {
        Loyalty {
            guarded: true,
            accounts: BTreeMap::new(),
        }
    }

    pub fn trusting() -> Loyalty {
        Loyalty::default()
    }
}

impl Participant for Loyalty {
    type Change = Change;

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::lit(topics::PAYMENT_RESULT), Topic::lit(topics::PAYMENT_CANCEL)]
    }

    fn on_message(&self, _now: Time, m: &Message) -> Decision<Change> {
        let order = m.global_id.clone();
        let account = self.accounts.get(&order);
        let seen = |f: fn(&Account) -> u32| account.is_some_and(|a| f(a) > 0);
        match m.topic.as_str() {
            topics::PAYMENT_RESULT if m.content == "1" => {
                // The guard: once per order, and never after a cancel.
                if self.guarded && (seen(|a| a.awarded) || seen(|a| a.revoked)) {
                    return Decision::Ignore;
                }
                Decision::change(Change::Award { order })
            }
            topics::PAYMENT_CANCEL => {
                if self.guarded && seen(|a| a.revoked) {
                    return Decision::Ignore;
                }
                Decision::change(Change::Revoke { order })
            }
            _ => Decision::Ignore,
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Award { order } => self.accounts.entry(order.clone()).or_default().awarded += 1,
            Change::Revoke { order } => self.accounts.entry(order.clone()).or_default().revoked += 1,
        }
    }
}

/// Its own invariant: every award and every take-back at most once per order.
pub fn once_per_order(l: &Loyalty) -> Result<(), String> {
    match l.accounts.iter().find(|(_, a)| a.awarded > 1 || a.revoked > 1) {
        Some((order, a)) => Err(format!(
            "order {order} awarded {} times, taken back {} times",
            a.awarded, a.revoked
        )),
        None => Ok(()),
    }
}

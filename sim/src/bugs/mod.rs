//! Planted bugs: realistic participant (and broker-wiring) mistakes, selectable
//! with `--bug NAME`. They live here, never in the shipped participants, and the
//! test suite (`sim/tests/bugs.rs`) proves the simulator catches each one.
//!
//! Map: [`host_flaw`] (mistakes in hosting: publish/answer/outbox relative to
//! durability, the inbox key), [`ledger`] (stock and payment logic with one
//! guard left out), [`naive_stock`] (the Go seed's stock service). The broker
//! bugs are switches in the world's broker driver ([`broker_durable_early`],
//! [`broker_ignores_sync_error`]); the shipped broker has no such flag.
//!
//! **Invariant:** a bug changes only the node(s) it names; every other node
//! runs the shipped code, so a failure is the bug's.

pub mod host_flaw;
pub mod ledger;
pub mod naive_stock;

use crate::participants::SimParticipant;
use crate::topology::{ORDER, PAYMENT, STOCK};
use host_flaw::{Flawed, HostFlaw};
use ledger::{LedgerPayment, LedgerStock, StockGuards};
use sagamq::saga::order::Order;
use sagamq::saga::{HostConfig, Participant, ParticipantHost};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bug {
    NaiveStock,
    NoInbox,
    PublishBeforeCommit,
    CommitWithoutOutbox,
    AckBeforeEffect,
    NoNullCompensation,
    NoHangingGuard,
    NoDeadline,
    DoubleRelease,
    AckBeforeDurable,
    StrictRecovery,
    LenientRecovery,
    AckAfterFailedSync,
    StaleTimer,
}

impl Bug {
    pub const ALL: [Bug; 14] = [
        Bug::NaiveStock,
        Bug::NoInbox,
        Bug::PublishBeforeCommit,
        Bug::CommitWithoutOutbox,
        Bug::AckBeforeEffect,
        Bug::NoNullCompensation,
        Bug::NoHangingGuard,
        Bug::NoDeadline,
        Bug::DoubleRelease,
        Bug::AckBeforeDurable,
        Bug::StrictRecovery,
        Bug::LenientRecovery,
        Bug::AckAfterFailedSync,
        Bug::StaleTimer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::NaiveStock => "naive-stock",
            Bug::NoInbox => "no-inbox",
            Bug::PublishBeforeCommit => "publish-before-commit",
            Bug::CommitWithoutOutbox => "commit-without-outbox",
            Bug::AckBeforeEffect => "ack-before-effect",
            Bug::NoNullCompensation => "no-null-compensation",
            Bug::NoHangingGuard => "no-hanging-guard",
            Bug::NoDeadline => "no-deadline",
            Bug::DoubleRelease => "double-release",
            Bug::AckBeforeDurable => "ack-before-durable",
            Bug::StrictRecovery => "strict-recovery",
            Bug::LenientRecovery => "lenient-recovery",
            Bug::AckAfterFailedSync => "ack-after-failed-sync",
            Bug::StaleTimer => "stale-timer",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Bug::NaiveStock => {
                "stock as the Go seed wrote it: levels in memory only, no inbox, deducts, queues the reply in memory and answers 2xx at once; restocks on every release"
            }
            Bug::NoInbox => {
                "payment dedups on the delivery attempt instead of (GlobalID, SubID), i.e. has no inbox, and charges for every request it is handed"
            }
            Bug::PublishBeforeCommit => {
                "every participant publishes a decision when its record is written, before it is durable: a crash forgets a decision others act on"
            }
            Bug::CommitWithoutOutbox => {
                "every participant commits its state change durably but keeps the messages it causes in memory: a crash after the commit loses them"
            }
            Bug::AckBeforeEffect => {
                "every participant answers a callback 2xx on arrival, before its effect is durable: a crash loses an effect the broker will not redeliver"
            }
            Bug::NoNullCompensation => {
                "stock's release assumes the deduction happened: a release for an order it never deducted restocks the order's quantity"
            }
            Bug::NoHangingGuard => {
                "stock deducts for an order whose release it already handled (the request arrived after the cancel): a compensated order keeps stock"
            }
            Bug::NoDeadline => "order has no deadline: an order whose request or reply never arrives waits forever",
            Bug::DoubleRelease => {
                "stock keeps no per-order 'released' record and trusts its bounded inbox: a release redelivered after its key was evicted restocks twice"
            }
            Bug::AckBeforeDurable => {
                "broker driver reports each write durable as soon as it is written: publishes are acknowledged before a crash can no longer lose them"
            }
            Bug::StrictRecovery => {
                "participants refuse to start from a log whose last record is torn (a crash mid-write), treating it as corruption instead of truncating"
            }
            Bug::LenientRecovery => {
                "participants treat any damaged record as a torn tail and cut the log there (the version-1 habit): a flipped bit in the middle silently drops every acknowledged record after it"
            }
            Bug::AckAfterFailedSync => {
                "broker driver treats a failed fsync (EIO) as done and carries on: the publishes it flushed are acknowledged, though their bytes never reach the disk"
            }
            Bug::StaleTimer => {
                "every participant host reports the timeout it last handled as its next one: its node wakes again at once, every time, with nothing to do (a busy loop that burns a core)"
            }
        }
    }
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Bug {
    type Err = String;
    fn from_str(s: &str) -> Result<Bug, String> {
        Bug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown bug {s:?}; `sagamq-sim list-bugs` names them"))
    }
}

/// Whether the world's broker driver reports each write durable as it is written.
pub fn broker_durable_early(bug: Option<Bug>) -> bool {
    bug == Some(Bug::AckBeforeDurable)
}

/// Whether the world's broker driver carries on after a failed sync (instead
/// of the shipped fail-stop), reporting the write durable.
pub fn broker_ignores_sync_error(bug: Option<Bug>) -> bool {
    bug == Some(Bug::AckAfterFailedSync)
}

type Built = Result<(Box<dyn SimParticipant>, u64, u64), String>;

/// A shipped host around `logic`, recovered from `image` (empty: a fresh start),
/// with the valid log length and the number of records replayed.
fn recover<P: Participant>(
    logic: P,
    config: HostConfig,
    image: &[u8],
) -> Result<(ParticipantHost<P>, u64, u64), String> {
    if image.is_empty() {
        return Ok((ParticipantHost::new(logic, config), 0, 0));
    }
    let (host, report) = ParticipantHost::recover(logic, config, image).map_err(|e| e.to_string())?;
    Ok((host, report.valid_len, report.records))
}

fn boxed<P>(logic: P, config: HostConfig, image: &[u8]) -> Built
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    let (h, len, records) = recover(logic, config, image)?;
    Ok((Box::new(h), len, records))
}

fn flawed<P>(logic: P, flaw: HostFlaw, config: HostConfig, image: &[u8]) -> Built
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    let (h, len, records) = recover(logic, config, image)?;
    Ok((Box::new(Flawed::new(h, flaw, records)), len, records))
}

/// The shipped participant of `node`, with `flaw` in its host.
fn shipped_flawed(
    node: usize,
    def: &sagamq::saga::scenario::Scenario,
    flaw: HostFlaw,
    config: HostConfig,
    image: &[u8],
) -> Option<Built> {
    Some(match node {
        ORDER => flawed(def.order_participant(), flaw, config, image),
        STOCK => flawed(def.stock_participant(), flaw, config, image),
        PAYMENT => flawed(def.payment_participant(), flaw, config, image),
        _ => return None,
    })
}

fn ledger_stock(
    node: usize,
    def: &sagamq::saga::scenario::Scenario,
    guards: StockGuards,
    config: HostConfig,
    image: &[u8],
) -> Option<Built> {
    (node == STOCK).then(|| boxed(LedgerStock::new(def.stock.clone(), guards), config, image))
}

/// The participant a planted bug puts on `node`, or None when the bug leaves that node alone.
pub fn build(
    bug: Bug,
    node: usize,
    def: &sagamq::saga::scenario::Scenario,
    config: HostConfig,
    image: &[u8],
) -> Option<Built> {
    match bug {
        Bug::NaiveStock => (node == STOCK).then(|| {
            // Memory only: it never wrote anything, so it always starts from scratch.
            let stock = naive_stock::NaiveStock::new(def.stock.clone(), config);
            Ok((Box::new(stock) as Box<dyn SimParticipant>, 0, 0))
        }),
        Bug::NoInbox => (node == PAYMENT).then(|| {
            flawed(
                LedgerPayment::new(def.balances.clone()),
                HostFlaw::NoInbox,
                config,
                image,
            )
        }),
        Bug::PublishBeforeCommit => shipped_flawed(node, def, HostFlaw::PublishBeforeCommit, config, image),
        Bug::CommitWithoutOutbox => shipped_flawed(node, def, HostFlaw::CommitWithoutOutbox, config, image),
        Bug::AckBeforeEffect => shipped_flawed(node, def, HostFlaw::AckBeforeEffect, config, image),
        Bug::StaleTimer => shipped_flawed(node, def, HostFlaw::StaleTimer, config, image),
        Bug::NoNullCompensation => ledger_stock(
            node,
            def,
            StockGuards {
                null_compensation: false,
                ..StockGuards::ALL
            },
            config,
            image,
        ),
        Bug::NoHangingGuard => ledger_stock(
            node,
            def,
            StockGuards {
                hanging: false,
                ..StockGuards::ALL
            },
            config,
            image,
        ),
        Bug::DoubleRelease => ledger_stock(
            node,
            def,
            StockGuards {
                release_once: false,
                ..StockGuards::ALL
            },
            config,
            image,
        ),
        Bug::NoDeadline => (node == ORDER).then(|| boxed(Order::new(def.flow, None), config, image)),
        Bug::AckBeforeDurable | Bug::AckAfterFailedSync => None,
        Bug::LenientRecovery => match sagamq::log::decode_all(image) {
            Err(sagamq::log::LogError::CorruptMiddle { offset, .. }) if matches!(node, ORDER | STOCK | PAYMENT) => {
                let prefix = &image[..usize::try_from(offset).expect("an offset in the image")];
                let built = match node {
                    ORDER => boxed(def.order_participant(), config, prefix),
                    STOCK => boxed(def.stock_participant(), config, prefix),
                    _ => boxed(def.payment_participant(), config, prefix),
                };
                Some(built)
            }
            _ => None,
        },
        Bug::StrictRecovery => {
            let torn = !image.is_empty() && sagamq::log::decode_all(image).is_ok_and(|r| r.torn_bytes > 0);
            (torn && matches!(node, ORDER | STOCK | PAYMENT)).then(|| {
                Err("the log ends in an incomplete record; a strict reader refuses it as corruption".to_string())
            })
        }
    }
}

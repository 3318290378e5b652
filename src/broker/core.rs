//! The broker state machine. TODO(issue 2): implement.

use super::*;
use crate::log::LogError;
use crate::machine::Machine;
use std::collections::BTreeMap;

pub struct Broker {
    _config: BrokerConfig,
}

/// What recovery found in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: u64,
    /// The driver truncates the log to this length before appending.
    pub valid_len: u64,
    pub torn_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    pub pending: usize,
    pub in_flight: usize,
    pub dead_letters: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub messages_live: usize,
    pub subscriptions: usize,
    pub log_records: u64,
    pub log_bytes: u64,
    pub subscribers: BTreeMap<ClientId, SubscriberStats>,
}

impl Broker {
    /// A fresh broker with an empty log. `seed` drives retry jitter.
    pub fn new(config: BrokerConfig, seed: u64) -> Broker {
        let _ = seed;
        Broker { _config: config }
    }

    /// Rebuilds the whole state from a log image (the durable records alone).
    pub fn recover(config: BrokerConfig, seed: u64, image: &[u8]) -> Result<(Broker, RecoveryReport), LogError> {
        let _ = (config, seed, image);
        todo!()
    }

    pub fn stats(&self) -> BrokerStats {
        todo!()
    }

    pub fn dead_letters(&self, client: &ClientId) -> Vec<Message> {
        let _ = client;
        todo!()
    }
}

impl Machine for Broker {
    type Input = BrokerInput;
    type Output = BrokerOutput;

    fn handle(&mut self, now: Time, input: BrokerInput) {
        let _ = (now, input);
        todo!()
    }
    fn handle_timeout(&mut self, now: Time) {
        let _ = now;
        todo!()
    }
    fn poll_output(&mut self) -> Option<BrokerOutput> {
        todo!()
    }
    fn poll_timeout(&self) -> Option<Time> {
        todo!()
    }
}

//! The nodes of the simulated world and how they are named: indices, names,
//! client ids and callback URLs. Everything above (plans, participants, the
//! checker, the world) refers to nodes through this module.

use sagamq::ClientId;
use sagamq::saga::topics;

pub const BROKER: usize = 0;
pub const ORDER: usize = 1;
pub const STOCK: usize = 2;
pub const PAYMENT: usize = 3;
pub const WORKLOAD: usize = 4;
/// Runs the user's own participant when `RunConfig::custom` is set (see `custom`).
pub const CUSTOM: usize = 5;

/// The nodes of the world, by name. Index = position here.
pub const NODES: [&str; 6] = ["broker", "order", "stock", "payment", "workload", "custom"];

/// Nodes the swarm crashes, partitions and skews when no custom participant runs
/// (the workload models the outside world and never fails).
pub const FAULTY_NODES: [u8; 4] = [0, 1, 2, 3];

/// The client id node `node` subscribes and publishes as; `custom` is the
/// user's participant's id when one runs.
pub fn client_of(node: usize, custom: Option<&ClientId>) -> ClientId {
    match node {
        ORDER => ClientId::lit(topics::ORDER_SERVICE),
        STOCK => ClientId::lit(topics::STOCK_SERVICE),
        PAYMENT => ClientId::lit(topics::PAYMENT_SERVICE),
        CUSTOM => custom.cloned().unwrap_or_else(|| ClientId::lit(NODES[node])),
        _ => ClientId::lit(NODES[node]),
    }
}

/// How node `node` is named in traces, views and summaries: its entry of
/// [`NODES`], except the custom node, shown by its participant's client id when
/// one runs (the index, the URL and the madsim node keep `custom`).
pub fn display_name(node: usize, custom: Option<&ClientId>) -> String {
    match (node, custom) {
        (CUSTOM, Some(id)) => id.to_string(),
        _ => NODES[node].to_string(),
    }
}

/// The callback URL a participant subscribes with, and its inverse.
pub fn notify_url(node: usize) -> String {
    format!("sim://{}", NODES[node])
}

pub fn node_of_url(url: &str) -> Option<usize> {
    let name = url.strip_prefix("sim://")?;
    NODES.iter().position(|n| *n == name)
}

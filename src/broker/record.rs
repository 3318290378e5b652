//! The broker's durable records (the payloads inside log frames).

use serde::{Deserialize, Serialize};

/// TODO(issue 2): Published / Subscribed / Unsubscribed / Acked / DeadLettered /
/// Redriven / Snapshot records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerRecord {}

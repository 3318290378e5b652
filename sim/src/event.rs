//! The structured event stream of a traced run: every message sent (with the
//! fault the plan applied to it), every copy received, crashes, restarts,
//! partitions, the heal phase, and the invariant violations. The diagrams in
//! [`crate::diagram`] are drawn from it.
//!
//! **Invariant:** a disabled [`EventLog`] records nothing and formats nothing
//! (sweeps pay one branch per event); an enabled one is filled by the world at
//! the same points that write the canonical trace, so it is as deterministic as
//! the trace. A receive names its send by the message's sequence number, which
//! travels with the message across the simulated network.

use crate::wire::Wire;
use sagamq::broker::Reply;
use std::collections::BTreeMap;

/// The n-th message sent in the run (before faults), unique per run; also the
/// index the fault plan's message faults refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u32);

/// A node of the world, by index into [`crate::plan::NODES`].
pub type Node = usize;

/// One event at a simulated time (nanoseconds since the run started).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub t_ns: u64,
    pub what: What,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// The run's identity and its fault plan (first event).
    Plan {
        seed: u64,
        scenario: String,
        bug: Option<String>,
        /// The fault profile, as `FaultProfile`'s Display prints it.
        profile: String,
        /// Each planned fault, as `Fault`'s Display prints it.
        faults: Vec<String>,
        /// The client id of the user's participant on the custom node, if one ran.
        custom: Option<String>,
    },
    /// A message handed to the transport; `fate` is what the fault plan did to it.
    Send {
        seq: Seq,
        from: Node,
        to: Node,
        msg: MsgInfo,
        fate: Fate,
    },
    /// One copy of message `seq` reached `to` (a duplicated message is received twice).
    Recv {
        seq: Seq,
        from: Node,
        to: Node,
    },
    /// The subscriber received callback `seq` but answered 500 (`hang = false`)
    /// or never answered (`hang = true`), without processing it.
    CallbackFault {
        seq: Seq,
        node: Node,
        hang: bool,
    },
    Crash {
        node: Node,
        torn: bool,
    },
    Restart {
        node: Node,
    },
    /// Links cut (`b = None`: `a` isolated from every other service node).
    /// `id` pairs the start with its heal.
    PartitionStart {
        id: usize,
        a: Node,
        b: Option<Node>,
        text: String,
    },
    PartitionHeal {
        id: usize,
        a: Node,
        b: Option<Node>,
        text: String,
    },
    /// The chaos phase ended: faults off, links healed, crashed nodes restarted.
    HealPhase,
    /// Something an operator did (redrive dead letters).
    Note {
        node: Node,
        text: String,
    },
    /// An invariant violation, at the time the checker saw it; `first` marks
    /// the first one reported (the run's verdict).
    Violation {
        kind: &'static str,
        invariant: &'static str,
        detail: String,
        first: bool,
    },
}

/// What a message is, for people: the full text (the trace's wording), a
/// short label for an arrow, and the order (saga GlobalID) it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgInfo {
    pub kind: MsgKind,
    pub text: String,
    pub short: String,
    /// None for messages that belong to no saga (subscriptions).
    pub order: Option<String>,
}

/// The kind of a [`Wire`] message (the diagrams colour arrows by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgKind {
    Publish,
    PublishReply,
    Subscribe,
    SubscribeReply,
    Callback,
    CallbackAnswer,
    CreateOrder,
    OrderAnswer,
}

impl MsgKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MsgKind::Publish => "publish",
            MsgKind::PublishReply => "publish-reply",
            MsgKind::Subscribe => "subscribe",
            MsgKind::SubscribeReply => "subscribe-reply",
            MsgKind::Callback => "callback",
            MsgKind::CallbackAnswer => "callback-answer",
            MsgKind::CreateOrder => "create-order",
            MsgKind::OrderAnswer => "order-answer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Handed to the network, possibly held back and/or sent twice. The network
    /// may still lose it (a partitioned link, a crashed destination): then no
    /// [`What::Recv`] follows.
    Sent { delay_ms: u32, duplicated: bool },
    /// The plan dropped it before it left the sender.
    Dropped,
    /// The plan lost this callback answer (the subscriber had applied the callback).
    AnswerLost,
}

/// The recorder the world writes into. It also remembers which order each
/// request and delivery concerns, so replies and callback answers (which carry
/// only an id) are attributed to their saga.
#[derive(Debug, Default)]
pub struct EventLog {
    enabled: bool,
    events: Vec<Event>,
    /// (participant node, outbox id) -> GlobalID of its publish.
    publish_orders: BTreeMap<(Node, u64), String>,
    /// broker delivery id -> GlobalID of the callback.
    delivery_orders: BTreeMap<u64, String>,
}

impl EventLog {
    pub fn new(enabled: bool) -> EventLog {
        EventLog {
            enabled,
            ..EventLog::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records the event `what()` builds, only when enabled.
    pub fn push(&mut self, t_ns: u64, what: impl FnOnce() -> What) {
        if self.enabled {
            self.events.push(Event { t_ns, what: what() });
        }
    }

    pub fn send(&mut self, t_ns: u64, seq: Seq, from: Node, to: Node, wire: &Wire, fate: Fate) {
        if !self.enabled {
            return;
        }
        let msg = self.describe(from, to, wire);
        self.events.push(Event {
            t_ns,
            what: What::Send {
                seq,
                from,
                to,
                msg,
                fate,
            },
        });
    }

    pub fn recv(&mut self, t_ns: u64, seq: Seq, from: Node, to: Node) {
        self.push(t_ns, || What::Recv { seq, from, to });
    }

    pub fn into_events(self) -> Vec<Event> {
        self.events
    }

    fn describe(&mut self, from: Node, to: Node, wire: &Wire) -> MsgInfo {
        let (kind, short, order) = match wire {
            Wire::Publish { req, publish } => {
                let order = publish.global_id.to_string();
                self.publish_orders.insert((from, *req), order.clone());
                (MsgKind::Publish, format!("publish {}", publish.sub_id), Some(order))
            }
            Wire::PublishReply { req, reply } => {
                let short = match reply {
                    Reply::Published {
                        msg_id,
                        duplicate: false,
                    } => format!("published {msg_id}"),
                    Reply::Published {
                        msg_id,
                        duplicate: true,
                    } => format!("published {msg_id} (dup)"),
                    other => format!("publish failed: {}", reply_word(other)),
                };
                (
                    MsgKind::PublishReply,
                    short,
                    self.publish_orders.get(&(to, *req)).cloned(),
                )
            }
            Wire::Subscribe { subscribe } => (MsgKind::Subscribe, format!("subscribe {}", subscribe.topic), None),
            Wire::SubscribeReply { topic, reply } => {
                let short = match reply {
                    Reply::Subscribed { .. } => format!("subscribed {topic}"),
                    other => format!("subscribe {topic}: {}", reply_word(other)),
                };
                (MsgKind::SubscribeReply, short, None)
            }
            Wire::Callback { delivery, message } => {
                let order = message.global_id.to_string();
                self.delivery_orders.insert(delivery.0, order.clone());
                let short = format!("callback {} {}", message.msg_id, message.sub_id);
                (MsgKind::Callback, short, Some(order))
            }
            Wire::CallbackAnswer { delivery, ok } => {
                let short = format!("{} d{}", if *ok { "2xx" } else { "error" }, delivery.0);
                (
                    MsgKind::CallbackAnswer,
                    short,
                    self.delivery_orders.get(&delivery.0).cloned(),
                )
            }
            Wire::CreateOrder { spec } => (
                MsgKind::CreateOrder,
                format!("create-order {} qty={}", spec.order_id, spec.quantity),
                Some(spec.order_id.clone()),
            ),
            Wire::OrderAccepted { order_id, refused } => (
                MsgKind::OrderAnswer,
                format!("{} {order_id}", if refused.is_some() { "refused" } else { "accepted" }),
                Some(order_id.clone()),
            ),
        };
        MsgInfo {
            kind,
            text: wire.to_string(),
            short,
            order,
        }
    }
}

/// One word for a reply that is not the expected success.
fn reply_word(reply: &Reply) -> String {
    match reply {
        Reply::Published { .. } => "published".to_string(),
        Reply::Subscribed { .. } => "subscribed".to_string(),
        Reply::Unsubscribed => "unsubscribed".to_string(),
        Reply::Redriven { .. } => "redriven".to_string(),
        Reply::Rejected(e) => format!("rejected: {e}"),
    }
}

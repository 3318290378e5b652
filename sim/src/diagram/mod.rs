//! Sequence diagrams of a traced run, for people: an SVG with one lane per
//! node and simulated time running down the page ([`svg`]), and a Mermaid
//! `sequenceDiagram` that renders in Markdown viewers ([`mermaid`]).
//!
//! Both are pure functions of the run's [`Event`]s: the same events give the
//! same bytes. [`Model::build`] pairs every receive with its send (by the
//! message's sequence number), applies the `--order` filter and keeps the
//! global events (crashes, restarts, partitions, heal, violations).
//!
//! **Invariant:** every message copy that was received is one arrow, and every
//! message that was never received is one arrow ending in a cross; nothing is
//! drawn twice and nothing is dropped, except what the order filter excludes.

mod mermaid;
mod svg;
mod xml;

pub use mermaid::mermaid;
pub use svg::{html_page, svg};
pub use xml::escape as xml_escape;

use crate::event::{Event, Fate, MsgInfo, Node, Seq, What};
use crate::topology::{BROKER, CUSTOM, ORDER, PAYMENT, STOCK, WORKLOAD};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Lanes left to right: the client, then the saga's flow through the broker;
/// the `custom` node gets a lane (last) only in runs where it takes part.
pub const LANES: [Node; 6] = [WORKLOAD, ORDER, BROKER, STOCK, PAYMENT, CUSTOM];

/// What to draw.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only the messages of this saga (GlobalID / order id), plus global events.
    pub order: Option<String>,
    /// The command shown in the header; by default the `replay` command derived from the run.
    pub command: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiagramError {
    /// `--order` names no order of this run.
    UnknownOrder { order: String, known: Vec<String> },
}

impl fmt::Display for DiagramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiagramError::UnknownOrder { order, known } => {
                write!(f, "no message of this run concerns order {order:?}; orders: ")?;
                let shown: Vec<&str> = known.iter().take(20).map(String::as_str).collect();
                write!(f, "{}", shown.join(", "))?;
                if known.len() > shown.len() {
                    write!(f, ", ... ({} in all)", known.len())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for DiagramError {}

/// Every order (GlobalID) some message of the run concerns, sorted.
pub fn orders(events: &[Event]) -> Vec<String> {
    let set: BTreeSet<&String> = events
        .iter()
        .filter_map(|e| match &e.what {
            What::Send { msg, .. } => msg.order.as_ref(),
            _ => None,
        })
        .collect();
    set.into_iter().cloned().collect()
}

/// Why a message never arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// The fault plan dropped it at the sender.
    Dropped,
    /// The fault plan lost this callback answer.
    AnswerLost,
    /// It left the sender but no receive followed: a partitioned link, or the
    /// destination was down (or crashed before handling it).
    Network,
}

impl Loss {
    pub(crate) fn explain(self) -> &'static str {
        match self {
            Loss::Dropped => "dropped by the fault plan",
            Loss::AnswerLost => "callback answer lost by the fault plan",
            Loss::Network => "never received: link partitioned, or the destination was down",
        }
    }
    pub(crate) fn word(self) -> &'static str {
        match self {
            Loss::Dropped => "dropped",
            Loss::AnswerLost => "answer lost",
            Loss::Network => "lost",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Copy number `copy` (0 = first) arrived at `t_ns`.
    Received {
        t_ns: u64,
        copy: u32,
    },
    Lost(Loss),
}

/// One arrow: one received copy of a message, or one message never received.
#[derive(Clone, Debug)]
pub(crate) struct Arrow<'a> {
    pub seq: Seq,
    pub from: Node,
    pub to: Node,
    pub t_send: u64,
    pub msg: &'a MsgInfo,
    pub fate: Fate,
    pub end: End,
    /// The subscriber answered this callback 500 (`false`) or never (`true`), as a fault.
    pub callback_fault: Option<bool>,
}

impl Arrow<'_> {
    pub(crate) fn delay_ms(&self) -> u32 {
        match self.fate {
            Fate::Sent { delay_ms, .. } => delay_ms,
            Fate::Dropped | Fate::AnswerLost => 0,
        }
    }
    pub(crate) fn duplicated(&self) -> bool {
        matches!(self.fate, Fate::Sent { duplicated: true, .. })
    }
    pub(crate) fn copy(&self) -> u32 {
        match self.end {
            End::Received { copy, .. } => copy,
            End::Lost(_) => 0,
        }
    }
    /// The full text for a hover title, nodes named as `header` names the lanes.
    pub(crate) fn title(&self, header: &Header) -> String {
        let mut s = format!(
            "#{} {} -> {}: {}\nsent t={}",
            self.seq.0,
            header.name(self.from),
            header.name(self.to),
            self.msg.text,
            sagamq::Time(self.t_send)
        );
        match self.end {
            End::Received { t_ns, copy } => {
                s.push_str(&format!(", received t={}", sagamq::Time(t_ns)));
                if copy > 0 {
                    s.push_str(&format!(" (copy {} of a duplicated message)", copy + 1));
                }
            }
            End::Lost(loss) => s.push_str(&format!(", {}", loss.explain())),
        }
        if self.delay_ms() > 0 {
            s.push_str(&format!("\nheld back {}ms by the fault plan", self.delay_ms()));
        }
        if self.duplicated() && self.copy() == 0 {
            s.push_str("\nduplicated by the fault plan (sent twice)");
        }
        match self.callback_fault {
            Some(false) => s.push_str("\nthe subscriber answered 500 without processing it (fault)"),
            Some(true) => s.push_str("\nthe subscriber never answered and did not process it (fault)"),
            None => {}
        }
        if let Some(order) = &self.msg.order {
            s.push_str(&format!("\norder {order}"));
        }
        s
    }
}

/// A global event, drawn on a lane or across all of them.
#[derive(Clone, Debug)]
pub(crate) struct Mark<'a> {
    pub t_ns: u64,
    pub what: &'a What,
}

/// The run's identity, from its [`What::Plan`] event.
#[derive(Clone, Debug, Default)]
pub(crate) struct Header {
    pub command: String,
    pub profile: String,
    pub faults: Vec<String>,
    /// The first violation: (kind, invariant, detail, at_ns).
    pub verdict: Option<(&'static str, &'static str, String, u64)>,
    /// The custom participant's client id, the custom lane's name when it ran.
    pub custom: Option<String>,
}

impl Header {
    /// A lane's name: the node's, or the custom participant's client id.
    pub(crate) fn name(&self, node: Node) -> &str {
        match (&self.custom, node) {
            (Some(id), CUSTOM) => id,
            _ => crate::topology::NODES[node],
        }
    }
}

/// The drawable content after filtering, arrows and marks each in time order.
#[derive(Debug)]
pub(crate) struct Model<'a> {
    pub header: Header,
    /// The lanes drawn, left to right.
    pub lanes: Vec<Node>,
    pub arrows: Vec<Arrow<'a>>,
    pub marks: Vec<Mark<'a>>,
}

impl<'a> Model<'a> {
    pub(crate) fn build(events: &'a [Event], opts: &Options) -> Result<Model<'a>, DiagramError> {
        let keep = |msg: &MsgInfo| match &opts.order {
            None => true,
            Some(o) => msg.order.as_deref() == Some(o.as_str()),
        };
        let mut header = Header::default();
        let mut sends: BTreeMap<Seq, (u64, Node, Node, &'a MsgInfo, Fate)> = BTreeMap::new();
        let mut copies: BTreeMap<Seq, u32> = BTreeMap::new();
        // The arrow of the latest copy of each message a node received (for callback faults).
        let mut last_copy: BTreeMap<Seq, usize> = BTreeMap::new();
        let mut arrows: Vec<Arrow<'a>> = Vec::new();
        let mut marks = Vec::new();
        let mut custom = false;
        for e in events {
            custom |= involves(&e.what, CUSTOM);
            match &e.what {
                What::Plan {
                    seed,
                    scenario,
                    bug,
                    profile,
                    faults,
                    custom: custom_id,
                } => {
                    let mut command = format!("sagamq-sim replay --seed {seed} --scenario {scenario}");
                    if let Some(bug) = bug {
                        command.push_str(&format!(" --bug {bug}"));
                    }
                    if let Some(id) = custom_id {
                        // The CLI cannot load a user's participant.
                        command = format!(
                            "seed {seed} scenario {scenario} + custom {id}: rerun the test that built it with SAGAMQ_SEED={seed}"
                        );
                    }
                    header.command = command;
                    header.custom = custom_id.clone();
                    header.profile = profile.clone();
                    header.faults = faults.clone();
                }
                What::Send {
                    seq,
                    from,
                    to,
                    msg,
                    fate,
                } => {
                    if !keep(msg) {
                        continue;
                    }
                    sends.insert(*seq, (e.t_ns, *from, *to, msg, *fate));
                    let loss = match fate {
                        Fate::Dropped => Some(Loss::Dropped),
                        Fate::AnswerLost => Some(Loss::AnswerLost),
                        Fate::Sent { .. } => None,
                    };
                    if let Some(loss) = loss {
                        arrows.push(Arrow {
                            seq: *seq,
                            from: *from,
                            to: *to,
                            t_send: e.t_ns,
                            msg,
                            fate: *fate,
                            end: End::Lost(loss),
                            callback_fault: None,
                        });
                    }
                }
                What::Recv { seq, .. } => {
                    let Some(&(t_send, from, to, msg, fate)) = sends.get(seq) else {
                        continue; // filtered out
                    };
                    let n = copies.entry(*seq).or_insert(0);
                    last_copy.insert(*seq, arrows.len());
                    arrows.push(Arrow {
                        seq: *seq,
                        from,
                        to,
                        t_send,
                        msg,
                        fate,
                        end: End::Received { t_ns: e.t_ns, copy: *n },
                        callback_fault: None,
                    });
                    *n += 1;
                }
                What::CallbackFault { seq, hang, .. } => {
                    if let Some(&i) = last_copy.get(seq) {
                        arrows[i].callback_fault = Some(*hang);
                    }
                }
                What::Violation {
                    kind,
                    invariant,
                    detail,
                    first,
                } => {
                    if *first {
                        header.verdict = Some((kind, invariant, detail.clone(), e.t_ns));
                    }
                    marks.push(Mark {
                        t_ns: e.t_ns,
                        what: &e.what,
                    });
                }
                What::Crash { .. }
                | What::Restart { .. }
                | What::PartitionStart { .. }
                | What::PartitionHeal { .. }
                | What::HealPhase
                | What::Note { .. } => marks.push(Mark {
                    t_ns: e.t_ns,
                    what: &e.what,
                }),
            }
        }
        // Messages that left the sender and never arrived anywhere.
        for (seq, (t_send, from, to, msg, fate)) in &sends {
            if matches!(fate, Fate::Sent { .. }) && !copies.contains_key(seq) {
                arrows.push(Arrow {
                    seq: *seq,
                    from: *from,
                    to: *to,
                    t_send: *t_send,
                    msg,
                    fate: *fate,
                    end: End::Lost(Loss::Network),
                    callback_fault: None,
                });
            }
        }
        if let Some(order) = &opts.order
            && sends.is_empty()
        {
            return Err(DiagramError::UnknownOrder {
                order: order.clone(),
                known: orders(events),
            });
        }
        arrows.sort_by_key(|a| (a.t_send, a.seq, a.copy()));
        marks.sort_by_key(|m| m.t_ns); // stable: same-time marks keep their recorded order
        if let Some(cmd) = &opts.command {
            header.command = cmd.clone();
        } else if let Some(order) = &opts.order {
            header.command.push_str(&format!(" --order {order}"));
        }
        let lanes = LANES.into_iter().filter(|&n| n != CUSTOM || custom).collect();
        Ok(Model {
            header,
            lanes,
            arrows,
            marks,
        })
    }

    /// Counts for the header: (messages, lost, duplicated, delayed).
    pub(crate) fn message_counts(&self) -> (usize, usize, usize, usize) {
        let firsts = self.arrows.iter().filter(|a| a.copy() == 0);
        let (mut n, mut lost, mut dup, mut delayed) = (0, 0, 0, 0);
        for a in firsts {
            n += 1;
            lost += usize::from(matches!(a.end, End::Lost(_)));
            dup += usize::from(a.duplicated());
            delayed += usize::from(a.delay_ms() > 0);
        }
        (n, lost, dup, delayed)
    }

    pub(crate) fn count_marks(&self, f: impl Fn(&What) -> bool) -> usize {
        self.marks.iter().filter(|m| f(m.what)).count()
    }
}

/// Whether an event touches `node` (as sender, receiver, or the node a mark is on).
fn involves(what: &What, node: Node) -> bool {
    match what {
        What::Send { from, to, .. } | What::Recv { from, to, .. } => *from == node || *to == node,
        What::CallbackFault { node: n, .. }
        | What::Crash { node: n, .. }
        | What::Restart { node: n }
        | What::Note { node: n, .. } => *n == node,
        What::PartitionStart { a, b, .. } | What::PartitionHeal { a, b, .. } => *a == node || *b == Some(node),
        What::Plan { .. } | What::HealPhase | What::Violation { .. } => false,
    }
}

/// `12.3ms`: tenths of a millisecond are enough to read a diagram.
pub(crate) fn fmt_ms(t_ns: u64) -> String {
    format!("{}.{}ms", t_ns / 1_000_000, (t_ns / 100_000) % 10)
}

/// `a`, or `a..b` when a partition names a pair.
pub(crate) fn partition_nodes(a: Node, b: Option<Node>) -> Vec<Node> {
    match b {
        Some(b) => vec![a, b],
        None => vec![a],
    }
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MsgKind;

    pub(crate) fn msg(short: &str, order: Option<&str>) -> MsgInfo {
        MsgInfo {
            kind: MsgKind::Publish,
            text: format!("{short} (full)"),
            short: short.to_string(),
            order: order.map(str::to_string),
        }
    }

    pub(crate) fn ev(t_ms: u64, what: What) -> Event {
        Event {
            t_ns: t_ms * 1_000_000,
            what,
        }
    }

    pub(crate) fn send(t: u64, seq: u32, from: Node, to: Node, order: Option<&str>, fate: Fate) -> Event {
        ev(
            t,
            What::Send {
                seq: Seq(seq),
                from,
                to,
                msg: msg(&format!("m{seq}"), order),
                fate,
            },
        )
    }

    pub(crate) fn recv(t: u64, seq: u32, from: Node, to: Node) -> Event {
        ev(
            t,
            What::Recv {
                seq: Seq(seq),
                from,
                to,
            },
        )
    }

    pub(crate) const SENT: Fate = Fate::Sent {
        delay_ms: 0,
        duplicated: false,
    };

    /// A small run: a delivered message, a duplicated one, a dropped one, one
    /// lost in the network, a crash and restart, a partition, a violation.
    pub(crate) fn sample() -> Vec<Event> {
        vec![
            ev(
                0,
                What::Plan {
                    seed: 9,
                    scenario: "seed".into(),
                    bug: None,
                    profile: "drop=1.0%".into(),
                    faults: vec!["drop message #2".into(), "duplicate message #1".into()],
                    custom: None,
                },
            ),
            send(1, 0, WORKLOAD, ORDER, Some("o-1"), SENT),
            recv(2, 0, WORKLOAD, ORDER),
            send(
                3,
                1,
                ORDER,
                BROKER,
                Some("o-1"),
                Fate::Sent {
                    delay_ms: 0,
                    duplicated: true,
                },
            ),
            recv(4, 1, ORDER, BROKER),
            recv(5, 1, ORDER, BROKER),
            send(6, 2, BROKER, STOCK, Some("o-2"), Fate::Dropped),
            ev(
                7,
                What::Crash {
                    node: STOCK,
                    torn: true,
                },
            ),
            send(8, 3, BROKER, STOCK, Some("o-1"), SENT),
            ev(
                9,
                What::PartitionStart {
                    id: 4,
                    a: BROKER,
                    b: Some(PAYMENT),
                    text: "partition broker<->payment".into(),
                },
            ),
            ev(20, What::Restart { node: STOCK }),
            ev(
                21,
                What::PartitionHeal {
                    id: 4,
                    a: BROKER,
                    b: Some(PAYMENT),
                    text: "partition broker<->payment".into(),
                },
            ),
            ev(500, What::HealPhase),
            ev(
                900,
                What::Violation {
                    kind: "safety",
                    invariant: "conservation",
                    detail: "stock of <p> & \"q\"".into(),
                    first: true,
                },
            ),
        ]
    }

    #[test]
    fn every_copy_is_an_arrow_and_unreceived_messages_end_lost() {
        let events = sample();
        let m = Model::build(&events, &Options::default()).unwrap();
        let ends: Vec<(u32, End)> = m.arrows.iter().map(|a| (a.seq.0, a.end)).collect();
        assert_eq!(
            ends,
            vec![
                (
                    0,
                    End::Received {
                        t_ns: 2_000_000,
                        copy: 0
                    }
                ),
                (
                    1,
                    End::Received {
                        t_ns: 4_000_000,
                        copy: 0
                    }
                ),
                (
                    1,
                    End::Received {
                        t_ns: 5_000_000,
                        copy: 1
                    }
                ),
                (2, End::Lost(Loss::Dropped)),
                (3, End::Lost(Loss::Network)),
            ]
        );
        assert_eq!(m.message_counts(), (4, 2, 1, 0));
        assert_eq!(m.marks.len(), 6);
        assert_eq!(m.header.verdict.as_ref().map(|v| v.1), Some("conservation"));
        assert_eq!(m.header.command, "sagamq-sim replay --seed 9 --scenario seed");
    }

    #[test]
    fn order_filter_keeps_one_saga_and_global_events() {
        let events = sample();
        let opts = Options {
            order: Some("o-2".into()),
            command: None,
        };
        let m = Model::build(&events, &opts).unwrap();
        assert_eq!(m.arrows.len(), 1);
        assert_eq!(m.arrows[0].end, End::Lost(Loss::Dropped));
        assert_eq!(m.marks.len(), 6, "crashes, partitions, heal and violations stay");
        assert!(m.header.command.ends_with("--order o-2"));
    }

    #[test]
    fn unknown_order_is_an_error_naming_the_known_ones() {
        let events = sample();
        let opts = Options {
            order: Some("nope".into()),
            command: None,
        };
        let err = Model::build(&events, &opts).unwrap_err();
        assert_eq!(
            err,
            DiagramError::UnknownOrder {
                order: "nope".into(),
                known: vec!["o-1".into(), "o-2".into()]
            }
        );
        assert!(err.to_string().contains("o-1, o-2"));
    }

    #[test]
    fn the_custom_node_gets_a_lane_only_when_it_takes_part() {
        let mut events = sample();
        let m = Model::build(&events, &Options::default()).unwrap();
        assert_eq!(m.lanes, vec![WORKLOAD, ORDER, BROKER, STOCK, PAYMENT]);
        events.push(send(30, 9, BROKER, CUSTOM, Some("o-1"), SENT));
        let m = Model::build(&events, &Options::default()).unwrap();
        assert_eq!(m.lanes, LANES.to_vec());
    }

    #[test]
    fn clip_and_time_format() {
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        assert_eq!(fmt_ms(108_752_043), "108.7ms");
        assert_eq!(fmt_ms(0), "0.0ms");
    }
}

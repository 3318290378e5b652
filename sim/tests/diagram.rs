//! Sequence diagrams of fixed seeds: the SVG parses as XML, has one lane per
//! node and one arrow per message copy (checked against the world's own message
//! counter), and its structure and the Mermaid text are snapshotted.

use sagamq_sim::diagram::{self, Options};
use sagamq_sim::event::{Event, What};
use sagamq_sim::plan::NODES;
use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::{RunConfig, RunResult};
use std::collections::{BTreeMap, BTreeSet};

/// Seed 15 of the `seed` scenario fires drops, duplicates, delays, crashes and
/// partitions, and passes; it is the README's example too.
const SEED: u64 = 15;

fn traced(scenario: Scenario, seed: u64) -> RunResult {
    let mut cfg = RunConfig::new(scenario, None);
    cfg.trace = true;
    runner::run_seed(seed, &cfg)
}

/// (sends, receives, distinct messages received) among `events`, optionally for one order.
fn message_counts(events: &[Event], order: Option<&str>) -> (usize, usize, usize) {
    let mut sends = BTreeSet::new();
    let mut recvs = 0;
    let mut received = BTreeSet::new();
    for e in events {
        match &e.what {
            What::Send { seq, msg, .. } if order.is_none() || msg.order.as_deref() == order => {
                sends.insert(*seq);
            }
            What::Recv { seq, .. } if sends.contains(seq) => {
                recvs += 1;
                received.insert(*seq);
            }
            _ => {}
        }
    }
    (sends.len(), recvs, received.len())
}

fn classes<'a>(node: roxmltree::Node<'a, 'a>) -> Vec<&'a str> {
    node.attribute("class").unwrap_or("").split_whitespace().collect()
}

/// A summary of the drawing, read back from the parsed XML.
fn structure(svg: &str) -> String {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    let mut lanes = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for g in root.descendants().filter(|n| n.has_tag_name("g")) {
        let cls = classes(g);
        match cls.first().copied() {
            Some("lane") => lanes.push(g.attribute("data-node").expect("lane names its node")),
            Some("msg") => {
                // Every arrow carries a hover title with the full message text.
                let title = g
                    .children()
                    .find(|c| c.has_tag_name("title"))
                    .and_then(|t| t.text())
                    .expect("arrow has a title");
                assert!(title.contains("->"), "{title}");
                *counts.entry("arrows".into()).or_default() += 1;
                for c in &cls[1..] {
                    *counts.entry(format!("arrows.{c}")).or_default() += 1;
                }
            }
            Some(kind @ ("mark" | "band")) => {
                *counts.entry(format!("{kind}.{}", cls[1..].join("."))).or_default() += 1;
            }
            Some(other) => *counts.entry(other.to_string()).or_default() += 1,
            None => {}
        }
    }
    let mut out = format!(
        "size: {}x{}\nlanes: {}\n",
        root.attribute("width").unwrap_or("?"),
        root.attribute("height").unwrap_or("?"),
        lanes.join(" ")
    );
    for (k, n) in counts {
        out.push_str(&format!("{k}: {n}\n"));
    }
    out
}

fn arrows_in(svg: &str) -> usize {
    let doc = roxmltree::Document::parse(svg).expect("well-formed");
    doc.descendants()
        .filter(|n| n.has_tag_name("g") && classes(*n).first() == Some(&"msg"))
        .count()
}

#[test]
fn svg_is_well_formed_with_a_lane_per_node_and_an_arrow_per_message_copy() {
    let r = traced(Scenario::Seed, SEED);
    let (sends, recvs, received) = message_counts(&r.events, None);
    // Every message the world counted is in the event stream.
    assert_eq!(sends as u64, r.messages);
    assert!(recvs > received, "seed {SEED} should deliver some message twice");
    assert!(sends > received, "seed {SEED} should lose some message");
    let svg = diagram::svg(&r.events, &Options::default()).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    let lanes: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("g") && classes(*n).first() == Some(&"lane"))
        .map(|n| n.attribute("data-node").unwrap())
        .collect();
    // One lane per node that takes part: every node but `custom`, which runs
    // only with a user's participant.
    let taking_part: BTreeSet<&str> = NODES.into_iter().filter(|n| *n != "custom").collect();
    assert_eq!(lanes.len(), taking_part.len());
    assert_eq!(lanes.iter().copied().collect::<BTreeSet<_>>(), taking_part);
    // One arrow per message sent, plus one per extra copy of a duplicated message.
    assert_eq!(arrows_in(&svg), sends + (recvs - received));
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("diagram_svg_structure_seed_15", structure(&svg));
    });
}

#[test]
fn order_filter_draws_one_saga_plus_global_events() {
    let r = traced(Scenario::Seed, SEED);
    let order = "test-order-1";
    let (sends, recvs, received) = message_counts(&r.events, Some(order));
    assert!(sends > 0);
    let opts = Options {
        order: Some(order.into()),
        command: None,
    };
    let svg = diagram::svg(&r.events, &opts).unwrap();
    assert_eq!(arrows_in(&svg), sends + (recvs - received));
    assert!(arrows_in(&svg) < arrows_in(&diagram::svg(&r.events, &Options::default()).unwrap()));
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let crashes = doc
        .descendants()
        .filter(|n| n.has_tag_name("g") && classes(*n) == ["mark", "crash"])
        .count();
    let crash_events = r.events.iter().filter(|e| matches!(e.what, What::Crash { .. })).count();
    assert!(crash_events > 0);
    assert_eq!(crashes, crash_events, "crashes are global: kept by the filter");
    assert!(svg.contains("--order test-order-1"));

    let err = diagram::svg(
        &r.events,
        &Options {
            order: Some("no-such-order".into()),
            command: None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("test-order-1, test-order-2"), "{err}");
}

#[test]
fn mermaid_of_a_fixed_seed() {
    let r = traced(Scenario::Seed, SEED);
    let text = diagram::mermaid(&r.events, &Options::default()).unwrap();
    let (sends, recvs, received) = message_counts(&r.events, None);
    let arrows = text.lines().filter(|l| l.contains("->>") || l.contains("-x")).count();
    assert_eq!(arrows, sends + (recvs - received));
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("diagram_mermaid_seed_15", text);
    });
}

#[test]
fn diagrams_are_deterministic_and_cost_nothing_untraced() {
    let a = traced(Scenario::Seed, SEED);
    let b = traced(Scenario::Seed, SEED);
    assert_eq!(a.events, b.events);
    let opts = Options::default();
    assert_eq!(diagram::svg(&a.events, &opts), diagram::svg(&b.events, &opts));
    let untraced = runner::run_seed(SEED, &RunConfig::new(Scenario::Seed, None));
    assert!(untraced.events.is_empty());
    assert_eq!(
        untraced.messages, a.messages,
        "recording events does not change the run"
    );
}

#[test]
fn a_saga_run_with_many_orders_stays_well_formed() {
    let r = traced(Scenario::Saga { orders: 20 }, 3);
    let svg = diagram::svg(&r.events, &Options::default()).unwrap();
    let (sends, recvs, received) = message_counts(&r.events, None);
    assert_eq!(arrows_in(&svg), sends + (recvs - received));
    for order in diagram::orders(&r.events).iter().take(3) {
        let opts = Options {
            order: Some(order.clone()),
            command: None,
        };
        let one = diagram::svg(&r.events, &opts).unwrap();
        let (s, rc, rd) = message_counts(&r.events, Some(order));
        assert_eq!(arrows_in(&one), s + (rc - rd), "order {order}");
        let m = diagram::mermaid(&r.events, &opts).unwrap();
        assert!(
            m.lines().skip(1).all(|l| l.starts_with("    ")),
            "one indented statement per line"
        );
    }
}

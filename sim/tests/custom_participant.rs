//! A user's own participant plugged into the madsim simulator: a shipping
//! service that ships every paid order exactly once, run on its own node under
//! the same swarm faults as the shipped services (crashes with torn writes,
//! partitions, lost and duplicated callbacks, skewed clocks).

mod common;

use sagamq::saga::{Decision, Outgoing, Participant, topics};
use sagamq::{GlobalId, Message, SubId, Time, Topic};
use sagamq_sim::check::{OrderPhase, View};
use sagamq_sim::custom::CustomNode;
use sagamq_sim::runner;
use sagamq_sim::scenario::Scenario;
use sagamq_sim::world::RunConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default)]
struct Shipping {
    /// Order -> how many times it was shipped (must stay 1).
    shipped: BTreeMap<GlobalId, u32>,
}

/// The committed change: replayed by `apply` live and after a crash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Shipped {
    order: GlobalId,
}

impl Participant for Shipping {
    type Change = Shipped;

    fn topics(&self) -> Vec<Topic> {
        vec![Topic::lit(topics::PAYMENT_RESULT)]
    }

    fn on_message(&self, _now: Time, m: &Message) -> Decision<Shipped> {
        if m.content != "1" || self.shipped.contains_key(&m.global_id) {
            return Decision::Ignore;
        }
        let notice = Outgoing {
            topic: Topic::lit("sale-order.shipped"),
            global_id: m.global_id.clone(),
            sub_id: SubId::new(format!("{}.shipped", m.global_id)).expect("short order ids"),
            content: "{}".to_string(),
        };
        Decision::change_and_publish(
            Shipped {
                order: m.global_id.clone(),
            },
            notice,
        )
    }

    fn apply(&mut self, change: &Shipped) {
        *self.shipped.entry(change.order.clone()).or_default() += 1;
    }
}

/// Checked by the simulator whenever it judges safety.
fn shipped_at_most_once(s: &Shipping) -> Result<(), String> {
    match s.shipped.iter().find(|(_, n)| **n > 1) {
        Some((order, n)) => Err(format!("order {order} shipped {n} times")),
        None => Ok(()),
    }
}

#[test]
fn a_custom_participant_survives_the_swarm() {
    let shipping = CustomNode::new("shipping-service", Shipping::default(), shipped_at_most_once);
    let cfg = RunConfig::new(Scenario::Saga { orders: 8 }, None).with_custom(shipping);
    let mut completed_total = 0;
    for seed in common::seeds(0..40) {
        let r = runner::run_seed(seed, &cfg);
        assert!(
            r.violations.is_empty(),
            "seed {seed}: {:?}\n{}",
            r.violations,
            runner::replay_command(seed, &cfg)
        );
        let shipping = r.views["custom"]
            .custom_state::<Shipping>()
            .expect("the custom node ran");
        let View::Order { orders } = &r.views["order"] else {
            panic!("order view")
        };
        for (id, (phase, _)) in orders {
            if *phase == OrderPhase::Completed {
                completed_total += 1;
                let id = GlobalId::new(id.clone()).expect("valid order id");
                assert_eq!(
                    shipping.shipped.get(&id),
                    Some(&1),
                    "seed {seed}: completed order {id} shipped once"
                );
            }
        }
    }
    assert!(completed_total > 0, "some orders completed, so shipping had work");
}

#[test]
fn a_broken_custom_invariant_is_reported() {
    fn never(_: &Shipping) -> Result<(), String> {
        Err("this invariant always fails".to_string())
    }
    let cfg = RunConfig::new(Scenario::Saga { orders: 4 }, None).with_custom(CustomNode::new(
        "shipping-service",
        Shipping::default(),
        never,
    ));
    let r = runner::run_seed(1, &cfg);
    assert_eq!(r.violations.first().map(|v| v.invariant), Some("custom-invariant"));
}

//! Which participant implementation each simulated node runs: the shipped
//! participants, or a planted bug's variant (see `bugs`), and how the checker
//! reads each one's state.

use crate::check::{OrderPhase, View};
use crate::world::{CUSTOM, ORDER, PAYMENT, RunConfig, STOCK, notify_url};
use sagamq::Time;
use sagamq::machine::Machine;
use sagamq::saga::order::{Order, OrderFlow, OrderStatus};
use sagamq::saga::payment::{Charge, Payment};
use sagamq::saga::stock::{Deduction, Stock};
use sagamq::saga::{
    HostConfig, Participant, ParticipantHost, ParticipantInput, ParticipantOutput, scenario as shipped,
};
use std::time::Duration;

/// A participant as the world drives and the checker reads it.
pub trait SimParticipant: Machine<Input = ParticipantInput, Output = ParticipantOutput> + Send {
    /// The participant's state, for the invariant checker.
    fn view(&self) -> View;
    /// Nothing left to do: no outbox entry waiting for the broker's acknowledgement.
    fn settled(&self) -> bool;
    /// Every subscription confirmed by the broker (traffic may start).
    fn ready(&self) -> bool;
}

impl SimParticipant for ParticipantHost<Stock> {
    fn view(&self) -> View {
        View::Stock {
            initial: self
                .initial()
                .levels()
                .iter()
                .map(|(p, n)| (p.to_string(), *n))
                .collect(),
            level: self.logic().levels().iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            held: self
                .logic()
                .orders()
                .iter()
                .filter(|(_, o)| o.held() > 0)
                .filter_map(|(id, o)| match &o.deduction {
                    Deduction::Deducted { product, .. } => Some((id.to_string(), (product.to_string(), o.held()))),
                    _ => None,
                })
                .collect(),
        }
    }
    fn settled(&self) -> bool {
        self.outbox_len() == 0
    }
    fn ready(&self) -> bool {
        self.subscribed()
    }
}

impl SimParticipant for ParticipantHost<Payment> {
    fn view(&self) -> View {
        View::Payment {
            initial: self
                .initial()
                .balances()
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            balance: self
                .logic()
                .balances()
                .iter()
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            charged: self
                .logic()
                .orders()
                .iter()
                .filter(|(_, o)| o.held() > 0)
                .filter_map(|(id, o)| match &o.charge {
                    Charge::Charged { customer, .. } => Some((id.to_string(), (customer.to_string(), o.held()))),
                    _ => None,
                })
                .collect(),
        }
    }
    fn settled(&self) -> bool {
        self.outbox_len() == 0
    }
    fn ready(&self) -> bool {
        self.subscribed()
    }
}

/// How the checker reads an order's status.
pub fn phase(status: OrderStatus, flow: OrderFlow) -> OrderPhase {
    match status {
        OrderStatus::Pending | OrderStatus::Compensating => OrderPhase::InProgress,
        OrderStatus::StockOutboundDone if flow == OrderFlow::Seed => OrderPhase::StockOutboundDone,
        OrderStatus::StockOutboundDone => OrderPhase::InProgress,
        OrderStatus::StockOutboundFailed => OrderPhase::StockOutboundFailed,
        OrderStatus::Completed => OrderPhase::Completed,
        OrderStatus::Compensated => OrderPhase::Compensated,
    }
}

impl SimParticipant for ParticipantHost<Order> {
    fn view(&self) -> View {
        let flow = self.logic().flow();
        View::Order {
            orders: self
                .logic()
                .orders()
                .iter()
                .map(|(id, o)| (id.to_string(), (phase(o.status, flow), o.status.to_string())))
                .collect(),
        }
    }
    fn settled(&self) -> bool {
        self.outbox_len() == 0
    }
    fn ready(&self) -> bool {
        self.subscribed()
    }
}

/// The host configuration of node `node` in the simulator.
pub fn host_config(node: usize, seed: u64, run: &RunConfig) -> HostConfig {
    let mut cfg = HostConfig::new(crate::check::client_of(node, run), notify_url(node));
    cfg.seed = seed ^ (node as u64).wrapping_mul(0x9E37_79B9);
    cfg.subscription_ttl = Duration::from_secs(30);
    cfg.subscribe_retry = Duration::from_millis(200);
    cfg.publish_retry_initial = Duration::from_millis(100);
    cfg.publish_retry_max = Duration::from_secs(1);
    cfg
}

/// A participant built for a node: itself, the valid log length, the records replayed.
pub type Built = Result<(Box<dyn SimParticipant>, u64, u64), String>;

fn host<P>(logic: P, config: HostConfig, image: &[u8]) -> Built
where
    P: Participant + Send,
    ParticipantHost<P>: SimParticipant,
{
    if image.is_empty() {
        return Ok((Box::new(ParticipantHost::new(logic, config)), 0, 0));
    }
    let (h, report) = ParticipantHost::recover(logic, config, image).map_err(|e| e.to_string())?;
    Ok((Box::new(h), report.valid_len, report.records))
}

/// Builds node `node`'s participant from its disk image (empty: a fresh start).
/// Returns the participant, the valid log length and the number of records replayed.
pub fn build(node: usize, cfg: &RunConfig, def: &shipped::Scenario, seed: u64, image: &[u8], _now: Time) -> Built {
    let config = host_config(node, seed, cfg);
    if let Some(bug) = cfg.bug
        && let Some(planted) = crate::bugs::build(bug, node, def, config.clone(), image)
    {
        return planted;
    }
    match node {
        CUSTOM => match &cfg.custom {
            Some(custom) => custom.build(config, image),
            None => Err("no custom participant configured".to_string()),
        },
        ORDER => host(def.order_participant(), config, image),
        STOCK => host(def.stock_participant(), config, image),
        PAYMENT => host(def.payment_participant(), config, image),
        _ => Err(format!("node {node} runs no participant")),
    }
}

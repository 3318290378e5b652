//! Named workloads the simulator and tests run: initial stock and balances, and
//! the orders with their creation times. **Invariant:** a scenario is a pure
//! function of its name and seed (drawn with [`crate::rng::Rng`]), so a seed
//! replays the same workload everywhere.

use super::ids::{CustomerId, ProductId};
use super::order::{Order, OrderFlow, OrderStatus};
use super::payment::Payment;
use super::stock::Stock;
use super::{Command, OrderSpec};
use crate::rng::Rng;
use crate::types::{GlobalId, Time};
use std::collections::BTreeMap;
use std::time::Duration;

/// The names [`by_name`] knows.
pub const NAMES: [&str; 2] = ["seed", "saga"];

/// An order and when the workload creates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledOrder {
    pub at: Time,
    pub spec: OrderSpec,
}

impl ScheduledOrder {
    pub fn command(&self) -> Command {
        Command::CreateOrder(self.spec.clone())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub flow: OrderFlow,
    /// How long an order waits for stock and payment before it cancels.
    pub order_deadline: Option<Duration>,
    pub stock: BTreeMap<ProductId, u64>,
    pub balances: BTreeMap<CustomerId, u64>,
    /// In creation order.
    pub orders: Vec<ScheduledOrder>,
    /// Final states known in advance when nothing goes wrong (the seed's test).
    pub expected: BTreeMap<GlobalId, OrderStatus>,
}

impl Scenario {
    pub fn order_participant(&self) -> Order {
        Order::new(self.flow, self.order_deadline)
    }

    pub fn stock_participant(&self) -> Stock {
        Stock::new(self.stock.clone())
    }

    pub fn payment_participant(&self) -> Payment {
        Payment::new(self.balances.clone())
    }

    /// Total units of stock at the start.
    pub fn stock_total(&self) -> u64 {
        self.stock.values().sum()
    }

    /// Total money at the start.
    pub fn money_total(&self) -> u64 {
        self.balances.values().sum()
    }
}

/// A scenario by name (`seed` ignores `seed`).
pub fn by_name(name: &str, seed: u64) -> Option<Scenario> {
    match name {
        "seed" => Some(self::seed()),
        "saga" => Some(saga(seed)),
        _ => None,
    }
}

/// The Go seed's integration test: 10 units of `test-prod-1`; `test-order-1`
/// (quantity 1, price 100) ends `StockOutboundDone`; `test-order-2` (quantity
/// 10, amount 1000) ends `StockOutboundFailed`; 9 units are left. The second
/// order comes 100 ms after the first, as the seed's test waited between them.
pub fn seed() -> Scenario {
    let order = |id: &str, quantity, at_ms| ScheduledOrder {
        at: Time::from_millis(at_ms),
        spec: OrderSpec {
            order_id: id.to_string(),
            customer_id: "test-customer-1".to_string(),
            product_id: "test-prod-1".to_string(),
            quantity,
            price: 100,
        },
    };
    Scenario {
        name: "seed",
        flow: OrderFlow::Seed,
        order_deadline: Some(Duration::from_secs(30)),
        stock: BTreeMap::from([(ProductId::lit("test-prod-1"), 10)]),
        balances: BTreeMap::new(),
        orders: vec![order("test-order-1", 1, 0), order("test-order-2", 10, 100)],
        expected: BTreeMap::from([
            (GlobalId::lit("test-order-1"), OrderStatus::StockOutboundDone),
            (GlobalId::lit("test-order-2"), OrderStatus::StockOutboundFailed),
        ]),
    }
}

/// Knobs of the `saga` workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaParams {
    pub orders: usize,
    pub customers: usize,
    pub products: usize,
    /// Orders are created at uniformly drawn times in `[0, window]`.
    pub window: Duration,
    pub order_deadline: Duration,
}

impl Default for SagaParams {
    fn default() -> Self {
        SagaParams {
            orders: 24,
            customers: 4,
            products: 3,
            window: Duration::from_secs(2),
            order_deadline: Duration::from_secs(20),
        }
    }
}

/// Many concurrent orders from several customers competing for scarce stock
/// (about a third of the demand), with balances that cover only some of each
/// customer's orders, so that both refusals and compensations run often.
pub fn saga(seed: u64) -> Scenario {
    saga_with(seed, &SagaParams::default())
}

pub fn saga_with(seed: u64, params: &SagaParams) -> Scenario {
    assert!(params.orders > 0 && params.customers > 0 && params.products > 0);
    let mut rng = Rng::new(seed);
    let stock = (1..=params.products)
        .map(|p| (ProductId::lit(&format!("prod-{p}")), rng.range_inclusive(2, 8)))
        .collect();
    let balances = (1..=params.customers)
        .map(|c| (CustomerId::lit(&format!("cust-{c}")), rng.range_inclusive(5, 50) * 10))
        .collect();
    let window_ms = u64::try_from(params.window.as_millis()).unwrap_or(u64::MAX);
    let mut orders: Vec<ScheduledOrder> = (1..=params.orders)
        .map(|i| ScheduledOrder {
            at: Time::from_millis(rng.range_inclusive(0, window_ms)),
            spec: OrderSpec {
                order_id: format!("order-{i:03}"),
                customer_id: format!("cust-{}", rng.range_inclusive(1, params.customers as u64)),
                product_id: format!("prod-{}", rng.range_inclusive(1, params.products as u64)),
                quantity: rng.range_inclusive(1, 3),
                price: rng.range_inclusive(1, 10) * 10,
            },
        })
        .collect();
    orders.sort_by(|a, b| (a.at, &a.spec.order_id).cmp(&(b.at, &b.spec.order_id)));
    Scenario {
        name: "saga",
        flow: OrderFlow::Saga,
        order_deadline: Some(params.order_deadline),
        stock,
        balances,
        orders,
        expected: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saga_is_a_function_of_its_seed() {
        assert_eq!(saga(7), saga(7));
        assert_ne!(saga(7).orders, saga(8).orders);
    }

    #[test]
    fn saga_stock_is_scarce() {
        for seed in 0..20 {
            let s = saga(seed);
            let demand: u64 = s.orders.iter().map(|o| o.spec.quantity).sum();
            assert!(
                s.stock_total() < demand,
                "seed {seed}: stock {} demand {demand}",
                s.stock_total()
            );
            assert!(s.orders.windows(2).all(|w| w[0].at <= w[1].at));
        }
    }

    #[test]
    fn by_name_knows_every_name() {
        for name in NAMES {
            assert_eq!(by_name(name, 1).map(|s| s.name), Some(name));
        }
        assert!(by_name("nope", 1).is_none());
    }
}

//! `sagamq demo`: the Go seed's integration test end to end over real HTTP on
//! loopback: the broker, the stock participant and the order participant,
//! each with its own log, on ephemeral ports.
//!
//! **Invariant:** the demo succeeds only if every order of the `seed`
//! scenario reaches its expected state (order 1 `StockOutboundDone`, order 2
//! `StockOutboundFailed`), 9 of 10 units remain, and the saga audits find
//! nothing; it waits on state, never on a fixed sleep, within a bound.

use super::callbacks::Allowlist;
use super::cli::DemoArgs;
use super::client::BrokerClient;
use super::clock::unix_nanos_now;
use super::participant::{NodeOptions, ParticipantNode};
use super::server::{self, ServeOptions};
use crate::saga::audit::{audit_orders, audit_stock};
use crate::saga::order::{Order, OrderStatus};
use crate::saga::scenario;
use crate::saga::stock::Stock;
use crate::saga::{CommandOutcome, ProductId, topics};
use crate::types::{ClientId, GlobalId};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long the demo waits for the saga to finish before declaring failure.
pub const DEMO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the demo observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoOutcome {
    pub orders: BTreeMap<GlobalId, Option<OrderStatus>>,
    pub expected: BTreeMap<GlobalId, OrderStatus>,
    pub stock_left: u64,
    pub stock_expected: u64,
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl DemoOutcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.stock_left == self.stock_expected
            && self
                .expected
                .iter()
                .all(|(id, want)| self.orders.get(id).copied().flatten() == Some(*want))
    }
}

pub async fn main(args: DemoArgs) -> ExitCode {
    let (dir, remove) = match &args.data {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("sagamq-demo-{}", std::process::id())),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let r = run(&dir).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match r {
        Ok(outcome) => {
            println!("final states (after {:.0} ms):", outcome.elapsed.as_secs_f64() * 1e3);
            for (id, status) in &outcome.orders {
                let want = outcome.expected.get(id);
                println!(
                    "  {id}: {} (expected {})",
                    status.map_or("unknown".to_string(), |s| format!("{s:?}")),
                    want.map_or("-".to_string(), |s| format!("{s:?}"))
                );
            }
            println!(
                "  stock test-prod-1: {} left (expected {})",
                outcome.stock_left, outcome.stock_expected
            );
            for v in &outcome.violations {
                println!("  violation: {v}");
            }
            if outcome.passed() {
                println!("demo passed");
                ExitCode::SUCCESS
            } else {
                println!("demo FAILED");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sagamq demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the seed scenario with fresh logs under `dir`.
pub async fn run(dir: &Path) -> Result<DemoOutcome, String> {
    let t0 = Instant::now();
    let scenario = scenario::seed();
    // Per-run secrets: publishes need the token as a bearer token; callbacks
    // are signed with a separate key, which the participants verify.
    let token = format!("demo-{:x}", unix_nanos_now());
    let signing_key = format!("demo-signing-{:x}", unix_nanos_now());
    let loopback = "127.0.0.1:0".parse().expect("static addr");

    let mut opts = ServeOptions::new(loopback, dir.join("broker"));
    opts.token = Some(token.clone());
    opts.signing_key = Some(signing_key.clone());
    opts.allow = Allowlist::loopback();
    // Fast retries: a callback can race the subscriber's own start.
    opts.broker.retry_backoff_initial = Duration::from_millis(20);
    opts.broker.retry_backoff_max = Duration::from_millis(500);
    let broker = server::start(opts).await.map_err(|e| e.to_string())?;
    println!("broker listening on {}", broker.url());
    let client = BrokerClient::new(broker.url(), Some(token.clone()));

    let node_opts = |name: &str, sub: &str| -> Result<NodeOptions, String> {
        Ok(NodeOptions {
            client_id: ClientId::new(name).map_err(|e| e.to_string())?,
            data_dir: dir.join(sub),
            broker: client.clone(),
            signing_key: Some(signing_key.as_bytes().to_vec()),
            listen: loopback,
            seed: 1,
        })
    };
    let stock =
        ParticipantNode::start(scenario.stock_participant(), node_opts(topics::STOCK_SERVICE, "stock")?).await?;
    println!("stock service: callbacks at {}", stock.notify_url);
    let order =
        ParticipantNode::start(scenario.order_participant(), node_opts(topics::ORDER_SERVICE, "order")?).await?;
    println!("order service: callbacks at {}", order.notify_url);

    let deadline = Instant::now() + DEMO_TIMEOUT;
    // Both subscribed before the first order, as the seed's test booted its services first.
    wait_until(deadline, || async {
        order.query(|h| h.subscribed()).await.unwrap_or(false) && stock.query(|h| h.subscribed()).await.unwrap_or(false)
    })
    .await
    .map_err(|()| "participants did not subscribe in time".to_string())?;

    let start = Instant::now();
    for o in &scenario.orders {
        let at = start + Duration::from_nanos(o.at.as_nanos());
        tokio::time::sleep_until(at.into()).await;
        match order.command(o.command()).await? {
            CommandOutcome::Committed => println!("created {}", o.command()),
            CommandOutcome::Refused(why) => return Err(format!("order refused: {why}")),
        }
    }
    let settled = wait_until(deadline, || async {
        order.query(|h| h.logic().all_terminal()).await.unwrap_or(false)
    })
    .await;
    if settled.is_err() {
        println!("orders did not all reach a terminal state within {DEMO_TIMEOUT:?}");
    }

    let ids: Vec<GlobalId> = scenario
        .orders
        .iter()
        .filter_map(|o| GlobalId::new(o.spec.order_id.clone()).ok())
        .collect();
    let order_logic: Order = order.query(|h| h.logic().clone()).await?;
    let (stock_logic, stock_initial): (Stock, Stock) =
        stock.query(|h| (h.logic().clone(), h.initial().clone())).await?;
    let mut violations: Vec<String> = audit_stock(&stock_logic, &stock_initial)
        .iter()
        .map(|v| v.to_string())
        .collect();
    violations.extend(
        audit_orders(&order_logic, &stock_logic, None, true)
            .iter()
            .map(|v| v.to_string()),
    );
    let product = ProductId::lit("test-prod-1");
    let outcome = DemoOutcome {
        orders: ids.iter().map(|id| (id.clone(), order_logic.status(id))).collect(),
        expected: scenario.expected.clone(),
        stock_left: stock_logic.level(&product),
        stock_expected: 9,
        violations,
        elapsed: t0.elapsed(),
    };
    if let Ok(st) = broker.driver().stats().await {
        println!(
            "broker: {} publishes stored, {} callbacks delivered, {} fsyncs",
            st.io.publishes_acked, st.io.callbacks_delivered, st.io.fsyncs
        );
    }
    order.shutdown().await?;
    stock.shutdown().await?;
    broker.shutdown().await.map_err(|e| e.to_string())?;
    Ok(outcome)
}

/// Polls `cond` every 10 ms until it holds or `deadline` passes.
async fn wait_until<F, Fut>(deadline: Instant, mut cond: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(())
}

//! Several `sagamq serve --store postgres://...` instances sharing one
//! PostgreSQL (feature `postgres`). The decisions are sans-IO in
//! [`crate::cluster`]; this module moves them to SQL and HTTP.
//!
//! Code map: [`store`] is the schema and every SQL statement (leases judged
//! by `now()`, writes fenced by the lease epoch, idempotent); [`partition`]
//! is one partition's task (an unchanged [`crate::broker::Broker`] recovered
//! from its rows, writing them back one group commit per transaction);
//! [`node`] is the lease loop and the routing table; [`http`] is the API,
//! forwarding each request to the owner of its partition.
//!
//! **Architecture invariants:** the broker core's records keep their
//! meaning (frames go to rows the way they go to the file); nothing under
//! `src/broker`, `src/log`, `src/saga` or `src/cluster` knows about SQL;
//! safety rests on the database alone (the epoch check in every write's
//! transaction), never on this process's clock or view.

pub mod http;
pub mod node;
pub mod partition;
pub mod store;

use crate::broker::BrokerConfig;
use crate::cluster::{InstanceId, Partitions};
use crate::real::auth::Auth;
use crate::real::callbacks::{Allowlist, CallbackConfig};
pub use crate::real::cluster_args::ClusterArgs;
use node::{Node, NodeConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::real::cluster_args::LEASE_TTL_DEFAULT;

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub addr: SocketAddr,
    pub store_url: String,
    pub partitions: Option<u32>,
    pub lease_ttl: Duration,
    pub advertise: Option<String>,
    pub auth: Auth,
    pub signing_key: Option<String>,
    pub allow: Allowlist,
    pub callback_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub body_len_max: usize,
    pub connections: crate::real::listener::ConnectionLimits,
    pub broker: BrokerConfig,
    pub seed: u64,
}

impl ClusterOptions {
    /// From `serve`'s options (token, allowlist, tuning) and the cluster flags.
    pub fn from_serve(o: &crate::real::ServeOptions, c: &ClusterArgs) -> Result<ClusterOptions, String> {
        let store_url = c.store.clone().ok_or("--store is missing")?;
        if !(store_url.starts_with("postgres://") || store_url.starts_with("postgresql://")) {
            return Err(format!(
                "--store {:?}: expected a postgres:// URL",
                store::redact(&store_url)
            ));
        }
        if c.lease_ms < 200 {
            return Err(format!("--lease-ms {} is too short (at least 200)", c.lease_ms));
        }
        if let Some(p) = c.partitions {
            Partitions::new(p).map_err(|e| format!("--partitions: {e}"))?;
        }
        Ok(ClusterOptions {
            addr: o.addr,
            store_url,
            partitions: c.partitions,
            lease_ttl: Duration::from_millis(c.lease_ms),
            advertise: c.advertise.clone(),
            auth: o.auth(),
            signing_key: o.signing_key.clone(),
            allow: o.allow.clone(),
            callback_ca: o.callback_ca.clone(),
            body_len_max: o.body_len_max,
            connections: o.connections,
            broker: o.broker.clone(),
            seed: o.seed,
        })
    }
}

/// A cluster instance serving HTTP in the current tokio runtime.
pub struct RunningInstance {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    stop_leases: watch::Sender<bool>,
    http: JoinHandle<()>,
    leases: JoinHandle<()>,
}

impl RunningInstance {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, finishes in-flight requests, then hands every
    /// partition back (writes finished, leases expired at once).
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop_http.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.http).await;
        let _ = self.stop_leases.send(true);
        let _ = (&mut self.leases).await;
    }

    /// Stops when `signal` completes.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await
    }
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Connects to the store (initialising it if new), binds, and serves.
pub async fn start(o: ClusterOptions) -> Result<RunningInstance, String> {
    let store = Store::connect(&o.store_url, store::POOL_SIZE_DEFAULT)?;
    let generated = random_hex(32)?;
    let meta = store
        .init(o.partitions, o.signing_key.as_deref().unwrap_or(&generated))
        .await?;
    if let Some(k) = &o.signing_key
        && *k != meta.signing_key
    {
        return Err(
            "--signing-key differs from the key this store was initialised with; every instance \
                    signs with the store's key (omit --signing-key)"
                .into(),
        );
    }
    let listener = TcpListener::bind(o.addr)
        .await
        .map_err(|e| format!("bind {}: {e}", o.addr))?;
    let addr = listener.local_addr().map_err(|e| format!("local_addr: {e}"))?;
    let allow = o.allow.clone().with_own_address(addr);
    let me = InstanceId(random_hex(8)?);
    let advertise = o.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let node = Node::new(
        NodeConfig {
            me: me.clone(),
            advertise: advertise.clone(),
            lease_ttl: o.lease_ttl,
            partitions: meta.partitions,
            broker: o.broker.clone(),
            callbacks: CallbackConfig {
                timeout: o.broker.callback_timeout,
                signing_key: Some(meta.signing_key.as_bytes().to_vec()),
                allow: allow.clone(),
                inflight_per_subscriber_max: o.broker.inflight_per_subscriber_max,
                extra_roots: o.callback_ca.clone(),
            },
            seed: o.seed,
        },
        store,
    );
    let forward = crate::real::callbacks::client_builder()
        .timeout(http::FORWARD_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let app = http::router(
        http::ClusterHttp {
            node: node.clone(),
            auth: o.auth.clone(),
            allow,
            forward,
        },
        o.body_len_max,
    );
    let (stop_leases, stop_rx) = watch::channel(false);
    let leases = tokio::spawn(node.clone().run(stop_rx));
    let (stop_http, http_rx) = tokio::sync::oneshot::channel();
    let limits = o.connections;
    let http = tokio::spawn(async move {
        let app = crate::real::http::Api::routed(app);
        crate::real::listener::serve(listener, app, limits, http_rx, crate::real::server::SHUTDOWN_GRACE).await;
    });
    tracing::info!(%addr, instance = %me, %advertise, partitions = meta.partitions.count(), store = %store::redact(&o.store_url), "sagamq cluster instance serving");
    Ok(RunningInstance {
        addr,
        node,
        stop_http: Some(stop_http),
        stop_leases,
        http,
        leases,
    })
}

/// Fresh databases for tests on the PostgreSQL named by `SAGAMQ_TEST_PG`.
pub mod testdb {
    /// The variable naming the test server (`postgres://user@host:port/db`).
    pub const TEST_PG_VAR: &str = "SAGAMQ_TEST_PG";
    /// When set to 1 (as `.ci/run` does), a test that needs PostgreSQL fails
    /// instead of skipping when `SAGAMQ_TEST_PG` is missing.
    pub const REQUIRE_PG_VAR: &str = "SAGAMQ_REQUIRE_PG";

    /// A new empty database for `test` (dropped first if a previous run left
    /// it), or `None` with a printed note when no test server is configured.
    pub async fn fresh(test: &str) -> Option<String> {
        let base = match std::env::var(TEST_PG_VAR) {
            Ok(u) if !u.is_empty() => u,
            _ => {
                assert!(
                    std::env::var(REQUIRE_PG_VAR).as_deref() != Ok("1"),
                    "{test}: {REQUIRE_PG_VAR}=1 but {TEST_PG_VAR} is not set (start one with \
                     `eval \"$(scripts/pg_throwaway.sh start)\"`)"
                );
                eprintln!(
                    "SKIPPED {test}: needs PostgreSQL; set {TEST_PG_VAR}=postgres://... (e.g. \
                     `eval \"$(scripts/pg_throwaway.sh start)\"`), as .ci/run does"
                );
                return None;
            }
        };
        let name = format!(
            "sagamq_t_{}_{}",
            test.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>(),
            std::process::id()
        );
        let name: String = name.chars().take(60).collect();
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{test}: connect to {TEST_PG_VAR}: {e}"));
        let conn = tokio::spawn(conn);
        // Two statements: CREATE DATABASE may not share an (implicit) transaction.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{test}: {sql}: {e}: {:?}", e.as_db_error()));
        }
        drop(client);
        let _ = conn.await;
        let cut = base
            .rfind('/')
            .filter(|i| *i > "postgres://".len())
            .unwrap_or(base.len());
        let (head, tail) = base.split_at(cut);
        let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
        Some(format!("{head}/{name}{query}"))
    }
}

//! One instance of the cluster: its lease loop (heartbeat, renew, take,
//! hand back, following [`crate::cluster::plan`]), the partitions it serves,
//! and its routing table (who owns each partition, at which address).
//!
//! **Invariants:** a partition is served here only between a successful
//! take (which raised its epoch) and the first of: a renewal that no longer
//! returns it, its local lease bound passing ([`LocalLease`]), a fenced
//! write, or a clean hand-back (writes finished, then the lease expired in
//! the database so another instance can take it at once). Every lease
//! decision is the database's (`now()`); this loop only reads its own
//! monotonic clock to give a lease up early.

use super::partition::{self, PartitionEnd, PartitionHandle, PartitionStart};
use super::store::{ClusterView, Store};
use crate::broker::BrokerConfig;
use crate::cluster::{InstanceId, LocalLease, PartitionId, Partitions, lease_tick_ms, plan};
use crate::real::callbacks::CallbackConfig;
use crate::real::clock::Clock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a hand-back waits for a partition's writes before dropping them.
const HAND_BACK_WAIT_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub me: InstanceId,
    /// Base URL other instances forward requests to (`http://host:port`).
    pub advertise: String,
    pub lease_ttl: Duration,
    pub partitions: Partitions,
    pub broker: BrokerConfig,
    pub callbacks: CallbackConfig,
    pub seed: u64,
}

/// Where a partition's requests go.
#[derive(Clone)]
pub enum Route {
    Local(PartitionHandle),
    Remote {
        owner: InstanceId,
        addr: String,
    },
    /// No live owner: answer 503 with Retry-After.
    NoOwner,
}

pub struct Node {
    pub config: NodeConfig,
    pub store: Store,
    origin: Instant,
    clock: Clock,
    local: RwLock<BTreeMap<PartitionId, PartitionHandle>>,
    /// The last view of the lease table (owner address of each live lease).
    remote: RwLock<BTreeMap<PartitionId, (InstanceId, String)>>,
    /// Partitions taken (ms from kill to serve are measured by tests from here).
    pub takeovers: std::sync::atomic::AtomicU64,
}

impl Node {
    pub fn new(config: NodeConfig, store: Store) -> Arc<Node> {
        Arc::new(Node {
            config,
            store,
            origin: Instant::now(),
            clock: Clock::new(),
            local: RwLock::new(BTreeMap::new()),
            remote: RwLock::new(BTreeMap::new()),
            takeovers: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.lease_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn route(&self, p: PartitionId) -> Route {
        if let Some(h) = self.local.read().expect("lock").get(&p)
            && !h.is_closed()
        {
            return Route::Local(h.clone());
        }
        match self.remote.read().expect("lock").get(&p) {
            Some((owner, addr)) if *owner != self.config.me => Route::Remote {
                owner: owner.clone(),
                addr: addr.clone(),
            },
            _ => Route::NoOwner,
        }
    }

    pub fn local_handle(&self, p: PartitionId) -> Option<PartitionHandle> {
        self.local
            .read()
            .expect("lock")
            .get(&p)
            .filter(|h| !h.is_closed())
            .cloned()
    }

    pub fn served(&self) -> Vec<PartitionId> {
        self.local.read().expect("lock").keys().copied().collect()
    }

    /// The owner and address of every partition, as this instance last saw them.
    pub fn routes(&self) -> BTreeMap<PartitionId, Option<(InstanceId, String)>> {
        let remote = self.remote.read().expect("lock");
        let local = self.local.read().expect("lock");
        self.config
            .partitions
            .all()
            .map(|p| {
                let r = if local.contains_key(&p) {
                    Some((self.config.me.clone(), self.config.advertise.clone()))
                } else {
                    remote.get(&p).cloned()
                };
                (p, r)
            })
            .collect()
    }

    /// Runs the lease loop until `stop` turns true, then hands every
    /// partition back cleanly.
    pub async fn run(self: Arc<Node>, mut stop: watch::Receiver<bool>) {
        let tick = Duration::from_millis(lease_tick_ms(self.ttl_ms()));
        let mut tasks: BTreeMap<PartitionId, (PartitionHandle, JoinHandle<PartitionEnd>)> = BTreeMap::new();
        loop {
            if let Err(e) = self.round(&mut tasks).await {
                tracing::warn!("lease round failed: {e}");
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        for (p, (h, join)) in std::mem::take(&mut tasks) {
            self.hand_back(p, h, join).await;
        }
        tracing::info!("every partition handed back");
    }

    async fn round(
        &self,
        tasks: &mut BTreeMap<PartitionId, (PartitionHandle, JoinHandle<PartitionEnd>)>,
    ) -> Result<(), String> {
        // Partitions that stopped by themselves (fenced, lease ran out).
        let ended: Vec<PartitionId> = tasks
            .iter()
            .filter(|(_, (_, j))| j.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            tasks.remove(&p);
            self.local.write().expect("lock").remove(&p);
        }
        let ttl = self.config.lease_ttl;
        let ttl_ms = self.ttl_ms();
        let me = &self.config.me;
        self.store.heartbeat(me, &self.config.advertise).await?;
        let view = self.store.view(ttl).await?;
        let serving: BTreeSet<PartitionId> = tasks.keys().copied().collect();
        let leases: Vec<_> = view.leases.iter().map(|l| l.view.clone()).collect();
        let plan = plan(me, &leases, &view.live, &serving);

        // Served here but no longer ours in the table (taken over while this
        // instance was paused or cut off): stop at once rather than at the
        // first fenced write.
        let planned: BTreeSet<PartitionId> = plan.renew.iter().chain(&plan.release).map(|(p, _)| *p).collect();
        let gone: Vec<PartitionId> = tasks.keys().filter(|p| !planned.contains(p)).copied().collect();
        for p in gone {
            if let Some((_, join)) = tasks.remove(&p) {
                tracing::warn!(partition = %p, "the lease table names another owner: stopping");
                join.abort();
                self.local.write().expect("lock").remove(&p);
            }
        }
        let sent = self.now_ms();
        let kept = self.store.renew(me, &plan.renew, ttl).await?;
        for (p, _) in &plan.renew {
            if kept.contains(p) {
                if let Some((h, _)) = tasks.get(p) {
                    h.extend(
                        LocalLease {
                            epoch: h.epoch,
                            renew_sent_ms: sent,
                        }
                        .valid_until_ms(ttl_ms),
                    );
                }
            } else if let Some((_, join)) = tasks.remove(p) {
                tracing::warn!(partition = %p, "lease lost (another instance took it): stopping");
                join.abort();
                self.local.write().expect("lock").remove(p);
            }
        }
        for (p, _) in &plan.release {
            if let Some((h, join)) = tasks.remove(p) {
                self.hand_back(*p, h, join).await;
            }
        }
        for p in &plan.acquire {
            let sent = self.now_ms();
            let Some(epoch) = self.store.acquire(*p, me, ttl).await? else {
                continue;
            };
            let start = PartitionStart {
                partition: *p,
                partitions: self.config.partitions,
                epoch,
                me: me.clone(),
                store: self.store.clone(),
                config: self.config.broker.clone(),
                seed: self.config.seed ^ (u64::from(p.0) << 32) ^ epoch,
                callbacks: self.config.callbacks.clone(),
                clock: self.clock,
                origin: self.origin,
                valid_until_ms: LocalLease {
                    epoch,
                    renew_sent_ms: sent,
                }
                .valid_until_ms(ttl_ms),
            };
            match partition::start(start).await {
                Ok((h, join, rows)) => {
                    tracing::info!(partition = %p, epoch, rows, "took the partition");
                    self.takeovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.local.write().expect("lock").insert(*p, h.clone());
                    tasks.insert(*p, (h, join));
                }
                Err(e) => {
                    tracing::error!(partition = %p, "cannot serve the partition: {e}");
                    let _ = self.store.release(*p, me, epoch).await;
                }
            }
        }
        self.update_routes(&view);
        Ok(())
    }

    fn update_routes(&self, view: &ClusterView) {
        let mut remote = self.remote.write().expect("lock");
        remote.clear();
        for l in &view.leases {
            if let (true, Some(owner), Some(addr)) = (l.view.live, &l.view.owner, &l.addr) {
                remote.insert(l.view.partition, (owner.clone(), addr.clone()));
            }
        }
    }

    /// Stops serving `p` (its writes finish, its requests are answered), then
    /// expires its lease so another instance takes it at once.
    async fn hand_back(&self, p: PartitionId, h: PartitionHandle, join: JoinHandle<PartitionEnd>) {
        self.local.write().expect("lock").remove(&p);
        h.stop().await;
        let mut join = join;
        match tokio::time::timeout(HAND_BACK_WAIT_MAX, &mut join).await {
            Ok(Ok(PartitionEnd::Clean)) => {
                if let Err(e) = self.store.release(p, &self.config.me, h.epoch).await {
                    tracing::warn!(partition = %p, "release: {e} (the lease expires by itself)");
                } else {
                    tracing::info!(partition = %p, "handed the partition back");
                }
            }
            Ok(Ok(PartitionEnd::Lost(_))) | Ok(Err(_)) => {}
            Err(_) => {
                join.abort();
                tracing::warn!(partition = %p, "hand-back timed out; the lease expires by itself");
            }
        }
    }
}

//! One partition served by this instance: the task that owns its broker core
//! (recovered from the partition's rows), writes its records to PostgreSQL
//! fenced by the lease epoch, sends its callbacks and answers its requests.
//!
//! **Invariants:** like the file driver, a reply the core gates on
//! durability is sent only after the write covering it committed; one write
//! is in flight at a time, so rows commit in lsn order; a write whose outcome
//! is unknown is retried as is (idempotent) while the lease is locally valid;
//! a fenced write stops the partition at once and answers nothing more (its
//! waiting requests see the partition gone, a retry reaches the new owner,
//! which has every row that committed). Message ids leave as cluster ids
//! ([`Partitions::cluster_msg_id`]).

use super::store::{Store, WriteError};
use crate::broker::{
    Broker, BrokerConfig, BrokerInput, BrokerOutput, BrokerStats, CallbackResult, DeliveryId, Lsn, Reply, RequestId,
};
use crate::cluster::PendingRows;
use crate::cluster::{InstanceId, PartitionId, Partitions};
use crate::machine::Machine;
use crate::real::callbacks::{CallbackConfig, Dispatcher};
use crate::real::clock::Clock;
use crate::real::driver::Request;
use crate::types::{ClientId, Message};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Requests queued to one partition; when full, handlers wait (bounded by the HTTP layer).
pub const PARTITION_COMMANDS_MAX: usize = 4096;
/// Inputs taken in one turn before outputs are drained.
const TURN_INPUTS_MAX: usize = 512;
/// Pause between attempts of a write whose outcome was unknown.
const WRITE_RETRY_DELAY: Duration = Duration::from_millis(100);

enum Command {
    Request {
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    Stats {
        reply: oneshot::Sender<BrokerStats>,
    },
    DeadLetters {
        client: ClientId,
        reply: oneshot::Sender<Vec<Message>>,
    },
    /// Finish the writes in flight and pending (answering their requests), then stop.
    Stop,
}

/// Why a partition is not taking a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionGone {
    /// It stopped (lease lost, handed back, or shutting down).
    Stopped,
    /// Its queue stayed full.
    Busy,
}

/// What the HTTP layer holds to talk to a partition served here.
#[derive(Clone)]
pub struct PartitionHandle {
    pub partition: PartitionId,
    pub epoch: u64,
    tx: mpsc::Sender<Command>,
    /// Milliseconds (on the node's monotonic origin) until which the lease is locally valid.
    valid_until_ms: Arc<AtomicU64>,
}

impl PartitionHandle {
    async fn send(&self, cmd: Command) -> Result<(), PartitionGone> {
        match tokio::time::timeout(crate::real::driver::COMMAND_QUEUE_WAIT_MAX, self.tx.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(PartitionGone::Stopped),
            Err(_) => Err(PartitionGone::Busy),
        }
    }

    pub async fn request(&self, request: Request) -> Result<Reply, PartitionGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request { request, reply }).await?;
        rx.await.map_err(|_| PartitionGone::Stopped)
    }

    pub async fn stats(&self) -> Result<BrokerStats, PartitionGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        rx.await.map_err(|_| PartitionGone::Stopped)
    }

    pub async fn dead_letters(&self, client: ClientId) -> Result<Vec<Message>, PartitionGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::DeadLetters { client, reply }).await?;
        rx.await.map_err(|_| PartitionGone::Stopped)
    }

    /// Asks for a clean stop (writes finished); a stopped partition ignores it.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The lease was renewed: locally valid until `ms`.
    pub fn extend(&self, ms: u64) {
        self.valid_until_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// Everything a partition needs to start.
pub struct PartitionStart {
    pub partition: PartitionId,
    pub partitions: Partitions,
    pub epoch: u64,
    pub me: InstanceId,
    pub store: Store,
    pub config: BrokerConfig,
    pub seed: u64,
    pub callbacks: CallbackConfig,
    pub clock: Clock,
    /// The node's monotonic origin (lease validity is in ms since it).
    pub origin: Instant,
    pub valid_until_ms: u64,
}

/// How a partition ended.
#[derive(Debug)]
pub enum PartitionEnd {
    /// Stopped on request, every write finished.
    Clean,
    /// A write was fenced, or the lease could not be kept: nothing more was answered.
    Lost(String),
}

/// Loads the partition's rows, recovers its core, and spawns its task.
pub async fn start(s: PartitionStart) -> Result<(PartitionHandle, tokio::task::JoinHandle<PartitionEnd>, u64), String> {
    let (image, rows) = s.store.load(s.partition).await?;
    let config = s.config.clone();
    let seed = s.seed;
    let (broker, _report) = tokio::task::spawn_blocking(move || Broker::recover(config, seed, &image))
        .await
        .map_err(|e| format!("recovery task: {e}"))?
        .map_err(|e| format!("partition {} holds a log that does not recover: {e}", s.partition))?;
    let (callbacks, callback_results) = Dispatcher::new(s.callbacks.clone())?;
    let (tx, rx) = mpsc::channel(PARTITION_COMMANDS_MAX);
    let (done_tx, done_rx) = mpsc::channel(1);
    let valid = Arc::new(AtomicU64::new(s.valid_until_ms));
    let handle = PartitionHandle {
        partition: s.partition,
        epoch: s.epoch,
        tx,
        valid_until_ms: valid.clone(),
    };
    let runner = Runner {
        broker,
        s,
        callbacks,
        callback_results,
        commands: rx,
        replies: BTreeMap::new(),
        request_next: 0,
        pending: PendingRows::default(),
        in_flight: None,
        done_tx,
        done_rx,
        valid_until_ms: valid,
        stopping: false,
    };
    Ok((handle, tokio::spawn(runner.run()), rows))
}

struct Runner {
    broker: Broker,
    s: PartitionStart,
    callbacks: Dispatcher,
    callback_results: mpsc::Receiver<(DeliveryId, CallbackResult)>,
    commands: mpsc::Receiver<Command>,
    replies: BTreeMap<RequestId, oneshot::Sender<Reply>>,
    request_next: u64,
    pending: PendingRows,
    in_flight: Option<Lsn>,
    done_tx: mpsc::Sender<(Lsn, Result<(), WriteError>)>,
    done_rx: mpsc::Receiver<(Lsn, Result<(), WriteError>)>,
    valid_until_ms: Arc<AtomicU64>,
    stopping: bool,
}

impl Runner {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.s.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lease_valid(&self) -> bool {
        self.now_ms() < self.valid_until_ms.load(Ordering::Relaxed)
    }

    async fn run(mut self) -> PartitionEnd {
        let p = self.s.partition;
        tracing::info!(partition = %p, epoch = self.s.epoch, "serving partition");
        self.turn();
        loop {
            if !self.lease_valid() {
                return self.lost("the lease could not be renewed in time");
            }
            if self.stopping && self.in_flight.is_none() && self.pending.is_empty() {
                tracing::info!(partition = %p, "partition handed back cleanly");
                return PartitionEnd::Clean;
            }
            let core_deadline = self.broker.poll_timeout().map(|t| self.s.clock.instant_of(t));
            // Wake to re-check the lease at least every 50 ms.
            let check = Instant::now() + Duration::from_millis(50);
            let deadline = core_deadline.map_or(check, |d| d.min(check));
            tokio::select! {
                biased;
                Some((lsn, result)) = self.done_rx.recv() => {
                    self.in_flight = None;
                    match result {
                        Ok(()) => {
                            let now = self.s.clock.now();
                            self.broker.handle(now, BrokerInput::Durable { lsn });
                        }
                        Err(e) => return self.lost(&e.to_string()),
                    }
                }
                Some((delivery, result)) = self.callback_results.recv() => {
                    let now = self.s.clock.now();
                    self.broker.handle(now, BrokerInput::CallbackResult { delivery, result });
                }
                cmd = self.commands.recv(), if !self.stopping => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => self.stopping = true,
                },
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            for _ in 0..TURN_INPUTS_MAX {
                match self.callback_results.try_recv() {
                    Ok((delivery, result)) => {
                        let now = self.s.clock.now();
                        self.broker
                            .handle(now, BrokerInput::CallbackResult { delivery, result });
                    }
                    Err(_) => break,
                }
            }
            for _ in 0..TURN_INPUTS_MAX {
                if self.stopping {
                    break;
                }
                match self.commands.try_recv() {
                    Ok(cmd) => self.on_command(cmd),
                    Err(_) => break,
                }
            }
            self.turn();
        }
    }

    fn lost(self, why: &str) -> PartitionEnd {
        tracing::warn!(partition = %self.s.partition, epoch = self.s.epoch, "stopped serving the partition: {why}");
        // Dropping `self` drops every waiting reply: those requests see the
        // partition gone, and a retry reaches the new owner.
        PartitionEnd::Lost(why.to_string())
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { request, reply } => {
                self.request_next += 1;
                let req = RequestId(self.request_next);
                self.replies.insert(req, reply);
                let input = match request {
                    Request::Publish(publish) => BrokerInput::Publish { req, publish },
                    Request::Subscribe(subscribe) => BrokerInput::Subscribe { req, subscribe },
                    Request::Unsubscribe { client, topic } => BrokerInput::Unsubscribe { req, client, topic },
                    Request::Redrive { client } => BrokerInput::Redrive { req, client },
                };
                let now = self.s.clock.now();
                self.broker.handle(now, input);
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.broker.stats());
            }
            Command::DeadLetters { client, reply } => {
                let parts = self.s.partitions;
                let p = self.s.partition;
                let mut list = self.broker.dead_letters(&client);
                for m in &mut list {
                    m.msg_id = parts.cluster_msg_id(p, m.msg_id);
                }
                let _ = reply.send(list);
            }
            Command::Stop => self.stopping = true,
        }
    }

    fn turn(&mut self) {
        let now = self.s.clock.now();
        if self.broker.poll_timeout().is_some_and(|t| t <= now) {
            self.broker.handle_timeout(now);
        }
        let (parts, p) = (self.s.partitions, self.s.partition);
        while let Some(out) = self.broker.poll_output() {
            match out {
                BrokerOutput::Persist { lsn, frames } => self.pending.append(lsn, frames),
                BrokerOutput::Rewrite { lsn, frames, .. } => self.pending.replace(lsn, frames),
                BrokerOutput::Reply { req, reply } => {
                    let reply = match reply {
                        Reply::Published { msg_id, duplicate } => Reply::Published {
                            msg_id: parts.cluster_msg_id(p, msg_id),
                            duplicate,
                        },
                        other => other,
                    };
                    if let Some(tx) = self.replies.remove(&req) {
                        let _ = tx.send(reply);
                    }
                }
                BrokerOutput::Callback(mut cb) => {
                    if !self.stopping {
                        cb.message.msg_id = parts.cluster_msg_id(p, cb.message.msg_id);
                        self.callbacks.dispatch(cb);
                    }
                }
            }
        }
        self.start_write();
    }

    fn start_write(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let Some((lsn, rows)) = self.pending.take() else { return };
        self.in_flight = Some(lsn);
        let store = self.s.store.clone();
        let (p, me, epoch) = (self.s.partition, self.s.me.clone(), self.s.epoch);
        let done = self.done_tx.clone();
        let valid = self.valid_until_ms.clone();
        let origin = self.s.origin;
        tokio::spawn(async move {
            let result = loop {
                match store.write(p, &me, epoch, &rows).await {
                    Ok(()) => break Ok(()),
                    Err(WriteError::Db(e)) => {
                        let now_ms = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
                        if now_ms >= valid.load(Ordering::Relaxed) {
                            break Err(WriteError::Db(format!("{e}; the lease ran out while retrying")));
                        }
                        tracing::warn!(partition = %p, "write failed, writing the same rows again: {e}");
                        tokio::time::sleep(WRITE_RETRY_DELAY).await;
                    }
                    Err(fenced) => break Err(fenced),
                }
            };
            let _ = done.send((lsn, result)).await;
        });
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::real::callbacks::Allowlist;
    use crate::types::{GlobalId, PublishRequest, SenderId, SubId, Topic};

    pub fn publish(gid: &str) -> Request {
        Request::Publish(PublishRequest {
            global_id: GlobalId::lit(gid),
            sub_id: SubId::lit("1"),
            sender_id: SenderId::lit("t"),
            create_time: 0,
            topic: Topic::lit("t"),
            content: "x".into(),
        })
    }

    pub async fn serve(
        store: &Store,
        me: &str,
        epoch: u64,
    ) -> (PartitionHandle, tokio::task::JoinHandle<PartitionEnd>) {
        let origin = Instant::now();
        let (h, join, _) = start(PartitionStart {
            partition: PartitionId(0),
            partitions: Partitions::new(1).unwrap(),
            epoch,
            me: InstanceId(me.into()),
            store: store.clone(),
            config: BrokerConfig::default(),
            seed: 1,
            callbacks: CallbackConfig {
                timeout: Duration::from_secs(1),
                signing_key: None,
                allow: Allowlist::loopback(),
                inflight_per_subscriber_max: 4,
                extra_roots: Vec::new(),
            },
            clock: Clock::new(),
            origin,
            valid_until_ms: 60_000,
        })
        .await
        .unwrap();
        (h, join)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    /// A stale owner answers nothing it cannot store; the new owner has
    /// everything the old one acknowledged and answers it with the original id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fenced_owner_stops_and_the_new_owner_answers_the_original_msg_id() {
        crate::real::callbacks::install_default_crypto_provider();
        let Some(url) = super::super::testdb::fresh("partition_fenced").await else {
            return;
        };
        let store = Store::connect(&url, 4).unwrap();
        store.init(Some(1), "k").await.unwrap();
        let ttl = Duration::from_secs(60);
        let (a, b) = (InstanceId("a".into()), InstanceId("b".into()));
        let ea = store.acquire(PartitionId(0), &a, ttl).await.unwrap().unwrap();
        let (ha, join_a) = serve(&store, "a", ea).await;
        let Ok(Reply::Published {
            msg_id,
            duplicate: false,
        }) = ha.request(publish("g1")).await
        else {
            panic!("first publish")
        };
        // b takes the partition over (a's lease "expired": a was paused).
        let c = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(c.1);
        c.0.execute("UPDATE sagamq_leases SET expires_at = now() - interval '1 second'", &[])
            .await
            .unwrap();
        let eb = store.acquire(PartitionId(0), &b, ttl).await.unwrap().unwrap();
        let (hb, _join_b) = serve(&store, "b", eb).await;
        // a's next write is fenced: its request is not acknowledged, a stops.
        assert_eq!(ha.request(publish("g2")).await, Err(PartitionGone::Stopped));
        assert!(matches!(join_a.await.unwrap(), PartitionEnd::Lost(why) if why.contains("fenced")));
        assert!(ha.request(publish("g3")).await.is_err(), "a stopped serving");
        // b has g1 under its original id, and g2 was never stored.
        assert_eq!(
            hb.request(publish("g1")).await,
            Ok(Reply::Published {
                msg_id,
                duplicate: true
            })
        );
        assert!(matches!(
            hb.request(publish("g2")).await,
            Ok(Reply::Published { duplicate: false, .. })
        ));
    }
}

/// A COMMIT whose answer never arrives (the connection cut right after it
/// left), through a TCP proxy between the store and PostgreSQL.
#[cfg(test)]
mod commit_lost {
    use super::tests_support::*;
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Relays bytes both ways; when `arm` is set, the first client chunk
    /// holding a `COMMIT` query is forwarded and then the connection is cut
    /// before any answer reaches the client.
    async fn proxy(upstream: String, arm: Arc<AtomicBool>, cuts: Arc<AtomicU64>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (arm, cuts) = (arm.clone(), cuts.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let cut = Arc::new(AtomicBool::new(false));
                    let cut2 = cut.clone();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let commit = buf[..n].windows(6).any(|w| w == b"COMMIT");
                            if commit && arm.swap(false, Ordering::SeqCst) {
                                cut2.store(true, Ordering::SeqCst);
                                cuts.fetch_add(1, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) {
                            // The answer to COMMIT is dropped, the client's side closed.
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    drop(cw);
                    up.abort();
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_whose_commit_answer_is_lost_is_written_again_stored_once_and_answered() {
        crate::real::callbacks::install_default_crypto_provider();
        let Some(url) = super::super::testdb::fresh("commit_lost").await else {
            return;
        };
        let parsed = reqwest::Url::parse(&url).unwrap();
        let upstream = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap_or(5432));
        let (arm, cuts) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let via = proxy(upstream, arm.clone(), cuts.clone()).await;
        let mut proxied = parsed.clone();
        proxied.set_host(Some("127.0.0.1")).unwrap();
        proxied.set_port(Some(via.port())).unwrap();
        let store = Store::connect(proxied.as_str(), 2).unwrap();
        store.init(Some(1), "k").await.unwrap();
        let ttl = Duration::from_secs(60);
        let a = InstanceId("a".into());
        let ea = store.acquire(PartitionId(0), &a, ttl).await.unwrap().unwrap();
        let (ha, _join) = serve(&store, "a", ea).await;
        // Let the recovered core's first write (its Epoch record) commit first.
        ha.stats().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        arm.store(true, Ordering::SeqCst);
        let reply = ha.request(publish("g1")).await;
        assert_eq!(
            cuts.load(Ordering::SeqCst),
            1,
            "the COMMIT answer was cut; reply {reply:?}"
        );
        let Ok(Reply::Published {
            msg_id,
            duplicate: false,
        }) = reply
        else {
            panic!("{reply:?}")
        };
        // Stored once: recovery refuses a key stored twice, and knows one key
        // (settled at once: nobody is subscribed).
        let (image, _) = store.load(PartitionId(0)).await.unwrap();
        let (recovered, _) = Broker::recover(BrokerConfig::default(), 1, &image).expect("one copy");
        let st = recovered.stats();
        assert_eq!(st.messages_live + st.dedup_settled, 1);
        // Published again: the original id.
        assert_eq!(
            ha.request(publish("g1")).await,
            Ok(Reply::Published {
                msg_id,
                duplicate: true
            })
        );
    }
}

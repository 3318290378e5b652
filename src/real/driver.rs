//! The driver: the single task that owns the [`Broker`] and moves bytes and
//! timestamps for it (HTTP requests in, replies out, log writes, callbacks,
//! timers).
//!
//! **Invariants:** the broker is touched by this task only; every input gets
//! `now` from one monotonic [`Clock`]; a `Persist`/`Rewrite` is reported
//! `Durable` only after the writer thread's fsync returned (so replies the core
//! gates on durability are never early); all `Persist` outputs gathered while
//! one fsync runs go out together in the next one (group commit); at shutdown
//! the answers of callbacks in flight are recorded (bounded wait) before the
//! last writes, so a clean restart does not deliver them again.

use super::callbacks::Dispatcher;
use super::clock::Clock;
use super::log_writer::{LogWriter, PendingWrites, WriteDone};
use crate::broker::{Broker, BrokerInput, BrokerOutput, BrokerStats, CallbackResult, DeliveryId, Reply, RequestId};
use crate::machine::Machine;
use crate::types::{ClientId, Message, PublishRequest, SubscribeRequest, Topic};
use std::collections::BTreeMap;
use std::fmt;
use tokio::sync::{mpsc, oneshot};

/// Capacity of the command channel from the HTTP handlers; when full, handlers wait.
pub const COMMANDS_QUEUED_MAX: usize = 8192;
/// Inputs taken in one turn before the outputs are drained (batches replies and writes).
const TURN_INPUTS_MAX: usize = 512;
/// How long a shutdown waits for the answers of callbacks in flight.
pub const SHUTDOWN_CALLBACKS_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(3);
/// Turns spent finishing writes at shutdown before giving up.
const SHUTDOWN_TURNS_MAX: usize = 1000;
/// Writes that no request waits for (delivery acks, dead letters) are synced
/// at most this late, or earlier with the next write a request waits for.
/// Losing them in a crash only causes a redelivery (at-least-once), and at
/// low rates it halves the fsyncs per message.
pub const LAZY_SYNC_DELAY_DEFAULT: std::time::Duration = std::time::Duration::from_millis(2);

/// What the driver needs from the core: the machine plus the operator queries.
/// [`Broker`] is the implementation; tests may drive a stand-in.
pub trait BrokerCore: Machine<Input = BrokerInput, Output = BrokerOutput> + Send + 'static {
    fn stats(&self) -> BrokerStats;
    fn dead_letters(&self, client: &ClientId) -> Vec<Message>;
}

impl BrokerCore for Broker {
    fn stats(&self) -> BrokerStats {
        Broker::stats(self)
    }
    fn dead_letters(&self, client: &ClientId) -> Vec<Message> {
        Broker::dead_letters(self, client)
    }
}

/// A client request that the core answers with a [`Reply`].
#[derive(Clone, Debug)]
pub enum Request {
    Publish(PublishRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe { client: ClientId, topic: Topic },
    Redrive { client: ClientId },
}

impl Request {
    fn into_input(self, req: RequestId) -> BrokerInput {
        match self {
            Request::Publish(publish) => BrokerInput::Publish { req, publish },
            Request::Subscribe(subscribe) => BrokerInput::Subscribe { req, subscribe },
            Request::Unsubscribe { client, topic } => BrokerInput::Unsubscribe { req, client, topic },
            Request::Redrive { client } => BrokerInput::Redrive { req, client },
        }
    }
}

enum Command {
    Request {
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    DeadLetters {
        client: ClientId,
        reply: oneshot::Sender<Vec<Message>>,
    },
    Shutdown,
}

/// Durations counted in powers of two of microseconds: bucket `i` holds
/// those in `[2^i, 2^(i+1))` µs (bucket 0 also those under 1 µs), the last
/// bucket everything longer. Cheap enough to keep for every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log2Histogram {
    pub buckets: [u64; LOG2_BUCKETS],
    pub max_nanos: u64,
}

/// Buckets of a [`Log2Histogram`]: the last starts at 2^23 µs (about 8 s).
pub const LOG2_BUCKETS: usize = 24;

impl Log2Histogram {
    pub fn record(&mut self, d: std::time::Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = nanos / 1000;
        let i = if us == 0 { 0 } else { (63 - us.leading_zeros()) as usize };
        self.buckets[i.min(LOG2_BUCKETS - 1)] += 1;
        self.max_nanos = self.max_nanos.max(nanos);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound (µs) of the bucket that holds quantile `q` (0..=1):
    /// the true quantile is at most this and more than half of it.
    pub fn quantile_upper_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(1u64 << (i + 1));
            }
        }
        Some(1u64 << LOG2_BUCKETS)
    }
}

/// Counters the driver keeps about its IO (the core's own numbers are in [`BrokerStats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    pub fsyncs: u64,
    pub fsync_nanos_total: u64,
    /// How long each batch's `fdatasync` took on the log thread.
    pub fsync_time: Log2Histogram,
    /// From the driver taking a publish to sending its answer (the core, the
    /// wait for the group commit and its fsync; not the HTTP parts).
    pub publish_time: Log2Histogram,
    /// Records (frames) written; `records_written / fsyncs` is the group-commit factor.
    pub records_written: u64,
    pub bytes_written: u64,
    /// The most records one fsync covered.
    pub records_per_fsync_max: u64,
    pub compactions: u64,
    pub publishes_acked: u64,
    pub publishes_duplicate: u64,
    pub requests_rejected: u64,
    pub callbacks_delivered: u64,
    pub callbacks_failed: u64,
    pub callbacks_timed_out: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub broker: BrokerStats,
    pub io: IoStats,
    /// CPU this process has used so far (`getrusage(RUSAGE_SELF)`).
    pub cpu: Option<super::cpu::CpuTime>,
}

/// Why the driver did not take a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverGone {
    /// It has stopped (shutdown or a fatal log error).
    Stopped,
    /// Its command queue stayed full for [`COMMAND_QUEUE_WAIT_MAX`]: retry later.
    Busy,
}

impl fmt::Display for DriverGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverGone::Stopped => f.write_str("the broker is shutting down"),
            DriverGone::Busy => write!(
                f,
                "the broker is overloaded: its queue of {COMMANDS_QUEUED_MAX} requests stayed full for {COMMAND_QUEUE_WAIT_MAX:?}; retry later"
            ),
        }
    }
}

/// How long a handler waits for room in the command queue before answering
/// 503: a client is told to come back instead of holding its connection and
/// body in memory while the core catches up.
pub const COMMAND_QUEUE_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(200);

/// What the HTTP handlers hold to talk to the driver.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
}

impl DriverHandle {
    /// Queues a command, waiting at most [`COMMAND_QUEUE_WAIT_MAX`] for room.
    async fn send(&self, cmd: Command) -> Result<(), DriverGone> {
        match tokio::time::timeout(COMMAND_QUEUE_WAIT_MAX, self.tx.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(DriverGone::Stopped),
            Err(_) => Err(DriverGone::Busy),
        }
    }

    pub async fn request(&self, request: Request) -> Result<Reply, DriverGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request { request, reply }).await?;
        rx.await.map_err(|_| DriverGone::Stopped)
    }

    pub async fn stats(&self) -> Result<Stats, DriverGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        rx.await.map_err(|_| DriverGone::Stopped)
    }

    pub async fn dead_letters(&self, client: ClientId) -> Result<Vec<Message>, DriverGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::DeadLetters { client, reply }).await?;
        rx.await.map_err(|_| DriverGone::Stopped)
    }

    /// Asks the driver to finish its writes and stop (waits for room: a
    /// shutdown is never dropped).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    /// A handle whose queue of `capacity` nobody drains (a stuck core), for tests.
    #[cfg(test)]
    pub(crate) fn stuck(capacity: usize) -> (DriverHandle, Box<dyn std::any::Any + Send>) {
        let (tx, rx) = mpsc::channel(capacity);
        (DriverHandle { tx }, Box::new(rx))
    }
}

/// A fatal error: the log could not be written, so nothing more may be acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FatalLogError(pub String);

impl fmt::Display for FatalLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log write failed, stopping: {}", self.0)
    }
}

impl std::error::Error for FatalLogError {}

pub struct Driver<B: BrokerCore = Broker> {
    broker: B,
    clock: Clock,
    writer: LogWriter,
    pending: PendingWrites,
    callbacks: Dispatcher,
    callback_results: mpsc::Receiver<(DeliveryId, CallbackResult)>,
    replies: BTreeMap<RequestId, (oneshot::Sender<Reply>, std::time::Instant)>,
    request_next: u64,
    io: IoStats,
    commands: mpsc::Receiver<Command>,
    /// At shutdown, callbacks are no longer started (they are redelivered after restart).
    stopping: bool,
    /// When pending writes that no request waits for must start at the latest.
    lazy_deadline: Option<std::time::Instant>,
    /// See [`LAZY_SYNC_DELAY_DEFAULT`]; zero syncs every write at once.
    lazy_sync_delay: std::time::Duration,
    /// Callbacks dispatched whose result has not come back (each produces exactly one).
    callbacks_outstanding: u64,
    /// Requests taken since the last batch started: while there are any, a
    /// pending write may hold what one of them waits for, so it goes now.
    requests_unbatched: u64,
}

impl<B: BrokerCore> Driver<B> {
    pub fn new(
        broker: B,
        clock: Clock,
        writer: LogWriter,
        callbacks: Dispatcher,
        callback_results: mpsc::Receiver<(DeliveryId, CallbackResult)>,
    ) -> (Driver<B>, DriverHandle) {
        let (tx, rx) = mpsc::channel(COMMANDS_QUEUED_MAX);
        (
            Driver {
                broker,
                clock,
                writer,
                pending: PendingWrites::default(),
                callbacks,
                callback_results,
                replies: BTreeMap::new(),
                request_next: 0,
                io: IoStats::default(),
                commands: rx,
                stopping: false,
                lazy_deadline: None,
                lazy_sync_delay: LAZY_SYNC_DELAY_DEFAULT,
                callbacks_outstanding: 0,
                requests_unbatched: 0,
            },
            DriverHandle { tx },
        )
    }

    pub fn with_lazy_sync_delay(mut self, d: std::time::Duration) -> Self {
        self.lazy_sync_delay = d;
        self
    }

    /// Runs until [`DriverHandle::shutdown`] (or every handle is dropped), then
    /// finishes the writes in flight so their requests get answered.
    pub async fn run(mut self) -> Result<(), FatalLogError> {
        // Whatever recovery left to do (redeliveries, timers) starts now.
        self.turn();
        loop {
            let core_deadline = self.broker.poll_timeout().map(|t| self.clock.instant_of(t));
            let deadline = match (core_deadline, self.lazy_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Durability first: it releases replies. Then callback results,
                // which free window slots. Then new work. Fixed order, no RNG.
                biased;
                done = self.writer.done() => self.on_write_done(done)?,
                Some((delivery, result)) = self.callback_results.recv() => self.on_callback(delivery, result),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.on_command(cmd),
                },
                () = sleep => {}
            }
            if !self.take_ready_inputs() {
                break;
            }
            self.turn();
        }
        self.finish().await
    }

    /// Takes inputs that are already waiting, up to [`TURN_INPUTS_MAX`], so one
    /// turn answers many of them. Returns false on shutdown.
    fn take_ready_inputs(&mut self) -> bool {
        for _ in 0..TURN_INPUTS_MAX {
            match self.callback_results.try_recv() {
                Ok((d, r)) => self.on_callback(d, r),
                Err(_) => break,
            }
        }
        for _ in 0..TURN_INPUTS_MAX {
            match self.commands.try_recv() {
                Ok(Command::Shutdown) => return false,
                Ok(cmd) => self.on_command(cmd),
                Err(_) => break,
            }
        }
        true
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { request, reply } => {
                self.request_next += 1;
                self.requests_unbatched += 1;
                let req = RequestId(self.request_next);
                self.replies.insert(req, (reply, std::time::Instant::now()));
                let now = self.clock.now();
                self.broker.handle(now, request.into_input(req));
            }
            Command::Stats { reply } => {
                let _ = reply.send(Stats {
                    broker: self.broker.stats(),
                    io: self.io.clone(),
                    cpu: super::cpu::process_cpu(),
                });
            }
            Command::DeadLetters { client, reply } => {
                let _ = reply.send(self.broker.dead_letters(&client));
            }
            Command::Shutdown => {}
        }
    }

    fn on_callback(&mut self, delivery: DeliveryId, result: CallbackResult) {
        self.callbacks_outstanding = self.callbacks_outstanding.saturating_sub(1);
        match result {
            CallbackResult::Delivered => self.io.callbacks_delivered += 1,
            CallbackResult::Failed => self.io.callbacks_failed += 1,
            CallbackResult::TimedOut => self.io.callbacks_timed_out += 1,
        }
        let now = self.clock.now();
        self.broker
            .handle(now, BrokerInput::CallbackResult { delivery, result });
    }

    fn on_write_done(&mut self, done: WriteDone) -> Result<(), FatalLogError> {
        let report = done.result.map_err(FatalLogError)?;
        self.io.fsyncs += 1;
        self.io.fsync_nanos_total += u64::try_from(report.sync_time.as_nanos()).unwrap_or(u64::MAX);
        self.io.fsync_time.record(report.sync_time);
        self.io.records_written += report.records;
        self.io.bytes_written += report.bytes;
        self.io.records_per_fsync_max = self.io.records_per_fsync_max.max(report.records);
        if report.replaced {
            self.io.compactions += 1;
        }
        let now = self.clock.now();
        self.broker.handle(now, BrokerInput::Durable { lsn: done.lsn });
        Ok(())
    }

    /// Fires due timers, drains every output, and starts the next write if the
    /// disk is idle.
    fn turn(&mut self) {
        let now = self.clock.now();
        if self.broker.poll_timeout().is_some_and(|t| t <= now) {
            self.broker.handle_timeout(now);
        }
        while let Some(out) = self.broker.poll_output() {
            match out {
                BrokerOutput::Persist { lsn, frames } => self.pending.append(lsn, frames),
                BrokerOutput::Rewrite { lsn, frames, .. } => {
                    tracing::info!(bytes = frames.len(), "compacting the log");
                    self.pending.replace(lsn, frames);
                }
                BrokerOutput::Reply { req, reply } => self.reply(req, reply),
                BrokerOutput::Callback(cb) => {
                    if !self.stopping {
                        self.callbacks_outstanding += 1;
                        self.callbacks.dispatch(cb);
                    }
                }
            }
        }
        self.start_writes(false);
    }

    /// Hands the pending writes to the log thread, which takes everything
    /// handed over as one batch (group commit) as soon as its disk is free.
    /// Writes no request waits for may wait up to `lazy_sync_delay` to share
    /// an fsync.
    fn start_writes(&mut self, force: bool) {
        if self.pending.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let due = self.lazy_deadline.is_some_and(|d| d <= now);
        // A request taken since the last batch started may wait for a pending
        // write (the requests of the batch in flight wait for that one only).
        if force || due || self.requests_unbatched > 0 {
            self.lazy_deadline = None;
            self.requests_unbatched = 0;
            self.writer.start(&mut self.pending);
        } else if self.lazy_deadline.is_none() {
            self.lazy_deadline = Some(now + self.lazy_sync_delay);
        }
    }

    fn reply(&mut self, req: RequestId, reply: Reply) {
        match &reply {
            Reply::Published { duplicate: false, .. } => self.io.publishes_acked += 1,
            Reply::Published { duplicate: true, .. } => self.io.publishes_duplicate += 1,
            Reply::Rejected(_) => self.io.requests_rejected += 1,
            Reply::Subscribed { .. } | Reply::Unsubscribed | Reply::Redriven { .. } => {}
        }
        match self.replies.remove(&req) {
            // The client may have gone away; the effect stands either way.
            Some((tx, taken)) => {
                if matches!(reply, Reply::Published { .. }) {
                    self.io.publish_time.record(taken.elapsed());
                }
                let _ = tx.send(reply);
            }
            None => tracing::warn!(req = req.0, "reply for an unknown request"),
        }
    }

    /// Shutdown: no new requests or callbacks; finish pending writes so every
    /// request already accepted gets its answer.
    async fn finish(mut self) -> Result<(), FatalLogError> {
        self.stopping = true;
        self.commands.close();
        // Requests that were queued before the close still get processed.
        while let Ok(cmd) = self.commands.try_recv() {
            self.on_command(cmd);
        }
        // Callbacks in flight: a subscriber may already have answered 2xx.
        // Record those answers (bounded wait), or a clean restart would
        // deliver the message again.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_CALLBACKS_WAIT_MAX;
        while self.callbacks_outstanding > 0 {
            match tokio::time::timeout_at(deadline, self.callback_results.recv()).await {
                Ok(Some((delivery, result))) => self.on_callback(delivery, result),
                Ok(None) | Err(_) => break,
            }
        }
        if self.callbacks_outstanding > 0 {
            tracing::info!(
                outstanding = self.callbacks_outstanding,
                "callbacks still in flight at shutdown are redelivered after restart"
            );
        }
        self.turn();
        self.start_writes(true);
        for _ in 0..SHUTDOWN_TURNS_MAX {
            if self.writer.in_flight().is_none() && self.pending.is_empty() {
                break;
            }
            let done = self.writer.done().await;
            self.on_write_done(done)?;
            self.turn();
            self.start_writes(true);
        }
        let unanswered = self.replies.len();
        if unanswered > 0 {
            tracing::info!(
                unanswered,
                "requests left unanswered at shutdown (not durable, not acknowledged)"
            );
        }
        tracing::info!(fsyncs = self.io.fsyncs, records = self.io.records_written, "log closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Lsn, SubscriberStats};
    use crate::log::{decode_all, encode_frame};
    use crate::real::callbacks::{Allowlist, CallbackConfig};
    use crate::real::file_disk::FileDisk;
    use crate::types::{GlobalId, MsgId, SenderId, SubId, Time};
    use std::collections::VecDeque;
    use std::time::Duration;

    /// A stand-in core with the contract's durability rule: a publish is
    /// answered once its `Persist` is reported durable.
    #[derive(Default)]
    struct DurableEcho {
        out: VecDeque<BrokerOutput>,
        lsn: u64,
        waiting: Vec<(Lsn, RequestId, MsgId)>,
    }

    impl Machine for DurableEcho {
        type Input = BrokerInput;
        type Output = BrokerOutput;
        fn handle(&mut self, _now: Time, input: BrokerInput) {
            match input {
                BrokerInput::Publish { req, publish } => {
                    self.lsn += 1;
                    let mut frames = Vec::new();
                    encode_frame(publish.content.as_bytes(), &mut frames);
                    let lsn = Lsn(self.lsn);
                    self.out.push_back(BrokerOutput::Persist { lsn, frames });
                    self.waiting.push((lsn, req, MsgId(self.lsn)));
                }
                BrokerInput::Durable { lsn } => {
                    let (done, rest): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|(l, _, _)| *l <= lsn);
                    self.waiting = rest;
                    for (_, req, msg_id) in done {
                        let reply = Reply::Published {
                            msg_id,
                            duplicate: false,
                        };
                        self.out.push_back(BrokerOutput::Reply { req, reply });
                    }
                }
                other => panic!("unexpected input {other:?}"),
            }
        }
        fn handle_timeout(&mut self, _now: Time) {}
        fn poll_output(&mut self) -> Option<BrokerOutput> {
            self.out.pop_front()
        }
        fn poll_timeout(&self) -> Option<Time> {
            None
        }
    }

    impl BrokerCore for DurableEcho {
        fn stats(&self) -> BrokerStats {
            let mut s = BrokerStats::default();
            s.subscribers.insert(ClientId::lit("c"), SubscriberStats::default());
            s
        }
        fn dead_letters(&self, _client: &ClientId) -> Vec<Message> {
            Vec::new()
        }
    }

    fn publish(i: usize) -> PublishRequest {
        PublishRequest {
            global_id: GlobalId::lit(&format!("g{i}")),
            sub_id: SubId::lit("1"),
            sender_id: SenderId::lit("t"),
            create_time: 0,
            topic: Topic::lit("t"),
            content: format!("payload-{i}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_wait_for_fsync_and_concurrent_publishes_share_fsyncs() {
        let dir = std::env::temp_dir().join(format!("sagamq-driver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = FileDisk::open(&dir).unwrap();
        let log_path = disk.path().to_path_buf();
        let writer = LogWriter::spawn(disk).unwrap();
        let (callbacks, results) = Dispatcher::new(CallbackConfig {
            timeout: Duration::from_secs(1),
            signing_key: None,
            allow: Allowlist::loopback(),
            inflight_per_subscriber_max: 4,
            extra_roots: Vec::new(),
        })
        .unwrap();
        let (driver, handle) = Driver::new(DurableEcho::default(), Clock::new(), writer, callbacks, results);
        let run = tokio::spawn(driver.run());

        const N: usize = 200;
        let mut tasks = Vec::new();
        for i in 0..N {
            let h = handle.clone();
            let path = log_path.clone();
            tasks.push(tokio::spawn(async move {
                let reply = h.request(Request::Publish(publish(i))).await.unwrap();
                let Reply::Published { msg_id, .. } = reply else {
                    panic!("{reply:?}")
                };
                // Answered only after fsync: the record is already in the file.
                let file = std::fs::read(&path).unwrap();
                let on_disk = decode_all(&file)
                    .expect("a log mid-append is at worst torn")
                    .records
                    .len() as u64;
                assert!(
                    on_disk >= msg_id.0,
                    "msg {} answered with {on_disk} records on disk",
                    msg_id.0
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let st = handle.stats().await.unwrap();
        assert_eq!(st.io.records_written, N as u64);
        assert_eq!(st.io.publishes_acked, N as u64);
        assert!(
            st.io.fsyncs < N as u64,
            "no group commit: {} fsyncs for {N} publishes",
            st.io.fsyncs
        );
        assert!(st.io.records_per_fsync_max > 1);
        handle.shutdown().await;
        run.await.unwrap().unwrap();
        assert!(handle.stats().await.is_err(), "driver answers after shutdown");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

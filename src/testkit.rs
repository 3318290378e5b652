//! An in-process deterministic driver for tests: one [`Broker`] and any hosted
//! participants wired by FIFO queues, each with a `MemDisk` that syncs at once
//! (auto-durable), on a virtual clock that jumps to the next `poll_timeout`
//! when nothing is queued. No threads, no sleeps, no real time.
//!
//! **Invariant:** a run is a pure function of what the test does (inputs,
//! schedule, crashes); every loop is bounded by [`World::steps_max`] and by the
//! caller's time limit, and every event is one readable line in the trace.
//!
//! The simulator (`sim/`) is the faulty, networked version of this; the
//! testkit is for fast scenario tests and for trying a custom participant.

use crate::broker::{Broker, BrokerConfig, BrokerInput, BrokerOutput, CallbackResult, DeliveryId, Reply, RequestId};
use crate::log::{Disk, LogError, MemDisk};
use crate::machine::Machine;
use crate::saga::audit::{self, Violation};
use crate::saga::order::{Order, OrderFlow};
use crate::saga::payment::Payment;
use crate::saga::scenario::Scenario;
use crate::saga::stock::Stock;
use crate::saga::{
    AnyParticipant, CallbackToken, Command, CommandOutcome, HostConfig, OutboxId, Participant, ParticipantHost,
    ParticipantInput, ParticipantOutput, RecoveryReport, topics,
};
use crate::types::{ClientId, Time, Topic};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

/// Tokens of duplicated callbacks carry this bit; their answers are dropped
/// (the broker hears only the answer to the original).
const DUPLICATE_TOKEN_BIT: u64 = 1 << 63;

/// Why a run stopped before its goal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorldError {
    StepLimit {
        steps: u64,
        now: Time,
    },
    TimeLimit {
        now: Time,
    },
    /// Nothing is queued and no machine has a deadline: the goal cannot be reached.
    Idle {
        now: Time,
    },
    Recovery(LogError),
}

impl fmt::Display for WorldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorldError::StepLimit { steps, now } => write!(f, "step limit {steps} reached at t={now}"),
            WorldError::TimeLimit { now } => write!(f, "time limit reached at t={now}"),
            WorldError::Idle { now } => write!(f, "nothing left to do at t={now}"),
            WorldError::Recovery(e) => write!(f, "recovery failed: {e}"),
        }
    }
}

impl std::error::Error for WorldError {}

#[derive(Clone, Debug)]
enum Envelope {
    ToBroker(BrokerInput),
    ToNode(ClientId, ParticipantInput),
}

#[derive(Clone, Debug)]
enum PendingRequest {
    Publish(OutboxId),
    Subscribe(Topic),
}

struct Slot {
    node: Box<dyn AnyParticipant>,
    disk: MemDisk,
}

/// A command's outcome as the world saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRecord {
    pub at: Time,
    pub client: ClientId,
    pub command: Command,
    pub outcome: CommandOutcome,
}

/// Counters of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorldStats {
    pub steps: u64,
    pub callbacks: u64,
    pub duplicated_callbacks: u64,
    /// Answers participants gave (to originals, not to duplicate copies).
    pub answers: u64,
    /// Of those, answers lost on the way back ([`World::lose_answer_every`]).
    pub answers_lost: u64,
    pub publishes: u64,
    pub crashes: u64,
}

pub struct World {
    now: Time,
    broker: Broker,
    broker_config: BrokerConfig,
    broker_seed: u64,
    broker_disk: MemDisk,
    nodes: BTreeMap<ClientId, Slot>,
    queue: VecDeque<Envelope>,
    requests: BTreeMap<RequestId, (ClientId, PendingRequest)>,
    request_next: u64,
    /// Callbacks handed to a participant and not yet answered.
    callbacks: BTreeMap<DeliveryId, ClientId>,
    schedule: BTreeMap<(Time, u64), (ClientId, ParticipantInput)>,
    schedule_next: u64,
    /// Scheduled inputs wait while `start` runs.
    schedule_held: bool,
    /// Participants that are unreachable: callbacks to them fail.
    paused: BTreeSet<ClientId>,
    commands: Vec<CommandRecord>,
    trace: Vec<String>,
    /// Record trace lines (on by default; off for large runs).
    pub trace_enabled: bool,
    /// Every run stops with `StepLimit` after this many steps in total.
    pub steps_max: u64,
    /// Deliver every n-th callback twice (a duplicate fault); 0 = never. The
    /// copy arrives right before the original, so an inbox that remembers the
    /// key absorbs it.
    pub duplicate_every: u64,
    /// Lose every n-th answer a participant gives (a lost acknowledgement); 0 =
    /// never. The participant has committed and answered, the broker never
    /// hears it: it times the callback out (`BrokerConfig::callback_timeout`)
    /// and redelivers later, after other messages. With a small
    /// `HostConfig::inbox_keys_max` the redelivery reaches the participant's
    /// logic, which is how the simulator catches a participant that is not
    /// idempotent per business key.
    pub lose_answer_every: u64,
    stats: WorldStats,
}

impl World {
    pub fn new(broker_config: BrokerConfig, broker_seed: u64) -> World {
        World {
            now: Time::ZERO,
            broker: Broker::new(broker_config.clone(), broker_seed),
            broker_config,
            broker_seed,
            broker_disk: MemDisk::new(),
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            requests: BTreeMap::new(),
            request_next: 1,
            callbacks: BTreeMap::new(),
            schedule: BTreeMap::new(),
            schedule_next: 0,
            schedule_held: false,
            paused: BTreeSet::new(),
            commands: Vec::new(),
            trace: Vec::new(),
            trace_enabled: true,
            steps_max: 1_000_000,
            duplicate_every: 0,
            lose_answer_every: 0,
            stats: WorldStats::default(),
        }
    }

    /// The three shipped participants for `scenario` (payment only in the
    /// saga flow), with its orders scheduled at their creation times.
    pub fn for_scenario(scenario: &Scenario, seed: u64) -> World {
        let mut world = World::new(BrokerConfig::default(), seed);
        world.add(scenario.order_participant(), host_config(topics::ORDER_SERVICE, seed));
        world.add(scenario.stock_participant(), host_config(topics::STOCK_SERVICE, seed));
        if scenario.flow == OrderFlow::Saga {
            world.add(
                scenario.payment_participant(),
                host_config(topics::PAYMENT_SERVICE, seed),
            );
        }
        let order_service = ClientId::lit(topics::ORDER_SERVICE);
        for o in &scenario.orders {
            world.schedule(o.at, &order_service, ParticipantInput::Command(o.command()));
        }
        world
    }

    /// Hosts `logic` as a new participant (it subscribes on the first step).
    pub fn add<P: Participant>(&mut self, logic: P, config: HostConfig) {
        let client = config.client_id.clone();
        let node = Box::new(ParticipantHost::new(logic, config));
        let slot = Slot {
            node,
            disk: MemDisk::new(),
        };
        assert!(
            self.nodes.insert(client.clone(), slot).is_none(),
            "participant {client} added twice"
        );
    }

    /// Feeds `input` to participant `client` at time `at` (or now, if past).
    pub fn schedule(&mut self, at: Time, client: &ClientId, input: ParticipantInput) {
        self.schedule.insert((at, self.schedule_next), (client.clone(), input));
        self.schedule_next += 1;
    }

    pub fn now(&self) -> Time {
        self.now
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn stats(&self) -> &WorldStats {
        &self.stats
    }

    pub fn commands(&self) -> &[CommandRecord] {
        &self.commands
    }

    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// The hosted participant `client`, if it has type `P`.
    pub fn host<P: Participant>(&self, client: &str) -> Option<&ParticipantHost<P>> {
        let slot = self.nodes.get(&ClientId::new(client).ok()?)?;
        slot.node.as_any().downcast_ref::<ParticipantHost<P>>()
    }

    /// The durable image of participant `client`'s log.
    pub fn log_image(&self, client: &str) -> Option<Vec<u8>> {
        let slot = self.nodes.get(&ClientId::new(client).ok()?)?;
        Some(slot.disk.read_all())
    }

    /// Whether every participant's subscriptions are confirmed.
    pub fn all_subscribed(&self) -> bool {
        self.nodes.values().all(|s| s.node.subscribed())
    }

    /// Whether every participant's outbox is acknowledged.
    pub fn outboxes_empty(&self) -> bool {
        self.nodes.values().all(|s| s.node.outbox_len() == 0)
    }

    /// Runs until every participant is subscribed (do this before the workload:
    /// the broker delivers a message only to subscriptions live at its publish).
    pub fn start(&mut self) -> Result<(), WorldError> {
        let limit = self.now.plus(Duration::from_secs(60));
        self.schedule_held = true;
        let result = self.run_until(limit, World::all_subscribed);
        self.schedule_held = false;
        result
    }

    /// Makes participant `client` unreachable: every callback to it fails (as
    /// a refused connection would) until [`World::resume`]. Its own timers
    /// and publishes go on.
    pub fn pause(&mut self, client: &str) {
        let client = ClientId::lit(client);
        self.log(|| format!("{client} PAUSED (unreachable)"));
        self.paused.insert(client);
    }

    /// Operator action: moves every participant's dead letters back to its
    /// queue (do this when healing after faults that outlast the broker's
    /// attempt limit).
    pub fn redrive_all(&mut self) {
        let clients: Vec<ClientId> = self.nodes.keys().cloned().collect();
        for client in clients {
            // The reply is not routed anywhere: no participant asked.
            let req = RequestId(self.request_next);
            self.request_next += 1;
            self.queue
                .push_back(Envelope::ToBroker(BrokerInput::Redrive { req, client }));
        }
    }

    pub fn resume(&mut self, client: &str) {
        let client = ClientId::lit(client);
        self.log(|| format!("{client} RESUMED"));
        self.paused.remove(&client);
    }

    /// Steps until `done` holds (checked before each step), failing at
    /// `time_limit`, at `steps_max`, or when nothing is left to do.
    pub fn run_until(&mut self, time_limit: Time, mut done: impl FnMut(&World) -> bool) -> Result<(), WorldError> {
        loop {
            if done(self) {
                return Ok(());
            }
            if self.stats.steps >= self.steps_max {
                return Err(WorldError::StepLimit {
                    steps: self.stats.steps,
                    now: self.now,
                });
            }
            if !self.step(time_limit)? {
                return Err(WorldError::TimeLimit { now: self.now });
            }
        }
    }

    /// Runs everything due up to `now + d`, then stops there.
    pub fn run_for(&mut self, d: Duration) -> Result<(), WorldError> {
        let until = self.now.plus(d);
        loop {
            if self.stats.steps >= self.steps_max {
                return Err(WorldError::StepLimit {
                    steps: self.stats.steps,
                    now: self.now,
                });
            }
            if !self.step(until)? {
                self.now = self.now.max(until);
                return Ok(());
            }
        }
    }

    /// One event: the next queued envelope, or else the clock advanced to the
    /// earliest deadline (not past `limit`). False when nothing is due by `limit`.
    fn step(&mut self, limit: Time) -> Result<bool, WorldError> {
        self.stats.steps += 1;
        if let Some(envelope) = self.queue.pop_front() {
            self.dispatch(envelope);
            return Ok(true);
        }
        let next = self
            .nodes
            .values()
            .filter_map(|s| s.node.poll_timeout())
            .chain(self.broker.poll_timeout())
            .chain(
                self.schedule
                    .keys()
                    .next()
                    .map(|(t, _)| *t)
                    .filter(|_| !self.schedule_held),
            )
            .min();
        let Some(next) = next else {
            return Err(WorldError::Idle { now: self.now });
        };
        if next > limit {
            return Ok(false);
        }
        self.now = self.now.max(next);
        let now = self.now;
        while let Some(entry) = self.schedule.first_entry() {
            if self.schedule_held || entry.key().0 > now {
                break;
            }
            let (client, input) = entry.remove();
            self.queue.push_back(Envelope::ToNode(client, input));
        }
        if self.broker.poll_timeout().is_some_and(|t| t <= now) {
            self.broker.handle_timeout(now);
            self.drain_broker();
        }
        let due: Vec<ClientId> = self
            .nodes
            .iter()
            .filter(|(_, s)| s.node.poll_timeout().is_some_and(|t| t <= now))
            .map(|(c, _)| c.clone())
            .collect();
        for client in due {
            let slot = self.nodes.get_mut(&client).expect("listed above");
            slot.node.handle_timeout(now);
            self.drain_node(&client);
        }
        Ok(true)
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.trace_enabled {
            let line = line();
            self.trace.push(format!("t={} {line}", self.now));
        }
    }

    fn dispatch(&mut self, envelope: Envelope) {
        let now = self.now;
        match envelope {
            Envelope::ToBroker(input) => {
                self.log(|| format!("broker <- {input}"));
                self.broker.handle(now, input);
                self.drain_broker();
            }
            Envelope::ToNode(client, input) => {
                if !self.nodes.contains_key(&client) {
                    return;
                }
                self.log(|| format!("{client} <- {input}"));
                let slot = self.nodes.get_mut(&client).expect("checked above");
                slot.node.handle(now, input);
                self.drain_node(&client);
            }
        }
    }

    fn drain_broker(&mut self) {
        while let Some(output) = self.broker.poll_output() {
            self.log(|| format!("broker -> {output}"));
            match output {
                BrokerOutput::Persist { lsn, frames } => {
                    self.broker_disk.append(&frames);
                    self.broker_disk.sync();
                    self.queue.push_back(Envelope::ToBroker(BrokerInput::Durable { lsn }));
                }
                BrokerOutput::Rewrite { lsn, frames, .. } => {
                    self.broker_disk.replace(&frames);
                    self.broker_disk.sync();
                    self.queue.push_back(Envelope::ToBroker(BrokerInput::Durable { lsn }));
                }
                BrokerOutput::Reply { req, reply } => self.route_reply(req, reply),
                BrokerOutput::Callback(cb) => {
                    self.stats.callbacks += 1;
                    if !self.nodes.contains_key(&cb.client) || self.paused.contains(&cb.client) {
                        let result = BrokerInput::CallbackResult {
                            delivery: cb.delivery,
                            result: CallbackResult::Failed,
                        };
                        self.queue.push_back(Envelope::ToBroker(result));
                        continue;
                    }
                    self.callbacks.insert(cb.delivery, cb.client.clone());
                    let token = CallbackToken(cb.delivery.0);
                    let duplicate =
                        self.duplicate_every > 0 && self.stats.callbacks.is_multiple_of(self.duplicate_every);
                    if duplicate {
                        self.stats.duplicated_callbacks += 1;
                        let copy = ParticipantInput::Deliver {
                            token: CallbackToken(token.0 | DUPLICATE_TOKEN_BIT),
                            message: cb.message.clone(),
                        };
                        self.queue.push_back(Envelope::ToNode(cb.client.clone(), copy));
                    }
                    let deliver = ParticipantInput::Deliver {
                        token,
                        message: cb.message,
                    };
                    self.queue.push_back(Envelope::ToNode(cb.client, deliver));
                }
            }
        }
    }

    fn route_reply(&mut self, req: RequestId, reply: Reply) {
        let Some((client, pending)) = self.requests.remove(&req) else {
            return; // a request of a broker incarnation that crashed
        };
        let input = match (pending, reply) {
            (PendingRequest::Publish(outbox), Reply::Published { msg_id, .. }) => {
                ParticipantInput::PublishAcked { outbox, msg_id }
            }
            (PendingRequest::Publish(outbox), _) => ParticipantInput::PublishFailed { outbox },
            (PendingRequest::Subscribe(topic), Reply::Subscribed { .. }) => ParticipantInput::Subscribed { topic },
            // A refused subscribe is asked again by the participant's retry timer.
            (PendingRequest::Subscribe(_), _) => return,
        };
        self.queue.push_back(Envelope::ToNode(client, input));
    }

    fn drain_node(&mut self, client: &ClientId) {
        loop {
            let slot = self.nodes.get_mut(client).expect("draining a known participant");
            let Some(output) = slot.node.poll_output() else {
                return;
            };
            if let ParticipantOutput::Persist { lsn, frames } = &output {
                slot.disk.append(frames);
                slot.disk.sync();
                let durable = ParticipantInput::Durable { lsn: *lsn };
                self.queue.push_back(Envelope::ToNode(client.clone(), durable));
            }
            self.log(|| format!("{client} -> {output}"));
            match output {
                ParticipantOutput::Persist { .. } => {}
                ParticipantOutput::Publish { outbox, publish } => {
                    self.stats.publishes += 1;
                    let req = self.request(client, PendingRequest::Publish(outbox));
                    self.queue
                        .push_back(Envelope::ToBroker(BrokerInput::Publish { req, publish }));
                }
                ParticipantOutput::Subscribe(subscribe) => {
                    let req = self.request(client, PendingRequest::Subscribe(subscribe.topic.clone()));
                    self.queue
                        .push_back(Envelope::ToBroker(BrokerInput::Subscribe { req, subscribe }));
                }
                ParticipantOutput::Answer { token, ok } => {
                    if token.0 & DUPLICATE_TOKEN_BIT != 0 {
                        continue;
                    }
                    let delivery = DeliveryId(token.0);
                    if self.callbacks.remove(&delivery).is_some() {
                        self.stats.answers += 1;
                        if self.lose_answer_every > 0 && self.stats.answers.is_multiple_of(self.lose_answer_every) {
                            self.stats.answers_lost += 1;
                            self.log(|| format!("{client} answer to {delivery} LOST (the broker will time it out)"));
                            continue;
                        }
                        let result = if ok {
                            CallbackResult::Delivered
                        } else {
                            CallbackResult::Failed
                        };
                        self.queue
                            .push_back(Envelope::ToBroker(BrokerInput::CallbackResult { delivery, result }));
                    }
                }
                ParticipantOutput::CommandDone { command, outcome } => self.commands.push(CommandRecord {
                    at: self.now,
                    client: client.clone(),
                    command,
                    outcome,
                }),
            }
        }
    }

    fn request(&mut self, client: &ClientId, pending: PendingRequest) -> RequestId {
        let req = RequestId(self.request_next);
        self.request_next += 1;
        self.requests.insert(req, (client.clone(), pending));
        req
    }

    /// Crashes participant `client` (its disk keeps only synced bytes, or
    /// `torn_keep` unsynced bytes more) and restarts it from its log alone.
    /// Inputs queued for it are lost; the broker hears "failed" for every
    /// callback it had not answered.
    pub fn crash(&mut self, client: &str, torn_keep: Option<usize>) -> Result<RecoveryReport, WorldError> {
        let client = ClientId::lit(client);
        let slot = self.nodes.get_mut(&client).expect("crash of a known participant");
        match torn_keep {
            None => slot.disk.crash(),
            Some(keep) => slot.disk.crash_torn(keep),
        }
        let image = slot.disk.read_all();
        let report = slot.node.restart(&image).map_err(WorldError::Recovery)?;
        slot.disk.truncate(report.valid_len);
        slot.disk.sync();
        self.stats.crashes += 1;
        self.queue
            .retain(|e| !matches!(e, Envelope::ToNode(c, _) if *c == client));
        let lost: Vec<DeliveryId> = self
            .callbacks
            .iter()
            .filter(|(_, c)| **c == client)
            .map(|(d, _)| *d)
            .collect();
        for delivery in lost {
            self.callbacks.remove(&delivery);
            let result = BrokerInput::CallbackResult {
                delivery,
                result: CallbackResult::Failed,
            };
            self.queue.push_back(Envelope::ToBroker(result));
        }
        self.log(|| {
            format!(
                "{client} CRASH -> recovered records={} torn_bytes={} outbox_unacked={}",
                report.records, report.torn_bytes, report.outbox_unacked
            )
        });
        Ok(report)
    }

    /// Crashes the broker and restarts it from its log alone. Requests and
    /// callbacks in flight are lost; participants retry on their timers.
    pub fn crash_broker(&mut self, torn_keep: Option<usize>) -> Result<(), WorldError> {
        match torn_keep {
            None => self.broker_disk.crash(),
            Some(keep) => self.broker_disk.crash_torn(keep),
        }
        let image = self.broker_disk.read_all();
        let (broker, report) =
            Broker::recover(self.broker_config.clone(), self.broker_seed, &image).map_err(WorldError::Recovery)?;
        self.broker_disk.truncate(report.valid_len);
        self.broker_disk.sync();
        self.broker = broker;
        self.stats.crashes += 1;
        self.queue.retain(|e| !matches!(e, Envelope::ToBroker(_)));
        self.requests.clear();
        self.callbacks.clear();
        self.log(|| format!("broker CRASH -> recovered records={}", report.records));
        self.drain_broker();
        Ok(())
    }

    /// The saga's invariants over the shipped participants (see
    /// [`audit`]): state consistency, conservation, and effects at most once
    /// judged from the participants' logs.
    pub fn audit(&self, require_terminal: bool) -> Vec<Violation> {
        let order = self.host::<Order>(topics::ORDER_SERVICE).expect("an order service");
        let stock = self.host::<Stock>(topics::STOCK_SERVICE).expect("a stock service");
        let payment = self.host::<Payment>(topics::PAYMENT_SERVICE);
        let mut out = audit::audit_hosts(order, stock, payment, require_terminal);
        let image = self.log_image(topics::STOCK_SERVICE).expect("stock log");
        match audit::changes_in_log::<Stock>(&image) {
            Ok(changes) => out.extend(audit::audit_stock_log(&changes)),
            Err(e) => out.push(Violation {
                invariant: "log-readable",
                detail: format!("stock: {e}"),
            }),
        }
        if let Some(image) = self.log_image(topics::PAYMENT_SERVICE) {
            match audit::changes_in_log::<Payment>(&image) {
                Ok(changes) => out.extend(audit::audit_payment_log(&changes)),
                Err(e) => out.push(Violation {
                    invariant: "log-readable",
                    detail: format!("payment: {e}"),
                }),
            }
        }
        out
    }

    /// Whether the broker has no message queued or in flight for any
    /// subscriber (dead letters aside): every delivery answered and heard.
    pub fn deliveries_settled(&self) -> bool {
        self.broker
            .stats()
            .subscribers
            .values()
            .all(|q| q.pending == 0 && q.in_flight == 0)
    }

    /// Whether the workload is all in (no command scheduled), nothing is in
    /// flight (including a callback whose answer was lost and that the broker
    /// will redeliver), every order is terminal and every outbox acknowledged.
    pub fn saga_settled(&self) -> bool {
        self.schedule.is_empty()
            && self.queue.is_empty()
            && self.deliveries_settled()
            && self
                .host::<Order>(topics::ORDER_SERVICE)
                .is_some_and(|o| o.logic().all_terminal())
            && self.outboxes_empty()
    }
}

/// The host configuration the testkit gives a shipped service.
pub fn host_config(name: &str, seed: u64) -> HostConfig {
    let mut config = HostConfig::new(ClientId::lit(name), format!("testkit://{name}"));
    config.seed = seed;
    config
}

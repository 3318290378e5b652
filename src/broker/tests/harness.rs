//! A tiny driver for broker tests: feeds inputs at a virtual time, writes
//! `Persist`/`Rewrite` to a [`MemDisk`], reports `Durable` (automatically unless
//! held), collects replies and callbacks, crashes and recovers, and keeps a
//! readable trace of everything that crossed the broker's boundary.

use crate::Machine;
use crate::broker::*;
use crate::log::{Disk, MemDisk};
use crate::types::*;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Harness {
    pub broker: Broker,
    pub disk: MemDisk,
    pub config: BrokerConfig,
    pub seed: u64,
    pub now: Time,
    pub trace: Vec<String>,
    /// When false, writes stay volatile until [`Harness::sync`].
    pub auto_sync: bool,
    /// Callbacks sent and not yet answered, in the order they went out.
    pub callbacks: Vec<Callback>,
    pub replies: BTreeMap<RequestId, Reply>,
    pub last_recovery: Option<RecoveryReport>,
    /// Whether the last crash was torn (may have kept unsynced bytes).
    pub last_torn: bool,
    /// Highest lsn written to the disk and not yet reported durable.
    unsynced: Option<Lsn>,
    next_req: u64,
    /// When false, `Persist` lines are left out of the trace (long scenarios).
    pub trace_persist: bool,
    /// When false, nothing is traced (property tests).
    pub tracing: bool,
    /// When true, every output, sync and restart is also kept in `observed` (for the model test).
    pub observe: bool,
    pub observed: Vec<Observed>,
}

/// What happened at the broker's boundary, for a test model to follow.
pub enum Observed {
    Output(BrokerOutput),
    /// Everything written so far became durable.
    Synced,
    /// The broker restarted from this log image.
    Restarted {
        image: Vec<u8>,
    },
}

pub const URL: &str = "http://sub/cb";

impl Harness {
    pub fn new(config: BrokerConfig, seed: u64) -> Harness {
        Harness {
            broker: Broker::new(config.clone(), seed),
            disk: MemDisk::new(),
            config,
            seed,
            now: Time::ZERO,
            trace: Vec::new(),
            auto_sync: true,
            callbacks: Vec::new(),
            replies: BTreeMap::new(),
            last_recovery: None,
            last_torn: false,
            unsynced: None,
            next_req: 1,
            trace_persist: true,
            tracing: true,
            observe: false,
            observed: Vec::new(),
        }
    }

    fn line(&mut self, mark: char, text: &dyn std::fmt::Display) {
        if self.tracing {
            let line = format!("{:>8} {mark} {text}", self.now.to_string());
            self.trace.push(line);
        }
    }

    pub fn note(&mut self, text: impl std::fmt::Display) {
        self.line('#', &text);
    }

    pub fn input(&mut self, input: BrokerInput) {
        self.line('>', &input);
        self.broker.handle(self.now, input);
        self.drain();
    }

    /// Takes every output; with `auto_sync`, syncs and reports `Durable` until quiet.
    pub fn drain(&mut self) {
        loop {
            while let Some(out) = self.broker.poll_output() {
                if self.trace_persist || !matches!(out, BrokerOutput::Persist { .. }) {
                    self.line('<', &out);
                }
                self.on_output(out);
            }
            if !(self.auto_sync && self.unsynced.is_some()) {
                return;
            }
            self.sync_quiet();
        }
    }

    fn on_output(&mut self, out: BrokerOutput) {
        if self.observe {
            self.observed.push(Observed::Output(out.clone()));
        }
        match out {
            BrokerOutput::Persist { lsn, frames } => {
                self.disk.append(&frames);
                self.unsynced = Some(lsn);
            }
            BrokerOutput::Rewrite { lsn, frames, .. } => {
                self.disk.replace(&frames);
                self.unsynced = Some(lsn);
            }
            BrokerOutput::Reply { req, reply } => {
                self.replies.insert(req, reply);
            }
            BrokerOutput::Callback(cb) => self.callbacks.push(cb),
        }
    }

    fn sync_quiet(&mut self) {
        if let Some(lsn) = self.unsynced.take() {
            self.disk.sync();
            if self.observe {
                self.observed.push(Observed::Synced);
            }
            let input = BrokerInput::Durable { lsn };
            self.line('>', &input);
            self.broker.handle(self.now, input);
        }
    }

    /// Syncs what was written and reports it durable.
    pub fn sync(&mut self) {
        self.sync_quiet();
        self.drain();
    }

    pub fn req(&mut self) -> RequestId {
        let r = RequestId(self.next_req);
        self.next_req += 1;
        r
    }

    pub fn publish_req(&mut self, publish: PublishRequest) -> RequestId {
        let req = self.req();
        self.input(BrokerInput::Publish { req, publish });
        req
    }

    /// Publishes `gid/sid` on `topic` with `CreateTime = create`.
    pub fn publish(&mut self, gid: &str, sid: &str, topic: &str, create: i64) -> RequestId {
        self.publish_req(publication(gid, sid, topic, create, "x"))
    }

    pub fn subscribe(&mut self, client: &str, topic: &str, until: Time) -> RequestId {
        let req = self.req();
        let subscribe = SubscribeRequest {
            client_id: ClientId::lit(client),
            topic: Topic::lit(topic),
            notify_url: format!("{URL}/{client}"),
            expire_time: until,
        };
        self.input(BrokerInput::Subscribe { req, subscribe });
        req
    }

    pub fn unsubscribe(&mut self, client: &str, topic: &str) -> RequestId {
        let req = self.req();
        let (client, topic) = (ClientId::lit(client), Topic::lit(topic));
        self.input(BrokerInput::Unsubscribe { req, client, topic });
        req
    }

    pub fn redrive(&mut self, client: &str) -> RequestId {
        let req = self.req();
        self.input(BrokerInput::Redrive {
            req,
            client: ClientId::lit(client),
        });
        req
    }

    /// Answers the outstanding callback `delivery`.
    pub fn answer(&mut self, delivery: DeliveryId, result: CallbackResult) {
        self.callbacks.retain(|c| c.delivery != delivery);
        self.input(BrokerInput::CallbackResult { delivery, result });
    }

    /// Answers every outstanding callback with `result`, oldest first.
    pub fn answer_all(&mut self, result: CallbackResult) {
        for cb in std::mem::take(&mut self.callbacks) {
            self.input(BrokerInput::CallbackResult {
                delivery: cb.delivery,
                result,
            });
        }
    }

    /// Answers every outstanding callback of `client` with `result`.
    pub fn answer_client(&mut self, client: &str, result: CallbackResult) {
        let (mine, others) = std::mem::take(&mut self.callbacks)
            .into_iter()
            .partition(|c| c.client.as_str() == client);
        self.callbacks = others;
        for cb in mine {
            self.input(BrokerInput::CallbackResult {
                delivery: cb.delivery,
                result,
            });
        }
    }

    pub fn take_callbacks(&mut self) -> Vec<Callback> {
        std::mem::take(&mut self.callbacks)
    }

    /// Moves time forward to `t`, firing every deadline on the way at its own time.
    pub fn advance_to(&mut self, t: Time) {
        while let Some(deadline) = self.broker.poll_timeout() {
            if deadline > t {
                break;
            }
            self.now = self.now.max(deadline);
            self.line('>', &"timeout");
            self.broker.handle_timeout(self.now);
            self.drain();
        }
        self.now = self.now.max(t);
    }

    pub fn advance(&mut self, ms: u64) {
        self.advance_to(self.now.plus(Duration::from_millis(ms)));
    }

    /// Crashes (unsynced writes lost) and recovers from the durable log.
    pub fn crash(&mut self) {
        self.disk.crash();
        self.last_torn = false;
        self.restart("crash");
    }

    /// Crashes keeping the first `keep` unsynced bytes (a torn write).
    pub fn crash_torn(&mut self, keep: usize) {
        self.disk.crash_torn(keep);
        self.last_torn = true;
        self.restart("torn crash");
    }

    fn restart(&mut self, what: &str) {
        self.unsynced = None;
        self.callbacks.clear();
        let image = self.disk.read_all();
        let (broker, report) = Broker::recover(self.config.clone(), self.seed, &image).expect("recovery");
        self.disk.truncate(report.valid_len);
        self.note(format!(
            "{what}; recovered {} records ({} bytes, torn tail {} bytes)",
            report.records, report.valid_len, report.torn_bytes
        ));
        self.broker = broker;
        if self.observe {
            self.observed.push(Observed::Restarted {
                image: self.disk.read_all(),
            });
        }
        self.last_recovery = Some(report);
        self.drain();
    }

    pub fn reply(&self, req: RequestId) -> Option<&Reply> {
        self.replies.get(&req)
    }

    /// The stats of one subscriber (zeroes when unknown).
    pub fn sub_stats(&self, client: &str) -> SubscriberStats {
        self.broker
            .stats()
            .subscribers
            .get(&ClientId::lit(client))
            .cloned()
            .unwrap_or_default()
    }

    pub fn trace_text(&self) -> String {
        self.trace.join("\n")
    }
}

pub fn publication(gid: &str, sid: &str, topic: &str, create: i64, content: &str) -> PublishRequest {
    PublishRequest {
        global_id: GlobalId::lit(gid),
        sub_id: SubId::lit(sid),
        sender_id: SenderId::lit("sender"),
        create_time: create,
        topic: Topic::lit(topic),
        content: content.into(),
    }
}

pub fn ms(ms: u64) -> Time {
    Time::from_millis(ms)
}

/// A config with small, readable timings for scenarios.
pub fn small_config() -> BrokerConfig {
    BrokerConfig {
        callback_timeout: Duration::from_millis(100),
        retry_backoff_initial: Duration::from_millis(10),
        retry_backoff_max: Duration::from_millis(40),
        attempts_max: 3,
        ..BrokerConfig::default()
    }
}

//! Scenario tests of the participants fed inputs directly (no broker): a
//! [`Bench`] holds one hosted participant and its `MemDisk`, feeds inputs at a
//! virtual time and writes a readable trace for insta snapshots.

mod host;
mod order;
mod payment;
mod stock;

use super::{
    CallbackToken, HostConfig, OrderBody, OutboxId, Participant, ParticipantHost, ParticipantInput, ParticipantOutput,
    RecoveryReport,
};
use crate::log::{Disk, MemDisk};
use crate::machine::Machine;
use crate::types::{ClientId, GlobalId, Message, MsgId, PublishRequest, SenderId, SubId, Time, Topic};

pub(crate) struct Bench<P: Participant> {
    pub host: ParticipantHost<P>,
    pub disk: MemDisk,
    pub now: Time,
    pub trace: Vec<String>,
    name: String,
    token_next: u64,
    msg_next: u64,
}

impl<P: Participant> Bench<P> {
    pub fn new(name: &str, logic: P) -> Self {
        Self::with_config(logic, HostConfig::new(ClientId::lit(name), format!("test://{name}")))
    }

    pub fn with_config(logic: P, config: HostConfig) -> Self {
        let name = config.client_id.to_string();
        Bench {
            host: ParticipantHost::new(logic, config),
            disk: MemDisk::new(),
            now: Time::ZERO,
            trace: Vec::new(),
            name,
            token_next: 1,
            msg_next: 1,
        }
    }

    pub fn at_ms(&mut self, ms: u64) {
        self.now = Time::from_millis(ms);
    }

    pub fn note(&mut self, line: &str) {
        self.trace.push(format!("# {line}"));
    }

    pub fn feed(&mut self, input: ParticipantInput) -> Vec<ParticipantOutput> {
        self.trace.push(format!("t={} {} <- {input}", self.now, self.name));
        self.host.handle(self.now, input);
        self.drain()
    }

    pub fn tick(&mut self) -> Vec<ParticipantOutput> {
        self.trace.push(format!("t={} {} timeout", self.now, self.name));
        self.host.handle_timeout(self.now);
        self.drain()
    }

    fn drain(&mut self) -> Vec<ParticipantOutput> {
        let mut outs = Vec::new();
        while let Some(o) = self.host.poll_output() {
            self.trace.push(format!("    -> {o}"));
            if let ParticipantOutput::Persist { frames, .. } = &o {
                self.disk.append(frames);
                for line in ParticipantHost::<P>::describe_frames(frames) {
                    self.trace.push(format!("       {line}"));
                }
            }
            outs.push(o);
        }
        outs
    }

    /// Syncs the disk and reports every written record durable.
    pub fn sync(&mut self) -> Vec<ParticipantOutput> {
        self.disk.sync();
        let (last, _) = self.host.lsns();
        self.feed(ParticipantInput::Durable { lsn: last })
    }

    pub fn message(&mut self, topic: &str, order: &str, step: &str, content: &str) -> Message {
        let msg_id = MsgId(self.msg_next);
        self.msg_next += 1;
        Message {
            msg_id,
            global_id: GlobalId::lit(order),
            sub_id: SubId::lit(&format!("{order}.{step}")),
            sender_id: SenderId::lit("test"),
            create_time: 0,
            topic: Topic::lit(topic),
            content: content.to_string(),
        }
    }

    /// Delivers `message` under a fresh callback token.
    pub fn deliver(&mut self, message: &Message) -> (CallbackToken, Vec<ParticipantOutput>) {
        let token = CallbackToken(self.token_next);
        self.token_next += 1;
        let outs = self.feed(ParticipantInput::Deliver {
            token,
            message: message.clone(),
        });
        (token, outs)
    }

    /// Acknowledges every publish in `outs` as the broker would.
    pub fn ack_all(&mut self, outs: &[ParticipantOutput]) -> Vec<ParticipantOutput> {
        let mut all = Vec::new();
        for (outbox, _) in publishes(outs) {
            let msg_id = MsgId(1000 + outbox.0);
            all.extend(self.feed(ParticipantInput::PublishAcked { outbox, msg_id }));
        }
        all
    }

    /// Crashes (losing unsynced bytes, or keeping `torn_keep` of them) and
    /// recovers from the disk alone, truncating a torn tail as a driver does.
    pub fn crash(&mut self, torn_keep: Option<usize>) -> RecoveryReport {
        match torn_keep {
            None => self.disk.crash(),
            Some(keep) => self.disk.crash_torn(keep),
        }
        let image = self.disk.read_all();
        let (host, report) = ParticipantHost::recover(self.host.initial().clone(), self.host.config().clone(), &image)
            .expect("recovery from a crashed disk");
        self.disk.truncate(report.valid_len);
        self.disk.sync();
        self.host = host;
        self.trace.push(format!(
            "t={} {} CRASH{} -> recovered records={} torn_bytes={} outbox_unacked={}",
            self.now,
            self.name,
            if torn_keep.is_some() { " (torn write)" } else { "" },
            report.records,
            report.torn_bytes,
            report.outbox_unacked
        ));
        report
    }

    pub fn trace(&self) -> String {
        self.trace.join("\n") + "\n"
    }
}

pub(crate) fn answers(outs: &[ParticipantOutput]) -> Vec<(CallbackToken, bool)> {
    outs.iter()
        .filter_map(|o| match o {
            ParticipantOutput::Answer { token, ok } => Some((*token, *ok)),
            _ => None,
        })
        .collect()
}

pub(crate) fn publishes(outs: &[ParticipantOutput]) -> Vec<(OutboxId, PublishRequest)> {
    outs.iter()
        .filter_map(|o| match o {
            ParticipantOutput::Publish { outbox, publish } => Some((*outbox, publish.clone())),
            _ => None,
        })
        .collect()
}

pub(crate) fn persists(outs: &[ParticipantOutput]) -> usize {
    outs.iter()
        .filter(|o| matches!(o, ParticipantOutput::Persist { .. }))
        .count()
}

/// `(topic, SubID, content)` of every publish in `outs`.
pub(crate) fn published(outs: &[ParticipantOutput]) -> Vec<(String, String, String)> {
    publishes(outs)
        .into_iter()
        .map(|(_, p)| (p.topic.to_string(), p.sub_id.to_string(), p.content))
        .collect()
}

pub(crate) fn order_json(order: &str, customer: &str, product: &str, quantity: u64, price: u64) -> String {
    serde_json::to_string(&OrderBody {
        order_id: GlobalId::lit(order),
        customer_id: super::CustomerId::lit(customer),
        product_id: super::ProductId::lit(product),
        quantity,
        price,
        amount: quantity * price,
    })
    .unwrap()
}

/// Runs `f` with insta writing to the top-level `snapshots/` directory.
pub(crate) fn snapshot(name: &str, trace: &str) {
    insta::with_settings!({snapshot_path => "../../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, trace);
    });
}

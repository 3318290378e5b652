//! The Go seed's stock service, as the article built it: stock levels in
//! memory only, no inbox, and on each `sale-order.created` callback it deducts,
//! queues the `"1"`/`"0"` reply in an in-memory publish queue, and answers the
//! callback 2xx at once. Its compensation (which the seed did not have) is
//! written in the same style: `stock += quantity` for every release.
//!
//! It never writes to its disk, so a restart begins from the initial levels.
//! The per-order ledger exists only so the checker can see what it did; it is
//! memory too and is lost with the rest.

use crate::participants::SimParticipant;
use crate::view::{StockEffects, View};
use sagamq::machine::Machine;
use sagamq::saga::{
    CommandOutcome, HostConfig, OrderBody, OutboxId, ParticipantInput, ParticipantOutput, ProductId, ReleasedBody,
    topics,
};
use sagamq::{GlobalId, Message, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Replies waiting in memory for the broker's acknowledgement. When full, a
/// callback is answered not-ok (the broker retries it later).
pub const NAIVE_QUEUE_MAX: usize = 10_000;

#[derive(Clone, Debug)]
struct Queued {
    publish: PublishRequest,
    attempts: u32,
    retry_at: Time,
}

#[derive(Clone, Debug)]
struct Subscription {
    next_at: Time,
    sent_at: Option<Time>,
    confirmed: bool,
}

#[derive(Clone, Debug)]
pub struct NaiveStock {
    config: HostConfig,
    sender: SenderId,
    initial: BTreeMap<ProductId, u64>,
    levels: BTreeMap<ProductId, u64>,
    /// order -> (product, units deducted, units restocked), summed; and the
    /// (order, topic) pairs it handled. Ghost state for the checker, bounded by
    /// the run's orders; lost on a crash like everything else here.
    ledger: BTreeMap<GlobalId, (ProductId, u64, u64)>,
    handled: BTreeSet<(GlobalId, Topic)>,
    queue: BTreeMap<OutboxId, Queued>,
    retries: BTreeSet<(Time, OutboxId)>,
    next_id: u64,
    subscriptions: BTreeMap<Topic, Subscription>,
    out: VecDeque<ParticipantOutput>,
}

impl NaiveStock {
    pub fn new(levels: BTreeMap<ProductId, u64>, config: HostConfig) -> NaiveStock {
        let subscriptions = [topics::SALE_ORDER_CREATED, topics::STOCK_RELEASE]
            .into_iter()
            .map(|t| {
                let s = Subscription {
                    next_at: Time::ZERO,
                    sent_at: None,
                    confirmed: false,
                };
                (Topic::lit(t), s)
            })
            .collect();
        NaiveStock {
            sender: SenderId::new(config.client_id.as_str()).expect("a ClientId is a valid SenderId"),
            config,
            initial: levels.clone(),
            levels,
            ledger: BTreeMap::new(),
            handled: BTreeSet::new(),
            queue: BTreeMap::new(),
            retries: BTreeSet::new(),
            next_id: 0,
            subscriptions,
            out: VecDeque::new(),
        }
    }

    fn on_deliver(&mut self, now: Time, token: sagamq::saga::CallbackToken, message: Message) {
        let body: OrderBody = match serde_json::from_str(&message.content) {
            Ok(b) if self.queue.len() < NAIVE_QUEUE_MAX => b,
            _ => {
                self.out.push_back(ParticipantOutput::Answer { token, ok: false });
                return;
            }
        };
        let order = body.order_id.clone();
        self.handled.insert((order.clone(), message.topic.clone()));
        let entry = self
            .ledger
            .entry(order.clone())
            .or_insert_with(|| (body.product_id.clone(), 0, 0));
        let (topic, step, content) = match message.topic.as_str() {
            topics::SALE_ORDER_CREATED => {
                let level = self.levels.entry(body.product_id.clone()).or_insert(0);
                let ok = *level >= body.quantity;
                if ok {
                    *level -= body.quantity;
                    entry.1 += body.quantity;
                }
                (
                    topics::STOCK_OUTBOUND,
                    "outbound",
                    if ok { "1" } else { "0" }.to_string(),
                )
            }
            topics::STOCK_RELEASE => {
                let level = self.levels.entry(body.product_id.clone()).or_insert(0);
                *level += body.quantity;
                entry.2 += body.quantity;
                let released = ReleasedBody {
                    order_id: order.clone(),
                    restocked: body.quantity,
                };
                let content = serde_json::to_string(&released).expect("bodies serialize");
                (topics::STOCK_RELEASED, "released", content)
            }
            _ => {
                self.out.push_back(ParticipantOutput::Answer { token, ok: true });
                return;
            }
        };
        let publish = PublishRequest {
            global_id: order.clone(),
            sub_id: SubId::new(format!("{order}.{step}")).expect("order ids leave room for the step"),
            sender_id: self.sender.clone(),
            create_time: i64::try_from(now.as_nanos()).unwrap_or(i64::MAX),
            topic: Topic::lit(topic),
            content,
        };
        let id = OutboxId(self.next_id);
        self.next_id += 1;
        self.queue.insert(
            id,
            Queued {
                publish,
                attempts: 0,
                retry_at: now,
            },
        );
        self.send(now, id);
        self.out.push_back(ParticipantOutput::Answer { token, ok: true });
    }

    fn send(&mut self, now: Time, id: OutboxId) {
        let Some(q) = self.queue.get_mut(&id) else { return };
        self.retries.remove(&(q.retry_at, id));
        q.attempts = q.attempts.saturating_add(1);
        let backoff = self
            .config
            .publish_retry_initial
            .saturating_mul(1 << q.attempts.min(10))
            .min(self.config.publish_retry_max);
        q.retry_at = now.plus(backoff);
        self.retries.insert((q.retry_at, id));
        self.out.push_back(ParticipantOutput::Publish {
            outbox: id,
            publish: q.publish.clone(),
        });
    }
}

impl Machine for NaiveStock {
    type Input = ParticipantInput;
    type Output = ParticipantOutput;

    fn handle(&mut self, now: Time, input: ParticipantInput) {
        match input {
            ParticipantInput::Deliver { token, message } => self.on_deliver(now, token, message),
            ParticipantInput::PublishAcked { outbox, .. } => {
                if let Some(q) = self.queue.remove(&outbox) {
                    self.retries.remove(&(q.retry_at, outbox));
                }
            }
            ParticipantInput::PublishFailed { .. } | ParticipantInput::Durable { .. } => {}
            ParticipantInput::Subscribed { topic } => {
                let half = self.config.subscription_ttl / 2;
                if let Some(s) = self.subscriptions.get_mut(&topic) {
                    s.confirmed = true;
                }
                if let Some(s) = self.subscriptions.get_mut(&topic)
                    && let Some(sent) = s.sent_at
                {
                    s.next_at = sent.plus(half);
                }
            }
            ParticipantInput::Command(command) => {
                self.out.push_back(ParticipantOutput::CommandDone {
                    command,
                    outcome: CommandOutcome::Refused("stock takes no commands".to_string()),
                });
            }
        }
    }

    fn handle_timeout(&mut self, now: Time) {
        let retry = self.config.subscribe_retry.min(self.config.subscription_ttl / 2);
        for (topic, s) in self.subscriptions.iter_mut() {
            if s.next_at > now {
                continue;
            }
            s.sent_at = Some(now);
            s.next_at = now.plus(retry);
            self.out.push_back(ParticipantOutput::Subscribe(SubscribeRequest {
                client_id: self.config.client_id.clone(),
                topic: topic.clone(),
                notify_url: self.config.notify_url.clone(),
                expire_time: now.plus(self.config.subscription_ttl),
            }));
        }
        while let Some(&(at, id)) = self.retries.first() {
            if at > now {
                break;
            }
            // `send` moves the entry at least `publish_retry_initial` ahead, so this ends.
            self.send(now, id);
        }
    }

    fn poll_output(&mut self) -> Option<ParticipantOutput> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<Time> {
        let subscriptions = self.subscriptions.values().map(|s| s.next_at).min();
        let retries = self.retries.first().map(|(at, _)| *at);
        [subscriptions, retries].into_iter().flatten().min()
    }
}

impl SimParticipant for NaiveStock {
    fn view(&self) -> View {
        let levels = |m: &BTreeMap<ProductId, u64>| m.iter().map(|(p, n)| (p.to_string(), *n)).collect();
        View::Stock {
            initial: levels(&self.initial),
            level: levels(&self.levels),
            orders: self
                .ledger
                .iter()
                .filter(|(_, (_, d, r))| *d > 0 || *r > 0)
                .map(|(id, (p, d, r))| {
                    let effects = StockEffects {
                        product: p.to_string(),
                        deducted: *d,
                        restocked: *r,
                    };
                    (id.to_string(), effects)
                })
                .collect(),
            reported_held: None,
        }
    }
    fn settled(&self) -> bool {
        self.queue.is_empty()
    }
    fn ready(&self) -> bool {
        self.subscriptions.values().all(|s| s.confirmed)
    }
    fn reflects(&self, message: &Message) -> bool {
        self.handled
            .contains(&(message.global_id.clone(), message.topic.clone()))
    }
}

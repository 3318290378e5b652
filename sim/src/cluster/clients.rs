//! The cluster's clients: publishers that send each publish to a seeded
//! random instance and retry (through any instance) until it is
//! acknowledged, some publishing an acknowledged message once more through
//! another instance (dedup across instances); subscribers that subscribe
//! (until confirmed) and answer callbacks 2xx, or now and then an error.

use super::world::{CTimer, Ev, MS, Msg, Node, World};
use crate::history::Event;
use sagamq::broker::Reply;
use sagamq::{ClientId, GlobalId, PublishRequest, SenderId, SubId, SubscribeRequest, Time, Topic};

/// A client publish waits this long for an answer before retrying.
const PUBLISH_TIMEOUT_NS: u64 = 1_500 * MS;
const SUBSCRIBE_TIMEOUT_NS: u64 = 2_000 * MS;
/// Subscribers answer a callback with an error this often (per million).
const CALLBACK_FAIL_PPM: u32 = 100_000;
/// Node numbers the checker sees for clients (beyond the saga's nodes).
pub(super) const PUB_NODE: usize = 100;
pub(super) const SUB_NODE: usize = 200;
const TOPICS: [&str; 2] = ["t0", "t1"];
/// The subscriber that subscribes halfway through the chaos phase (entitlement after subscribe).
const LATE_SUBSCRIBER: usize = 2;

pub(super) struct PubJob {
    pub publisher: usize,
    pub publish: PublishRequest,
    /// The attempt in flight.
    pub req: u64,
    pub acked: bool,
    /// Publish once more after the acknowledgement (through another instance).
    pub repeat: bool,
    pub emitted: bool,
    pub done: bool,
    /// The benchmark's lanes publish their next message once this one is acknowledged.
    pub lane: Option<usize>,
}

pub(super) struct SubJob {
    pub sub: usize,
    pub topic: Topic,
    pub req: u64,
    pub done: bool,
}

impl World {
    /// The sweep's workload: two subscribers from the start (one on both
    /// topics), one subscribing halfway through the chaos phase; publishers
    /// publishing at random times during the chaos phase, a quarter of their
    /// messages published twice.
    pub(super) fn workload(&mut self) {
        let subs = [
            ("sub-a", &TOPICS[..], 0),
            ("sub-b", &TOPICS[1..], 0),
            ("sub-c", &TOPICS[..1], self.cfg.chaos_ms / 2),
        ];
        for (s, (client, topics, at_ms)) in subs.into_iter().enumerate() {
            self.sub_clients.push(ClientId::lit(client));
            for t in topics {
                let job = self.subs.len();
                self.subs.push(SubJob {
                    sub: s,
                    topic: Topic::lit(t),
                    req: 0,
                    done: false,
                });
                self.at(at_ms * MS, Ev::Sub(CTimer::Attempt(job)));
            }
        }
        for publisher in 0..self.cfg.publishers {
            for k in 0..self.cfg.publishes_each {
                let at = self.rng.work.below(self.cfg.chaos_ms * 9 / 10) * MS;
                let topic = TOPICS[self.rng.work.below(2) as usize];
                let repeat = self.rng.work.chance(250_000);
                let gid = format!("g{publisher}-{k}");
                self.add_pub(publisher, &gid, topic, at, repeat, None);
            }
        }
    }

    /// The benchmark's workload: `lanes` closed-loop publishers, no subscriber.
    pub(super) fn bench_workload(&mut self, lanes: usize) {
        for lane in 0..lanes {
            let gid = format!("b{lane}-0");
            self.add_pub(lane, &gid, TOPICS[0], lane as u64 * 10_000, false, Some(lane));
        }
    }

    fn add_pub(&mut self, publisher: usize, gid: &str, topic: &str, at_ns: u64, repeat: bool, lane: Option<usize>) {
        let job = self.pubs.len();
        self.pubs.push(PubJob {
            publisher,
            publish: PublishRequest {
                global_id: GlobalId::lit(gid),
                sub_id: SubId::lit("1"),
                sender_id: SenderId::lit(&format!("pub-{publisher}")),
                create_time: (crate::clock::CLOCK_BASE_NS + at_ns) as i64,
                topic: Topic::lit(topic),
                content: format!("{gid} on {topic}"),
            },
            req: 0,
            acked: false,
            repeat,
            emitted: false,
            done: false,
            lane,
        });
        self.at(at_ns, Ev::Pub(CTimer::Attempt(job)));
    }

    fn any_instance(&mut self) -> usize {
        self.rng.work.below(self.insts.len() as u64) as usize
    }

    pub(super) fn pub_timer(&mut self, t: CTimer) {
        match t {
            CTimer::Attempt(job) => self.pub_attempt(job),
            CTimer::Timeout(job, req) => {
                if self.pubs[job].req == req && !self.pubs[job].done {
                    self.pub_reqs.remove(&req);
                    self.pub_retry(job);
                }
            }
        }
    }

    fn pub_attempt(&mut self, job: usize) {
        if self.pubs[job].done {
            return;
        }
        let req = self.id();
        self.pubs[job].req = req;
        self.pub_reqs.insert(req, job);
        if !self.pubs[job].emitted {
            self.pubs[job].emitted = true;
            let (node, publish) = (PUB_NODE + self.pubs[job].publisher, self.pubs[job].publish.clone());
            self.observe(Event::Emitted {
                node,
                publish: &publish,
            });
        }
        let to = self.any_instance();
        let (from, publish) = (Node::Pub(self.pubs[job].publisher), self.pubs[job].publish.clone());
        self.send(from, Node::Inst(to), Msg::Publish { req, publish }, 0);
        self.at(self.now + PUBLISH_TIMEOUT_NS, Ev::Pub(CTimer::Timeout(job, req)));
    }

    fn pub_retry(&mut self, job: usize) {
        let backoff = self.rng.work.range_inclusive(50, 300) * MS;
        self.at(self.now + backoff, Ev::Pub(CTimer::Attempt(job)));
    }

    pub(super) fn pub_msg(&mut self, msg: Msg) {
        let Msg::PubReply { req, reply } = msg else { return };
        let Some(job) = self.pub_reqs.remove(&req) else { return };
        if self.pubs[job].req != req || self.pubs[job].done {
            return;
        }
        match reply {
            Some(Reply::Published { .. }) => {
                let j = &mut self.pubs[job];
                if !j.acked {
                    j.acked = true;
                    self.acked += 1;
                    if let Some(b) = self.cfg.bench
                        && (b.from_ms * MS..b.to_ms * MS).contains(&self.now)
                    {
                        self.bench_acked += 1;
                    }
                }
                let j = &mut self.pubs[job];
                if j.repeat {
                    j.repeat = false;
                    let later = self.rng.work.range_inclusive(20, 400) * MS;
                    self.at(self.now + later, Ev::Pub(CTimer::Attempt(job)));
                } else {
                    j.done = true;
                    if let Some(lane) = j.lane {
                        let k = self.pubs.len();
                        let gid = format!("b{lane}-{k}");
                        self.add_pub(lane, &gid, TOPICS[0], self.now, false, Some(lane));
                    }
                }
            }
            _ => self.pub_retry(job),
        }
    }

    pub(super) fn sub_timer(&mut self, t: CTimer) {
        match t {
            CTimer::Attempt(job) => {
                if self.subs[job].done {
                    return;
                }
                let req = self.id();
                self.subs[job].req = req;
                self.sub_reqs.insert(req, job);
                let s = self.subs[job].sub;
                let sub = SubscribeRequest {
                    client_id: self.sub_clients[s].clone(),
                    topic: self.subs[job].topic.clone(),
                    notify_url: format!("sim://sub/{s}"),
                    expire_time: Time(self.time().0 + 3_600_000 * MS),
                };
                let to = self.any_instance();
                self.send(Node::Sub(s), Node::Inst(to), Msg::Subscribe { req, sub }, 0);
                self.at(self.now + SUBSCRIBE_TIMEOUT_NS, Ev::Sub(CTimer::Timeout(job, req)));
            }
            CTimer::Timeout(job, req) => {
                if self.subs[job].req == req && !self.subs[job].done {
                    self.sub_reqs.remove(&req);
                    let backoff = self.rng.work.range_inclusive(50, 300) * MS;
                    self.at(self.now + backoff, Ev::Sub(CTimer::Attempt(job)));
                }
            }
        }
    }

    pub(super) fn sub_msg(&mut self, s: usize, from: Node, msg: Msg) {
        match msg {
            Msg::SubReply { req, until } => {
                let Some(job) = self.sub_reqs.remove(&req) else { return };
                if self.subs[job].req != req || self.subs[job].done {
                    return;
                }
                if until.is_some() {
                    self.subs[job].done = true;
                } else {
                    let backoff = self.rng.work.range_inclusive(50, 300) * MS;
                    self.at(self.now + backoff, Ev::Sub(CTimer::Attempt(job)));
                }
            }
            Msg::Callback { gdid, message, client } => {
                let ok = !self.rng.answers.chance(CALLBACK_FAIL_PPM);
                self.observe(Event::CallbackReceived {
                    node: SUB_NODE + s,
                    message: &message,
                });
                if ok {
                    let key = message.key();
                    if s == LATE_SUBSCRIBER {
                        self.check.count("cluster_late_subscriber_processed");
                    }
                    self.observe(Event::Processed {
                        node: SUB_NODE + s,
                        client: &client,
                        key: &key,
                    });
                }
                self.send(Node::Sub(s), from, Msg::CallbackAnswer { gdid, ok }, 0);
            }
            _ => {}
        }
    }
}

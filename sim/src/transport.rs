//! The simulated network: one deterministic mailbox per node, on madsim's
//! clock, instead of madsim's `Endpoint`. A message sent at virtual time `t`
//! is due at `t + delay + latency` (latency drawn from madsim's seeded RNG,
//! 0.2-3 ms as madsim's network drew it); a node wakes when a message is due
//! and takes messages in (due time, send order), at most one per
//! [`RECEIVE_GAP_NS`] as madsim's receive path did. A message is lost when its
//! link is cut when it is sent or when it falls due, or when its destination
//! is down when it is sent or crashes before it falls due (madsim delivered
//! to the socket of the incarnation it was sent to, which a kill closes).
//!
//! Why not `Endpoint`: every message cost a 1 ms "syscall" sleep in the
//! sender, a latency timer, a 1 ms sleep in the receiver's task, a channel
//! hand-off and two task wake-ups. Here it costs one heap push and, when it is
//! the earliest thing its node waits for, one madsim timer.
//!
//! **Invariant:** every choice is the seed's: latencies come from madsim's
//! global RNG in send order, ties in due time are broken by send order, and a
//! node is woken only by madsim timers (so by virtual time, never by polling
//! luck).

use crate::event::Seq;
use crate::wire::Wire;
use madsim::rand::Rng;
use madsim::time::{Instant, TimeHandle};
use sagamq::ClientId;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// One-way network latency, drawn per copy of a message (ns).
pub const LATENCY_NS: std::ops::Range<u64> = 200_000..3_000_000;
/// madsim never fires a timer sooner than this after it is set.
const TIMER_MIN_NS: u64 = 1_000_000;
/// A node takes in at most one message per this long (madsim's receive path
/// cost 1 ms per message). Without it a burst lands at once: four
/// subscription renewals meet a broker allowed one unsynced request, three are
/// refused, and with a short TTL the subscription lapses beyond its grace.
pub const RECEIVE_GAP_NS: u64 = 1_000_000;

/// madsim's virtual clock, read without the intercepted `clock_gettime`
/// (each `Instant::now()` inside madsim looks up the runtime in thread-local
/// storage and clones its handle).
pub struct SimClock {
    time: TimeHandle,
    start: Instant,
    start_elapsed: Duration,
}

impl SimClock {
    /// The clock of the current madsim runtime, reading 0 now.
    pub fn current() -> SimClock {
        let time = TimeHandle::current();
        SimClock {
            start: time.now_instant(),
            start_elapsed: time.elapsed(),
            time,
        }
    }

    /// Virtual nanoseconds since [`SimClock::current`].
    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.time.elapsed().saturating_sub(self.start_elapsed).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The madsim instant `ns` after the start.
    pub fn instant(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// A madsim sleep until `ns` after the start (madsim makes it at least 1 ms).
    pub fn sleep_until_ns(&self, ns: u64) -> madsim::time::Sleep {
        self.time.sleep_until(self.instant(ns))
    }
}

/// What a node's mailbox holds: a network message, or (broker) an operator's request.
pub enum Inbound {
    Net { from: usize, seq: Seq, wire: Wire },
    Redrive(ClientId),
}

struct Queued {
    due_ns: u64,
    /// Send order: breaks ties in due time deterministically.
    order: u64,
    inbound: Inbound,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ns, self.order) == (other.due_ns, other.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due_ns, self.order).cmp(&(other.due_ns, other.order))
    }
}

#[derive(Default)]
struct Mailbox {
    queue: BinaryHeap<Reverse<Queued>>,
    /// The node's current incarnation is running (bound, in madsim's terms).
    up: bool,
    /// The node task's waker, set while it waits.
    waker: Option<Waker>,
    /// The earliest madsim timer set to wake this node that may not have fired yet.
    armed_ns: Option<u64>,
    /// The node takes in its next message no earlier than this.
    receive_free_ns: u64,
}

/// Every node's mailbox and the links that are cut.
pub struct Transport {
    boxes: Vec<Mailbox>,
    /// `cut[a][b]`: messages from `a` to `b` are lost.
    cut: Vec<Vec<bool>>,
    order: u64,
}

impl Transport {
    pub fn new(nodes: usize) -> Transport {
        Transport {
            boxes: (0..nodes).map(|_| Mailbox::default()).collect(),
            cut: vec![vec![false; nodes]; nodes],
            order: 0,
        }
    }

    /// Node `i`'s new incarnation runs: messages sent to it from now on arrive.
    pub fn up(&mut self, i: usize) {
        self.boxes[i].up = true;
    }

    /// Node `i` was killed: what was on its way to it is lost with its socket.
    pub fn down(&mut self, i: usize) {
        let b = &mut self.boxes[i];
        b.up = false;
        b.queue.clear();
        b.waker = None;
        b.armed_ns = None;
        b.receive_free_ns = 0;
    }

    /// Cuts (or heals) the link between `a` and `b`, both ways.
    pub fn set_cut(&mut self, a: usize, b: usize, cut: bool) {
        self.cut[a][b] = cut;
        self.cut[b][a] = cut;
    }

    /// Cuts (or heals) the link from `from` to `to` only (an asymmetric
    /// partition): `to` still reaches `from`.
    pub fn set_cut_one_way(&mut self, from: usize, to: usize, cut: bool) {
        self.cut[from][to] = cut;
    }

    pub fn heal_all(&mut self) {
        self.cut.iter_mut().for_each(|row| row.fill(false));
    }

    /// Sends one copy of `wire` from `from` to `to`, held `delay_ns` before
    /// its latency. False if it is lost at once (link cut, destination down).
    #[allow(clippy::too_many_arguments)] // the message, its route and its timing
    pub fn send(
        &mut self,
        clock: &SimClock,
        now_ns: u64,
        from: usize,
        to: usize,
        seq: Seq,
        wire: Wire,
        delay_ns: u64,
    ) -> bool {
        if self.cut[from][to] || !self.boxes[to].up {
            return false;
        }
        let latency = madsim::rand::thread_rng().gen_range(LATENCY_NS);
        let due_ns = now_ns + delay_ns + latency;
        self.push(clock, now_ns, to, due_ns, Inbound::Net { from, seq, wire });
        true
    }

    /// Queues a local request (the operator's) for node `to`, due now.
    pub fn post(&mut self, clock: &SimClock, now_ns: u64, to: usize, inbound: Inbound) {
        if self.boxes[to].up {
            self.push(clock, now_ns, to, now_ns, inbound);
        }
    }

    fn push(&mut self, clock: &SimClock, now_ns: u64, to: usize, due_ns: u64, inbound: Inbound) {
        let order = self.order;
        self.order += 1;
        self.boxes[to].queue.push(Reverse(Queued { due_ns, order, inbound }));
        self.arm(clock, now_ns, to, due_ns);
    }

    /// The next message due for node `i` by `now_ns`, in (due, send) order,
    /// if the node may take one in now (see [`RECEIVE_GAP_NS`]); one whose
    /// link is cut by the time it falls due is lost.
    pub fn pop_due(&mut self, i: usize, now_ns: u64) -> Option<Inbound> {
        loop {
            let b = &mut self.boxes[i];
            if b.receive_free_ns > now_ns || b.queue.peek().is_none_or(|Reverse(q)| q.due_ns > now_ns) {
                return None;
            }
            let Reverse(q) = b.queue.pop()?;
            match &q.inbound {
                Inbound::Net { from, .. } if self.cut[*from][i] => continue,
                Inbound::Net { .. } => {
                    b.receive_free_ns = now_ns + RECEIVE_GAP_NS;
                    return Some(q.inbound);
                }
                Inbound::Redrive(_) => return Some(q.inbound),
            }
        }
    }

    /// When node `i` can next take in a queued message.
    pub fn next_due_ns(&self, i: usize) -> Option<u64> {
        let b = &self.boxes[i];
        b.queue.peek().map(|Reverse(q)| q.due_ns.max(b.receive_free_ns))
    }

    /// Messages due for node `i` by `now_ns` and not handled yet (a paused node's backlog).
    pub fn backlog(&self, i: usize, now_ns: u64) -> usize {
        self.boxes[i]
            .queue
            .iter()
            .filter(|Reverse(q)| q.due_ns <= now_ns)
            .count()
    }

    /// Node `i`'s task waits until `next_ns` (None: until a message arrives):
    /// ready if that time has come, else its waker is kept and a timer set.
    pub fn wait(
        &mut self,
        clock: &SimClock,
        now_ns: u64,
        i: usize,
        next_ns: Option<u64>,
        cx: &Context<'_>,
    ) -> Poll<()> {
        if next_ns.is_some_and(|t| t <= now_ns) {
            return Poll::Ready(());
        }
        let b = &mut self.boxes[i];
        if !b.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            b.waker = Some(cx.waker().clone());
        }
        if let Some(t) = next_ns {
            self.arm(clock, now_ns, i, t);
        }
        Poll::Pending
    }

    /// Makes sure node `i` is woken at `at_ns` (or at most madsim's minimum
    /// timer delay later): sets a madsim timer with the node's own waker
    /// unless an earlier one is pending. A node not waiting yet computes its
    /// own wake-up when it does.
    fn arm(&mut self, clock: &SimClock, now_ns: u64, i: usize, at_ns: u64) {
        let b = &mut self.boxes[i];
        let Some(waker) = &b.waker else { return };
        let target = at_ns.max(now_ns + TIMER_MIN_NS);
        if b.armed_ns.is_some_and(|a| a > now_ns && a <= target) {
            return;
        }
        // A madsim sleep polled once with the node's waker leaves its timer
        // behind; the timer wakes the node even though the sleep is dropped.
        let mut sleep = pin!(clock.sleep_until_ns(at_ns));
        let ready = sleep.as_mut().poll(&mut Context::from_waker(waker)).is_ready();
        if ready {
            waker.wake_by_ref();
        } else {
            b.armed_ns = Some(target);
        }
    }
}

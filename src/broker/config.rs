//! Every bound and timing knob of the broker, named (most significant word first).

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Subscriptions (client, topic) held at once.
    pub subscriptions_max: usize,
    /// Live (not yet settled for every subscriber) messages stored.
    pub messages_max: usize,
    /// Messages queued for one subscriber (pending + in flight + backing off).
    pub pending_per_subscriber_max: usize,
    /// Dead letters kept per subscriber. A publish is refused (`DeadLettersFull`)
    /// while queued + dead letters of an entitled subscriber reach it, since every
    /// queued message may still become a dead letter.
    pub dead_letters_per_subscriber_max: usize,
    /// Callbacks in flight per subscriber (the delivery window).
    pub inflight_per_subscriber_max: usize,
    /// Requests (publishes, duplicates waiting for their original, subscribes,
    /// unsubscribes, redrives) accepted but whose answer waits for an fsync.
    pub publishes_unsynced_max: usize,
    /// `(GlobalID, SubID)` keys remembered after their message settled.
    pub dedup_settled_max: usize,
    /// A callback with no answer after this counts as `TimedOut`.
    pub callback_timeout: Duration,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`, with seeded jitter.
    pub retry_backoff_initial: Duration,
    pub retry_backoff_max: Duration,
    /// Attempts per (subscriber, message) before it becomes a dead letter.
    pub attempts_max: u32,
    /// How long after its `ExpireTime` a subscription is still entitled to new
    /// messages (queued, delivery paused until it renews). A subscriber cut
    /// off for longer than its TTL then misses nothing published within the
    /// grace. Zero: an expired subscription gets nothing new.
    pub subscription_grace: Duration,
    /// Compact when the log holds more than this many records beyond the live
    /// state (and, to keep the snapshot cost amortised, more than the live state).
    pub compact_garbage_records_min: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            subscriptions_max: 10_000,
            messages_max: 1_000_000,
            pending_per_subscriber_max: 100_000,
            dead_letters_per_subscriber_max: 100_000,
            inflight_per_subscriber_max: 16,
            publishes_unsynced_max: 10_000,
            dedup_settled_max: 1_000_000,
            callback_timeout: Duration::from_secs(5),
            retry_backoff_initial: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(30),
            attempts_max: 10,
            subscription_grace: Duration::ZERO,
            compact_garbage_records_min: 100_000,
        }
    }
}

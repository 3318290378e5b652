#!/usr/bin/env python3
"""Realistic bugs written into the shipped code, one at a time, each judged by
the simulator alone: `sagamq-sim run --seeds 0..1000 --scenario saga` and
`--seeds 0..300 --scenario seed`. A bug is caught when either sweep fails.

These are not planted variants (`--bug`): they edit the real broker core and
saga participants, the way a held-out bug would, so they measure what the
oracle catches in code it did not grow up with.

    python3 scripts/realistic_bugs.py [--only NAME] [--saga-seeds N] [--seed-seeds N]

Runs in a scratch git worktree (`target/realistic-bugs/`), never in this tree.
Prints one line per bug and a summary; exit 0 only if every bug is caught.
"""
import argparse, os, re, shutil, subprocess, sys, json

# (name, file, old, new, what the mistake is); old/new may be lists of edits
BUGS = [
    ("dedup-by-globalid", "src/broker/dedup.rs",
     ["fn same_key(m: &Message, global_id: &GlobalId, sub_id: &SubId) -> bool {\n    m.global_id == *global_id && m.sub_id == *sub_id",
      ".bytes().chain([0xFF]).chain(sub_id.as_str().bytes());",
      ".is_some_and(|s| s.key.global_id == *global_id && s.key.sub_id == *sub_id)"],
     ["fn same_key(m: &Message, global_id: &GlobalId, _sub_id: &SubId) -> bool {\n    m.global_id == *global_id",
      ".bytes().chain([0xFF]).chain(sub_id.as_str().bytes().take(0));",
      ".is_some_and(|s| s.key.global_id == *global_id)"],
     "the broker dedups by GlobalID alone (SubID ignored)"),
    ("no-payment-request", "src/saga/order.rs",
     "if ok && self.flow == OrderFlow::Saga {",
     "if ok && self.flow == OrderFlow::Saga && false {",
     "the order never sends sale-order.payment.requested"),
    ("dead-letter-first-failure", "src/broker/delivery.rs",
     "if attempts >= self.config.attempts_max {",
     "if attempts >= 1 {",
     "the broker dead-letters on the first failed attempt"),
    ("no-dispatch-after-restart", "src/broker/core.rs",
     "broker.dirty = broker.clients.keys().cloned().collect();",
     "broker.dirty.clear();",
     "after a restart the broker dispatches nothing until a request wakes a queue"),
    ("compaction-drops-dedup-keys", "src/broker/compact.rs",
     "let mut settled = self.dedup.settled().peekable();",
     "let mut settled = self.dedup.settled().take(0).peekable();",
     "compaction drops the remembered dedup keys of settled messages"),
    ("stock-off-by-one", "src/saga/stock.rs",
     "if quantity > 0 && self.level(&product) >= quantity {",
     "if quantity > 0 && self.level(&product) > quantity {",
     "stock refuses an order that takes the last units"),
    ("payment-off-by-one", "src/saga/payment.rs",
     "if self.balance(&customer) >= amount {",
     "if self.balance(&customer) > amount {",
     "payment refuses a charge that empties the balance"),
    ("entitle-expired", "src/broker/core.rs",
     ".filter(|(_, s)| s.entitles(now, self.config.subscription_grace))",
     ".filter(|(_, _s)| true)",
     "the broker entitles expired subscriptions forever"),
    ("no-payment-cancel-on-deadline", "src/saga/order.rs",
     "        let mut publish = vec![Self::release(order, o, 1)];\n        if o.payment_requested {",
     "        let mut publish = vec![Self::release(order, o, 1)];\n        if o.payment_requested && false {",
     "an order that times out after asking for payment never cancels it"),
    ("complete-on-refusal", "src/saga/order.rs",
     "                if *ok {\n                    o.status = OrderStatus::Completed;",
     "                if *ok || !*ok {\n                    o.status = OrderStatus::Completed;",
     "the order completes when payment refuses"),
    ("compaction-drops-dead-letters", "src/broker/compact.rs",
     "            for (_, msg_id) in &q.dead {\n                put(BrokerRecord::DeadLettered {",
     "            for (_, msg_id) in q.dead.iter().take(0) {\n                put(BrokerRecord::DeadLettered {",
     "compaction forgets the dead letters"),
    ("dispatch-newest-first", "src/broker/delivery.rs",
     "let first = *set.first().expect(\"empty ready sets are removed\");",
     "let first = *set.last().expect(\"empty ready sets are removed\");",
     "the broker attempts the newest ready message of a topic first"),
    ("refund-to-another-customer", "src/saga/payment.rs",
     "                let balance = self.balances.entry(customer.clone()).or_insert(0);\n                *balance = balance.checked_add(amount).expect(\"balance fits u64\");\n                entry.refund",
     "                let to = self.balances.keys().next().cloned().unwrap_or(customer.clone());\n                let balance = self.balances.entry(to).or_insert(0);\n                *balance = balance.checked_add(amount).expect(\"balance fits u64\");\n                entry.refund",
     "payment refunds the first customer on its books, not the one it charged"),
    ("accepts-an-empty-callback-url", "src/broker/core.rs",
     "if s.notify_url.is_empty() || s.notify_url.len() > URL_LEN_MAX {",
     "if s.notify_url.is_empty() && s.notify_url.len() > URL_LEN_MAX {",
     "the broker stores a subscription with an empty callback URL (a mutant the sweeps used to miss)"),
    ("restock-another-product", "src/saga/stock.rs",
     "                let level = self.levels.entry(product.clone()).or_insert(0);\n                *level = level.checked_add(quantity).expect(\"stock level fits u64\");\n                entry.release",
     "                let to = self.levels.keys().next().cloned().unwrap_or(product.clone());\n                let level = self.levels.entry(to).or_insert(0);\n                *level = level.checked_add(quantity).expect(\"stock level fits u64\");\n                entry.release",
     "stock puts released units back on the first shelf, not the product's"),
    ("retries-without-backoff", "src/broker/delivery.rs",
     "Duration::from_nanos(full - half + jitter)",
     "Duration::from_nanos(jitter)",
     "the broker retries a failed callback after the jitter alone, hammering a failing subscriber"),
    ("compaction-miscounts-the-log", "src/broker/core.rs",
     "self.log_records = records;",
     "self.log_records += records;",
     "after a compaction the broker adds the snapshot's records to the old count: /stats lies and compaction runs ever more often"),
    ("window-ignored", "src/broker/delivery.rs",
     "if q.in_flight >= self.config.inflight_per_subscriber_max {",
     "if q.in_flight >= self.config.inflight_per_subscriber_max.saturating_mul(64) {",
     "the broker floods a subscriber, ignoring its in-flight window"),
    ("queue-bound-off-by-one", "src/broker/core.rs",
     "            if q.entries.len() >= self.config.pending_per_subscriber_max {",
     "            if q.entries.len() > self.config.pending_per_subscriber_max {",
     "the broker stores one message more than pending_per_subscriber_max for a subscriber"),
    ("messages-bound-ignored", "src/broker/core.rs",
     "        if self.messages.len() >= self.config.messages_max {",
     "        if self.messages.len() >= self.config.messages_max.saturating_mul(64) {",
     "the broker stores messages beyond messages_max (memory grows without bound)"),
    ("unsynced-bound-ignored", "src/broker/core.rs",
     "        if self.waiting_count >= self.config.publishes_unsynced_max {\n            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);\n        }\n        if self.messages.len()",
     "        if self.waiting_count >= self.config.publishes_unsynced_max.saturating_mul(64) {\n            return self.reject(req, BrokerError::TooManyUnsyncedPublishes);\n        }\n        if self.messages.len()",
     "the broker admits new publishes however many replies already wait for an fsync"),
    ("redrive-keeps-attempts", "src/broker/apply.rs",
     "                phase: Phase::Ready,\n                attempts: 0,",
     "                phase: Phase::Ready,\n                attempts: self.config.attempts_max.saturating_sub(1),",
     "a redriven dead letter keeps its spent attempt budget: one more failure dead-letters it again"),
    ("unsubscribe-keeps-entitlement", "src/broker/core.rs",
     "        !self.retired && now < self.expire_time.plus(grace)",
     "        now < self.expire_time.plus(grace)",
     "an unsubscribed client whose messages are still queued keeps getting new messages of the topic"),
    ("attempt-budget-off-by-one", "src/broker/delivery.rs",
     "if attempts >= self.config.attempts_max {",
     "if attempts > self.config.attempts_max {",
     "the broker makes one attempt more than attempts_max before dead-lettering"),
    ("host-answers-one-record-early", "src/saga/host.rs",
     "        let later = self.waiting.split_off(&Lsn(lsn.0 + 1));",
     "        let later = self.waiting.split_off(&Lsn(lsn.0 + 2));",
     "a host answers work whose record is one past the durable one (caught since a simulated sync promises only what was written when it began)"),
    # Fifth round: each passed both sweeps before the check named beside it.
    ("host-backoff-uncapped", "src/saga/host.rs",
     "        let base = initial.saturating_mul(factor).min(max);\n        let base_ns = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);\n        let jitter = self.rng.below(base_ns / 4 + 1);\n        Duration::from_nanos(base_ns.saturating_add(jitter)).min(max)",
     "        let base = initial.saturating_mul(factor);\n        let base_ns = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);\n        let jitter = self.rng.below(base_ns / 4 + 1);\n        let _ = max;\n        Duration::from_nanos(base_ns.saturating_add(jitter))",
     "a participant host's publish backoff ignores publish_retry_max (host-retry's ceiling)"),
    ("order-deadline-too-long", "src/saga/order.rs",
     "deadline: self.deadline_after.map(|d| now.plus(d)),",
     "deadline: self.deadline_after.map(|d| now.plus(d + d / 4)),",
     "the order's deadline is a quarter longer than configured (order-deadline)"),
    ("host-ignores-unsynced-bound", "src/saga/host.rs",
     "if self.lsn_last.0 - self.lsn_durable.0 >= self.config.records_unsynced_max {",
     "if self.lsn_last.0 - self.lsn_durable.0 > self.config.records_unsynced_max {",
     "a participant host takes one effect more than records_unsynced_max allows (host-bounds)"),
    ("unsynced-refused-with-room", "src/broker/core.rs",
     "            } else if self.waiting_count >= self.config.publishes_unsynced_max {",
     "            } else if self.waiting_count < self.config.publishes_unsynced_max {",
     "a retried publish of a not-yet-durable message is refused as TooManyUnsyncedPublishes with room (queue-bound's judged refusal)"),
]

def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--saga-seeds", type=int, default=1000)
    ap.add_argument("--seed-seeds", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    root = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
    scratch = os.path.join(root, "target", "realistic-bugs")
    if not os.path.isdir(scratch):
        run(["git", "worktree", "add", "--detach", scratch, "HEAD"], root, check=True)
    run(["git", "checkout", "--detach", "--force",
         subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()], scratch, check=True)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(root, "target", "realistic-bugs-target"))
    env.pop("RUSTFLAGS", None)
    bugs = [b for b in BUGS if a.only in (None, b[0])]
    caught = 0
    for name, path, old, new, what in bugs:
        run(["git", "checkout", "--", "."], scratch, check=True)
        f = os.path.join(scratch, path)
        src = open(f).read()
        olds, news = (old, new) if isinstance(old, list) else ([old], [new])
        if any(src.count(o) != 1 for o in olds):
            print(f"{name:32} SKIP: the code it edits moved ({path})")
            continue
        for o, n in zip(olds, news):
            src = src.replace(o, n)
        open(f, "w").write(src)
        b = run(["cargo", "build", "--release", "-q", "-p", "sagamq-sim"], scratch, env=env)
        if b.returncode != 0:
            print(f"{name:32} DOES NOT COMPILE\n{b.stderr[-2000:]}")
            continue
        exe = os.path.join(env["CARGO_TARGET_DIR"], "release", "sagamq-sim")
        verdicts = []
        for scen, n in (("saga", a.saga_seeds), ("seed", a.seed_seeds)):
            r = run([exe, "run", "--seeds", f"0..{n}", "--scenario", scen, "--json", "--jobs", str(a.jobs)], scratch, env=env)
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
            try:
                s = json.loads(last)
            except json.JSONDecodeError:
                s = {}
            if r.returncode != 0:
                fails = s.get("failures") or [{}]
                f0 = fails[0]
                verdicts.append(f"{scen}: {s.get('failed','?')} failed, first seed {f0.get('seed')} `{f0.get('invariant')}`")
            else:
                verdicts.append(f"{scen}: green")
        ok = any("failed" in v for v in verdicts)
        caught += ok
        print(f"{name:32} {'CAUGHT' if ok else 'MISSED'}  {'; '.join(verdicts)}  ({what})", flush=True)
    run(["git", "checkout", "--", "."], scratch)
    print(f"caught {caught} of {len(bugs)}")
    sys.exit(0 if caught == len(bugs) else 1)

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Mutation testing as a figure, on a seeded random sample.

`cargo mutants` lists every mutant of the core (`src/broker`, `src/saga`,
`src/log`, tests and display code left out) with its diff; this script draws a
seeded sample, applies each mutant in a scratch worktree and judges it:

1. the simulator alone: `sagamq-sim run --seeds 0..1000 --scenario saga` and
   `--seeds 0..300 --scenario seed` (caught when either fails);
2. for the mutants the simulator misses, the whole suite of the two crates
   (`cargo test --release -p sagamq --lib --tests` and `-p sagamq-sim`).

A mutant that does not compile is "unviable" and not counted.

    python3 scripts/mutation_sample.py [--n 30] [--seed 1] [--out target/mutation.jsonl] [--sim-only] [--reuse OLD.jsonl]

(`cargo mutants` itself is the harness of choice for the whole set, but its
baseline ran the workspace's full test command, real-broker process tests
included, and ignored `--test-package`; a sweep as the judge is this
script's job. Install it with `cargo install cargo-mutants`.)
"""
import argparse, json, os, random, subprocess, sys

CORE = ("src/broker/", "src/saga/", "src/log/")
# display and audit code, the demo scenario, and MemDisk (the simulated disk:
# a mutant there changes the world, not the system under test) are left out.
SKIP = ("/tests/", "display.rs", "audit.rs", "scenario.rs", "log/disk.rs")


def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="target/mutation.jsonl")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reuse", help="a previous --out file: its caught_by_sim and unviable verdicts "
                    "are kept (checks are only ever added), the rest judged again")
    ap.add_argument("--sim-only", action="store_true",
                    help="judge by the sweeps alone (a mutant they miss is `missed_by_sim`)")
    a = ap.parse_args()
    root = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
    listed = run(["cargo", "mutants", "--list", "--json", "--diff"]
                 + sum((["-f", f"{d}*.rs"] for d in CORE), []), root)
    if listed.returncode != 0:
        sys.exit(f"cargo mutants --list failed: {listed.stderr[-2000:]}")
    mutants = [m for m in json.loads(listed.stdout)
               if m["file"].startswith(CORE) and not any(s in m["file"] for s in SKIP)]
    mutants.sort(key=lambda m: m["name"])
    sample = random.Random(a.seed).sample(mutants, min(a.n, len(mutants)))
    print(f"{len(mutants)} mutants in the core; judging a sample of {len(sample)} (seed {a.seed})", flush=True)

    scratch = os.path.join(root, "target", "mutation-scratch")
    if not os.path.isdir(scratch):
        run(["git", "worktree", "add", "--detach", scratch, "HEAD"], root, check=True)
    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()
    run(["git", "checkout", "--detach", "--force", head], scratch, check=True)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(root, "target", "mutation-target"))
    env.pop("RUSTFLAGS", None)
    exe = os.path.join(env["CARGO_TARGET_DIR"], "release", "sagamq-sim")
    out = open(os.path.join(root, a.out), "w")
    tally = {"caught_by_sim": 0, "caught_by_suite": 0, "survived": 0, "missed_by_sim": 0, "unviable": 0}
    kept = {}
    if a.reuse and os.path.exists(a.reuse):
        for line in open(a.reuse):
            r = json.loads(line)
            if r["verdict"] in ("caught_by_sim", "unviable"):
                kept[r["name"]] = r
    for k, m in enumerate(sample):
        if m["name"] in kept:
            rec = kept[m["name"]]
            tally[rec["verdict"]] += 1
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"[{k + 1}/{len(sample)}] {rec['verdict']:16} {m['name']}  {rec['detail']} (kept)", flush=True)
            continue
        run(["git", "checkout", "--", "."], scratch, check=True)
        path = os.path.join(scratch, m["file"])
        p = subprocess.run(["patch", "-s", path], input=m["diff"], capture_output=True, text=True)
        if p.returncode != 0:
            verdict, detail = "unviable", "the diff does not apply"
        elif run(["cargo", "build", "--release", "-q", "-p", "sagamq-sim"], scratch, env=env).returncode != 0:
            verdict, detail = "unviable", "does not compile"
        else:
            detail = ""
            verdict = None
            for scen, n in (("saga", 1000), ("seed", 300)):
                r = run([exe, "run", "--seeds", f"0..{n}", "--scenario", scen, "--json",
                         "--stop-at-first", "--jobs", str(a.jobs)], scratch, env=env)
                if r.returncode != 0:
                    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
                    try:
                        f0 = (json.loads(last).get("failures") or [{}])[0]
                    except json.JSONDecodeError:
                        f0 = {}
                    verdict = "caught_by_sim"
                    detail = f"{scen} seed {f0.get('seed')} `{f0.get('invariant')}`"
                    break
            if verdict is None and a.sim_only:
                verdict = "missed_by_sim"
            if verdict is None:
                t1 = run(["cargo", "test", "--release", "-q", "-p", "sagamq", "--lib", "--tests"], scratch, env=env)
                t2 = run(["cargo", "test", "--release", "-q", "-p", "sagamq-sim"], scratch, env=env) \
                    if t1.returncode == 0 else t1
                if t1.returncode != 0 or t2.returncode != 0:
                    verdict, detail = "caught_by_suite", "unit/property/sim tests"
                else:
                    verdict, detail = "survived", ""
        tally[verdict] += 1
        rec = {"name": m["name"], "file": m["file"], "verdict": verdict, "detail": detail}
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(f"[{k + 1}/{len(sample)}] {verdict:16} {m['name']}  {detail}", flush=True)
    run(["git", "checkout", "--", "."], scratch)
    viable = len(sample) - tally["unviable"]
    if a.sim_only:
        print(f"viable {viable}: simulator alone {tally['caught_by_sim']}, missed {tally['missed_by_sim']}")
    else:
        print(f"viable {viable}: simulator alone {tally['caught_by_sim']}, "
              f"whole suite {tally['caught_by_sim'] + tally['caught_by_suite']}, survived {tally['survived']}")


if __name__ == "__main__":
    main()

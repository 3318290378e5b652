#!/usr/bin/env bash
# Figures of `sagamq serve --store postgres://...` on this machine:
#   1. acked publishes/s of the file log, then of one, two and three instances
#      on one throwaway PostgreSQL (one `sagamq bench --url` per instance, in
#      parallel, rates summed: each bench publishes through its own instance,
#      which forwards the publishes of partitions it does not own);
#   2. the time from `kill -9` of an instance to each of its partitions
#      answering a publish again through a survivor.
#
#   scripts/cluster_bench.sh [MESSAGES_PER_RUN] [LEASE_MS]
#
# Needs PostgreSQL's server binaries (see scripts/pg_throwaway.sh), python3
# and curl. Everything listens on 127.0.0.1 and is stopped by pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUSTFLAGS
MESSAGES=${1:-20000}
LEASE_MS=${2:-2000}
PARTITIONS=16
cargo build --release --features postgres -q
B=target/release/sagamq
eval "$(scripts/pg_throwaway.sh start)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
    scripts/pg_throwaway.sh stop "$SAGAMQ_PG_DIR"
}
trap cleanup EXIT
BASE=${SAGAMQ_TEST_PG%/postgres}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sagamq-cluster-bench.XXXXXX")

rate() { sed -n 's/.*msgs: \([0-9]*\) acked publishes\/s.*/\1/p' "$1" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

start_instance() { # db n -> prints URL; pid appended to PIDS via file
    local db=$1 n=$2
    $B serve --addr 127.0.0.1:0 --store "$BASE/$db" --partitions $PARTITIONS --lease-ms "$LEASE_MS" \
        >"$WORK/$db-$n.out" 2>"$WORK/$db-$n.err" &
    echo $! >"$WORK/$db-$n.pid"
    for _ in $(seq 1 100); do
        grep -q 'listening on' "$WORK/$db-$n.out" 2>/dev/null && break
        sleep 0.1
    done
    sed 's/sagamq listening on //' "$WORK/$db-$n.out"
}

wait_balanced() { # urls...: every instance serves something, all partitions served
    for _ in $(seq 1 200); do
        local total=0 each=1
        for u in "$@"; do
            local n
            n=$(curl -s "$u/cluster" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["Served"]))' 2>/dev/null || echo 0)
            [ "$n" -gt 0 ] || each=0
            total=$((total + n))
        done
        if [ $each = 1 ] && [ $total = $PARTITIONS ]; then
            # and every instance knows every owner (routes refresh each lease/4)
            sleep "$(python3 -c "print($LEASE_MS/1000)")"
            return
        fi
        sleep 0.1
    done
    echo "cluster never balanced" >&2
    exit 1
}

echo "== file log (one process, --data) =="
$B bench --parts throughput --repeat 1 --msgs "$MESSAGES" >"$WORK/file.txt"
echo "file log: $(rate "$WORK/file.txt") acked publishes/s"

for n in 1 2 3; do
    db=bench$n
    psql "$SAGAMQ_TEST_PG" -qc "CREATE DATABASE $db"
    urls=()
    for k in $(seq 1 $n); do
        urls+=("$(start_instance $db $k)")
        PIDS+=("$(cat "$WORK/$db-$k.pid")")
    done
    wait_balanced "${urls[@]}"
    bench_pids=()
    for k in $(seq 1 $n); do
        $B bench --url "${urls[$((k - 1))]}" --parts throughput --repeat 1 --msgs "$((MESSAGES / n))" \
            >"$WORK/$db-bench-$k.txt" 2>&1 &
        bench_pids+=($!)
    done
    for p in "${bench_pids[@]}"; do wait "$p"; done
    sum=0
    for k in $(seq 1 $n); do sum=$((sum + $(rate "$WORK/$db-bench-$k.txt"))); done
    echo "postgres, $n instance(s): $sum acked publishes/s (sum over $n parallel benches of $((MESSAGES / n)) messages)"
    if [ $n = 3 ]; then
        # kill -9 the instance serving the most partitions, then time each of its
        # partitions until a survivor answers a publish in it.
        victim=1 most=0
        for k in 1 2 3; do
            c=$(curl -s "${urls[$((k - 1))]}/cluster" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["Served"]))')
            if [ "$c" -gt "$most" ]; then victim=$k most=$c; fi
        done
        parts=$(curl -s "${urls[$((victim - 1))]}/cluster" | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin)["Served"])))')
        survivor=${urls[$((victim % 3))]}
        kill -9 "$(cat "$WORK/$db-$victim.pid")"
        python3 - "$survivor" "$PARTITIONS" "$parts" <<'EOF'
import json, sys, time, urllib.request, zlib
url, count, parts = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split()]
t0 = time.monotonic()
def gid_in(p, salt):
    i = 0
    while True:
        g = f"probe-{salt}-{i}"
        if zlib.crc32(g.encode()) % count == p:
            return g
        i += 1
worst = 0.0
pending = {p: 0 for p in parts}
while pending:
    for p in list(pending):
        pending[p] += 1
        body = json.dumps({"GlobalID": gid_in(p, pending[p]), "SubID": "1", "SenderID": "probe",
                           "CreateTime": 0, "Topic": "probe", "Content": "x"}).encode()
        req = urllib.request.Request(url + "/publish", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    worst = time.monotonic() - t0
                    del pending[p]
        except Exception:
            pass
    time.sleep(0.01)
    if time.monotonic() - t0 > 60:
        sys.exit("partitions never served again")
print(f"kill -9 of the owner of {len(parts)} partitions -> all of them serving again through a survivor: {worst * 1000:.0f} ms")
EOF
    fi
    for k in $(seq 1 $n); do kill "$(cat "$WORK/$db-$k.pid")" 2>/dev/null || true; done
    sleep 1
done
rm -rf "$WORK"

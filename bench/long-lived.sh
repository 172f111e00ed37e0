#!/usr/bin/env bash
# Puts on one long-lived 3-node lmskv cluster: RUNS put runs back to back on
# the same cluster (records loaded once), and after each run the server CPU
# by thread kind (async workers, WAL syncer, RocksDB flushes and compactions)
# per put. At the end, node 1's RocksDB compactions by column family (CPU
# time and input records, from RocksDB's event log). Measures how a cluster
# that has been taking writes for a while differs from a fresh one
# (bench/findings.md, "Why puts slow down on a long-lived cluster").
#
# Usage: bench/long-lived.sh            (release binaries of this checkout)
#   RUNS=10 DUR=30s CLIENTS=64          runs, measured time per run, clients
#   EXTRA='snapshot_logs_since_last = 1000000\n'   more node config lines
#   BIN=DIR                             lmskv-node, lmskv-bench and lmskv here
#   BASE_PORT=17101                     the nodes listen on BASE_PORT..+2
#   OUT=DIR                             per-run JSON and the summary (kept)
set -euo pipefail

BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/lmskv-target}/release}
RUNS=${RUNS:-6}
DUR=${DUR:-10s}
CLIENTS=${CLIENTS:-64}
EXTRA=${EXTRA:-}
BASE_PORT=${BASE_PORT:-17101}
OUT=${OUT:-$(mktemp -d /tmp/lmskv-long-lived.XXXX)}

for b in lmskv-node lmskv-bench lmskv; do
  [ -x "$BIN/$b" ] || { echo "long-lived: $BIN/$b not found; run make build-release first" >&2; exit 2; }
done
case "$RUNS" in '' | *[!0-9]* | 0) echo "long-lived: RUNS must be a positive number" >&2; exit 2 ;; esac
mkdir -p "$OUT"
data=$(mktemp -d /tmp/lmskv-long-lived-data.XXXX)
printf 'split_qps = 0.0\n%b' "$EXTRA" > "$data/node.toml"
eps=127.0.0.1:$BASE_PORT,127.0.0.1:$((BASE_PORT + 1)),127.0.0.1:$((BASE_PORT + 2))
up=
cleanup() {
  # `lmskv local up` stops its nodes on an interrupt.
  [ -n "$up" ] && kill -INT "$up" 2>/dev/null && wait "$up" 2>/dev/null
  rm -rf "$data"
}
trap cleanup EXIT INT TERM
LMSKV_LOG=${LMSKV_LOG:-warn} "$BIN/lmskv" local up --nodes 3 --base-port "$BASE_PORT" \
  --data-dir "$data" --config "$data/node.toml" --worker-threads 1 --endpoints "$eps" \
  > "$data/local-up.log" 2>&1 &
up=$!
# The placement driver moves a leader only to a node up for 10 s.
echo "long-lived: cluster starting; waiting ${SETTLE:-25}s for its leaders to settle"
sleep "${SETTLE:-25}"
mapfile -t pids < <(pgrep -P "$up" -x lmskv-node)
if [ ${#pids[@]} -ne 3 ]; then
  echo "long-lived: the cluster did not start; its output:" >&2
  cat "$data/local-up.log" >&2
  exit 1
fi
server_pids=$(IFS=,; echo "${pids[*]}")

# CPU ticks (1/100 s) by thread name, summed over the three nodes.
threads() {
  for p in "${pids[@]}"; do
    for t in /proc/$p/task/*; do
      read -r line < "$t/stat" || continue
      set -- ${line##*) }
      echo "$(cat "$t/comm" 2>/dev/null) $((${12} + ${13}))"
    done
  done | awk '{a[$1] += $NF} END {for (k in a) print k, a[k]}' | sort
}

for r in $(seq 1 "$RUNS"); do
  threads > "$OUT/threads-$r.before"
  load=--skip-load
  [ "$r" = 1 ] && load=
  "$BIN/lmskv-bench" --endpoints "$eps" --workload put --threads "$CLIENTS" --duration "$DUR" \
    --warmup 2s $load --server-pids "$server_pids" --json "$OUT/run-$r.json" > "$OUT/run-$r.txt" 2>&1
  threads > "$OUT/threads-$r.after"
  python3 - "$OUT" "$r" "$DUR" <<'EOF'
import json, sys
out, r, dur = sys.argv[1], sys.argv[2], sys.argv[3]
j = json.load(open(f"{out}/run-{r}.json"))
ops = j["throughput_ops_s"]
# Threads are sampled around the whole run, warm-up (2 s) included.
secs = float(dur[:-1]) if dur.endswith("s") and not dur.endswith("ms") else None
before = dict(l.rsplit(None, 1) for l in open(f"{out}/threads-{r}.before") if l.strip())
after = dict(l.rsplit(None, 1) for l in open(f"{out}/threads-{r}.after") if l.strip())
parts = []
if secs:
    puts = ops * (secs + 2)
    for name in sorted(after):
        d = int(after[name]) - int(before.get(name, 0))
        if d > 5:
            parts.append(f"{name} {d * 10000 / puts:.1f}")
print(f"run {r}: {ops:,.0f} puts/s, p50 {j['latency_us']['p50']} us, "
      f"server CPU {j['server_cpu_us_per_op']:.1f} us/put; by thread (us/put): {', '.join(parts)}")
EOF
done | tee "$OUT/summary.txt"

log=$(find "$data/node-1" -name LOG | head -1)
[ -n "$log" ] && cp "$log" "$OUT/rocksdb-LOG-node-1"
python3 - "$OUT/rocksdb-LOG-node-1" <<'EOF' | tee -a "$OUT/summary.txt"
import collections, json, re, sys
job_cf, agg = {}, collections.defaultdict(lambda: [0, 0, 0])
try:
    lines = open(sys.argv[1])
except OSError:
    sys.exit(0)
for line in lines:
    m = re.search(r"\[(\w+)\] \[JOB (\d+)\]", line)
    if m:
        job_cf[int(m.group(2))] = m.group(1)
    m = re.search(r"EVENT_LOG_v1 (\{.*\})", line)
    if m:
        e = json.loads(m.group(1))
        if e.get("event") == "compaction_finished":
            a = agg[job_cf.get(e.get("job"), "?")]
            a[0] += 1
            a[1] += e["compaction_time_cpu_micros"]
            a[2] += e["num_input_records"]
print("node 1 compactions by column family: " + ", ".join(
    f"{cf} {n} jobs {cpu / 1e6:.2f} s CPU {recs:,} records in" for cf, (n, cpu, recs) in sorted(agg.items())))
EOF
echo "long-lived: results in $OUT"

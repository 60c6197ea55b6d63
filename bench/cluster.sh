#!/usr/bin/env bash
# Measures delivery across two sluice nodes over NATS against delivery on
# one node, in one run. nats-server and two nodes (a, b; one worker each,
# their NATS bridge threads beside it) share core 0; sluice-load runs on
# core 1. Three measurements:
#
# 1. latency: 1,000 subscribers on node b, one publisher at 1,000
#    publishes/s of 64 B, on node b ("same") or on node a ("cross"),
#    alternately, ROUNDS times each: publish-to-arrival percentiles,
#    medians over the rounds.
# 2. CPU per publish: one subscriber on b, PUBLISH_RATE publishes/s from a
#    (cross) or from b (same): each process's CPU time over the run,
#    divided by the publishes.
# 3. ceiling: one subscriber on b, the publisher on a, at each rate of
#    CEILING_RATES: what arrived, and whether anything was lost. The
#    ceiling is the highest rate with nothing lost.
#
#   bench/cluster.sh                    ROUNDS=3, 5 s windows
#   ROUNDS=1 SECONDS_PER_RUN=2 bench/cluster.sh      a quick check
#   NODE_A_CPUS=1 NATS_CPUS=1 bench/cluster.sh       node a and nats-server on
#                                       core 1 with the harness, node b alone on core 0
#
# Installs nothing: needs nats-server (Debian's package). Loopback only;
# every run ends by itself; only processes it started are stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_RUN:-5}"
PUBLISH_RATE="${PUBLISH_RATE:-50000}"
CEILING_RATES="${CEILING_RATES:-100000 200000 300000 400000 500000}"
NODE_A_CPUS="${NODE_A_CPUS:-0}"
NATS_CPUS="${NATS_CPUS:-0}"
SCENARIOS="${SCENARIOS:-latency cpu ceiling}"
OUT="${OUT:-target/bench-cluster}"
command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 2; }
cargo build --release -q -p sluice -p sluice-load
mkdir -p "$OUT"
ulimit -n 20000
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# wait_log FILE PATTERN: the first match's last word (an address or port)
wait_log() {
  local found=""
  for _ in $(seq 100); do
    found=$(grep -o "$2[0-9.:]*" "$1" | head -n 1 | awk '{print $NF}' || true)
    [ -n "$found" ] && { echo "$found"; return; }
    sleep 0.1
  done
  cat "$1" >&2
  echo "no '$2' in $1" >&2
  exit 1
}

taskset -c "$NATS_CPUS" nats-server -a 127.0.0.1 -p -1 >"$OUT/nats.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
NATS="nats://$(wait_log "$OUT/nats.log" "Listening for client connections on ")"
declare -A WS ADMIN PID
for node in a b; do
  cpus=0
  [ "$node" = a ] && cpus=$NODE_A_CPUS
  taskset -c "$cpus" target/release/sluice --workers 1 --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --nats "$NATS" --node-id "$node" >"$OUT/node-$node.log" 2>&1 &
  PID[$node]=$!
  PIDS+=("$!")
  WS[$node]=$(wait_log "$OUT/node-$node.log" "listening on ")
  ADMIN[$node]=$(wait_log "$OUT/node-$node.log" "admin API on ")
done
for node in a b; do
  for _ in $(seq 100); do
    curl -sf "http://${ADMIN[$node]}/readyz" >/dev/null && break
    sleep 0.1
  done
done
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -r)"
  echo "$(nats-server --version); rounds $ROUNDS, $SECS s windows; node a on CPU $NODE_A_CPUS, nats-server on $NATS_CPUS, node b on 0"
} | tee "$OUT/run.txt"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# fanout NAME PUBLISHER_NODE ARGS...: one sluice-load run into NAME.json,
# subscribers on node b; the CPU ticks of a, b and nats-server into NAME.cpu
fanout() {
  local name=$1 from=$2
  shift 2
  local before=("$(cpu_ticks "${PID[a]}")" "$(cpu_ticks "${PID[b]}")" "$(cpu_ticks "$NATS_PID")")
  taskset -c 1 target/release/sluice-load fanout --url "ws://${WS[b]}/ws" --pub-url "ws://${WS[$from]}/ws" \
    --topics 1 --publishers 1 -s 64 --warmup 2 -t "$SECS" --json "$OUT/$name.json" --max-errors 1000000000 "$@" \
    >"$OUT/$name.txt" 2>&1
  echo "$(($(cpu_ticks "${PID[a]}") - before[0])) $(($(cpu_ticks "${PID[b]}") - before[1])) $(($(cpu_ticks "$NATS_PID") - before[2]))" >"$OUT/$name.cpu"
}

for round in $(seq "$ROUNDS"); do
  for mode in same cross; do
    from=b
    [ "$mode" = cross ] && from=a
    if [[ " $SCENARIOS " == *" latency "* ]]; then
      fanout "latency-$mode-$round" "$from" --subscribers 1000 -r 1000 --threads 2
    fi
    if [[ " $SCENARIOS " == *" cpu "* ]]; then
      fanout "cpu-$mode-$round" "$from" --subscribers 1 -r "$PUBLISH_RATE" --threads 1
    fi
  done
done
if [[ " $SCENARIOS " == *" ceiling "* ]]; then
  for rate in $CEILING_RATES; do
    fanout "ceiling-$rate" a --subscribers 1 -r "$rate" --threads 1
  done
fi

python3 - "$OUT" "$ROUNDS" "$SECS" "$PUBLISH_RATE" "$CEILING_RATES" "$SCENARIOS" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys
out, rounds, secs, rate, ceilings = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
scenarios = sys.argv[6].split()
tick = 100  # clock ticks per second (USER_HZ)
modes = (("same", "node b (same node)"), ("cross", "node a (across NATS)"))
def load(name):
    return json.load(open(f"{out}/{name}.json")), [int(x) for x in open(f"{out}/{name}.cpu").read().split()]
def med(xs):
    return statistics.median(xs)
if "latency" in scenarios:
    print("Publish to arrival, 1,000 subscribers on node b, 1,000 publishes/s of 64 B, "
          f"medians of {rounds} (min-max):\n")
    print("| publisher on | delivered | arrival p50 | p99 | p99.9 |")
    print("| --- | --- | --- | --- | --- |")
    for mode, where in modes:
        runs = [load(f"latency-{mode}-{r}")[0] for r in range(1, rounds + 1)]
        lost = sum(r["lost"] + r["out_of_order"] for r in runs)
        cells = []
        for key in ("p50", "p99", "p99_9"):
            vals = [r["arrival_us"][key] / 1000 for r in runs]
            cells.append(f"{med(vals):.2f} ms [{min(vals):.2f}-{max(vals):.2f}]")
        delivered = "all, in order" if lost == 0 else f"{lost} lost or out of order"
        print(f"| {where} | {delivered} | " + " | ".join(cells) + " |")
if "cpu" in scenarios:
    print(f"\nCPU per publish, one subscriber on node b, {rate} publishes/s, medians of {rounds}:\n")
    print("| publisher on | node a | node b | nats-server | delivered |")
    print("| --- | --- | --- | --- | --- |")
    for mode, where in modes:
        per = [[], [], []]
        lost = 0
        for r in range(1, rounds + 1):
            j, cpu = load(f"cpu-{mode}-{r}")
            lost += j["lost"]
            for i in range(3):
                per[i].append(cpu[i] / tick / j["sent"] * 1e6)
        cells = [f"{med(p):.2f} µs" for p in per]
        print(f"| {where} | " + " | ".join(cells) + f" | {'all' if lost == 0 else f'{lost} lost'} |")
if "ceiling" in scenarios:
    print("\nCeiling, node a to node b, one subscriber, 64 B:\n")
    print("| publishes/s offered | arriving/s | lost | arrival p50 / p99 |")
    print("| --- | --- | --- | --- |")
    best = 0
    for c in ceilings:
        j, _ = load(f"ceiling-{c}")
        if j["lost"] == 0 and j["out_of_order"] == 0:
            best = max(best, int(c))
        a = j["arrival_us"]
        lat = f"{a['p50']/1000:.2f} / {a['p99']/1000:.2f} ms" if a else "-"
        print(f"| {int(c):,} | {j['arrivals_per_second']:,.0f} | {j['lost']:,} | {lat} |")
    print(f"\nceiling: {best:,} publishes/s with nothing lost")
PY
for node in a b; do
  curl -s "http://${ADMIN[$node]}/stats" | python3 -c "import json,sys; print('node $node bus:', json.load(sys.stdin)['bus'])" | tee -a "$OUT/run.txt"
done

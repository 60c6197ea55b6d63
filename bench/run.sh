#!/usr/bin/env bash
# Measures sluice and the peer servers (bench/peers) in one run: for each
# scenario, every server in turn (A B C D E A B C D E ...), each pinned to
# core 0 with one core's worth of work (sluice --workers 1; the peers are
# single-threaded), sluice-load pinned to core 1. Prints a markdown table:
# medians, min-max, and sluice's ratio to each peer.
#
#   bench/run.sh               5 rounds, 5 s windows
#   ROUNDS=1 SECONDS_PER_RUN=2 bench/run.sh     a quick check
#   SCENARIOS="echo-32-100x64 fanout-1000" bench/run.sh
#
# Loopback only; every run ends by itself; only processes it started are
# stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-5}"
SCENARIOS="${SCENARIOS:-echo-32-100x64 echo-512-100x64 echo-32-1000x4 echo-512-1000x4 fanout-1000}"
OUT="${OUT:-target/bench-run}"
SERVERS=(sluice tungstenite-default tungstenite-tuned fastwebsockets-default fastwebsockets-tuned)

cargo build --release --workspace -q
cargo build --release -q --manifest-path bench/peers/Cargo.toml
mkdir -p "$OUT"
ulimit -n 20000

# start_server NAME MODE PORT: starts it in the background; its PID in $SERVER_PID
start_server() {
  local name=$1 mode=$2 port=$3
  case $name in
    sluice) taskset -c 0 target/release/sluice --workers 1 --listen "127.0.0.1:$port" --admin-listen off >"$OUT/server.log" 2>&1 & ;;
    *) taskset -c 0 bench/peers/target/release/peer --lib "${name%-*}" --config "${name##*-}" --mode "$mode" \
         --listen "127.0.0.1:$port" >"$OUT/server.log" 2>&1 & ;;
  esac
  SERVER_PID=$!
}

# stop_server: SIGTERM, then wait (bounded) for it to exit
stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

# run SCENARIO SERVER ROUND: one measurement, its JSON in $OUT
run() {
  local scenario=$1 server=$2 round=$3 port=$((9300 + RANDOM % 500)) mode args path
  case $scenario in
    echo-*)
      mode=echo; path=/echo
      IFS=- read -r _ size shape <<<"$scenario"
      args=(echo -c "${shape%x*}" -d "${shape#*x}" -s "$size" --warmup 2)
      ;;
    fanout-*)
      mode=broadcast; path=/ws
      args=(fanout --subscribers "${scenario#fanout-}" --topics 1 --publishers 1 -r 12000 -s 64 --warmup 2 --threads 2 --max-errors 1000000000)
      ;;
  esac
  start_server "$server" "$mode" "$port"
  sleep 0.3
  taskset -c 1 target/release/sluice-load "${args[0]}" --url "ws://127.0.0.1:$port$path" "${args[@]:1}" \
    -t "$SECS" --server-pid "$SERVER_PID" --json "$OUT/$scenario-$server-$round.json" >"$OUT/$scenario-$server-$round.out" 2>&1 || true
  stop_server
}

for scenario in $SCENARIOS; do
  for round in $(seq "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
      run "$scenario" "$server" "$round"
    done
  done
done

python3 - "$OUT" "$ROUNDS" "$SCENARIOS" "${SERVERS[@]}" <<'PY'
import json, statistics, sys
out, rounds, scenarios, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
print("| scenario | server | median | min-max | sluice / this |")
print("| --- | --- | --- | --- | --- |")
for sc in scenarios:
    key = "arrivals_per_second" if sc.startswith("fanout") else "messages_per_second"
    unit = "deliveries/s" if sc.startswith("fanout") else "msg/s"
    med = {}
    for sv in servers:
        vals = []
        for r in range(1, rounds + 1):
            try:
                vals.append(json.load(open(f"{out}/{sc}-{sv}-{r}.json"))[key])
            except Exception:
                pass
        if vals:
            med[sv] = (statistics.median(vals), min(vals), max(vals))
    for sv in servers:
        if sv not in med:
            print(f"| {sc} | {sv} | no result | | |")
            continue
        m, lo, hi = med[sv]
        ratio = f"{med['sluice'][0] / m:.2f}x" if "sluice" in med and sv != "sluice" and m > 0 else ""
        print(f"| {sc} | {sv} | {m/1e6:.2f} M {unit} | {lo/1e6:.2f}-{hi/1e6:.2f} M | {ratio} |")
PY

#!/usr/bin/env bash
# Measures sluice and the peer servers (bench/peers) in one run: for each
# scenario, every server in turn (A B C D E A B C D E ...), each pinned to
# core 0 with one core's worth of work (sluice --workers 1; the peers are
# single-threaded), sluice-load pinned to core 1. Writes every run's JSON,
# a percentile plot per scenario (SCENARIO.svg) and the table (table.md)
# into OUT, and prints the table: medians, min-max, and how sluice compares
# with each peer. A run from which the hypervisor stole more than 5% of
# either core (STEAL_LIMIT) is measured again, up to RETRIES (4) times.
#
#   bench/run.sh               every scenario, 5 rounds, 5 s windows
#   ROUNDS=1 SECONDS_PER_RUN=2 bench/run.sh     a quick check
#   SCENARIOS="echo-32-100x64 fanout-1000" bench/run.sh
#   SERVERS="sluice sluice-before" SLUICE_BEFORE=/path/to/old/sluice bench/run.sh
#                              this build against another sluice binary
#                              (run alternately, same pinning and flags)
#   UWS=/path/to/BenchServer bench/run.sh
#                              uWebSockets' bench server as one more peer
#                              (`uws`) in every scenario (fan-out on its
#                              /broadcast path, which subscribes on the text
#                              `sub`); it is built outside the repository
#   SLUICE_ARGS="--driver epoll" bench/run.sh
#                              flags for sluice (and sluice-before)
#
# Scenarios (names are parsed, so others of the same shapes work too):
#   echo-SIZE-CxD        closed-loop echo, C connections x D in flight; a
#                        connection writes the echoes of one read in one send
#   echo-SIZE-CxD-each   the same, each message with its own send (one
#                        frame per write, as independent clients write)
#   latency-SIZE-C       open-loop echo at LATENCY_RATE msg/s (default: half
#                        the lowest median of echo-SIZE-Cx1 in this run),
#                        the harness busy-polling
#   memory-N             N idle connections: server RSS per connection
#   fanout-N[-RATE]      1 publisher, N subscribers on one topic, RATE
#                        publishes/s (default 12,000,000 / N offered deliveries)
#   churn-C              C clients: connect, one echo, close, over and over
#
# Loopback only; every run ends by itself; only processes it started are
# stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-5}"
SCENARIOS="${SCENARIOS:-echo-32-100x64 echo-32-100x64-each echo-512-100x16 echo-512-100x16-each echo-512-100x64 echo-32-1000x4 echo-32-1000x4-each echo-512-1000x4 echo-32-100x1 latency-32-100 memory-15000 fanout-1000 fanout-1000-24000 fanout-10000 fanout-10000-2400 churn-50}"
OUT="${OUT:-target/bench-run}"
read -r -a SERVERS <<<"${SERVERS:-sluice tungstenite-default tungstenite-tuned fastwebsockets-default fastwebsockets-tuned${UWS:+ uws}}"
read -r -a SLUICE_FLAGS <<<"${SLUICE_ARGS:-}"
if [[ " ${SERVERS[*]} " == *" uws "* && ! -x ${UWS:-} ]]; then
  echo "uws needs UWS=<path to uWebSockets' BenchServer, built from uWebSockets' sources>" >&2
  exit 2
fi
if [[ " ${SERVERS[*]} " == *" sluice-before "* && ! -x ${SLUICE_BEFORE:-} ]]; then
  echo "sluice-before needs SLUICE_BEFORE=<path to a sluice binary>" >&2
  exit 2
fi
# Source addresses for the scenarios that use many ports.
SOURCES=127.0.0.1-127.0.0.40

cargo build --release --workspace -q
cargo build --release -q --manifest-path bench/peers/Cargo.toml
mkdir -p "$OUT"
ulimit -n 20000
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -r)"
  echo "rounds $ROUNDS, $SECS s windows"
} >"$OUT/run.txt"

# start_server NAME MODE PORT: starts it in the background; its PID in $SERVER_PID
start_server() {
  local name=$1 mode=$2 port=$3
  case $name in
    sluice) taskset -c 0 target/release/sluice --workers 1 --listen "127.0.0.1:$port" --admin-listen off "${SLUICE_FLAGS[@]}" >"$OUT/server.log" 2>&1 & ;;
    sluice-before) taskset -c 0 "$SLUICE_BEFORE" --workers 1 --listen "127.0.0.1:$port" --admin-listen off "${SLUICE_FLAGS[@]}" >"$OUT/server.log" 2>&1 & ;;
    uws) taskset -c 0 "$UWS" "$port" >"$OUT/server.log" 2>&1 & ;;
    *) taskset -c 0 bench/peers/target/release/peer --lib "${name%-*}" --config "${name##*-}" --mode "$mode" \
         --listen "127.0.0.1:$port" >"$OUT/server.log" 2>&1 & ;;
  esac
  SERVER_PID=$!
}

# stop_server (SIGTERM, a bounded wait, SIGKILL)
source bench/lib.sh

# lowest_median SCENARIO KEY: the lowest per-server median of KEY over this run's JSONs
lowest_median() {
  python3 - "$OUT" "$1" "$2" "$ROUNDS" "${SERVERS[@]}" <<'PY'
import json, statistics, sys
out, sc, key, rounds, servers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
meds = []
for sv in servers:
    vals = []
    for r in range(1, rounds + 1):
        try:
            vals.append(json.load(open(f"{out}/{sc}-{sv}-{r}.json"))[key])
        except Exception:
            pass
    if vals:
        meds.append(statistics.median(vals))
print(int(min(meds)) if meds else "")
PY
}

# args_for SCENARIO: the harness command for it in ARGS, the peer mode in MODE, the path in URL_PATH
args_for() {
  local scenario=$1 size shape subs rate
  case $scenario in
    echo-*)
      MODE=echo URL_PATH=/echo
      local each
      IFS=- read -r _ size shape each <<<"$scenario"
      ARGS=(echo -c "${shape%x*}" -d "${shape#*x}" -s "$size" --warmup 1 -t "$SECS" ${each:+--write-each})
      ;;
    latency-*)
      MODE=echo URL_PATH=/echo
      IFS=- read -r _ size conns <<<"$scenario"
      rate="${LATENCY_RATE:-}"
      if [[ -z $rate ]]; then
        local ceiling
        ceiling=$(lowest_median "echo-$size-${conns}x1" messages_per_second)
        [[ -n $ceiling ]] || { echo "latency: run echo-$size-${conns}x1 first or set LATENCY_RATE" >&2; exit 2; }
        rate=$((ceiling / 2))
        echo "$scenario: $rate msg/s (half of the lowest echo-$size-${conns}x1 median, $ceiling)" >>"$OUT/run.txt"
      fi
      ARGS=(latency -c "$conns" -r "$rate" -s "$size" --busy-poll --warmup 1 -t "$SECS")
      ;;
    memory-*)
      MODE=echo URL_PATH=/echo
      ARGS=(connect -n "${scenario#memory-}" --rate 10000 --hold 3 --source "$SOURCES")
      ;;
    fanout-*)
      MODE=broadcast URL_PATH=/ws
      IFS=- read -r _ subs rate <<<"$scenario"
      rate="${rate:-$((12000000 / subs))}"
      ARGS=(fanout --subscribers "$subs" --topics 1 --publishers 1 -r "$rate" -s 64 --warmup 2 -t "$SECS"
        --threads 2 --settle-ms $((subs >= 5000 ? 2000 : 500)) --source "$SOURCES" --max-errors 1000000000)
      ;;
    churn-*)
      MODE=echo URL_PATH=/echo
      ARGS=(churn -c "${scenario#churn-}" -s 32 --warmup 1 -t "$SECS" --source "$SOURCES")
      ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
}

# stolen JSON: true when the hypervisor took more than STEAL_LIMIT of the
# measured window from either core (the run measured the host, not the servers)
stolen() {
  python3 - "$1" "${STEAL_LIMIT:-0.05}" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
window = j["measured_seconds"]
sys.exit(0 if any(s > float(sys.argv[2]) * window for s in j["cpu"]["steal_seconds"]) else 1)
PY
}

# run SCENARIO SERVER ROUND: one measurement, its JSON in $OUT; repeated (at
# most RETRIES times) while the host steals CPU from it
run() {
  local scenario=$1 server=$2 round=$3 try port json
  json="$OUT/$scenario-$server-$round.json"
  for try in $(seq 0 "${RETRIES:-4}"); do
    port=$((9300 + RANDOM % 500))
    start_server "$server" "$MODE" "$port"
    sleep 0.3
    local path=$URL_PATH extra=()
    if [[ $server == uws && $MODE == broadcast ]]; then
      # uWebSockets' bench server: one topic on /broadcast, `sub` subscribes,
      # any other message is published as it is
      path=/broadcast extra=(--sub-msg sub --pub-prefix '')
    fi
    taskset -c 1 target/release/sluice-load "${ARGS[0]}" --url "ws://127.0.0.1:$port$path" "${ARGS[@]:1}" "${extra[@]}" \
      --server-pid "$SERVER_PID" --json "$json" >"$OUT/$scenario-$server-$round.out" 2>&1 || true
    stop_server
    if [[ -f $json ]] && stolen "$json"; then
      echo "$scenario $server round $round: steal over the limit, measured again" >>"$OUT/run.txt"
      mv "$json" "$OUT/stolen-$scenario-$server-$round-$try.json"
      continue
    fi
    return
  done
}

for scenario in $SCENARIOS; do
  args_for "$scenario"
  for round in $(seq "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
      run "$scenario" "$server" "$round"
    done
  done
  series=()
  for server in "${SERVERS[@]}"; do
    files=$(ls "$OUT/$scenario-$server"-*.json 2>/dev/null | paste -sd, || true)
    [[ -n $files ]] && series+=("$server=$files")
  done
  drawn=latency
  [[ $scenario == memory-* ]] && drawn=handshake
  target/release/sluice-load plot --out "$OUT/$scenario.svg" --histogram "$drawn" \
    --title "$scenario: $drawn by percentile, all rounds" "${series[@]}" >/dev/null 2>&1 || true
done

python3 bench/table.py "$OUT" "$ROUNDS" "$SCENARIOS" "${SERVERS[@]}" | tee "$OUT/table.md"

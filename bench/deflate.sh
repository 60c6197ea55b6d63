#!/usr/bin/env bash
# permessage-deflate's figures: each scenario in each of MODES,
# alternately, ROUNDS rounds; sluice (--workers 1) pinned to core 0, the
# client to core 1. Prints one line per run and the medians.
#
#   bench/deflate.sh                     every scenario, 3 rounds
#   ROUNDS=1 SCENARIOS="echo" bench/deflate.sh
#   SLUICE_ARGS="--compress-level 1" bench/deflate.sh
#   MODES="deflate dedicated" bench/deflate.sh
#
# Modes (default "plain deflate"):
#   plain      the extension not offered
#   deflate    offered without context takeover: sluice's `shared` mode
#   dedicated  sluice --deflate dedicated (its budget raised past what the
#              run needs), offered as browsers do (sluice-load --deflate
#              --deflate-takeover, ECHO_CHECK_DEFLATE=2): context takeover
#              both ways, a compressor and an inflater per connection
#   dedicated-wN  the same with --deflate-window-bits N
#
# Scenarios:
#   fanout   1 publisher, 1,000 subscribers of one topic, RATES publishes
#            a second (default "100 250") of 1 KiB JSON-like text
#            (sluice-load fanout --json-payload [--deflate]): deliveries a
#            second, the server's CPU per delivery, and the bytes it wrote
#            per delivery (sluice_bytes_out_total / sluice_deliveries_total)
#   echo     100 connections x 4 in flight x 1 KiB JSON-like text, closed
#            loop, one frame per write: sluice-load echo --write-each, and
#            the independent client (bench/echo_check.c, ECHO_CHECK_JSON=1
#            [ECHO_CHECK_DEFLATE=1|2]); and the bytes sluice wrote per
#            echo (sluice_bytes_out_total / sluice_messages_out_total)
#   memory   15,000 idle connections (sluice-load connect [--deflate]):
#            the server's RSS per connection
#
# Loopback only; every run ends by itself; only processes it started are
# stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_RUN:-4}"
SCENARIOS="${SCENARIOS:-fanout echo memory}"
MODES="${MODES:-plain deflate}"
RATES="${RATES:-100 250}"
OUT="${OUT:-target/bench-deflate}"
read -r -a SLUICE_FLAGS <<<"${SLUICE_ARGS:-}"
SOURCES=127.0.0.1-127.0.0.40
mkdir -p "$OUT"
cargo build --release -q -p sluice-load
cargo build --release -q --bin sluice
cc -O2 -Wall -o "$OUT/echo_check" bench/echo_check.c -lssl -lcrypto -lz
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SERVER_PID=""
MODE_FLAGS=()
start_server() {
  local port=$1 admin=$2
  taskset -c 0 target/release/sluice --workers 1 --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    "${SLUICE_FLAGS[@]}" "${MODE_FLAGS[@]}" >"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do
    grep -q "listening on" "$OUT/server.log" && return 0
    sleep 0.1
  done
  echo "sluice did not start" >&2
  exit 1
}
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }

# field JSON KEY...: a number from sluice-load's JSON
field() {
  python3 - "$@" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    j = j[k]
print(j)
PY
}

results="$OUT/results.txt"
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for mode in $MODES; do
      flag=()
      MODE_FLAGS=()
      deflate=0
      case $mode in
        deflate) flag=(--deflate) deflate=1 ;;
        dedicated*)
          flag=(--deflate --deflate-takeover) deflate=2
          MODE_FLAGS=(--deflate dedicated --deflate-dedicated-bytes 68719476736)
          [[ $mode == dedicated-w* ]] && MODE_FLAGS+=(--deflate-window-bits "${mode#dedicated-w}")
          ;;
      esac
      port=$((9300 + RANDOM % 500))
      admin=$((port + 500))
      case $scenario in
        fanout)
          for rate in $RATES; do
            start_server "$port" "$admin"
            json="$OUT/fanout-$rate-$mode-$round.json"
            taskset -c 1 target/release/sluice-load fanout --url "ws://127.0.0.1:$port/ws" --subscribers 1000 \
              --topics 1 --publishers 1 -r "$rate" -s 1024 --json-payload "${flag[@]}" --warmup 1 -t "$SECS" \
              --threads 2 --settle-ms 500 --source "$SOURCES" --server-pid "$SERVER_PID" --json "$json" \
              --max-errors 1000000000 >"$OUT/fanout-$rate-$mode-$round.out" 2>&1 || true
            bytes=$(metric "$admin" sluice_bytes_out_total)
            deliveries=$(metric "$admin" sluice_deliveries_total)
            stop_server
            echo "fanout-$rate $mode deliveries_per_s $(field "$json" arrivals_per_second) lost $(field "$json" lost)" \
              "server_ns_per_delivery $(field "$json" cpu server_ns_per_message)" \
              "bytes_per_delivery $(python3 -c "print(round($bytes / max($deliveries, 1), 1))")" | tee -a "$results"
          done
          ;;
        echo)
          start_server "$port" "$admin"
          json="$OUT/echo-$mode-$round.json"
          taskset -c 1 target/release/sluice-load echo --url "ws://127.0.0.1:$port/echo" -c 100 -d 4 -s 1024 \
            --write-each --json-payload "${flag[@]}" --warmup 1 -t "$SECS" --server-pid "$SERVER_PID" \
            --json "$json" >"$OUT/echo-$mode-$round.out" 2>&1 || true
          bytes=$(metric "$admin" sluice_bytes_out_total)
          messages=$(metric "$admin" sluice_messages_out_total)
          echo "echo-sluice-load $mode msg_per_s $(field "$json" messages_per_second)" \
            "server_ns_per_msg $(field "$json" cpu server_ns_per_message)" \
            "bytes_per_msg $(python3 -c "print(round($bytes / max($messages, 1), 1))")" | tee -a "$results"
          stop_server
          start_server "$port" "$admin"
          check=$(ECHO_CHECK_JSON=1 ECHO_CHECK_DEFLATE=$deflate taskset -c 1 "$OUT/echo_check" 127.0.0.1 "$port" /echo \
            echo 100 4 1024 "$SECS" "$SERVER_PID" 2>&1 || true)
          stop_server
          echo "echo-check $mode $(python3 -c "
import json, sys
j = json.loads(sys.argv[1])
print('msg_per_s', round(j['messages_per_second']), 'server_ns_per_msg', round(j['server_cpu'] / max(j['messages_per_second'], 1) * 1e9))
" "$check")" | tee -a "$results"
          ;;
        memory)
          start_server "$port" "$admin"
          json="$OUT/memory-$mode-$round.json"
          taskset -c 1 target/release/sluice-load connect --url "ws://127.0.0.1:$port/echo" -n 15000 --rate 10000 \
            --hold 3 --source "$SOURCES" "${flag[@]}" --server-pid "$SERVER_PID" --json "$json" \
            >"$OUT/memory-$mode-$round.out" 2>&1 || true
          stop_server
          echo "memory $mode bytes_per_connection $(field "$json" memory bytes_per_connection)" | tee -a "$results"
          ;;
      esac
    done
  done
done

echo
echo "medians over $ROUNDS rounds:"
python3 - "$results" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    parts = line.split()
    name, mode, rest = parts[0], parts[1], parts[2:]
    for k, v in zip(rest[::2], rest[1::2]):
        rows[(name, mode)][k].append(float(v))
for (name, mode), fields in rows.items():
    print(name, mode, " ".join("%s %s (%s-%s)" % (k, round(statistics.median(v), 1), min(v), max(v)) for k, v in fields.items()))
PY

#!/usr/bin/env bash
# wss:// against ws:// on one sluice, in the same run: echo throughput as a
# fraction of plain (rounds alternate the two), and idle memory per
# connection (a fresh server for each measurement). Server on core 0 with
# one worker, sluice-load on core 1; medians of ROUNDS.
#
#   bench/tls.sh                       (ROUNDS=5 SECONDS_PER_RUN=3)
#   OUT=target/bench-tls bench/tls.sh
#   UWS=.../BenchServer UWS_TLS=.../TlsBenchServer bench/tls.sh   (uWebSockets too)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-3}"
OUT="${OUT:-target/bench-tls}"
SHAPES="${SHAPES:-32:100:64 512:100:64 16384:10:4}"
MEMORY_CONNECTIONS="${MEMORY_CONNECTIONS:-15000}"
mkdir -p "$OUT"
cargo build --release --workspace -q
SLUICE=target/release/sluice
LOAD=target/release/sluice-load

# A certificate for 127.0.0.1, made here.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 7 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null

SERVER=""
start_server() {
  local log="$OUT/server.log"
  taskset -c 0 "$SLUICE" --workers 1 --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 \
    --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem" --admin-listen off >"$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 50); do
    PLAIN=$(grep -o 'listening on [0-9.:]*' "$log" | head -n 1 | cut -d' ' -f3 || true)
    SECURE=$(grep -o 'wss:// on [0-9.:]*' "$log" | head -n 1 | cut -d' ' -f3 || true)
    [[ -n $PLAIN && -n $SECURE ]] && return 0
    sleep 0.1
  done
  echo "sluice did not start" >&2
  cat "$log" >&2
  exit 1
}
stop_server() {
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

url() { if [[ $1 == wss ]]; then echo "wss://$SECURE/echo"; else echo "ws://$PLAIN/echo"; fi; }

field() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval("d" + sys.argv[2]))' "$1" "$2"; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "rounds $ROUNDS, $SECS s windows"
} | tee "$OUT/run.txt"

start_server
for shape in $SHAPES; do
  IFS=: read -r size conns depth <<<"$shape"
  for round in $(seq "$ROUNDS"); do
    for scheme in ws wss; do
      json="$OUT/echo-$size-${conns}x$depth-$scheme-$round.json"
      taskset -c 1 "$LOAD" echo --url "$(url $scheme)" --ca "$OUT/cert.pem" -c "$conns" -d "$depth" -s "$size" \
        --warmup 1 -t "$SECS" --server-pid "$SERVER" --json "$json" >/dev/null
    done
  done
  ws=$(for f in "$OUT"/echo-"$size"-"${conns}x$depth"-ws-*.json; do field "$f" '["messages_per_second"]'; done | median)
  wss=$(for f in "$OUT"/echo-"$size"-"${conns}x$depth"-wss-*.json; do field "$f" '["messages_per_second"]'; done | median)
  printf 'echo %s B %sx%s: ws %.0f msg/s, wss %.0f msg/s, wss/ws %.2f\n' "$size" "$conns" "$depth" "$ws" "$wss" \
    "$(echo "$wss / $ws" | bc -l)" | tee -a "$OUT/run.txt"
  # The harness does the same crypto as the server and saturates its core
  # first over wss://: the server's CPU per message is then the figure.
  ws=$(for f in "$OUT"/echo-"$size"-"${conns}x$depth"-ws-*.json; do field "$f" '["cpu"]["server_ns_per_message"]'; done | median)
  wss=$(for f in "$OUT"/echo-"$size"-"${conns}x$depth"-wss-*.json; do field "$f" '["cpu"]["server_ns_per_message"]'; done | median)
  printf '  server CPU per message: ws %.0f ns, wss %.0f ns, ws/wss %.2f\n' "$ws" "$wss" \
    "$(echo "$ws / $wss" | bc -l)" | tee -a "$OUT/run.txt"
done
stop_server

# The same shapes with the independent client (bench/echo_check.c, over
# OpenSSL for wss://) in both its write shapes: "each" writes every
# message with its own SSL_write (one record per frame, as browsers send
# them), "burst" the echoes of one read in one. With UWS and UWS_TLS,
# uWebSockets runs beside sluice: UWS_TLS is its BenchServer with
# `uWS::SSLApp app({.key_file_name = argv[2], .cert_file_name = argv[3]})`
# in place of `uWS::App app`, on uSockets built with WITH_OPENSSL=1, and
# takes PORT KEY CERT.
[[ -f /usr/include/openssl/ssl.h ]] || { echo "echo_check needs OpenSSL's headers: apt-get install libssl-dev" >&2; exit 2; }
cc -O2 -Wall -o "$OUT/echo_check" bench/echo_check.c -lssl -lcrypto
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PEERS=()
start_uws() {
  local plain_port secure_port
  plain_port=$(free_port)
  secure_port=$(free_port)
  taskset -c 0 "$UWS" "$plain_port" >"$OUT/uws.log" 2>&1 &
  PEERS=($!)
  taskset -c 0 "$UWS_TLS" "$secure_port" "$OUT/key.pem" "$OUT/cert.pem" >"$OUT/uws-tls.log" 2>&1 &
  PEERS+=($!)
  PLAIN=127.0.0.1:$plain_port
  SECURE=127.0.0.1:$secure_port
  sleep 0.5
}
stop_uws() {
  kill -TERM "${PEERS[@]}" 2>/dev/null || true
  wait "${PEERS[@]}" 2>/dev/null || true
  PEERS=()
}
: >"$OUT/check.txt"
for shape in $SHAPES; do
  IFS=: read -r size conns depth <<<"$shape"
  for round in $(seq "$ROUNDS"); do
    for server in sluice ${UWS_TLS:+uws}; do
      if [[ $server == sluice ]]; then start_server; else start_uws; fi
      for mode in each burst; do
        for scheme in ws wss; do
          if [[ $scheme == wss ]]; then host=tls:127.0.0.1 addr=$SECURE pid=${PEERS[1]:-$SERVER}; else host=127.0.0.1 addr=$PLAIN pid=${PEERS[0]:-$SERVER}; fi
          cmode=$([[ $mode == each ]] && echo echo || echo burst)
          result=$(taskset -c 1 "$OUT/echo_check" "$host" "${addr##*:}" /echo "$cmode" "$conns" "$depth" "$size" "$SECS" "$pid")
          echo "$server $mode $scheme $size ${conns}x$depth $round $result" >>"$OUT/check.txt"
        done
      done
      if [[ $server == sluice ]]; then stop_server; else stop_uws; fi
    done
  done
done
python3 - "$OUT/check.txt" <<'PY' | tee -a "$OUT/run.txt"
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    server, mode, scheme, size, shape, _round, result = line.split(" ", 6)
    r = json.loads(result)
    runs.setdefault((server, mode, size, shape, scheme), []).append(
        (r["messages_per_second"], r["server_cpu"] / r["messages_per_second"] * 1e9))
print("independent client (echo_check), medians:")
for (server, mode, size, shape, scheme), rows in sorted(runs.items()):
    if scheme != "ws":
        continue
    ws, wss = rows, runs[(server, mode, size, shape, "wss")]
    med = lambda rs, i: statistics.median(r[i] for r in rs)
    print(f"  {server} {mode} {size} B {shape}: ws {med(ws, 0):.0f} msg/s {med(ws, 1):.0f} ns/msg, "
          f"wss {med(wss, 0):.0f} msg/s {med(wss, 1):.0f} ns/msg; wss/ws {med(wss, 0) / med(ws, 0):.2f} in msg/s, "
          f"{med(ws, 1) / med(wss, 1):.2f} in server CPU per message")
PY

i=1
for scheme in ws wss ws wss; do
  start_server
  taskset -c 1 "$LOAD" connect --url "$(url $scheme)" --ca "$OUT/cert.pem" -n "$MEMORY_CONNECTIONS" --rate 5000 \
    --hold 3 --source 127.0.0.1-127.0.0.40 --server-pid "$SERVER" --json "$OUT/memory-$scheme-$i.json" >/dev/null
  stop_server
  printf 'idle memory %s: %.0f bytes per connection\n' "$scheme" \
    "$(field "$OUT/memory-$scheme-$i.json" '["memory"]["bytes_per_connection"]')" | tee -a "$OUT/run.txt"
  i=$((i + 1))
done

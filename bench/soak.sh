#!/usr/bin/env bash
# A long run of everything at once against one release server, to show
# that nothing accumulates: connection churn (ws:// and wss://), native
# and STOMP fan-out, subscribers that stop reading and get closed (or
# close themselves), and admin requests. Every 10 s it records the
# server's RSS, its queued delivery bytes, publish holds and connections;
# at the end, with every client gone, the queued bytes must be 0 and the
# server must stop cleanly on SIGTERM.
#
#   bench/soak.sh [SECONDS]        (default 1800)
#
# Output: target/soak/ (soak.csv, the summary, each load's log). Loopback
# only; every load stops by itself at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_TOTAL="${1:-1800}"
OUT=target/soak
rm -rf "$OUT"
mkdir -p "$OUT"
cargo build --release --bin sluice -p sluice -q
cargo build --release -p sluice-load -q
LOAD=target/release/sluice-load
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null

# A small core budget and stall timeout, so holds and their shedding happen.
target/release/sluice --workers 2 --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 \
  --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem" --admin-listen 127.0.0.1:0 \
  --max-core-outbound-bytes 8388608 --stall-timeout-ms 1000 \
  --ping-interval-ms 5000 --idle-timeout-ms 15000 >"$OUT/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
addr() { grep -o "$1 [0-9.:]*" "$OUT/server.log" | head -n 1 | awk '{print $NF}'; }
for _ in $(seq 100); do
  [ -n "$(addr 'admin API on')" ] && break
  sleep 0.1
done
WS=$(addr 'listening on')
WSS=$(addr 'wss:// on')
ADMIN=$(addr 'admin API on')
[ -n "$WS" ] && [ -n "$WSS" ] && [ -n "$ADMIN" ] || { cat "$OUT/server.log"; exit 1; }
echo "server $SERVER: ws://$WS wss://$WSS admin $ADMIN, $SECONDS_TOTAL s"

metric() {
  curl -s --max-time 5 "http://$ADMIN/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

RUN=$((SECONDS_TOTAL - 20))
$LOAD churn --url "ws://$WS/echo" -c 16 -t "$RUN" --max-errors 1000000 >"$OUT/churn-ws.log" 2>&1 &
PIDS+=("$!")
$LOAD churn --url "wss://$WSS/echo" --ca "$OUT/cert.pem" -c 4 -t "$RUN" --max-errors 1000000 >"$OUT/churn-wss.log" 2>&1 &
PIDS+=("$!")
$LOAD fanout --url "ws://$WS/ws" --subscribers 400 --topics 4 --publishers 2 -r 20000 -s 256 \
  -t "$RUN" --max-errors 1000000 >"$OUT/fanout-ws.log" 2>&1 &
PIDS+=("$!")
$LOAD fanout --url "wss://$WSS/stomp" --ca "$OUT/cert.pem" --protocol stomp --subscribers 100 --topics 2 \
  --publishers 1 -r 2000 -s 512 -t "$RUN" --max-errors 1000000 >"$OUT/fanout-stomp-wss.log" 2>&1 &
PIDS+=("$!")

# Subscribers that stop reading: 20 at a time on the fan-out topics, each
# held 3-12 s (the server closes most of them first, as slow consumers or
# by shedding), then replaced.
python3 - "$WS" "$RUN" >"$OUT/stalled.log" 2>&1 <<'PY' &
import os, random, socket, struct, sys, time
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.time() + int(sys.argv[2])
def frame(text):
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(data)]) + mask
    return head + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
held, opened, closed_by_server = [], 0, 0
while time.time() < deadline:
    while len(held) < 20:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        s.sendall(frame("SUB load.%d" % random.randrange(4)))
        held.append((s, time.time() + random.uniform(3, 12)))
        opened += 1
    time.sleep(0.5)
    now = time.time()
    for s, until in held[:]:
        if now >= until:
            held.remove((s, until))
            s.close()
print("stalled subscribers opened", opened)
for s, _ in held:
    s.close()
PY
PIDS+=("$!")

# Admin requests: scrapes, publishes (alone and in batches), one at a time.
(
  end=$((SECONDS + RUN))
  n=0
  while [ "$SECONDS" -lt "$end" ]; do
    curl -s --max-time 5 -o /dev/null "http://$ADMIN/metrics" || true
    curl -s --max-time 5 -o /dev/null "http://$ADMIN/stats" || true
    curl -s --max-time 5 -o /dev/null -XPOST "http://$ADMIN/publish?topic=load.0" -d "admin $n" || true
    curl -s --max-time 5 -o /dev/null -XPOST "http://$ADMIN/publish" \
      -d '{"messages":[{"topic":"load.1","payload":"a"},{"topic":"load.2","payload_base64":"AAH/"}]}' || true
    curl -s --max-time 5 -o /dev/null -H 'Authorization: Bearer wrong' "http://$ADMIN/nowhere" || true
    n=$((n + 1))
    sleep 0.2
  done
  echo "admin rounds $n"
) >"$OUT/admin.log" 2>&1 &
PIDS+=("$!")

echo "seconds,rss_kib,queued_bytes,publish_holds,connections,slow_consumer_closes" >"$OUT/soak.csv"
sample() {
  local rss
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER/status")
  echo "$1,$rss,$(metric sluice_queued_bytes),$(metric sluice_publish_holds_total),$(metric sluice_connections),$(metric sluice_slow_consumer_closes_total)" >>"$OUT/soak.csv"
}
START=$SECONDS
while [ $((SECONDS - START)) -lt "$SECONDS_TOTAL" ]; do
  sample $((SECONDS - START))
  sleep 10
done
# Every load has ended by now (they run SECONDS_TOTAL - 20 s); the last
# stalled ones have been closed.
for _ in $(seq 30); do
  [ "$(metric sluice_connections)" = "0" ] && break
  sleep 1
done
sample $((SECONDS - START))
QUEUED=$(metric sluice_queued_bytes)
CONNECTIONS=$(metric sluice_connections)
kill -TERM "$SERVER"
STATUS=0
wait "$SERVER" || STATUS=$?
{
  echo "soak of $SECONDS_TOTAL s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)"
  echo "after every client: connections=$CONNECTIONS queued_bytes=$QUEUED; exit status on SIGTERM $STATUS"
  awk -F, 'NR == 2 { first = $2 } NR > 1 { last = $2; if ($2 > max) max = $2 }
    END { print "rss KiB: first sample " first ", last " last ", highest " max }' "$OUT/soak.csv"
  for f in churn-ws churn-wss fanout-ws fanout-stomp-wss stalled admin; do
    echo "--- $f"; tail -n 4 "$OUT/$f.log"
  done
} | tee "$OUT/summary.txt"
[ "$QUEUED" = "0" ] && [ "$CONNECTIONS" = "0" ] && [ "$STATUS" = "0" ]

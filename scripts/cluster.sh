#!/usr/bin/env bash
# Starts a local cluster to try: nats-server on 127.0.0.1:4222 and three
# sluice nodes (a, b, c) on it, each with its WebSocket port and admin API:
#
#   node a  ws://127.0.0.1:8081/ws  (and /stomp, /echo)  admin http://127.0.0.1:9091
#   node b  ws://127.0.0.1:8082/ws                         admin http://127.0.0.1:9092
#   node c  ws://127.0.0.1:8083/ws                         admin http://127.0.0.1:9093
#
# A client subscribed on one node gets what is published on any other:
#   websocat ws://127.0.0.1:8082/ws    then type: SUB news
#   curl -XPOST 'http://127.0.0.1:9091/publish?topic=news' -d hello
#
# Ctrl-C stops the nodes and nats-server. Extra arguments go to every node
# (e.g. --workers 1). Needs nats-server (apt-get install nats-server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_PORT="${NATS_PORT:-4222}"
command -v nats-server >/dev/null || { echo "needs nats-server: apt-get install nats-server" >&2; exit 2; }
cargo build --release -q --bin sluice
LOGS=target/cluster
mkdir -p "$LOGS"
PIDS=()
stop() {
  trap - INT TERM EXIT
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap stop INT TERM EXIT

nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$LOGS/nats.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 50); do
  grep -q "Server is ready" "$LOGS/nats.log" && break
  sleep 0.1
done
grep -q "Server is ready" "$LOGS/nats.log" || { cat "$LOGS/nats.log"; exit 1; }
echo "nats-server on nats://127.0.0.1:$NATS_PORT (log: $LOGS/nats.log)"

i=0
for node in a b c; do
  i=$((i + 1))
  target/release/sluice --listen "127.0.0.1:808$i" --admin-listen "127.0.0.1:909$i" \
    --nats "nats://127.0.0.1:$NATS_PORT" --node-id "$node" "$@" >"$LOGS/node-$node.log" 2>&1 &
  PIDS+=("$!")
  echo "node $node: ws://127.0.0.1:808$i/ws, admin http://127.0.0.1:909$i (log: $LOGS/node-$node.log)"
done
for i in 1 2 3; do
  for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:909$i/readyz" >/dev/null && break
    sleep 0.1
  done
done
echo "ready; Ctrl-C stops the cluster"
wait -n "${PIDS[@]}" || true
echo "stopping the cluster"

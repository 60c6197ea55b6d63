#!/usr/bin/env bash
# Well-behaved clients under attack: 1,000 clients in an open-loop echo
# (sluice-load latency) for SECONDS_PER_RUN s, quiet and then while
# sluice-load abuse runs its attack mix against the same gateway, ROUNDS
# times in turn. Reports each run's percentiles, losses and steal, the
# medians, and how every attack was answered.
# Server on core 0 with one worker; both harness processes on core 1, the
# attacker niced, and the well-behaved clients' harness at real-time
# priority (chrt -f 10), so that it is never queued behind the attacker.
#
#   bench/abuse.sh                 (SECONDS_PER_RUN=60 ROUNDS=3)
#   OUT=target/bench-abuse bench/abuse.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS="${SECONDS_PER_RUN:-60}"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-target/bench-abuse}"
CLIENTS="${CLIENTS:-1000}"
RATE="${RATE:-10000}"
WARMUP=5
mkdir -p "$OUT"
cargo build --release --workspace -q
SLUICE=target/release/sluice
LOAD=target/release/sluice-load
head -c 48 /dev/urandom | base64 >"$OUT/jwt-secret"

# The limits the attacks meet: handshakes per address, connections per
# address, messages per connection, frame size, handshake time; tokens are
# optional on the routes, so a bad one is a 401 and none is anonymous.
LIMITS=(--max-handshakes-per-sec-per-ip 20 --max-connections-per-ip 200 --max-messages-per-sec 2000
  --max-frame-bytes 1048576 --handshake-timeout-ms 3000 --jwt-secret-file "$OUT/jwt-secret" --auth optional)

taskset -c 0 "$SLUICE" --workers 1 --listen 127.0.0.1:0 --admin-listen off "${LIMITS[@]}" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
ADDR=""
for _ in $(seq 50); do
  ADDR=$(grep -o 'listening on [0-9.:]*' "$OUT/server.log" | head -n 1 | cut -d' ' -f3 || true)
  [[ -n $ADDR ]] && break
  sleep 0.1
done
[[ -n $ADDR ]] || { cat "$OUT/server.log"; exit 1; }

good() {
  chrt -f 10 taskset -c 1 "$LOAD" latency --url "ws://$ADDR/echo" -c "$CLIENTS" -r "$RATE" -s 32 --warmup "$WARMUP" -t "$SECS" \
    --source 127.0.0.1-127.0.0.50 --server-pid "$SERVER" --json "$OUT/$1.json" >"$OUT/$1.txt" 2>&1
}

{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "server: ${LIMITS[*]}"
  echo "well-behaved: $CLIENTS clients, $RATE msg/s of 32 B in all, $SECS s measured after $WARMUP s"
} | tee "$OUT/run.txt"

for round in $(seq "$ROUNDS"); do
  good "quiet-$round"
  nice -n 10 taskset -c 1 "$LOAD" abuse --url "ws://$ADDR/echo" --source 127.0.1.1-127.0.1.250 \
    -t "$((SECS + WARMUP + 3))" --flood-rate 10000 --json "$OUT/attacks-$round.json" >"$OUT/attacks-$round.txt" 2>&1 &
  ATTACKER=$!
  good "attacked-$round"
  wait "$ATTACKER"
done

python3 - "$OUT" "$ROUNDS" <<'EOF' | tee -a "$OUT/run.txt"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
p99 = {"quiet": [], "attacked": []}
for r in range(1, rounds + 1):
    for run in ("quiet", "attacked"):
        d = json.load(open(f"{out}/{run}-{r}.json"))
        l, steal = d["latency_us"], d["cpu"]["steal_seconds"]
        p99[run].append(l["p99"])
        print(f"{run:>8} {r}: sent {d['sent']}, received {d['received']}, lost {d['lost']}, errors {d['errors']}, "
              f"p50 {l['p50']} us, p99 {l['p99']} us, p99.9 {l['p99_9']} us, max {l['max']} us, "
              f"server cpu {d['cpu']['server_seconds']:.1f} s, steal {steal[0]:.2f}/{steal[1]:.2f} s")
q, a = statistics.median(p99["quiet"]), statistics.median(p99["attacked"])
print(f"median p99: quiet {q} us, attacked {a} us, attacked/quiet {a / q:.2f}")
EOF
echo "attacks (round 1):" | tee -a "$OUT/run.txt"
tee -a "$OUT/run.txt" <"$OUT/attacks-1.txt"

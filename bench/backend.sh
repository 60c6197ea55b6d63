#!/usr/bin/env bash
# Measures a backend route (docs/BACKEND.md) against Pushpin, the reference
# of the WebSocket-over-HTTP protocol, in front of one minimal backend
# (bench/peers over-http-echo: hyper, one thread, echoes every event), in
# one run, the gateways alternating (sluice pushpin sluice pushpin ...).
#
# Pinning (2 cores): the gateway on core 0, alone: sluice --workers 1, or
# every Pushpin process (condure, pushpin-proxy, pushpin-handler, and zurl,
# through which its proxy makes its upstream requests); the backend and
# sluice-load share core 1. So core 0's work is the gateway's alone; the
# backend is the same for both, and at Pushpin's rates it is far from
# busy. `gateway_cpu` is core 0's busy share over the window (/proc/stat),
# which counts every Pushpin process.
#
#   bench/backend.sh                  3 rounds, 5 s windows, every scenario
#   ROUNDS=1 SECONDS_PER_RUN=2 bench/backend.sh
#   SCENARIOS="echo-32-100x16" bench/backend.sh
#
# Scenarios:
#   echo-SIZE-CxD     closed-loop echo, C connections x D messages in flight
#   latency-SIZE-C    open-loop echo at LATENCY_RATE msg/s over C connections
#                     (default: half of Pushpin's median echo-SIZE-Cx1)
#   memory-N[-RATE]   N idle connections to sluice's backend route, then N to
#                     its echo route, opened at RATE a second (default 1,000):
#                     RSS per connection of each (sluice only). At 10,000 a
#                     second the upstream's OPENs overlap, and the memory
#                     their requests took stays with the allocator.
#   check-echo-C      the independent client (bench/backend_check.py: asyncio,
#                     one frame per send), closed loop over C connections
#   check-latency-C   the same client, open loop at the latency scenario's rate
#
# Needs Debian's pushpin (apt-get install pushpin; installed here when run
# as root). Loopback only; every run ends by itself; only processes it
# started are stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_RUN:-5}"
SCENARIOS="${SCENARIOS:-echo-32-100x1 echo-32-100x16 latency-32-100 check-echo-100 check-latency-100 memory-12000}"
OUT="${OUT:-target/bench-backend}"
read -r -a SERVERS <<<"${SERVERS:-sluice pushpin}"
SOURCES=127.0.0.1-127.0.0.40
BACKEND_PORT=9190

if ! command -v pushpin >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pushpin
fi
cargo build --release -q --bin sluice -p sluice -p sluice-load
cargo build --release -q --manifest-path bench/peers/Cargo.toml --bin over-http-echo
python3 -c "import sys; sys.path.insert(0, 'target/python'); import websockets" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check --target target/python websockets==17.4
mkdir -p "$OUT"
ulimit -n 20000
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "date $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -r)"
  echo "pushpin $(pushpin --version 2>&1 | head -n1)"
  echo "rounds $ROUNDS, $SECS s windows"
} >"$OUT/run.txt"

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

taskset -c 1 bench/peers/target/release/over-http-echo --listen "127.0.0.1:$BACKEND_PORT" 2>"$OUT/backend.log" &
PIDS+=("$!")

cat >"$OUT/sluice.toml" <<EOF
[[route]]
path = "/app"
protocol = "backend"
upstream = "http://127.0.0.1:$BACKEND_PORT/app"

[[route]]
path = "/echo"
protocol = "echo"
EOF

wait_port() {
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# start_gateway NAME PORT: its PIDs in GATEWAY_PIDS
start_gateway() {
  local name=$1 port=$2
  case $name in
    sluice)
      taskset -c 0 target/release/sluice --workers 1 --listen "127.0.0.1:$port" --admin-listen off \
        --config "$OUT/sluice.toml" >"$OUT/gateway.log" 2>&1 &
      GATEWAY_PIDS=("$!")
      ;;
    pushpin)
      # Pushpin's state under $OUT/pushpin; zurl allowed to reach loopback
      # (its default policy denies 127.*); every route to the backend, over HTTP.
      local dir="$OUT/pushpin"
      rm -rf "$dir" && mkdir -p "$dir/run" "$dir/log" /var/run/zurl
      sed -e "s#^rundir=.*#rundir=$dir/run#" -e "s#^logdir=.*#logdir=$dir/log#" -e "s#^http_port=.*#http_port=$port#" \
        /etc/pushpin/pushpin.conf >"$dir/pushpin.conf"
      echo "* 127.0.0.1:$BACKEND_PORT,over_http" >"$dir/routes"
      sed -e 's/^deny=.*/deny=/' /etc/zurl.conf >"$dir/zurl.conf"
      taskset -c 0 zurl --config="$dir/zurl.conf" >"$dir/log/zurl.out" 2>&1 &
      GATEWAY_PIDS=("$!")
      taskset -c 0 pushpin --config "$dir/pushpin.conf" >"$dir/log/pushpin.out" 2>&1 &
      GATEWAY_PIDS+=("$!")
      ;;
  esac
  wait_port "$port"
  # Pushpin's proxy and handler come up after its listener.
  [[ $name == pushpin ]] && sleep 2
  return 0
}

source bench/lib.sh
stop_gateway() {
  stop_pids "${GATEWAY_PIDS[@]}"
  # Pushpin's fixed ports (its handler's) must be free for the next start.
  sleep 1
}

# core0_ticks: busy and total jiffies of core 0
core0_ticks() {
  awk '$1 == "cpu0" { busy = $2 + $3 + $4 + $7 + $8; total = busy + $5 + $6; print busy, total }' /proc/stat
}

# add_gateway_cpu JSON BUSY TOTAL: core 0's busy share over the run, into
# the run's JSON (over the harness's whole run, warm-up and handshakes
# included: an upper bound); nothing if the run wrote none
add_gateway_cpu() {
  python3 - "$@" <<'PY'
import json, sys
path, busy, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    j = json.load(open(path))
except FileNotFoundError:
    sys.exit(0)
j["gateway_cpu"] = busy / total if total else None
json.dump(j, open(path, "w"))
PY
}

median_of() {
  python3 - "$@" <<'PY'
import json, statistics, sys
key, files = sys.argv[1], sys.argv[2:]
vals = [json.load(open(f))[key] for f in files]
print(statistics.median(vals) if vals else "")
PY
}

for scenario in $SCENARIOS; do
  case $scenario in
    echo-*)
      IFS=- read -r _ size shape <<<"$scenario"
      ARGS=(echo -c "${shape%x*}" -d "${shape#*x}" -s "$size" --warmup 1 -t "$SECS")
      ;;
    check-*)
      IFS=- read -r _ shape conns <<<"$scenario"
      CHECK=(--connections "$conns" --seconds "$SECS" --warmup 1)
      if [[ $shape == latency ]]; then
        rate=$(grep -o "^latency-32-$conns: [0-9]*" "$OUT/run.txt" | tail -n1 | cut -d' ' -f2 || true)
        rate="${LATENCY_RATE:-$rate}"
        [[ -n $rate ]] || { echo "check-latency: run latency-32-$conns first or set LATENCY_RATE" >&2; exit 2; }
        CHECK+=(--rate "$rate")
      fi
      for round in $(seq "$ROUNDS"); do
        for server in "${SERVERS[@]}"; do
          port=$((9300 + RANDOM % 500))
          start_gateway "$server" "$port"
          json="$OUT/$scenario-$server-$round.json"
          read -r busy0 total0 < <(core0_ticks)
          taskset -c 1 env PYTHONPATH=target/python python3 bench/backend_check.py --url "ws://127.0.0.1:$port/app" \
            "${CHECK[@]}" >"$json" 2>"${json%.json}.out" || rm -f "$json"
          read -r busy1 total1 < <(core0_ticks)
          stop_gateway
          add_gateway_cpu "$json" "$((busy1 - busy0))" "$((total1 - total0))"
        done
      done
      continue
      ;;
    latency-*)
      IFS=- read -r _ size conns <<<"$scenario"
      rate="${LATENCY_RATE:-}"
      if [[ -z $rate ]]; then
        files=$(ls "$OUT/echo-$size-${conns}x1-pushpin-"*.json 2>/dev/null || true)
        [[ -n $files ]] || { echo "latency: run echo-$size-${conns}x1 first or set LATENCY_RATE" >&2; exit 2; }
        rate=$(median_of messages_per_second $files | cut -d. -f1)
        rate=$((rate / 2))
        echo "$scenario: $rate msg/s (half of Pushpin's echo-$size-${conns}x1 median)" >>"$OUT/run.txt"
      else
        echo "$scenario: $rate msg/s (LATENCY_RATE)" >>"$OUT/run.txt"
      fi
      ARGS=(latency -c "$conns" -r "$rate" -s "$size" --warmup 1 -t "$SECS")
      ;;
    memory-*)
      IFS=- read -r _ n rate <<<"$scenario"
      rate="${rate:-1000}"
      for round in $(seq "$ROUNDS"); do
        for path in /app /echo; do
          port=$((9300 + RANDOM % 500))
          start_gateway sluice "$port"
          json="$OUT/$scenario-sluice${path//\//-}-$round.json"
          taskset -c 1 target/release/sluice-load connect --url "ws://127.0.0.1:$port$path" -n "$n" --rate "$rate" \
            --hold 3 --source "$SOURCES" --server-pid "${GATEWAY_PIDS[0]}" --json "$json" \
            >"${json%.json}.out" 2>&1 || true
          stop_gateway
        done
      done
      continue
      ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  for round in $(seq "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
      port=$((9300 + RANDOM % 500))
      start_gateway "$server" "$port"
      json="$OUT/$scenario-$server-$round.json"
      read -r busy0 total0 < <(core0_ticks)
      taskset -c 1 target/release/sluice-load "${ARGS[0]}" --url "ws://127.0.0.1:$port/app" "${ARGS[@]:1}" \
        --json "$json" --max-errors 1000000000 >"${json%.json}.out" 2>&1 || true
      read -r busy1 total1 < <(core0_ticks)
      stop_gateway
      add_gateway_cpu "$json" "$((busy1 - busy0))" "$((total1 - total0))"
    done
  done
done

python3 - "$OUT" "$ROUNDS" "$SCENARIOS" "${SERVERS[@]}" <<'PY' | tee "$OUT/table.md"
import base64, json, statistics, sys, zlib, glob, os
out, rounds, scenarios, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]

def med(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)

def fmt(t, unit="", scale=1.0, digits=0):
    if t is None:
        return "-"
    m, lo, hi = (x * scale for x in t)
    f = f"{{:,.{digits}f}}"
    return f"{f.format(m)}{unit} [{f.format(lo)}-{f.format(hi)}]"

def percentile_from_out(path, name):
    # sluice-load's text report: "latency µs  p50 X p90 Y p99 Z p99.9 W ..."
    try:
        for line in open(path):
            if "latency µs" in line:
                parts = line.split()
                return float(parts[parts.index(name) + 1])
    except (FileNotFoundError, ValueError):
        pass
    return None

for sc in scenarios:
    if sc.startswith("memory-"):
        print(f"\n### {sc}: server RSS per idle connection, bytes\n")
        print("| route | per connection |")
        print("| --- | --- |")
        for path in ("app", "echo"):
            vals = []
            for r in range(1, rounds + 1):
                try:
                    j = json.load(open(f"{out}/{sc}-sluice-{path}-{r}.json"))
                    vals.append(j["memory"]["bytes_per_connection"])
                except (FileNotFoundError, KeyError, TypeError):
                    pass
            print(f"| /{path} ({'backend' if path == 'app' else 'echo'}) | {fmt(med(vals))} |")
        continue
    print(f"\n### {sc}\n")
    print("| gateway | msg/s | p50 µs | p99 µs | p99.9 µs | gateway core busy |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {}
    for sv in servers:
        files = [f"{out}/{sc}-{sv}-{r}.json" for r in range(1, rounds + 1)]
        js = [json.load(open(f)) for f in files if os.path.exists(f)]
        outs = [f[:-5] + ".out" for f in files]
        rate = med([j["messages_per_second"] for j in js])
        if sc.startswith("check-"):
            p = {n: med([j.get(k) for j in js]) for n, k in (("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p99_9_us"))}
        else:
            p = {n: med([percentile_from_out(o, n) for o in outs]) for n in ("p50", "p99", "p99.9")}
        cpu = med([j.get("gateway_cpu") for j in js])
        rows[sv] = (rate, p)
        print(f"| {sv} | {fmt(rate)} | {fmt(p['p50'])} | {fmt(p['p99'])} | {fmt(p['p99.9'])} | {fmt(cpu, '%', 100)} |")
    if "sluice" in rows and "pushpin" in rows and rows["sluice"][0] and rows["pushpin"][0]:
        print(f"\nsluice / pushpin msg/s: {rows['sluice'][0][0] / rows['pushpin'][0][0]:.1f}x")
PY

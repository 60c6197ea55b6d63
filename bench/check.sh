#!/usr/bin/env bash
# Checks the echo figures with an independent client (bench/echo_check.c:
# C, one epoll loop, none of sluice's code), servers alternating in one run
# (A B C A B C ...), each pinned to core 0, the client to core 1. Prints,
# and writes to OUT/table.md, each server's median, min-max and CPU per
# message for every shape.
#
#   bench/check.sh                          sluice (io_uring), sluice (epoll)
#   UWS=/path/to/BenchServer bench/check.sh and uWebSockets' bench server
#   ROUNDS=3 SECONDS_PER_RUN=3 SHAPES="burst-100x64x32" bench/check.sh
#
# Shapes:
#   burst-CxDxS    closed loop, C connections x D in flight x S bytes; the
#                  echoes of one read are answered with one send
#   each-CxDxS     the same, one send per message (one frame per write)
#   rate-C-RxS     open loop, R msg/s over C connections, S bytes, the client
#                  busy-polling; latency against the schedule
#
# Loopback only; every run ends by itself; only processes it started are
# stopped, by PID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-5}"
SHAPES="${SHAPES:-burst-100x64x32 each-100x64x32 burst-100x16x512 each-100x16x512 burst-1000x4x32 each-1000x4x32 rate-100-50000x32}"
OUT="${OUT:-target/bench-check}"
read -r -a SERVERS <<<"${SERVERS:-sluice-uring sluice-epoll${UWS:+ uws}}"
if [[ " ${SERVERS[*]} " == *" uws "* && ! -x ${UWS:-} ]]; then
  echo "uws needs UWS=<path to uWebSockets' BenchServer, built from uWebSockets' sources>" >&2
  exit 2
fi

cargo build --release -q --bin sluice
mkdir -p "$OUT"
[[ -f /usr/include/openssl/ssl.h ]] || { echo "echo_check needs OpenSSL's headers: apt-get install libssl-dev" >&2; exit 2; }
[[ -f /usr/include/zlib.h ]] || { echo "echo_check needs zlib's headers: apt-get install zlib1g-dev" >&2; exit 2; }
cc -O2 -Wall -o "$OUT/echo_check" bench/echo_check.c -lssl -lcrypto -lz
# As many descriptors as the shapes need, where the hard limit allows.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
: >"$OUT/runs.txt"

start_server() {
  local name=$1 port=$2
  case $name in
    sluice-uring) taskset -c 0 target/release/sluice --workers 1 --driver uring --listen "127.0.0.1:$port" --admin-listen off >"$OUT/server.log" 2>&1 & ;;
    sluice-epoll) taskset -c 0 target/release/sluice --workers 1 --driver epoll --listen "127.0.0.1:$port" --admin-listen off >"$OUT/server.log" 2>&1 & ;;
    uws) taskset -c 0 "$UWS" "$port" >"$OUT/server.log" 2>&1 & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
}

# stop_server (SIGTERM, a bounded wait, SIGKILL)
source bench/lib.sh

for shape in $SHAPES; do
  case $shape in
    burst-*|each-*)
      mode=${shape%%-*} mode=${mode/each/echo}
      IFS=x read -r conns knob size <<<"${shape#*-}" ;;
    rate-*)
      mode=rate
      IFS=- read -r _ conns rest <<<"$shape"
      IFS=x read -r knob size <<<"$rest" ;;
    *) echo "unknown shape $shape" >&2; exit 2 ;;
  esac
  for round in $(seq "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
      port=$((9300 + RANDOM % 500))
      start_server "$server" "$port"
      sleep 0.3
      result=$(taskset -c 1 "$OUT/echo_check" 127.0.0.1 "$port" /echo "$mode" "$conns" "$knob" "$size" "$SECS" "$SERVER_PID" 2>&1 || true)
      stop_server
      echo "$shape $server $round $result" | tee -a "$OUT/runs.txt"
    done
  done
done

python3 - "$OUT/runs.txt" "${SERVERS[@]}" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys
runs, servers = sys.argv[1], sys.argv[2:]
data, failed = {}, {}
for line in open(runs):
    shape, server, _, rest = line.split(" ", 3)
    try:
        data.setdefault(shape, {}).setdefault(server, []).append(json.loads(rest))
    except ValueError:
        # the client failed (refused, closed by the server, bad port): counted
        failed[(shape, server)] = failed.get((shape, server), 0) + 1
print("| shape | server | msg/s median (min-max) | server CPU µs/msg median | p99 / p99.9 µs median | failed runs |")
print("| --- | --- | --- | --- | --- | --- |")
for shape, by_server in data.items():
    for sv in servers:
        rs = by_server.get(sv, [])
        if not rs:
            continue
        rate = [r["messages_per_second"] for r in rs]
        cpu = [r["server_cpu"] * 1e6 / r["messages_per_second"] for r in rs if r["messages_per_second"]]
        lat = ""
        if "p99_us" in rs[0]:
            lat = f'{statistics.median(r["p99_us"] for r in rs):.0f} / {statistics.median(r["p999_us"] for r in rs):.0f}'
        print(f"| {shape} | {sv} | {statistics.median(rate) / 1e6:.3f} M ({min(rate) / 1e6:.3f}-{max(rate) / 1e6:.3f}) "
              f"| {f'{statistics.median(cpu):.2f}' if cpu else '-'} | {lat} | {failed.get((shape, sv), 0)} |")
for (shape, sv), n in failed.items():
    if sv not in data.get(shape, {}):
        print(f"| {shape} | {sv} | - | - | - | {n} |")
PY

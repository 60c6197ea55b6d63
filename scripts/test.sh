#!/usr/bin/env bash
# The test command: formatting, lints, every unit/property/integration test
# (integration tests run the real binary under io_uring and epoll; the STOMP
# ones also drive it with @stomp/stompjs, installed here from npm, and the
# wss:// ones with Python's websockets, installed here from PyPI; the
# cluster ones start nats-server (Debian's package, installed here) and
# publish with nats-py, from PyPI; the browser one drives examples/backend
# in headless Chromium (Debian's package, installed here), and
# tests/examples.rs runs examples/ (sluice.toml, the browser page in
# Chromium, the Python and Node clients), and tests/console.rs the admin
# port's web console in Chromium;
# tests/layers.rs fails when a module of src/ names one above it), the
# Autobahn|Testsuite cases 1.*-13.* against /echo under both drivers (12.*
# and 13.* are permessage-deflate's; they run again under --deflate
# dedicated), the Debian package of that release build (scripts/package.sh,
# with cargo-deb, installed here from crates.io: its files, control fields
# and maintainer scripts checked, its systemd unit checked by Debian's
# systemd-analyze, installed here, and its binary started with its config
# and stopped), and a short run of each fuzz target. Exits non-zero on the
# first failure.
#
#   scripts/test.sh                  everything
#   SLUICE_FUZZ_SECONDS=0 scripts/test.sh    skip the fuzz runs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p target
FUZZ_SECONDS="${SLUICE_FUZZ_SECONDS:-20}"
AUTOBAHN_CASES='1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*,12.*,13.*'
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "fuzz/Cargo.lock is current (the fuzz crate builds sluice: a new dependency must be in its lock too)"
(cd fuzz && cargo metadata --locked --format-version 1 >/dev/null)

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "STOMP client library for the integration tests (@stomp/stompjs, ws)"
npm ci --prefix tests/stomp --no-audit --no-fund --loglevel=error
# tests/stomp.rs fails rather than skips without it.
export SLUICE_REQUIRE_STOMPJS=1

step "what the examples need (@stomp/stompjs for examples/browser, ws for examples/node)"
npm ci --prefix examples/browser --no-audit --no-fund --loglevel=error
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
# tests/examples.rs fails rather than skips without them.
export SLUICE_REQUIRE_EXAMPLES=1

step "nats-server for the cluster tests, chromium for the browser test, systemd for systemd-analyze (Debian's packages)"
packages=()
command -v nats-server >/dev/null || packages+=(nats-server)
command -v chromium >/dev/null || packages+=(chromium)
# The package step verifies the unit with it; no systemd runs here.
command -v systemd-analyze >/dev/null || packages+=(systemd)
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
  else
    echo "needed: apt-get install ${packages[*]}" >&2
    exit 1
  fi
fi
nats-server --version
chromium --version
systemd-analyze --version | sed -n 1p

step "Python websockets for the wss:// tests, nats-py for the cluster tests"
python3 -m pip install --quiet --disable-pip-version-check --target target/python websockets==17.4 nats-py==2.16.0
# Only the tests see it (the Autobahn step runs Python 2).
PY_TESTS="$PWD/target/python"
# tests/tls.rs fails rather than skips without it.
export SLUICE_REQUIRE_PYTHON_WEBSOCKETS=1

step "cargo test (unit, property, integration under both drivers)"
PYTHONPATH="$PY_TESTS" cargo test --workspace --lib --bins --tests 2>&1 | tee target/test.log
cargo_passed=$(grep -E '^test result:' target/test.log | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)
cargo_failed=$(grep -E '^test result:' target/test.log | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ | bc)

step "integration tests under AddressSanitizer (the unsafe socket code runs here)"
# Stable toolchain: RUSTC_BOOTSTRAP unlocks -Zsanitizer; --target keeps
# proc-macros unsanitized; mimalloc is off so ASan sees every allocation.
# SLUICE_SANITIZED: the tests that measure the server's RSS skip that part.
SLUICE_SANITIZED=1 PYTHONPATH="$PY_TESTS" LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp" RUSTFLAGS="-Zsanitizer=address" RUSTC_BOOTSTRAP=1 \
  cargo test -p sluice --no-default-features --target "$(rustc -vV | sed -n 's/^host: //p')" \
  --test echo --test protocol --test park --test pubsub --test admin --test stomp --test auth --test tls \
  --test queued --test shutdown --test cluster --test backend 2>&1 | tee target/asan.log
asan_passed=$(grep -E '^test result:' target/asan.log | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)

step "Autobahn|Testsuite 1.*-13.* against /echo (12.* and 13.*: permessage-deflate), io_uring and epoll; 12.* and 13.* under --deflate dedicated"
cargo build --release --bin sluice
ab_pids=()
# uring and epoll: 1.*-13.* with the default `--deflate shared`; dedicated:
# 12.* and 13.* under `--deflate dedicated` (context takeover), io_uring.
for run in uring epoll dedicated; do
  driver=$run cases=$AUTOBAHN_CASES flags=()
  if [ "$run" = dedicated ]; then
    driver=uring cases='12.*,13.*' flags=(--deflate dedicated)
  fi
  log="target/autobahn-server-$run.log"
  ./target/release/sluice --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --driver "$driver" "${flags[@]}" >"$log" 2>&1 &
  PIDS+=("$!")
  addr=""
  for _ in $(seq 50); do
    addr=$(grep -o 'listening on [0-9.:]*' "$log" | head -n 1 | cut -d' ' -f3 || true)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$log"; echo "sluice ($run) did not start"; exit 1; }
  # One wstest per run, side by side: wstest is single-threaded, and
  # the compression cases would take three times as long one after the other.
  SLUICE_AUTOBAHN_TIMEOUT=2400 scripts/autobahn.sh --cases "$cases" --out "target/autobahn-$run" \
    "sluice-$run=ws://$addr/echo" >"target/autobahn-summary-$run.txt" 2>&1 &
  ab_pids+=("$!")
done
ab_rc=0
for pid in "${ab_pids[@]}"; do wait "$pid" || ab_rc=$?; done
cat target/autobahn-summary-{uring,epoll,dedicated}.txt | tee target/autobahn-summary.txt
[ "$ab_rc" -eq 0 ] || { echo "autobahn failed ($ab_rc)"; exit 1; }
ab_cases=$(grep -E '^autobahn [^:]+: [0-9]+ cases' target/autobahn-summary.txt | sed -E 's/.*: ([0-9]+) cases.*/\1/' | paste -sd+ | bc)
ab_failed=$(grep -E '^autobahn [^:]+: [0-9]+ cases' target/autobahn-summary.txt | sed -E 's/.*FAILED ([0-9]+).*/\1/' | paste -sd+ | bc)
cleanup
PIDS=()

step "Debian package and systemd unit (cargo-deb; systemd-analyze verify and security; the release build above)"
# Pinned: the package's paths and maintainer scripts are cargo-deb's, and
# scripts/package.sh expects them exactly.
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo-deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
scripts/package.sh

if [ "$FUZZ_SECONDS" -gt 0 ]; then
  step "fuzz targets, ${FUZZ_SECONDS}s each (libFuzzer; longer runs: see fuzz/README.md)"
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
  for target in handshake messages stomp; do
    mkdir -p "fuzz/corpus/$target"
    (cd fuzz && cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 2>&1 | tail -n 3)
  done
fi

step "the tree is as the checkout left it (git status --porcelain)"
if git rev-parse --git-dir >/dev/null 2>&1; then
  dirty=$(git status --porcelain)
  if [ -n "$dirty" ]; then
    echo "the test command left the tree changed:"
    echo "$dirty"
    exit 1
  fi
fi

step "summary"
echo "cargo tests: $cargo_passed passed, $cargo_failed failed"
echo "integration tests under ASan: $asan_passed passed"
echo "autobahn cases (both drivers, and dedicated deflate): $((ab_cases - ab_failed)) passed, $ab_failed failed"
echo "total: $((cargo_passed + asan_passed + ab_cases - ab_failed)) passed, $((cargo_failed + ab_failed)) failed"

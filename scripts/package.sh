#!/usr/bin/env bash
# The Debian package: builds it with cargo-deb from the release binary
# already built (cargo build --release --bin sluice) into target/debian/,
# then checks it: its files and their modes, exactly; its control fields and
# conffiles; maintainer scripts that neither enable nor start the service on
# install; the unit as packaged, with systemd-analyze verify inside the
# extracted tree (any warning is a failure) and systemd-analyze security (its
# exposure level at most 1.5); and the packaged binary, started as the unit
# starts it with the packaged config (only --listen and --admin-listen moved
# to free ports), answering GET /healthz on the admin port with 200 and
# exiting 0 on SIGTERM within the drain timeout.
# Needs cargo-deb and systemd-analyze (Debian's systemd); exits non-zero on
# the first failure.
#
#   scripts/package.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# sluice's default --drain-timeout-ms, and a second for the stop after it.
STOP_WAIT_MS=11000
# systemd-analyze security's exposure level, in tenths, the most allowed.
EXPOSURE_MAX_TENTHS=15

fail() { echo "package: $*" >&2; exit 1; }

for tool in cargo-deb systemd-analyze dpkg-deb; do
  command -v "$tool" >/dev/null || fail "needed: $tool (cargo install cargo-deb --locked; apt-get install systemd dpkg)"
done
[ -x target/release/sluice ] || fail "no target/release/sluice: cargo build --release --bin sluice first"

work=$(mktemp -d)
sluice_pid=""
cleanup() {
  if [ -n "$sluice_pid" ]; then kill -KILL "$sluice_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "building the package (cargo deb --no-build)"
# cargo-deb prints the package's path last.
deb=$(cargo deb --no-build | tail -n 1)
[ -f "$deb" ] || fail "cargo deb made no package (got: $deb)"
echo "$deb"

echo "files and modes (dpkg-deb -c)"
# Every file (not directory) with its mode; nothing missing, nothing more.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $6 }' | sort >"$work/files"
sort >"$work/files.expected" <<'EOF'
-rw------- ./etc/sluice/sluice.toml
-rw-r--r-- ./usr/lib/systemd/system/sluice.service
-rw-r--r-- ./usr/share/doc/sluice/README.Debian
-rw-r--r-- ./usr/share/doc/sluice/README.md
-rw-r--r-- ./usr/share/doc/sluice/copyright
-rw-r--r-- ./usr/share/doc/sluice/docs/ADMIN.md
-rw-r--r-- ./usr/share/doc/sluice/docs/BACKEND.md
-rw-r--r-- ./usr/share/doc/sluice/docs/CONFIGURATION.md
-rw-r--r-- ./usr/share/doc/sluice/docs/PROTOCOL.md
-rwxr-xr-x ./usr/bin/sluice
EOF
diff -u "$work/files.expected" "$work/files" || fail "the package's files are not the expected ones (- expected, + packaged)"

echo "control fields and conffiles (dpkg-deb -I)"
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = sluice ] || fail "Package: $(field Package)"
[ "$(field Section)" = net ] || fail "Section: $(field Section)"
[ "$(field Priority)" = optional ] || fail "Priority: $(field Priority)"
[ "$(field Maintainer)" = "sluice developers" ] || fail "Maintainer: $(field Maintainer)"
[ "$(field Architecture)" = "$(dpkg --print-architecture)" ] || fail "Architecture: $(field Architecture)"
# No pipe into a reader that stops early (grep -q, head): under pipefail,
# dpkg-deb's SIGPIPE would fail the script at random.
[[ "$(field Depends)" == *"libc6 (>= "* ]] || fail "Depends lacks libc6: $(field Depends)"
# Debian policy 3.4.1: the synopsis is one line under 80 characters.
synopsis=$(field Description)
synopsis=${synopsis%%$'\n'*}
[ "${#synopsis}" -lt 80 ] || fail "the Description's synopsis has ${#synopsis} characters"
[ "$(dpkg-deb -I "$deb" conffiles)" = /etc/sluice/sluice.toml ] || fail "conffiles: $(dpkg-deb -I "$deb" conffiles)"

echo "maintainer scripts: the unit is neither enabled nor started on install"
dpkg-deb -e "$deb" "$work/control"
# Each script run as on a host booted with systemd (its /run/systemd/system
# test pointed at a directory that exists), with stubs for the helpers that
# log their calls; deb-systemd-helper answers as for a unit never installed,
# whose was-enabled is true.
mkdir -p "$work/stubs" "$work/run-systemd"
for helper in deb-systemd-helper deb-systemd-invoke systemctl; do
  cat >"$work/stubs/$helper" <<EOF
#!/bin/sh
echo "$helper \$*" >>"$work/calls"
case "\$*" in *debian-installed*) exit 1 ;; esac
EOF
  chmod +x "$work/stubs/$helper"
done
maintainer_script() {
  : >"$work/calls"
  sed "s#/run/systemd/system#$work/run-systemd#g" "$work/control/$1" >"$work/$1.run"
  PATH="$work/stubs:$PATH" sh -e "$work/$1.run" "${@:2}" || fail "$1 ${*:2} exited $?"
}
maintainer_script postinst configure ""
if grep -E ' (enable|start|restart|try-restart|reload-or-restart) ' "$work/calls"; then
  fail "postinst enables or starts sluice on install"
fi
maintainer_script postinst configure 0.1.0-1
grep -qx 'deb-systemd-invoke try-restart sluice.service' "$work/calls" || fail "postinst does not restart a running sluice on upgrade"
if grep -E ' (enable|start|restart) ' "$work/calls"; then
  fail "postinst enables or starts sluice on upgrade"
fi
maintainer_script prerm remove
grep -qx 'deb-systemd-invoke stop sluice.service' "$work/calls" || fail "prerm does not stop sluice on remove"

echo "the unit as packaged (systemd-analyze verify in the extracted tree)"
root="$work/root"
dpkg-deb -x "$deb" "$root"
# The tree as the root: ExecStart's /usr/bin/sluice and the config are the
# packaged ones. It lacks what the host's systemd gives a unit: the targets
# the unit orders itself after (copied from the host's units), and
# ExecReload's /bin/kill.
mkdir -p "$root/bin" "$root/etc/systemd/system"
cp /bin/kill "$root/bin/kill"
for dir in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -d "$dir" ]; then
    cp -n "$dir"/*.target "$root/etc/systemd/system/" 2>/dev/null || true
  fi
done
# verify exits 0 on an unknown key or an unparsable value (it warns and
# ignores the line): any output at all is a failure.
if ! systemd-analyze verify --root="$root" sluice.service >"$work/verify.log" 2>&1 || [ -s "$work/verify.log" ]; then
  cat "$work/verify.log" >&2
  fail "systemd-analyze verify: packaged sluice.service"
fi
# systemd's own measure of the sandbox, from 0 (all of it) to 10 (none):
# 1.5 on systemd 252; a sandboxing line taken out raises it past the bound.
if ! systemd-analyze security --offline=yes --root="$root" --threshold="$EXPOSURE_MAX_TENTHS" sluice.service >"$work/security.log" 2>&1; then
  cat "$work/security.log" >&2
  fail "systemd-analyze security: exposure above $EXPOSURE_MAX_TENTHS tenths"
fi
sed -n 's/^→ //p' "$work/security.log"

echo "the packaged binary, started as the unit starts it"
unit="$root/usr/lib/systemd/system/sluice.service"
# ExecStart's words, each absolute path taken inside the tree, and each
# credential (%d/NAME) the file its LoadCredential=NAME:PATH copies.
read -r -a exec_start <<<"$(sed -n 's/^ExecStart=//p' "$unit")"
command=()
for word in "${exec_start[@]}"; do
  case $word in
    /*) command+=("$root$word") ;;
    %d/*)
      source=$(sed -n "s#^LoadCredential=${word#%d/}:##p" "$unit")
      [ -n "$source" ] || fail "ExecStart reads credential ${word#%d/}, which no LoadCredential= gives"
      command+=("$root$source")
      ;;
    *) command+=("$word") ;;
  esac
done
[ "${command[0]}" = "$root/usr/bin/sluice" ] || fail "ExecStart does not run /usr/bin/sluice: ${exec_start[*]}"
[[ " ${command[*]} " == *" --config $root/etc/sluice/sluice.toml "* ]] || fail "ExecStart does not read the packaged config: ${exec_start[*]}"
log="$work/sluice.log"
: >"$log"
# The unit's log filter, not the caller's.
SLUICE_LOG=$(sed -n 's/^Environment=SLUICE_LOG=//p' "$unit") \
  "${command[@]}" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$log" 2>&1 &
sluice_pid=$!
ws_addr="" admin_addr=""
for _ in $(seq 50); do
  # Either log format, text or JSON: the message is the same.
  ws_addr=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$log")
  admin_addr=$(sed -n 's/.*admin API on \([0-9.]*:[0-9]*\).*/\1/p' "$log")
  [ -n "$ws_addr" ] && [ -n "$admin_addr" ] && break
  kill -0 "$sluice_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ws_addr" ] && [ -n "$admin_addr" ] || { cat "$log" >&2; fail "sluice did not log its addresses"; }
echo "listening on $ws_addr, admin API on $admin_addr"

url="http://$admin_addr/healthz"
if command -v curl >/dev/null; then
  status=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$url" || true)
else
  status=$(python3 -c 'import sys, urllib.request
try: print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except Exception as e: print(getattr(e, "code", e))' "$url")
fi
[ "$status" = 200 ] || { cat "$log" >&2; fail "GET $url answered $status, not 200"; }
echo "GET /healthz: 200"

kill -TERM "$sluice_pid"
waited_ms=0
while kill -0 "$sluice_pid" 2>/dev/null && [ "$waited_ms" -lt "$STOP_WAIT_MS" ]; do
  sleep 0.1
  waited_ms=$((waited_ms + 100))
done
if kill -0 "$sluice_pid" 2>/dev/null; then
  cat "$log" >&2
  fail "sluice still running ${STOP_WAIT_MS} ms after SIGTERM"
fi
rc=0
wait "$sluice_pid" || rc=$?
sluice_pid=""
[ "$rc" = 0 ] || { cat "$log" >&2; fail "sluice exited $rc after SIGTERM"; }
grep -qw stopped "$log" || { cat "$log" >&2; fail "sluice did not log that it stopped"; }
echo "SIGTERM: exited 0 after about ${waited_ms} ms"
echo "package: $deb passed"

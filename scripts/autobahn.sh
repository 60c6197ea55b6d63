#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient (wstest) against one or more
# WebSocket echo servers on loopback and summarise the results.
#
# Usage:
#   scripts/autobahn.sh [--cases '1.*,2.*,...'] [--out DIR] \
#       NAME=ws://127.0.0.1:PORT/echo [NAME2=URL2 ...]
#
# Each NAME is the agent name used in the report (index.json and the summary).
# Default cases: 1.* .. 10.* (301 cases). Default out dir: <repo>/target/autobahn
# (a relative --out is taken relative to the current directory).
#
# Exit status:
#   0  every expected case is in the report and none has behavior FAILED
#   1  some case FAILED, or a case is missing from the report (e.g. the server
#      refused a connection or died: wstest then skips the agent's remaining
#      cases and still exits 0, so "missing" is checked here)
#   2  usage error, setup/install error, wstest crashed or timed out
#
# Environment:
#   SLUICE_AUTOBAHN_VENV     Python 2.7 env for wstest
#                            (default: ~/.cache/sluice/autobahn-py27)
#   SLUICE_AUTOBAHN_PYTHON2  python2.7 interpreter to use (default: searched)
#   SLUICE_AUTOBAHN_TIMEOUT  wall-clock limit for wstest, seconds (default 1200)
#   SLUICE_AUTOBAHN_VERBOSE  1 = also stream wstest's own output to stderr
#   SLUICE_AUTOBAHN_STRICT_CLOSE  1 = also exit 1 when a case's behaviorClose
#                            is FAILED or UNCLEAN (default: only `behavior`
#                            decides, as in Autobahn's own Pass/Fail column)
#
# Notes:
#   * wstest (PyPI `autobahntestsuite`) runs only on Python 2.7. The env is
#     created with `virtualenv<20.22` (the last line able to create 2.7 envs)
#     from a small Python 3 tool venv, then filled from PyPI with the exact
#     pins below. It is rebuilt only when the pins or the interpreter change.
#   * Only the fuzzingclient mode is used: it opens outgoing connections only.
#     Never use `wstest -m echoserver`/`fuzzingserver` here: they bind every
#     interface. Targets are restricted to loopback addresses.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

DEFAULT_CASES='1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*'
VENV="${SLUICE_AUTOBAHN_VENV:-${HOME:-/root}/.cache/sluice/autobahn-py27}"
TOOL_VENV="${VENV}-virtualenv-tool"
WSTEST_TIMEOUT="${SLUICE_AUTOBAHN_TIMEOUT:-1200}"

# virtualenv 20.22.0 dropped support for creating Python 2.7 environments;
# 20.21.1 is the last release that can, and it runs on Python 3.7..3.13
# (checked on 3.11, 3.12, 3.13). It seeds the 2.7 env from its bundled
# wheels (pip 20.3.4, setuptools 44.1.1, wheel 0.37.1) without downloading.
VIRTUALENV_PIN='virtualenv==20.21.1'

# Exact, complete package set for the Python 2.7 env (the result of
# `pip freeze` after a clean install, verified to install from PyPI and to
# run the 1.*-10.* cases). Everything is pinned so that a new release on PyPI
# cannot change what runs.
PY27_PINS="$(cat <<'EOF'
# --- the test suite itself (Python 2.7 only) ---
autobahntestsuite==25.10.1
# --- pinned by autobahntestsuite 25.10.1's own install_requires ---
# wstest is written against the Autobahn|Python 0.10.x API; [accelerate]
# pulls wsaccel+ujson, [twisted] pulls Twisted.
autobahn[accelerate,twisted]==0.10.9
txaio==2.1.0
Twisted==19.10.0
incremental==16.10.1
zope.interface==4.6.0
# TLS stack (imported by Twisted/wstest even for plain ws://). cryptography
# 3.3.2 is the last release with cp27 manylinux wheels (no Rust/OpenSSL build).
cryptography==3.3.2
pyOpenSSL==19.1.0
service-identity==18.1.0
# report rendering / embedded web UI (klein, jinja2) pinned by autobahntestsuite
Jinja2==2.11.3
MarkupSafe==1.1.1
Werkzeug==1.0.1
klein==17.10.0
unittest2==1.1.0
six==1.16.0
# autobahntestsuite pins setuptools==44.0.0 (44.x is the last line for 2.7)
setuptools==44.0.0
# --- transitive deps: last releases that still support Python 2.7 ---
# wsaccel: C extension (sdist, built with gcc) for fast masking and UTF-8
# validation; without it the 9.* (large message) cases are much slower.
wsaccel==0.6.6
# ujson 2.0.3: last release with cp27 wheels.
ujson==2.0.3
# cffi 1.15.1 / pycparser 2.21: last 2.7 releases (cryptography needs cffi).
cffi==1.15.1
pycparser==2.21
enum34==1.1.10
ipaddress==1.0.23
# attrs 21.4.0: last 2.7 release (needed by Twisted, Automat, service-identity)
attrs==21.4.0
Automat==22.10.0
constantly==15.1.0
hyperlink==21.0.0
# idna 2.10: 3.x is Python 3 only.
idna==2.10
PyHamcrest==1.10.1
# pyasn1 0.5.1 / pyasn1-modules 0.3.0: last releases that accept Python 2.7.
pyasn1==0.5.1
pyasn1-modules==0.3.0
typing==3.10.0.0
linecache2==1.0.0
traceback2==1.4.0
argparse==1.4.0
EOF
)"
# Bump when the install procedure changes so existing envs are rebuilt.
INSTALL_RECIPE_VERSION=1

log() { printf 'autobahn.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }
# Any unexpected failure (pip, virtualenv, ...) exits 2, never 1, so that
# exit status 1 always means "the WebSocket server under test failed a case".
set -E
trap 'log "error: command failed (status $?) at line $LINENO"; exit 2' ERR

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- arguments
cases_arg="$DEFAULT_CASES"
out_arg="$REPO_ROOT/target/autobahn"
agents=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cases) [ $# -ge 2 ] || die "--cases needs a value"; cases_arg="$2"; shift 2 ;;
    --cases=*) cases_arg="${1#--cases=}"; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a value"; out_arg="$2"; shift 2 ;;
    --out=*) out_arg="${1#--out=}"; shift ;;
    --) shift; agents+=("$@"); break ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *=*) agents+=("$1"); shift ;;
    *) usage >&2; die "expected NAME=URL, got: $1" ;;
  esac
done
[ ${#agents[@]} -gt 0 ] || { usage >&2; die "at least one NAME=URL is required"; }
case "$WSTEST_TIMEOUT" in ''|*[!0-9]*) die "SLUICE_AUTOBAHN_TIMEOUT must be whole seconds" ;; esac

PYTHON3="$(command -v python3 || true)"
[ -n "$PYTHON3" ] || die "python3 is required"
command -v timeout >/dev/null || die "timeout (coreutils) is required"

# Absolute out dir (created only after the arguments are validated).
case "$out_arg" in /*) OUTDIR="$out_arg" ;; *) OUTDIR="$PWD/$out_arg" ;; esac

# Validate agents (unique names, loopback ws:// or wss:// URLs) and build the
# fuzzingclient spec. JSON is produced by python3 so quoting is never an issue.
spec_json="$("$PYTHON3" - "$OUTDIR" "$cases_arg" "${agents[@]}" <<'PY'
import ipaddress, json, os, sys
from urllib.parse import urlsplit

outdir, cases_arg, *agents = sys.argv[1:]
cases = [c.strip() for c in cases_arg.split(",") if c.strip()]
if not cases:
    sys.exit("autobahn.sh: error: --cases is empty")
servers, seen = [], set()
for a in agents:
    name, _, url = a.partition("=")
    if not name or not url:
        sys.exit("autobahn.sh: error: expected NAME=URL, got %r" % a)
    if name in seen:
        sys.exit("autobahn.sh: error: duplicate agent name %r" % name)
    seen.add(name)
    u = urlsplit(url)
    if u.scheme not in ("ws", "wss"):
        sys.exit("autobahn.sh: error: %s: URL must be ws:// or wss://" % name)
    host = u.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit("autobahn.sh: error: %s: only loopback targets are allowed "
                 "(127.0.0.0/8, localhost, [::1]), got %r" % (name, host))
    servers.append({"agent": name, "url": url})
print(json.dumps({
    "outdir": os.path.normpath(outdir),
    "servers": servers,
    "cases": cases,
    "exclude-cases": [],
    "exclude-agent-cases": {},
}, indent=2))
PY
)" || exit 2
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
SPEC="$OUTDIR/spec.json"
printf '%s\n' "$spec_json" > "$SPEC"

# ------------------------------------------------------- find python2.7
py27_ok() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1; }

find_python27() {
  local c
  # pyenv installs first (real binaries, not shims); newest 2.7.x wins.
  local cands=()
  shopt -s nullglob
  cands=("${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/2.7*/bin/python2.7
         /root/.pyenv/versions/2.7*/bin/python2.7
         /opt/pyenv/versions/2.7*/bin/python2.7
         /usr/local/pyenv/versions/2.7*/bin/python2.7)
  shopt -u nullglob
  while IFS= read -r c; do
    if [ -n "$c" ] && py27_ok "$c"; then echo "$c"; return; fi
  done < <(printf '%s\n' ${cands[@]+"${cands[@]}"} | sort -rV -u)
  # Then whatever is on PATH (a pyenv shim is fine if it resolves to 2.7).
  for c in python2.7 python2; do
    c="$(command -v "$c" 2>/dev/null || true)"
    if [ -n "$c" ] && py27_ok "$c"; then
      # Resolve shims to the real interpreter so the env does not depend on pyenv state.
      "$c" -c 'import sys; print(sys.executable)'; return
    fi
  done
  return 1
}

if [ -n "${SLUICE_AUTOBAHN_PYTHON2:-}" ]; then
  py27_ok "$SLUICE_AUTOBAHN_PYTHON2" || die "SLUICE_AUTOBAHN_PYTHON2=$SLUICE_AUTOBAHN_PYTHON2 is not a working Python 2.7"
  PY27="$SLUICE_AUTOBAHN_PYTHON2"
else
  PY27="$(find_python27)" || die "no Python 2.7 interpreter found.
  wstest (autobahntestsuite) needs Python 2.7. Looked in \$PYENV_ROOT/~/.pyenv
  versions/2.7*, /root/.pyenv, and python2.7/python2 on PATH. Debian 12 has no
  python2.7 package and pyenv cannot download a build here; install one
  (e.g. 'pyenv install 2.7.18' where downloads work) or set SLUICE_AUTOBAHN_PYTHON2."
fi

# ------------------------------------------------------- install (cached)
stamp_value="$(printf '%s\n%s\n%s\n%s\n' "$INSTALL_RECIPE_VERSION" "$PY27" "$VIRTUALENV_PIN" "$PY27_PINS" | sha256sum | cut -d' ' -f1)"
STAMP="$VENV/.sluice-autobahn-stamp"

env_ready() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_value" ] &&
    [ -x "$VENV/bin/wstest" ] && "$VENV/bin/python" -c 'import autobahntestsuite, wsaccel' >/dev/null 2>&1
}

install_env() {
  local t0 tool_py req
  t0=$(date +%s)
  log "installing wstest into $VENV (python: $PY27); takes about a minute"
  # Tool venv with virtualenv (Python 3); prefer 3.11, any 3.7+ works.
  tool_py="$(command -v python3.11 || command -v python3)"
  if ! [ -x "$TOOL_VENV/bin/python" ] || ! "$TOOL_VENV/bin/python" -m pip show -q virtualenv >/dev/null 2>&1 ||
     [ "$("$TOOL_VENV/bin/python" -c 'import virtualenv.version as v; print(v.__version__)' 2>/dev/null)" != "${VIRTUALENV_PIN#virtualenv==}" ]; then
    rm -rf "$TOOL_VENV"
    "$tool_py" -m venv "$TOOL_VENV"
    "$TOOL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$VIRTUALENV_PIN"
  fi
  rm -rf "$VENV"
  # --no-download/--no-periodic-update: seed pip/setuptools/wheel from the
  # wheels bundled in virtualenv (pip 20.3.4 is the last pip for 2.7).
  "$TOOL_VENV/bin/python" -m virtualenv --quiet --no-download --no-periodic-update \
    --app-data "$TOOL_VENV/app-data" -p "$PY27" "$VENV"
  req="$VENV/sluice-requirements.txt"
  printf '%s\n' "$PY27_PINS" > "$req"
  # PYTHONWARNINGS silences pip's Python 2.7 end-of-life banner.
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --no-input --disable-pip-version-check \
    --progress-bar off -q -r "$req"
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip check >/dev/null ||
    { PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip check >&2 || true; die "pip check failed in $VENV"; }
  "$VENV/bin/wstest" -a >/dev/null 2>&1 || die "wstest does not start in $VENV"
  echo "$stamp_value" > "$STAMP"
  log "install done in $(( $(date +%s) - t0 ))s"
}

mkdir -p "$(dirname "$VENV")"
if ! env_ready; then
  # Serialise concurrent installs into the same cache.
  if command -v flock >/dev/null; then
    exec 9>"$VENV.lock"
    flock 9
  fi
  # (install_env is called as a plain command, not in an `||` list, so that
  # `set -e` stays in force inside it.)
  if ! env_ready; then install_env; fi
  if command -v flock >/dev/null; then exec 9>&-; fi
fi

# ------------------------------------------------------- expected cases
# Expand the case patterns with wstest's own CaseSet, so the check for
# missing cases uses exactly the list wstest will try to run.
EXPECTED="$OUTDIR/expected-cases.json"
"$VENV/bin/python" - "$SPEC" "$EXPECTED" <<'PY' || exit 2
import json, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
from autobahntestsuite.caseset import CaseSet
spec = json.load(open(sys.argv[1]))
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
cases = cs.parseSpecCases(spec)
if not cases:
    sys.exit("autobahn.sh: error: case patterns %s match no case" % spec["cases"])
json.dump(cases, open(sys.argv[2], "w"))
PY

# ------------------------------------------------------- run wstest
# Remove the previous run's reports so a stale index.json is never read.
rm -f "$OUTDIR/index.json" "$OUTDIR/index.html" "$OUTDIR"/*_case_*.json "$OUTDIR"/*_case_*.html
WSTEST_LOG="$OUTDIR/wstest.log"
n_expected="$("$PYTHON3" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$EXPECTED")"
log "running $n_expected cases against ${#agents[@]} agent(s), limit ${WSTEST_TIMEOUT}s; log: $WSTEST_LOG"
t0=$(date +%s)
rc=0
rm -f "$OUTDIR/.wstest-rc"
if [ "${SLUICE_AUTOBAHN_VERBOSE:-0}" = 1 ]; then
  { PYTHONUNBUFFERED=1 timeout --kill-after=15 "$WSTEST_TIMEOUT" \
      "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC" 2>&1 || echo $? > "$OUTDIR/.wstest-rc"; } |
    tee "$WSTEST_LOG" >&2
  if [ -f "$OUTDIR/.wstest-rc" ]; then rc="$(cat "$OUTDIR/.wstest-rc")"; rm -f "$OUTDIR/.wstest-rc"; fi
else
  PYTHONUNBUFFERED=1 timeout --kill-after=15 "$WSTEST_TIMEOUT" \
    "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC" >"$WSTEST_LOG" 2>&1 || rc=$?
fi
elapsed=$(( $(date +%s) - t0 ))
if [ "$rc" -ne 0 ]; then
  tail -n 30 "$WSTEST_LOG" >&2 || true
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    die "wstest timed out after ${WSTEST_TIMEOUT}s (SLUICE_AUTOBAHN_TIMEOUT); the last case started is in $WSTEST_LOG"
  fi
  die "wstest exited with status $rc"
fi
[ -f "$OUTDIR/index.json" ] || { tail -n 30 "$WSTEST_LOG" >&2 || true; die "wstest wrote no $OUTDIR/index.json"; }
log "wstest finished in ${elapsed}s; reports in $OUTDIR (index.html)"
# wstest skips an agent's remaining cases when a connection is refused; say why.
grep -E '^Connection to .* failed' "$WSTEST_LOG" | sed 's/^/autobahn.sh: wstest: /' >&2 || true

# ------------------------------------------------------- summary
summary_rc=0
"$PYTHON3" - "$OUTDIR/index.json" "$SPEC" "$EXPECTED" "${SLUICE_AUTOBAHN_STRICT_CLOSE:-0}" <<'PY' || summary_rc=$?
import json, sys
from collections import Counter

try:
    index = json.load(open(sys.argv[1]))
except ValueError as e:
    print("autobahn.sh: error: cannot parse %s: %s" % (sys.argv[1], e), file=sys.stderr)
    sys.exit(2)
spec = json.load(open(sys.argv[2]))
expected = json.load(open(sys.argv[3]))
strict_close = sys.argv[4] == "1"

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
# Anything else Autobahn's HTML report would show as "Fail" counts as FAILED.
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
BAD_CLOSE = {"FAILED", "UNCLEAN"}

def sort_key(case_id):
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]

def fmt(counter, order):
    keys = order + sorted(k for k in counter if k not in order)
    return ", ".join("%s %d" % (k, counter.get(k, 0)) for k in keys)

bad = False
for server in spec["servers"]:
    name = server["agent"]
    results = index.get(name, {})
    beh = Counter(r["behavior"] for r in results.values())
    close = Counter(r["behaviorClose"] for r in results.values())
    print("autobahn %s: %d cases, %s" % (name, len(results), fmt(beh, BEHAVIORS)))
    print("autobahn %s: behaviorClose: %s" % (name, fmt(close, ["OK"])))
    failed = sorted((c for c, r in results.items() if r["behavior"] not in PASSING), key=sort_key)
    if failed:
        bad = True
        print("autobahn %s: FAILED cases: %s" % (name, " ".join(
            c if results[c]["behavior"] == "FAILED" else "%s(%s)" % (c, results[c]["behavior"])
            for c in failed)))
    bad_close = sorted((c for c, r in results.items() if r["behaviorClose"] in BAD_CLOSE), key=sort_key)
    if bad_close:
        bad = bad or strict_close
        print("autobahn %s: close FAILED/UNCLEAN cases%s: %s" % (
            name, "" if strict_close else " (not fatal)", " ".join(bad_close)))
    missing = [c for c in expected if c not in results]
    if missing:
        bad = True
        shown = " ".join(missing[:40]) + (" ..." if len(missing) > 40 else "")
        print("autobahn %s: MISSING %d of %d cases from report (connection refused or server died?): %s"
              % (name, len(missing), len(expected), shown))
sys.exit(1 if bad else 0)
PY
exit "$summary_rc"

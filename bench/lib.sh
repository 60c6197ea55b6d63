# Shell functions the bench scripts share (sourced, not run).

# stop_pids PID...: SIGTERM to each, a bounded wait (10 s) for each to exit,
# then SIGKILL to any that has not.
stop_pids() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# stop_server: stop_pids for $SERVER_PID.
stop_server() {
  stop_pids "$SERVER_PID"
}

# Shell functions the bench scripts share (sourced, not run).

# stop_server: SIGTERM to $SERVER_PID, a bounded wait for it to exit, then
# SIGKILL if it has not.
stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

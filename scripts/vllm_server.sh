#!/usr/bin/env bash
# Start a real CPU vLLM server on 127.0.0.1 in the background, wait until /health answers, print its PID.
#
# Usage: vllm_server.sh MODEL_DIR PORT [NAME]
# Stop: kill -INT PID (exits in ~3 s; the server runs in its own process group, so if anything
# lingers, kill -KILL -- -PID).
# Env: ROLLWIRE_VLLM_VENV (see setup_vllm.sh), VLLM_LOG (default /tmp/vllm-server-PORT.log),
#      VLLM_HEALTH_TIMEOUT seconds (default 240), VLLM_EXTRA_ARGS (appended, word-split).
# Prints only the PID on stdout; progress and errors go to stderr. On timeout or early exit the
# server is stopped, the log tail is shown and the exit code is 1.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR PORT [NAME]" >&2
  exit 2
fi
MODEL=$(cd "$1" && pwd)
PORT=$2
NAME=${3:-$(basename "$MODEL")}
VENV=${ROLLWIRE_VLLM_VENV:-$HOME/.cache/rollwire/vllm-venv}
LOG=${VLLM_LOG:-/tmp/vllm-server-$PORT.log}
TIMEOUT=${VLLM_HEALTH_TIMEOUT:-240}
if [ ! -x "$VENV/bin/python" ]; then
  echo "no vLLM venv at $VENV: run scripts/setup_vllm.sh" >&2
  exit 1
fi

# The launcher gives the server its own session and process group (so the caller's Ctrl-C does not
# reach it and `kill -- -PID` reaches all its workers) and un-ignores SIGINT: a background job of a
# non-interactive shell inherits SIGINT as ignored, and vLLM would then ignore SIGINT until uvicorn
# is up. It then execs the server, keeping the PID.
launcher='import os, signal, sys
try:
    os.setsid()
except OSError:
    pass
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])'
# shellcheck disable=SC2086
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1 \
  "$VENV/bin/python" -c "$launcher" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" --served-model-name "$NAME" --host 127.0.0.1 --port "$PORT" \
  --max-model-len 2048 --max-num-seqs 4 --enforce-eager --enable-scale-out \
  --limit-mm-per-prompt '{"image":4,"video":0}' ${VLLM_EXTRA_ARGS:-} \
  >"$LOG" 2>&1 </dev/null &
pid=$!
echo "vLLM starting: pid $pid, log $LOG" >&2

# SIGINT, then SIGKILL to the server's process group if it has not exited after 20 s.
stop_group() {
  kill -INT "$1" 2>/dev/null || return 0
  for _ in $(seq 40); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL -- "-$1" 2>/dev/null || true
}

start=$(date +%s)
while true; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "vLLM exited before becoming healthy; last log lines:" >&2
    tail -n 30 "$LOG" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true   # leftover workers, if any
    exit 1
  fi
  if curl -fs -o /dev/null "http://127.0.0.1:$PORT/health"; then
    break
  fi
  if (( $(date +%s) - start >= TIMEOUT )); then
    echo "vLLM not healthy after ${TIMEOUT}s; stopping it. Last log lines:" >&2
    tail -n 30 "$LOG" >&2
    stop_group "$pid"
    exit 1
  fi
  sleep 1
done
echo "vLLM healthy after $(( $(date +%s) - start )) s on http://127.0.0.1:$PORT (model $NAME)" >&2
echo "$pid"

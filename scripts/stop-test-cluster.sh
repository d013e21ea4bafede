#!/usr/bin/env bash
# Stop the test cluster started by scripts/start-test-cluster.sh and remove its state.
#
#   QDB_CLUSTER_DIR            state directory (default <repo>/.qdb-cluster)
#   QDB_CLUSTER_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default 10)
#
# SIGTERM makes each node shut down gracefully (GOAWAY "shutdown" to clients).
# Idempotent: nothing to stop is not an error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${QDB_CLUSTER_DIR:-$ROOT/.qdb-cluster}"
TIMEOUT="${QDB_CLUSTER_STOP_TIMEOUT:-10}"

if [[ ! -d "$STATE" ]]; then
    echo "stop-test-cluster: no cluster state in $STATE"
    exit 0
fi

is_our_node() {  # pid -> true if it is a live test node (guards against reused pids)
    local args
    args="$(ps -p "$1" -o args= 2>/dev/null || true)"
    [[ "$args" == *qdb_client.testing* ]]
}

pids=()
shopt -s nullglob
for pidfile in "$STATE"/node-*.pid; do
    pid="$(cat "$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && is_our_node "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
done

deadline=$((SECONDS + TIMEOUT))
while (( SECONDS < deadline )); do
    alive=0
    for pid in "${pids[@]+"${pids[@]}"}"; do
        if is_our_node "$pid"; then
            alive=1
        fi
    done
    (( alive )) || break
    sleep 0.1
done
for pid in "${pids[@]+"${pids[@]}"}"; do
    if is_our_node "$pid"; then
        echo "stop-test-cluster: pid $pid did not stop after ${TIMEOUT}s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
done

rm -f "$STATE"/node-*.pid
if [[ -f "$STATE/.qdb-test-cluster" ]]; then
    rm -rf "$STATE"
else
    echo "stop-test-cluster: $STATE was not created by start-test-cluster.sh; kept it" >&2
fi
echo "stop-test-cluster: stopped ${#pids[@]} node(s)"

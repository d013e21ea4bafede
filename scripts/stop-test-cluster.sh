#!/usr/bin/env bash
# Stop the test cluster started by scripts/start-test-cluster.sh and remove its state.
#
#   QDB_CLUSTER_DIR            state directory (default <repo>/.qdb-cluster)
#   QDB_CLUSTER_STOP_TIMEOUT   seconds between SIGTERM and SIGKILL (default 10)
#
# SIGTERM makes each node shut down gracefully (GOAWAY "shutdown" to clients).
# The fault proxy process of `start-test-cluster.sh --proxies` (proxy.pid) is stopped
# too; `--proxies` is accepted for symmetry, `--proxies-only` stops just the proxies
# and leaves the nodes and the state directory alone.
# Idempotent: nothing to stop is not an error.
set -euo pipefail

ONLY_PROXIES=0
for arg in "$@"; do
    case "$arg" in
        --proxies) ;;
        --proxies-only) ONLY_PROXIES=1 ;;
        *) echo "usage: stop-test-cluster.sh [--proxies | --proxies-only]" >&2; exit 2 ;;
    esac
done

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
nodes=0
proxies=0
shopt -s nullglob
pidfiles=("$STATE"/proxy.pid)
(( ONLY_PROXIES )) || pidfiles+=("$STATE"/node-*.pid)
for pidfile in "${pidfiles[@]}"; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && is_our_node "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
        if [[ "$pidfile" == */proxy.pid ]]; then
            proxies=$((proxies + 1))
        else
            nodes=$((nodes + 1))
        fi
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

rm -f "$STATE"/proxy.pid
if (( ONLY_PROXIES )); then
    echo "stop-test-cluster: stopped $proxies proxy process(es)"
    exit 0
fi
rm -f "$STATE"/node-*.pid
if [[ -f "$STATE/.qdb-test-cluster" ]]; then
    rm -rf "$STATE"
else
    echo "stop-test-cluster: $STATE was not created by start-test-cluster.sh; kept it" >&2
fi
if (( proxies )); then
    echo "stop-test-cluster: stopped $nodes node(s) and $proxies proxy process(es)"
else
    echo "stop-test-cluster: stopped $nodes node(s)"
fi

#!/usr/bin/env bash
# Start a QDB test cluster in the background and wait until every node answers ping.
#
#   TEST_SERVER_PORTS   ports, comma-separated          (default 7000,7001,7002)
#   TEST_CLUSTER_SIZE   how many of them to start       (default: all listed)
#   TEST_SERVER_HOST    host to bind                    (default 127.0.0.1)
#   QDB_CLUSTER_DIR     state: pid files, logs, database (default <repo>/.qdb-cluster)
#   PYTHON              interpreter (default .venv/bin/python, else python3)
#   QDB_CLUSTER_START_TIMEOUT  seconds to wait for readiness (default 15)
#
# Nodes run `python -m qdb_client.testing --test-mode` on one shared SQLite file.
# Idempotent: nodes whose pid file names a live node are left alone.
# Stop with scripts/stop-test-cluster.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${QDB_CLUSTER_DIR:-$ROOT/.qdb-cluster}"
HOST="${TEST_SERVER_HOST:-127.0.0.1}"
TIMEOUT="${QDB_CLUSTER_START_TIMEOUT:-15}"
IFS=',' read -r -a PORTS <<< "${TEST_SERVER_PORTS:-7000,7001,7002}"
SIZE="${TEST_CLUSTER_SIZE:-${#PORTS[@]}}"

PY="${PYTHON:-$ROOT/.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
    PY="python3"
fi

if ! [[ "$SIZE" =~ ^[0-9]+$ ]] || (( SIZE < 1 || SIZE > ${#PORTS[@]} )); then
    echo "start-test-cluster: TEST_CLUSTER_SIZE=$SIZE, but ${#PORTS[@]} port(s) in TEST_SERVER_PORTS" >&2
    exit 2
fi
PORTS=("${PORTS[@]:0:$SIZE}")

mkdir -p "$STATE"
touch "$STATE/.qdb-test-cluster"   # marks the directory as ours for stop-test-cluster.sh
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

is_our_node() {  # pid -> true if it is a live test node (not a zombie, not a reused pid)
    local args
    args="$(ps -p "$1" -o args= 2>/dev/null || true)"
    [[ "$args" == *qdb_client.testing* ]]
}

addresses=()
for port in "${PORTS[@]}"; do
    addresses+=("$HOST:$port")
done

started=()
for port in "${PORTS[@]}"; do
    pidfile="$STATE/node-$port.pid"
    if [[ -f "$pidfile" ]] && is_our_node "$(cat "$pidfile")"; then
        echo "start-test-cluster: node on port $port already running (pid $(cat "$pidfile"))"
        continue
    fi
    peers=()
    for address in "${addresses[@]}"; do
        [[ "$address" == "$HOST:$port" ]] || peers+=("$address")
    done
    peer_list="$(IFS=','; echo "${peers[*]:-}")"
    nohup "$PY" -m qdb_client.testing \
        --host "$HOST" --port "$port" \
        --db "$STATE/qdb.sqlite3" \
        ${peer_list:+--peers "$peer_list"} \
        --test-mode \
        >"$STATE/node-$port.out" 2>"$STATE/node-$port.log" </dev/null &
    echo $! >"$pidfile"
    started+=("$!:$port")
done

show_logs() {
    for port in "${PORTS[@]}"; do
        echo "--- $STATE/node-$port.log (last 20 lines) ---" >&2
        tail -n 20 "$STATE/node-$port.log" >&2 2>/dev/null || true
    done
}

all_addresses="$(IFS=','; echo "${addresses[*]}")"
"$PY" -m qdb_client.testing.wait "$all_addresses" --timeout "$TIMEOUT" &
waiter=$!
died=""
while kill -0 "$waiter" 2>/dev/null; do
    for entry in "${started[@]+"${started[@]}"}"; do
        if ! is_our_node "${entry%%:*}"; then  # not kill -0: a zombie would pass it
            died="${entry##*:}"
        fi
    done
    if [[ -n "$died" ]]; then
        kill "$waiter" 2>/dev/null || true
        break
    fi
    sleep 0.1
done
if [[ -z "$died" ]] && wait "$waiter"; then
    echo "start-test-cluster: ${#PORTS[@]} node(s) ready on $all_addresses (state in $STATE)"
    exit 0
fi
wait "$waiter" 2>/dev/null || true
if [[ -n "$died" ]]; then
    echo "start-test-cluster: the node on port $died exited during startup" >&2
else
    echo "start-test-cluster: nodes not ready within ${TIMEOUT}s" >&2
fi
show_logs
for entry in "${started[@]+"${started[@]}"}"; do  # leave nothing half-started behind
    kill -KILL "${entry%%:*}" 2>/dev/null || true
    rm -f "$STATE/node-${entry##*:}.pid"
done
exit 1

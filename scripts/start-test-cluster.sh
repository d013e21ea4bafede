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
# With --proxies, also one fault proxy process (`python -m qdb_client.testing proxy`)
# with a proxy in front of every node, once the nodes are ready:
#   TEST_PROXY_PORTS         proxy ports, one per node, in order (default: node port + 10000)
#   TEST_PROXY_CONTROL_PORT  its JSON-lines control port (default: first proxy port + 100)
# It prints the proxied addresses the driver should use.
#
# With --tls, the nodes speak TLS only, with a throwaway authority made on first use
# (scripts/make-test-certs.py, needs trustme): $QDB_CLUSTER_DIR/tls/ca.pem is what
# clients trust. With --auth, they require credentials: $QDB_CLUSTER_DIR/credentials
# (user:password lines, mode 0600; made on first use with the user $QDB_CLUSTER_USER,
# default "demo", and a random password) is what clients log in with.
#
# Nodes run `python -m qdb_client.testing --test-mode --state-dir $QDB_CLUSTER_DIR` on
# one shared SQLite file; each writes its control token to node-<port>.control-token
# there (control tools find it through QDB_CLUSTER_DIR). Every file of the state
# directory is readable by its owner only.
# Idempotent: nodes (and a proxy process) whose pid file names a live one are left alone,
# so running it again restarts only the nodes that stopped (a rolling restart's step).
# Stop with scripts/stop-test-cluster.sh.
set -euo pipefail

PROXIES=0
TLS=0
AUTH=0
for arg in "$@"; do
    case "$arg" in
        --proxies) PROXIES=1 ;;
        --tls) TLS=1 ;;
        --auth) AUTH=1 ;;
        *) echo "usage: start-test-cluster.sh [--proxies] [--tls] [--auth]" >&2; exit 2 ;;
    esac
done
umask 077

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

PROXY_PORTS=()
if (( PROXIES )); then
    if [[ -n "${TEST_PROXY_PORTS:-}" ]]; then
        IFS=',' read -r -a PROXY_PORTS <<< "$TEST_PROXY_PORTS"
    else
        for port in "${PORTS[@]}"; do
            PROXY_PORTS+=($((port + 10000)))
        done
    fi
    if (( ${#PROXY_PORTS[@]} < ${#PORTS[@]} )); then
        echo "start-test-cluster: TEST_PROXY_PORTS has ${#PROXY_PORTS[@]} port(s) for ${#PORTS[@]} node(s)" >&2
        exit 2
    fi
    PROXY_PORTS=("${PROXY_PORTS[@]:0:${#PORTS[@]}}")
    CONTROL_PORT="${TEST_PROXY_CONTROL_PORT:-$((PROXY_PORTS[0] + 100))}"
fi

mkdir -p "$STATE"
touch "$STATE/.qdb-test-cluster"   # marks the directory as ours for stop-test-cluster.sh
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export QDB_CLUSTER_DIR="$STATE"    # where the nodes' control tokens are (for the waits)

NODE_FLAGS=(--test-mode --state-dir "$STATE")
WAIT_FLAGS=()
if (( TLS )); then
    "$PY" "$ROOT/scripts/make-test-certs.py" "$STATE/tls" "$HOST"
    NODE_FLAGS+=(--tls-cert "$STATE/tls/node.pem" --tls-key "$STATE/tls/node.key")
    WAIT_FLAGS+=(--tls-ca "$STATE/tls/ca.pem")
fi
if (( AUTH )); then
    if [[ ! -s "$STATE/credentials" ]]; then
        password="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(18))')"
        printf '%s:%s\n' "${QDB_CLUSTER_USER:-demo}" "$password" >"$STATE/credentials"
        unset password
    fi
    NODE_FLAGS+=(--credentials-file "$STATE/credentials")
    WAIT_FLAGS+=(--credentials-file "$STATE/credentials")  # through proxies: no token
fi

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
        "${NODE_FLAGS[@]}" \
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

show_proxy_log() {
    echo "--- $STATE/proxy.log (last 20 lines) ---" >&2
    tail -n 20 "$STATE/proxy.log" >&2 2>/dev/null || true
}

proxy_started=""
give_up() {  # leave nothing half-started behind
    for entry in "${started[@]+"${started[@]}"}"; do
        kill -KILL "${entry%%:*}" 2>/dev/null || true
        rm -f "$STATE/node-${entry##*:}.pid"
    done
    if [[ -n "$proxy_started" ]]; then
        kill -KILL "$proxy_started" 2>/dev/null || true
        rm -f "$STATE/proxy.pid"
    fi
    exit 1
}

all_addresses="$(IFS=','; echo "${addresses[*]}")"
"$PY" -m qdb_client.testing.wait "$all_addresses" --timeout "$TIMEOUT" "${WAIT_FLAGS[@]+"${WAIT_FLAGS[@]}"}" &
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
if [[ -n "$died" ]] || ! wait "$waiter"; then
    wait "$waiter" 2>/dev/null || true
    if [[ -n "$died" ]]; then
        echo "start-test-cluster: the node on port $died exited during startup" >&2
    else
        echo "start-test-cluster: nodes not ready within ${TIMEOUT}s" >&2
    fi
    show_logs
    give_up
fi
security="plain TCP"
(( TLS )) && security="TLS (trust $STATE/tls/ca.pem)"
(( AUTH )) && security="$security, credentials in $STATE/credentials"
echo "start-test-cluster: ${#PORTS[@]} node(s) ready on $all_addresses, $security (state in $STATE)"
(( PROXIES )) || exit 0

# ---------------------------------------------------------------- proxies
proxy_addresses=()
maps=()
for i in "${!PORTS[@]}"; do
    proxy_addresses+=("$HOST:${PROXY_PORTS[$i]}")
    maps+=(--map "$HOST:${PROXY_PORTS[$i]}=$HOST:${PORTS[$i]}")
done
all_proxies="$(IFS=','; echo "${proxy_addresses[*]}")"
pidfile="$STATE/proxy.pid"
if [[ -f "$pidfile" ]] && is_our_node "$(cat "$pidfile")"; then
    echo "start-test-cluster: proxies already running (pid $(cat "$pidfile"))"
else
    nohup "$PY" -m qdb_client.testing proxy "${maps[@]}" --control "$HOST:$CONTROL_PORT" \
        >"$STATE/proxy.out" 2>"$STATE/proxy.log" </dev/null &
    proxy_started=$!
    echo "$proxy_started" >"$pidfile"
    deadline=$((SECONDS + TIMEOUT))
    until grep -q '^QDB-PROXY READY' "$STATE/proxy.out" 2>/dev/null; do
        if ! is_our_node "$proxy_started"; then
            echo "start-test-cluster: the proxy process exited during startup" >&2
            show_proxy_log
            give_up
        fi
        if (( SECONDS >= deadline )); then
            echo "start-test-cluster: proxies not ready within ${TIMEOUT}s" >&2
            show_proxy_log
            give_up
        fi
        sleep 0.1
    done
fi
if ! "$PY" -m qdb_client.testing.wait "$all_proxies" --timeout "$TIMEOUT" "${WAIT_FLAGS[@]+"${WAIT_FLAGS[@]}"}"; then
    echo "start-test-cluster: the nodes do not answer through the proxies" >&2
    show_proxy_log
    give_up
fi
proxy_ports="$(IFS=','; echo "${PROXY_PORTS[*]}")"
echo "start-test-cluster: proxies ready on $all_proxies (control $HOST:$CONTROL_PORT)"
echo "start-test-cluster: point the driver at the proxies: TEST_SERVER_PORTS=$proxy_ports"

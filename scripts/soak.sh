#!/usr/bin/env bash
# Jepsen-style soak of the driver under faults (see docs/reliability.md).
#
#   scripts/soak.sh [--duration SECONDS] [--seed N] [--clients K] [--out DIR] [-- MORE]
#
#   --duration  seconds of workload, at least 30 (default 60)
#   --seed      seed of the fault schedule (default: random, printed)
#   --clients   client processes, 16 trio tasks each (default 3)
#   --out       output directory, new or empty (default: a fresh one under $TMPDIR or /tmp)
#   MORE        passed on to `python -m tests.soak` (--tasks, --timeout, --think,
#               --error-pause, --max-unavailable, --driver-defaults, --hedge-delay)
#
# Starts three test nodes on free ports (one shared SQLite file in DIR/state), a
# fault proxy in front of each, the client processes, and the seeded fault
# schedule; heals; checks the final state against every client's history; writes
# DIR/report.txt, DIR/verdict.json and DIR/timeline.html; prints one summary line.
# Exit status: 0 pass, 1 a violation, 2 bad arguments, 3 the run broke, 130 interrupted.
#
# Every process the run started is listed in DIR/pids; whatever way this script
# ends (Ctrl-C, SIGTERM, a crash), it stops the run and kills what is left of them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
    PY="python3"
fi

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

DURATION=60
SEED=""
CLIENTS=3
OUT=""
EXTRA=()
while (($#)); do
    case "$1" in
        --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --clients) CLIENTS="${2:?--clients needs a value}"; shift 2 ;;
        --out) OUT="${2:?--out needs a value}"; shift 2 ;;
        --) shift; EXTRA+=("$@"); break ;;
        -h|--help) usage ;;
        --tasks|--timeout|--think|--error-pause|--max-unavailable)
            EXTRA+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --driver-defaults) EXTRA+=("$1"); shift ;;
        *) echo "soak.sh: unknown option $1" >&2; usage ;;
    esac
done
if [[ -z "$OUT" ]]; then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/qdb-soak.XXXXXX")"
fi
ARGS=(--duration "$DURATION" --clients "$CLIENTS" --out "$OUT")
if [[ -n "$SEED" ]]; then
    ARGS+=(--seed "$SEED")
fi

is_ours() {  # pid -> true if it is a live process of this soak (not a reused pid)
    local args
    args="$(ps -p "$1" -o args= 2>/dev/null || true)"
    [[ "$args" == *qdb_client.testing* || "$args" == *tests.soak* ]]
}

child=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        for _ in $(seq 1 150); do  # the runner stops its processes itself: give it 15 s
            kill -0 "$child" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if [[ -f "$OUT/pids" ]]; then
        while read -r pid role; do
            if is_ours "$pid"; then
                kill -CONT "$pid" 2>/dev/null || true
                kill -KILL "$pid" 2>/dev/null || true
                echo "soak.sh: killed leftover $role (pid $pid)" >&2
            fi
        done <"$OUT/pids"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# In the background, so that a signal to this script is handled at once (a foreground
# child would delay the trap until it exits); the trap forwards it to the runner.
"$PY" -m tests.soak "${ARGS[@]}" "${EXTRA[@]+"${EXTRA[@]}"}" &
child=$!
status=0
wait "$child" || status=$?
child=""
exit "$status"

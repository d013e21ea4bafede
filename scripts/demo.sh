#!/usr/bin/env bash
# The driver's main job, end to end: set up .venv, start a local 3-node test
# cluster over TLS with authentication (a throwaway certificate authority and a
# random password, made in the cluster's state directory), run a real workload
# through qdb_client, print a report, stop the cluster (also on failure or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

export TEST_SERVER_PORTS="${TEST_SERVER_PORTS:-7000,7001,7002}"
export QDB_CLUSTER_DIR="${QDB_CLUSTER_DIR:-$PWD/.qdb-cluster/demo}"
trap 'scripts/stop-test-cluster.sh >/dev/null 2>&1 || true' EXIT
scripts/start-test-cluster.sh --tls --auth
.venv/bin/python examples/workload.py \
    --tls-ca "$QDB_CLUSTER_DIR/tls/ca.pem" \
    --credentials-file "$QDB_CLUSTER_DIR/credentials" \
    "$@"

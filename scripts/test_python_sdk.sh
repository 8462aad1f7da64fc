#!/usr/bin/env bash
# Tests the Python SDK: installs it with pip (into a virtual environment under
# the build folder), starts the local cluster, runs its pytest suite against
# the router, and stops the cluster. Run by ctest (python_sdk).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"
VENV="$BUILD/python-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "./client/python[test]"
export PSA_CLUSTER_DIR="$BUILD/python-sdk-cluster"
export PSA_ROUTER_PORT="${PSA_ROUTER_PORT:-0}"
deploy/local/cluster.sh stop >/dev/null 2>&1 || true
deploy/local/cluster.sh start
trap '"$ROOT/deploy/local/cluster.sh" stop >/dev/null' EXIT
export PSA_TARGET="127.0.0.1:$(sed -n 's/^grpc_port=//p' "$PSA_CLUSTER_DIR/router.ports")"
cd client/python/tests  # import the installed package, not the source tree
"$VENV/bin/python" -m pytest -q .

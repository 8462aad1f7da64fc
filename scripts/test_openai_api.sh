#!/usr/bin/env bash
# Tests the router's OpenAI-compatible HTTP API with the official `openai`
# Python package (and curl): installs it and the Python SDK into the build's
# virtual environment, starts the local cluster, runs
# tests/openai/test_openai_api.py against it; then starts it again with
# PSA_SECURE=1 (TLS everywhere, HTTPS, an API key) and runs
# tests/openai/secure/. Run by ctest (openai.AgainstLocalCluster).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"
VENV="$BUILD/python-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "./client/python[test]" "openai>=1.40"
command -v curl >/dev/null || { echo "curl is missing: run scripts/setup.sh" >&2; exit 1; }
export PSA_CLUSTER_DIR="$BUILD/openai-cluster"
export PSA_ROUTER_PORT=0 PSA_HTTP_PORT=0
SECURE_DIR="$BUILD/openai-secure-cluster"
stop_all() {
  "$ROOT/deploy/local/cluster.sh" stop >/dev/null
  PSA_CLUSTER_DIR="$SECURE_DIR" "$ROOT/deploy/local/cluster.sh" stop >/dev/null
}
stop_all 2>/dev/null || true
deploy/local/cluster.sh start
trap stop_all EXIT
port() { sed -n "s/^$1=//p" "$PSA_CLUSTER_DIR/router.ports"; }
export PSA_HTTP="http://127.0.0.1:$(port http_port)"
export PSA_TARGET="127.0.0.1:$(port grpc_port)"
export PSA_ROUTER_METRICS="http://127.0.0.1:$(port metrics_port)/metrics"
(cd tests/openai && "$VENV/bin/python" -m pytest -q -p no:cacheprovider test_openai_api.py)
deploy/local/cluster.sh stop >/dev/null

export PSA_CLUSTER_DIR="$SECURE_DIR"
PSA_SECURE=1 deploy/local/cluster.sh start
export PSA_HTTPS="https://127.0.0.1:$(port http_port)"
export PSA_TARGET="127.0.0.1:$(port grpc_port)"
export PSA_CA="$SECURE_DIR/tls/ca.pem"
PSA_API_KEY="$(cat "$SECURE_DIR/tls/api_key")"
export PSA_API_KEY
(cd tests/openai/secure && "$VENV/bin/python" -m pytest -q -p no:cacheprovider .)

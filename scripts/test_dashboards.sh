#!/usr/bin/env bash
# Proves the dashboards and rules against real tools: starts the local
# cluster and a Prometheus server (Debian's) scraping all five processes,
# drives some traffic (dense and PSA generations, a repeated long prompt for
# the prefix cache), then runs every dashboard panel's query through
# Prometheus's HTTP API (scripts/check_dashboards.py) and checks the rules
# with promtool. Run by ctest (dashboards.PanelsHaveData).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"
export PSA_CLUSTER_DIR="$BUILD/dashboards-cluster"
export PSA_ROUTER_PORT=0
PROM_DIR="$BUILD/dashboards-prometheus"
command -v prometheus >/dev/null || { echo "prometheus is missing: run scripts/setup.sh" >&2; exit 1; }

deploy/local/cluster.sh stop >/dev/null 2>&1 || true
deploy/local/cluster.sh start
PROM_PID=""
cleanup() {
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null || true
  "$ROOT/deploy/local/cluster.sh" stop >/dev/null
}
trap cleanup EXIT

port() { sed -n "s/^$2=//p" "$PSA_CLUSTER_DIR/$1.ports"; }
rm -rf "$PROM_DIR" && mkdir -p "$PROM_DIR"
{
  echo "global: {scrape_interval: 1s, evaluation_interval: 1s}"
  echo "rule_files: ['$ROOT/dashboards/rules/psa_serve.rules.yml']"
  echo "scrape_configs:"
  for job in router worker0 worker1 kv0 kv1; do
    echo "  - job_name: $job"
    echo "    static_configs: [{targets: ['127.0.0.1:$(port "$job" metrics_port)']}]"
  done
} >"$PROM_DIR/prometheus.yml"
promtool check config "$PROM_DIR/prometheus.yml" >/dev/null
PROM_PORT=$(( 20000 + $$ % 20000 ))
prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$PROM_DIR/prometheus.log" 2>&1 &
PROM_PID=$!

ROUTER="127.0.0.1:$(port router grpc_port)"
DOC="$(scripts/long_document.sh | sed -n 1,30p)"
for i in 1 2; do  # the second run of the long prompt loads its prefix
  "$BUILD/client/psactl" --target="$ROUTER" --max_tokens=16 --attention=psa --stats=false \
    generate "$DOC
Which cabinet holds ledger 1370?" >/dev/null
done
"$BUILD/client/psactl" --target="$ROUTER" --max_tokens=16 --attention=dense --stats=false \
  generate "Name a colour." >/dev/null
"$BUILD/client/psactl" --target="$ROUTER" --max_tokens=2000000 generate "x" >/dev/null 2>&1 || true
sleep 8  # several scrapes after the traffic, so rates have two samples

scripts/check_dashboards.py "http://127.0.0.1:$PROM_PORT" dashboards/grafana/*.json
promtool check rules dashboards/rules/psa_serve.rules.yml
(cd dashboards/rules/tests && promtool test rules psa_serve.rules.test.yml)

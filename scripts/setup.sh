#!/usr/bin/env bash
# Installs every Debian package PSA-Serve needs to build and test, and
# nothing when all are present (idempotent). Needs root or sudo for apt.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config python3 python3-pip
  libabsl-dev libicu-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libopenblas-dev libre2-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libssl-dev
  libcpp-httplib-dev curl prometheus python3-venv
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl (with its built-in kustomize, v1.27+) renders deploy/k8s in the
# tests. Debian ships only an old one (kubernetes-client); the machines we
# build on have a current kubectl preinstalled.
if ! command -v kubectl >/dev/null; then
  echo "setup: warning: kubectl (1.27+) not found; the deploy tests will fail without it" >&2
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"

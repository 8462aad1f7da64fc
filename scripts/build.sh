#!/usr/bin/env bash
# Configures and builds PSA-Serve in build/ (Release). Extra arguments go to
# cmake's configure step, e.g. scripts/build.sh -DPSA_NATIVE=OFF.
#   PSA_BUILD_DIR  build folder (default build)
#   PSA_JOBS       parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${PSA_BUILD_DIR:-build}"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C "$BUILD" -j "${PSA_JOBS:-$(nproc)}"

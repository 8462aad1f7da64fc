#!/usr/bin/env bash
# The test command: installs what is missing, fetches the models the golden
# tests check (the default model and qwen2.5-coder-0.5b), builds, and runs
# every test (unit, integration against llama.cpp fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PSA_MODEL="$(scripts/fetch_model.sh)"
scripts/fetch_model.sh qwen2.5-coder-0.5b >/dev/null
scripts/build.sh
ctest --test-dir "${PSA_BUILD_DIR:-build}" --output-on-failure --timeout 900 "$@"

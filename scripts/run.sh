#!/usr/bin/env bash
# The main job: installs what is missing, fetches the default model, builds,
# starts the local cluster (2 KV service shards, 2 workers, the router), and
# asks two questions about a long document (~3,500 tokens) through the
# router with psactl, printing each answer, tokens/s and how much of the KV
# PSA read compared with dense attention. The second question reuses the
# document's KV from the KV service instead of recomputing it. The cluster
# stops when the job ends.
#   scripts/run.sh                      # default questions
#   scripts/run.sh "Your question"      # your own question about the document
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PSA_MODEL="$(scripts/fetch_model.sh)"
scripts/build.sh
export PSA_ROUTER_PORT="${PSA_ROUTER_PORT:-7000}"
deploy/local/cluster.sh start "$PSA_MODEL"
trap 'deploy/local/cluster.sh stop' EXIT

DOCUMENT="$(scripts/long_document.sh)"
ask() {
  echo
  echo "Q: $1"
  printf 'A: '
  build/client/psactl --target="127.0.0.1:$PSA_ROUTER_PORT" --max_tokens=64 \
    generate "$DOCUMENT

$1"
}
if [ $# -gt 0 ]; then
  ask "$1"
else
  ask "In which cabinet is ledger 1629 kept?"
  ask "What colour is the leather binding of ledger 1629?"
fi

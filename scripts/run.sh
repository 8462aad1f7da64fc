#!/usr/bin/env bash
# The main job: installs what is missing, fetches the model, builds,
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
# The main job's model: Qwen2.5-Coder-1.5B-Instruct (docs/models.md says why);
# PSA_RUN_MODEL=NAME picks another registered one (scripts/fetch_model.sh --list).
export PSA_MODEL="$(scripts/fetch_model.sh "${PSA_RUN_MODEL:-qwen2.5-coder-1.5b}")"
scripts/build.sh
export PSA_ROUTER_PORT="${PSA_ROUTER_PORT:-7000}"
deploy/local/cluster.sh start "$PSA_MODEL"
trap 'deploy/local/cluster.sh stop' EXIT

PSACTL="${PSA_BUILD_DIR:-build}/client/psactl"
DOCUMENT="$(scripts/long_document.sh)"
DOCUMENT_TOKENS="$("$PSACTL" --target="127.0.0.1:$PSA_ROUTER_PORT" tokenize "$DOCUMENT" | wc -w)"
PREFILL="prefilling the ${DOCUMENT_TOKENS}-token document and the question"

# Passes psactl's output through from stdin. Until its first character
# comes (the prompt is being prefilled: 15-30 s for the first question on 2
# cores), shows after "A: " on the terminal how long it has waited: ESC 7 /
# ESC 8 save and restore the cursor, ESC [K erases the message for the
# answer. psactl's stderr (the stats line, errors) comes through here too,
# so that it stays after the answer.
with_prefill_clock() {
  local ticker="" first=""
  if [ -t 1 ] && [ -t 2 ]; then
    ( start=$SECONDS
      while :; do printf '\0337(%s ... %d s)\0338' "$PREFILL" $(( SECONDS - start )) >&2; sleep 1; done
    ) &
    ticker=$!
  fi
  IFS= read -r -N 1 first || true
  if [ -n "$ticker" ]; then
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    printf '\033[K' >&2
  fi
  printf '%s' "$first"
  cat
}

ask() {
  echo
  echo "Q: $1"
  # Not on a terminal: say once what the wait is for (psactl's stats line
  # after the answer gives the time to the first token).
  if ! { [ -t 1 ] && [ -t 2 ]; }; then echo "($PREFILL ...)" >&2; fi
  printf 'A: '
  "$PSACTL" --target="127.0.0.1:$PSA_ROUTER_PORT" --max_tokens=64 \
    generate "$DOCUMENT

$1" 2>&1 | with_prefill_clock
}
if [ $# -gt 0 ]; then
  ask "$1"
else
  ask "In which cabinet is ledger 1629 kept?"
  ask "What colour is the leather binding of ledger 1629?"
fi

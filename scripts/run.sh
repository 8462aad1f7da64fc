#!/usr/bin/env bash
# The main job: installs what is missing, fetches the default model, builds,
# and generates a completion for a prompt, printing tokens/s.
#   scripts/run.sh                      # default question
#   scripts/run.sh "Your question"      # your own prompt
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL="$(scripts/fetch_model.sh)"
scripts/build.sh
PROMPT="${1:-Explain in three sentences why the KV cache dominates long-context decoding.}"
exec build/compute_worker/psa-generate --model "$MODEL" --prompt "$PROMPT" --max_tokens 128

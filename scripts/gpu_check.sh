#!/usr/bin/env bash
# Issue 21's GPU checks in one go, on a GPU machine with nvcc, CMake, ninja
# and PyTorch but none of the project's other dependencies, from a copy of
# the tree plus .gpu_carry/ (scripts/gpu_prepare.sh builds it on the CPU
# machine). Under 8 minutes:
#   1. the device (nvidia-smi, psa_gpu_bench --query);
#   2. the GPU tests: CUDA dense / top-k / PSA against the CPU engine;
#   3. compute-sanitizer memcheck and racecheck on a small case;
#   4. psa_gpu_bench: copy bandwidth, dense decode GB/s, top-k / PSA vs dense;
#   5. PyTorch SDPA: the dense output against it (fp32), its decode timed;
#   6. $OUT/summary.json and summary.md (plus gpu_check.log, bench.json,
#      sdpa.json).
# Without .gpu_carry the benchmark is built here from bench/gpu (CUDA only)
# and the tests are reported as not run. Without a GPU it stops after step 1
# with a message and exit status 2. Exit 0 when every step passed.
#   OUT            output folder (default ./gpu_out)
#   PSA_GPU_QUICK  1: fewer benchmark configurations
# scripts/gpu_check.sh --source-hash prints the hash of the sources the
# carried binaries depend on (gpu_prepare.sh records it).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

source_hash() {
  find compute_worker/model compute_worker/kernels compute_worker/kv compute_worker/attention \
    common/attention_policy.h common/attention_policy.cc tests/gpu bench/gpu -type f \
    \( -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc' \) \
    -print0 2>/dev/null | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
if [[ "${1:-}" == "--source-hash" ]]; then
  source_hash
  exit 0
fi

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/psa-gpu-check.XXXXXX)
STEPS="$TMP/steps.tsv"
LOG="$OUT/gpu_check.log"
: >"$LOG"
START=$(date +%s)
exec > >(tee -a "$LOG") 2>&1

say() { echo "== $(($(date +%s) - START))s: $*"; }
# step NAME STATUS SECONDS NOTE
step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS"; say "$1: $2 ${4:-}"; }
# timed NAME LIMIT_S CMD...: runs CMD under a time limit, records the step.
timed() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  say "$name: $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
  ((rc != 0)) && [[ -z "$note" ]] && note="exit $rc"
  step "$name" "$([[ $rc == 0 ]] && echo pass || echo fail)" "$(($(date +%s) - t0))" "$note"
  return $rc
}
summarize() {
  python3 bench/gpu/summarize.py --steps "$STEPS" --bench "$OUT/bench.json" \
    --bench_md "$TMP/bench.md" --sdpa "$OUT/sdpa.json" --out_json "$OUT/summary.json" \
    --out_md "$OUT/summary.md" >/dev/null
  local rc=$?
  say "summary: $OUT/summary.md (exit $rc)"
  cat "$OUT/summary.md" 2>/dev/null
  return $rc
}
elapsed() { echo $(($(date +%s) - START)); }

# ---- 1. The device and the binaries ----
CARRY=$ROOT/.gpu_carry
BIN=$CARRY/bin
SYSTEM_LD_PATH="${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$CARRY/lib:$CARRY/lib-cxx${SYSTEM_LD_PATH:+:$SYSTEM_LD_PATH}"
if [[ -x "$BIN/psa_cuda_test" ]] && ! "$BIN/psa_cuda_test" --gtest_list_tests >/dev/null; then
  # The carried C++ runtime needs a newer glibc than this machine's: its own.
  say "the carried binaries do not start with the carried libstdc++: trying this machine's"
  export LD_LIBRARY_PATH="$CARRY/lib${SYSTEM_LD_PATH:+:$SYSTEM_LD_PATH}"
fi
if [[ -f "$CARRY/BUILD_INFO" ]]; then
  cat "$CARRY/BUILD_INFO"
  built=$(sed -n 's/^sources: //p' "$CARRY/BUILD_INFO")
  if [[ "$built" != "$(source_hash)" ]]; then
    say "WARNING: .gpu_carry was built from other sources than this tree's: rerun scripts/gpu_prepare.sh"
  fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
BENCH=""
if [[ -x "$BIN/psa_gpu_bench" ]]; then
  "$BIN/psa_gpu_bench" --query
  rc=$?
  if ((rc == 0)); then
    BENCH="$BIN/psa_gpu_bench"
  elif ((rc == 2)); then
    step device fail 0 "no usable CUDA device"
    echo "gpu_check: no usable CUDA device here: run this on a GPU machine" >&2
    summarize
    exit 2
  else
    say "the carried psa_gpu_bench does not start here (exit $rc): building it from bench/gpu"
  fi
fi
if [[ -z "$BENCH" ]]; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    step device fail 0 "no GPU (nvidia-smi finds none)"
    echo "gpu_check: no usable CUDA device here: run this on a GPU machine" >&2
    summarize
    exit 2
  fi
  export PATH="$PATH:/usr/local/cuda/bin"
  timed build_bench 240 bash -c "cmake -S bench/gpu -B '$TMP/build' -G Ninja \
      -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && ninja -C '$TMP/build' psa_gpu_bench" &&
    BENCH="$TMP/build/psa_gpu_bench"
  [[ -n "$BENCH" ]] && "$BENCH" --query
fi
step device pass 0 "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

# ---- 2. GPU tests (a skip means the GPU was not usable: a failure here) ----
if [[ -x "$BIN/psa_cuda_test" ]]; then
  timed gpu_tests 150 bash -c "'$BIN/psa_cuda_test' 2>&1 | tee '$TMP/tests.log'; \
      exit \${PIPESTATUS[0]}" &&
    if grep -q '^\[  SKIPPED \]' "$TMP/tests.log"; then
      step gpu_tests_not_skipped fail 0 "tests skipped on a GPU machine"
    fi
else
  step gpu_tests fail 0 "no .gpu_carry/bin/psa_cuda_test: run scripts/gpu_prepare.sh and carry .gpu_carry"
fi

# ---- 3. compute-sanitizer on a small case ----
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [[ -x "$BIN/psa_cuda_test" && -x "$SAN" ]]; then
  export PSA_GPU_SMALL=1
  timed memcheck 100 "$SAN" --tool memcheck --error-exitcode 1 "$BIN/psa_cuda_test" \
    --gtest_filter='PsaCudaTest.PsaEqualsTheCpuEngine:PsaCudaTest.TopK*:PsaCudaTest.BlockScores*'
  timed racecheck 100 "$SAN" --tool racecheck --error-exitcode 1 "$BIN/psa_cuda_test" \
    --gtest_filter='PsaCudaTest.PsaEqualsTheCpuEngine'
  unset PSA_GPU_SMALL
else
  step sanitizer skip 0 "no compute-sanitizer or no test binary"
fi

# ---- 4. Benchmark ----
CTX="8K,32K,128K" BATCH="1,8,64" SEL_CTX="32K,128K" SEL_BATCH="1,16"
if [[ "${PSA_GPU_QUICK:-0}" == 1 ]]; then
  CTX="8K,32K" BATCH="1,8" SEL_CTX="32K" SEL_BATCH="1"
fi
if [[ -n "$BENCH" ]]; then
  mkdir -p "$TMP/cases"
  timed bench 200 "$BENCH" --contexts="$CTX" --batches="$BATCH" --sel_contexts="$SEL_CTX" \
    --sel_batches="$SEL_BATCH" --json="$OUT/bench.json" --md="$TMP/bench.md" --dump="$TMP/cases"
else
  step bench fail 0 "no benchmark binary"
fi

# ---- 5. PyTorch SDPA: reference and baseline ----
if (($(elapsed) < 400)); then
  timed sdpa 110 python3 bench/gpu/sdpa_check.py --cases "$TMP/cases" --contexts="$CTX" \
    --batches="$BATCH" --out "$OUT/sdpa.json"
else
  step sdpa skip 0 "skipped: $(elapsed)s already spent"
fi

# ---- 6. Summary ----
summarize
rc=$?
say "done in $(elapsed)s"
rm -rf "$TMP"
exit $rc

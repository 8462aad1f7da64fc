#!/usr/bin/env bash
# Builds, on a CPU machine with the project's dependencies and nvcc, what
# scripts/gpu_check.sh runs on a GPU machine that has neither gRPC, Abseil
# nor GoogleTest: the GPU tests (psa_cuda_test, against the CPU engine) and
# the benchmark (psa_gpu_bench), into .gpu_carry/ (git-ignored) with the
# shared libraries they need beside them; only glibc and the GPU driver
# come from the GPU machine. Portable code (-DPSA_NATIVE=OFF: the AVX2
# baseline, not this machine's -march=native). Then carry .gpu_carry with
# the tree (the device tool's carry=[".gpu_carry"]) and run
# scripts/gpu_check.sh there.
#   PSA_BUILD_DIR  build folder (default build-gpu)
#   PSA_JOBS       parallel compile jobs (default: number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${PSA_BUILD_DIR:-build-gpu}"
CARRY=.gpu_carry
MAX_MIB=48  # the tree and the carry travel in 64 MiB

if [[ ! -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  echo "gpu_prepare: no nvcc here: the CUDA targets cannot be built" >&2
  exit 2
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPSA_NATIVE=OFF >/dev/null
ninja -C "$BUILD" -j "${PSA_JOBS:-$(nproc)}" psa_cuda_test psa_gpu_bench

rm -rf "$CARRY"
mkdir -p "$CARRY/bin" "$CARRY/lib" "$CARRY/lib-cxx"
cp "$BUILD/tests/gpu/psa_cuda_test" "$BUILD/bench/gpu/psa_gpu_bench" "$CARRY/bin/"
strip --strip-unneeded "$CARRY/bin/"*
# Every shared library but glibc's, the loader and the driver; the C++
# runtime apart (lib-cxx: it needs a newer glibc than the rest, and
# gpu_check.sh falls back to the GPU machine's own where it does not load).
for lib in $(ldd "$CARRY/bin/"* | awk '/=>/ && $3 ~ /^\// {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | libcuda.so*) ;;
    libstdc++.so* | libgcc_s.so*) cp -L "$lib" "$CARRY/lib-cxx/" ;;
    *) cp -L "$lib" "$CARRY/lib/" ;;
  esac
done
# What the GPU machine must have.
newest_glibc() { objdump -T "$@" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1; }
glibc="$(newest_glibc "$CARRY/bin/"* "$CARRY/lib/"*) (with lib-cxx: $(newest_glibc "$CARRY/lib-cxx/"*))"
# The sources the carried binaries were built from (gpu_check.sh warns when
# the tree it runs in differs).
source_hash=$(scripts/gpu_check.sh --source-hash)
cat >"$CARRY/BUILD_INFO" <<EOF
built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)
needs: ${glibc:-unknown glibc} or newer, an NVIDIA driver for CUDA $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || echo '?')
sources: $source_hash
EOF
size_mib=$(du -sm "$CARRY" | cut -f1)
cat "$CARRY/BUILD_INFO"
echo "gpu_prepare: $CARRY is ${size_mib} MiB ($(find "$CARRY/lib" -type f | wc -l) libraries)"
if ((size_mib > MAX_MIB)); then
  echo "gpu_prepare: $CARRY is over ${MAX_MIB} MiB: it would not travel with the tree" >&2
  exit 1
fi

// The fiber scheduler behind cuda_emulation.h, and the few CUDA runtime
// calls the GPU tests make, on host memory.
#include "tests/gpu/emulation/cuda_emulation.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace psa_emu {
namespace {

constexpr size_t kStackBytes = 256 << 10;

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  bool done = false;
};

struct Warp {
  int arrived = 0;
  unsigned gen = 0;
  uint64_t slot[2][32];
};

// The CTA being run.
struct Cta {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t main;
  int current = 0;
  int alive = 0;
  int arrived = 0;  // at __syncthreads
  unsigned gen = 0;
  uint64_t events = 0;  // arrivals, releases, exits: a round without any is a deadlock
  const std::function<void()>* body = nullptr;
};

Cta* g_cta = nullptr;
uint3 g_block_idx;
std::vector<std::unique_ptr<char[]>> g_stacks;

void Yield() { swapcontext(&g_cta->fibers[g_cta->current].ctx, &g_cta->main); }

void Entry() {
  (*g_cta->body)();
  Cta& c = *g_cta;
  c.fibers[c.current].done = true;
  --c.alive;
  ++c.events;
  // Threads that exit count as arrived at the CTA's barrier.
  if (c.arrived > 0 && c.arrived == c.alive) {
    c.arrived = 0;
    ++c.gen;
  }
}  // returns to c.main (uc_link)

}  // namespace

const uint3& ThreadIdx() { return g_cta->fibers[g_cta->current].tid; }
const uint3& BlockIdx() { return g_block_idx; }

void SyncThreads() {
  Cta& c = *g_cta;
  const unsigned gen = c.gen;
  ++c.events;
  if (++c.arrived == c.alive) {
    c.arrived = 0;
    ++c.gen;
    return;
  }
  while (c.gen == gen) Yield();
}

uint64_t ShuffleXor(uint64_t bits, int lane_mask) {
  Cta& c = *g_cta;
  const int t = c.current;
  Warp& w = c.warps[t / 32];
  const int lane = t % 32;
  const unsigned gen = w.gen;
  w.slot[gen & 1][lane] = bits;  // two buffers: a fast lane writes the next one
  ++c.events;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
  } else {
    while (w.gen == gen) Yield();
  }
  return w.slot[gen & 1][lane ^ lane_mask];
}

void Launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n % 32 != 0) {
    std::fprintf(stderr, "cuda emulation: CTAs of whole warps only (%d threads)\n", n);
    std::abort();
  }
  while (static_cast<int>(g_stacks.size()) < n) g_stacks.emplace_back(new char[kStackBytes]);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        Cta c;
        c.fibers.resize(n);
        c.warps.resize(n / 32);
        c.alive = n;
        c.body = &body;
        g_cta = &c;
        for (int i = 0; i < n; ++i) {
          Fiber& f = c.fibers[i];
          f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = g_stacks[i].get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &c.main;
          makecontext(&f.ctx, Entry, 0);
        }
        while (c.alive > 0) {
          const uint64_t before = c.events;
          for (int i = 0; i < n; ++i) {
            if (c.fibers[i].done) continue;
            c.current = i;
            swapcontext(&c.main, &c.fibers[i].ctx);
          }
          if (c.events == before && c.alive > 0) {
            std::fprintf(stderr, "cuda emulation: deadlock in CTA (%u, %u, %u)\n", x, y, z);
            std::abort();
          }
        }
        g_cta = nullptr;
      }
    }
  }
}

}  // namespace psa_emu

// The CUDA runtime calls of the tests, on host memory.
extern "C" {

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *p != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// Host memory is device memory here: a mapped page's device address is its own.
cudaError_t cudaHostGetDevicePointer(void** dev, void* host, unsigned int) {
  *dev = host;
  return cudaSuccess;
}
cudaError_t cudaHostRegister(void*, size_t, unsigned int) { return cudaSuccess; }
cudaError_t cudaHostUnregister(void*) { return cudaSuccess; }
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error (cuda emulation)" : "error (cuda emulation)";
}

}  // extern "C"

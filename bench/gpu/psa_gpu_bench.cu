// psa_gpu_bench: the CUDA decode kernels (compute_worker/attention/cuda/)
// on a GPU, ratios against baselines measured in the same run.
//  - copy: a device-to-device cudaMemcpy (GB/s counting bytes read and
//    written), the bandwidth ceiling;
//  - dense: paged decode, GB/s of KV read, in SmolLM2-135M's attention
//    shape (9 query / 3 KV heads, dim 64) and Llama-3.1-8B's (32 / 8 / 128),
//    contexts x batches (each timed run after an L2 flush, median);
//  - selection: on synthetic peaked keys (a fraction of blocks aligned with
//    the query), top-k at 5 / 10 / 20% of the blocks and PSA (eps 0.9) on
//    data whose mass sits in about that share, against dense on the same
//    batch: step times and the share the block scores take. The order
//    comes from the host (sorted outside the timing: no device ordering
//    yet).
// --dump=DIR writes small cases (q, K, V contiguous, the kernel's output)
// for bench/gpu/sdpa_check.py to compare with PyTorch. --query prints the
// device and exits (2 without one). Needs only CUDA: bench/gpu/CMakeLists.txt
// also builds it standalone.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "compute_worker/attention/cuda/page_pool.h"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"

namespace {

using psa::cuda::DecodeMode;

#define CK(x)                                                                            \
  do {                                                                                   \
    const cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(3);                                                                      \
    }                                                                                    \
  } while (0)

struct ModelShape {
  const char* name;
  int n_head, n_head_kv, head_dim;
};
const ModelShape kShapes[] = {{"smollm2", 9, 3, 64}, {"llama31_8b", 32, 8, 128}};

struct Options {
  std::vector<int> contexts = {8192, 32768, 131072};
  std::vector<int> batches = {1, 8, 64};
  std::vector<int> sel_contexts = {32768, 131072};
  std::vector<int> sel_batches = {1, 16};
  std::string json = "gpu_bench.json", md = "gpu_bench.md", dump;
  int iters = 10;
  bool query = false;
};

std::vector<int> ParseInts(const std::string& s) {
  std::vector<int> v;
  size_t at = 0;
  while (at < s.size()) {
    const size_t comma = s.find(',', at);
    const std::string item = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    int x = std::atoi(item.c_str());
    if (!item.empty() && (item.back() == 'K' || item.back() == 'k')) x *= 1024;
    v.push_back(x);
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return v;
}

// ---- Synthetic data ----

__device__ __forceinline__ uint32_t Mix(uint32_t a, uint32_t b) {
  uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u + (a << 6) + (a >> 2));
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
__device__ __forceinline__ float Normal(uint32_t a, uint32_t b) {
  const uint32_t h1 = Mix(a, b), h2 = Mix(h1, b ^ 0x68E31DA4u);
  const float u1 = (static_cast<float>(h1 >> 8) + 1.0f) * (1.0f / 16777217.0f);
  const float u2 = static_cast<float>(h2 >> 8) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// Logical page L = (s * n_head_kv + h) * max_blocks + b: keys N(0, 1),
// plus the (s, h) direction on hot pages (a hot_per_million share); values
// N(0, 1).
__global__ void FillPages(uint16_t* const* pages, size_t n_pages, int max_blocks, int d,
                          uint32_t hot_per_million, uint32_t seed) {
  const int elems = 2 * psa::cuda::kPageRows * d;
  for (size_t L = blockIdx.x; L < n_pages; L += gridDim.x) {
    const uint32_t sh = static_cast<uint32_t>(L / max_blocks);
    const bool hot = Mix(static_cast<uint32_t>(L), seed) % 1000000u < hot_per_million;
    __half* page = reinterpret_cast<__half*>(pages[L]);
    for (int e = threadIdx.x; e < elems; e += blockDim.x) {
      float x = Normal(static_cast<uint32_t>(L) * 8191u + e, seed);
      if (hot && e < elems / 2) x += Normal(sh * 131u + e % d, seed ^ 0xABCDu);
      page[e] = __float2half_rn(x);
    }
  }
}

// q[s][head][i] = the (s, head's KV head) direction + 0.5 N(0, 1).
__global__ void FillQueries(float* q, int n_seq, int n_head, int n_head_kv, int d, uint32_t seed) {
  const int group = n_head / n_head_kv;
  const size_t n = static_cast<size_t>(n_seq) * n_head * d;
  for (size_t x = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(x % d);
    const size_t head = x / d;
    const uint32_t sh = static_cast<uint32_t>((head / n_head) * n_head_kv + (head % n_head) / group);
    q[x] = Normal(sh * 131u + i, seed ^ 0xABCDu) + 0.5f * Normal(static_cast<uint32_t>(x), seed ^ 0x1234u);
  }
}

// ---- One model shape's pool: the largest batch x context of the run ----

struct Pool {
  ModelShape shape;
  int max_seq = 0, max_blocks = 0;
  size_t n_pages = 0, page_elems = 0;
  uint16_t* mem = nullptr;
  uint16_t** pages = nullptr;  // [logical page]
  uint16_t *kmax = nullptr, *kmin = nullptr, *kmean = nullptr;
  int* table = nullptr;  // [s * n_head_kv + h] = (s * n_head_kv + h) * max_blocks
  int* seq_len = nullptr;
  float* q = nullptr;

  Pool(const ModelShape& m, int seqs, int max_ctx) : shape(m), max_seq(seqs) {
    max_blocks = (max_ctx + psa::cuda::kPageRows - 1) / psa::cuda::kPageRows;
    n_pages = static_cast<size_t>(seqs) * m.n_head_kv * max_blocks;
    page_elems = static_cast<size_t>(2) * psa::cuda::kPageRows * m.head_dim;
    CK(cudaMalloc(&mem, n_pages * page_elems * sizeof(uint16_t)));
    CK(cudaMalloc(&kmax, n_pages * m.head_dim * sizeof(uint16_t)));
    CK(cudaMalloc(&kmin, n_pages * m.head_dim * sizeof(uint16_t)));
    CK(cudaMalloc(&kmean, n_pages * m.head_dim * sizeof(uint16_t)));
    // Pages scattered over the pool, as a block pool would hold them.
    std::vector<uint32_t> perm(n_pages);
    std::iota(perm.begin(), perm.end(), 0u);
    std::shuffle(perm.begin(), perm.end(), std::mt19937(17));
    std::vector<uint16_t*> ptrs(n_pages);
    for (size_t i = 0; i < n_pages; ++i) ptrs[i] = mem + perm[i] * page_elems;
    CK(cudaMalloc(&pages, n_pages * sizeof(uint16_t*)));
    CK(cudaMemcpy(pages, ptrs.data(), n_pages * sizeof(uint16_t*), cudaMemcpyHostToDevice));
    std::vector<int> t(static_cast<size_t>(seqs) * m.n_head_kv);
    for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int>(i) * max_blocks;
    CK(cudaMalloc(&table, t.size() * sizeof(int)));
    CK(cudaMemcpy(table, t.data(), t.size() * sizeof(int), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&seq_len, seqs * sizeof(int)));
    CK(cudaMalloc(&q, static_cast<size_t>(seqs) * m.n_head * m.head_dim * sizeof(float)));
  }
  ~Pool() {
    for (void* p : {static_cast<void*>(mem), static_cast<void*>(kmax), static_cast<void*>(kmin),
                    static_cast<void*>(kmean), static_cast<void*>(pages), static_cast<void*>(table),
                    static_cast<void*>(seq_len), static_cast<void*>(q)}) {
      cudaFree(p);
    }
  }
  // Fresh data: a hot share of pages, then the metadata of every block.
  void Fill(double hot_share, uint32_t seed) {
    FillPages<<<65536, 256>>>(pages, n_pages, max_blocks, shape.head_dim,
                              static_cast<uint32_t>(hot_share * 1e6), seed);
    CK(cudaGetLastError());
    FillQueries<<<1024, 256>>>(q, max_seq, shape.n_head, shape.n_head_kv, shape.head_dim, seed);
    CK(cudaGetLastError());
    SetBatch(max_seq, max_blocks * psa::cuda::kPageRows);
    CK(psa::cuda::RunBlockMetadata(View(max_seq), max_blocks, kmax, kmin, kmean, nullptr));
    CK(cudaDeviceSynchronize());
  }
  // The first n_seq sequences, each `ctx` positions long.
  void SetBatch(int n_seq, int ctx) {
    std::vector<int> len(n_seq, ctx);
    CK(cudaMemcpy(seq_len, len.data(), n_seq * sizeof(int), cudaMemcpyHostToDevice));
  }
  psa::cuda::PagedKv View(int n_seq) const {
    psa::cuda::PagedKv v;
    v.n_seq = n_seq;
    v.n_head_kv = shape.n_head_kv;
    v.head_dim = shape.head_dim;
    v.pages = pages;
    v.table = table;
    v.seq_len = seq_len;
    v.kmax = kmax;
    v.kmin = kmin;
    v.kmean = kmean;
    return v;
  }
};

// ---- Timing ----

struct Timer {
  cudaEvent_t a, b;
  void* flush = nullptr;
  static constexpr size_t kFlushBytes = 256 << 20;  // > L2
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    CK(cudaMalloc(&flush, kFlushBytes));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaFree(flush);
  }
  // Median ms of fn() over `iters` runs, each after an L2 flush.
  template <typename F>
  double Median(int iters, F&& fn) {
    fn();  // warm-up
    CK(cudaDeviceSynchronize());
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      CK(cudaMemsetAsync(flush, i, kFlushBytes));
      CK(cudaEventRecord(a));
      fn();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float t = 0;
      CK(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

double CopyGbps(Timer& timer) {
  const size_t bytes = size_t{1} << 31;
  void *src = nullptr, *dst = nullptr;
  CK(cudaMalloc(&src, bytes));
  CK(cudaMalloc(&dst, bytes));
  CK(cudaMemset(src, 1, bytes));
  const double ms = timer.Median(10, [&] { CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * bytes / (ms * 1e6);  // read + written
}

int SmCount() {
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

struct Buffers {  // outputs of one decode step
  float *out = nullptr, *captured = nullptr;
  int *blocks = nullptr, *iterations = nullptr;
  void* workspace = nullptr;
  size_t ws_bytes = 0;
  explicit Buffers(size_t heads, int d) {
    CK(cudaMalloc(&out, heads * d * sizeof(float)));
    CK(cudaMalloc(&captured, heads * sizeof(float)));
    CK(cudaMalloc(&blocks, heads * sizeof(int)));
    CK(cudaMalloc(&iterations, heads * sizeof(int)));
  }
  ~Buffers() {
    cudaFree(out);
    cudaFree(captured);
    cudaFree(blocks);
    cudaFree(iterations);
    cudaFree(workspace);
  }
  void Reserve(size_t bytes) {
    if (bytes <= ws_bytes) return;
    cudaFree(workspace);
    CK(cudaMalloc(&workspace, bytes));
    ws_bytes = bytes;
  }
  psa::cuda::DecodeOutputs Outputs() const {
    psa::cuda::DecodeOutputs o;
    o.out = out;
    o.blocks = blocks;
    o.iterations = iterations;
    o.captured = captured;
    return o;
  }
};

std::string g_json;  // records, comma-separated
void Record(const std::string& r) { g_json += (g_json.empty() ? "\n  " : ",\n  ") + r; }
std::string Fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

}  // namespace

#include "bench/gpu/psa_gpu_bench_runs.inc"

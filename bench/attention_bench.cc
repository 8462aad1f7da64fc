// attention_bench: decode-attention kernels, on one thread or (--threads T)
// as a decode step of T sequences on T threads, every KV head a task as the
// worker schedules them.
//   - dense: GB/s of fp16 KV read, against the read bandwidth of as many
//     cores measured in the same run, with the two limits it sits between:
//     the same pages read with no arithmetic (memory alone), and the kernel
//     on one core on a KV that stays in the caches (arithmetic alone);
//   - topk and psa: time per step against dense at the same context, and
//     PSA's selection overhead (block scoring, ranking, bookkeeping) as a
//     share of its step, measured as the step time of a PSA selection
//     that scores and ranks every block, attends one and stops.
// The cache has SmolLM2's attention shape (3 KV heads, 3 query heads each,
// head dim 64) and a "peaked" key distribution: a few hot blocks that a
// query aligns with, so the sparse policies have something to find.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/flags_main.h"
#include "compute_worker/model/ggml_types.h"
#include "compute_worker/kernels/fp16_kernels.h"
#include "compute_worker/kv/page_slab.h"
#include "compute_worker/attention/sparse_attention.h"

ABSL_FLAG(std::string, contexts, "8192,16384,32768,65536,131072", "Context lengths.");
ABSL_FLAG(int, reps, 5, "Timed repetitions; the fastest is reported.");
ABSL_FLAG(double, hot_fraction, 0.03, "Fraction of blocks the query aligns with.");
ABSL_FLAG(double, epsilon, 0.95, "PSA epsilon.");
ABSL_FLAG(std::string, rank, "",
          "How top-k and PSA rank blocks: estimate or bound (Quest's); empty: the "
          "policies' default (the estimate).");
ABSL_FLAG(int, top_k, 0, "Top-k budget in blocks (0: PSA's mean budget, for equal KV).");
ABSL_FLAG(std::string, shape, "smollm2",
          "Attention shape of one layer: smollm2 (3 KV heads, groups of 3, head dim 64) or "
          "qwen2.5-1.5b (2 KV heads, groups of 6, head dim 128).");
ABSL_FLAG(int, threads, 1,
          "Threads: a decode step of this many sequences (copies of one cache), measured "
          "against the read bandwidth of as many cores (0: every core).");

namespace psa {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kBlock = 16;
// The layer's shape (--shape), set once in main.
int kKvHeads = 3, kGroup = 3, kDim = 64;

// Best-of-reps seconds of fn().
template <typename Fn>
double Time(int reps, Fn fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

// Seconds to read floats [buf, buf + n) once on `threads` cores, each
// summing its share.
double TimeRead(const float* buf, size_t n, int threads) {
  volatile float sink = 0;
  const double s = Time(1, [&] {
#pragma omp parallel num_threads(threads)
    {
      const size_t per = n / omp_get_num_threads() / 16 * 16;
      const float* mine = buf + omp_get_thread_num() * per;
      float acc[16] = {};
      for (size_t i = 0; i < per; i += 16) {
#pragma omp simd
        for (int k = 0; k < 16; ++k) acc[k] += mine[i + k];
      }
      float t = 0;
      for (float a : acc) t += a;
      sink = t;
    }
  });
  (void)sink;
  return s;
}

// Seconds to read (layer 0 of) kv's pages in the dense kernel's order, with
// no arithmetic: per head the key halves, then the value halves, one load a
// cache line, prefetching 32 blocks ahead as the kernel does (the whole
// page in the key pass, the value half in the value pass).
double TimePagePattern(const KvCache& kv) {
  const int blocks = kv.length() / kv.block_size();
  const size_t half = kv.page_bytes() / 2;
  volatile uint64_t sink = 0;
  const double s = Time(1, [&] {
    uint64_t acc = 0;
    for (int h = 0; h < kv.n_head_kv(); ++h) {
      for (int part = 0; part < 2; ++part) {
        for (int b = 0; b < blocks; ++b) {
          const auto* p = reinterpret_cast<const uint64_t*>(
              reinterpret_cast<const char*>(kv.Page(0, h, b)) + part * half);
          if (b + 32 < blocks) {
            const char* ahead = reinterpret_cast<const char*>(kv.Page(0, h, b + 32));
            if (part == 0) {
              PrefetchBytes<2>(ahead, kv.page_bytes());
            } else {
              PrefetchBytes<2>(ahead + half, half);
            }
          }
          for (size_t i = 0; i < half / sizeof(uint64_t); i += 8) acc |= p[i];  // a load a line
        }
      }
    }
    sink = acc;
  });
  (void)sink;
  return s;
}

KvCache PeakedCache(int length, double hot_fraction, const std::vector<float>& dir) {
  KvCache kv(1, kKvHeads, kDim, kBlock);
  kv.Reserve(length);
  std::mt19937 rng(42);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int blocks = length / kBlock;
  std::vector<bool> hot(blocks);
  for (int b = 0; b < blocks; ++b) hot[b] = u(rng) < hot_fraction;
  for (int h = 0; h < kKvHeads; ++h) {
    for (int t = 0; t < length; ++t) {
      for (int i = 0; i < kDim; ++i) {
        kv.KeySlot(0, h, t)[i] = Fp32ToFp16(n(rng) + (hot[t / kBlock] ? 8.0f * dir[i] : 0.0f));
        kv.ValueSlot(0, h, t)[i] = Fp32ToFp16(n(rng));
      }
    }
  }
  kv.Commit(length);
  return kv;
}

}  // namespace
}  // namespace psa

int main(int argc, char** argv) {
  using namespace psa;
  psa::ParseFlags(
      argc, argv,
      "Decode-attention kernel benchmark: one thread, or a step of --threads sequences.");
  const std::string shape_name = absl::GetFlag(FLAGS_shape);
  if (shape_name == "qwen2.5-1.5b") {
    kKvHeads = 2, kGroup = 6, kDim = 128;
  } else if (shape_name != "smollm2") {
    std::fprintf(stderr, "error: --shape must be smollm2 or qwen2.5-1.5b, not '%s'\n",
                 shape_name.c_str());
    return 2;
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  const int threads =
      absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads) : omp_get_num_procs();
  std::vector<int> contexts;
  for (absl::string_view c : absl::StrSplit(absl::GetFlag(FLAGS_contexts), ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(c, &v) || v < 256) {
      std::fprintf(stderr, "error: bad --contexts entry\n");
      return 2;
    }
    contexts.push_back(v / kBlock * kBlock);
  }
  // Read bandwidth of `threads` cores, measured next to each dense timing
  // (best of the same repetitions) since the machine's speed drifts.
  // In huge pages, as the KV cache's pages are.
  const size_t bw_floats = (size_t{512} << 20) / sizeof(float);
  const PageSlab bw_slab = AllocatePageSlab(bw_floats * sizeof(float));
  float* const bw_buf = reinterpret_cast<float*>(bw_slab.get());
  std::fill(bw_buf, bw_buf + bw_floats, 1.0f);

  std::vector<float> dir(kDim);
  for (int i = 0; i < kDim; ++i) dir[i] = (i % 3 ? 1.0f : -1.0f) / 8.0f;
  const AttentionShape shape{kKvHeads * kGroup, kKvHeads, kDim,
                             1.0f / std::sqrt(static_cast<float>(kDim))};
  std::vector<float> q(kGroup * kDim);
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 0.3f);
  for (int g = 0; g < kGroup; ++g)
    for (int i = 0; i < kDim; ++i) q[g * kDim + i] = 8.0f * dir[i] + n(rng);
  // One decode step of every KV head of every cache in `batch`, each (cache,
  // head) a task on `nt` threads; *frac: the share of blocks read.
  auto run_batch = [&](const std::vector<KvCache*>& batch, const AttentionBackend& b,
                       int nt, double* frac) {
    const int tasks = static_cast<int>(batch.size()) * kKvHeads;
    std::vector<float> out(static_cast<size_t>(tasks) * kGroup * kDim);
    std::vector<HeadStepStats> stats(static_cast<size_t>(tasks) * kGroup);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int i = 0; i < tasks; ++i) {
      KvCache& kv = *batch[i / kKvHeads];
      AttentionTask t;
      t.kv = &kv;
      t.kv_head = i % kKvHeads;
      t.q_pos0 = kv.length() - 1;
      t.n_q = 1;
      t.q = q.data();
      t.q_stride = kGroup * kDim;
      t.out = &out[static_cast<size_t>(i) * kGroup * kDim];
      t.out_stride = kGroup * kDim;
      t.stats = &stats[static_cast<size_t>(i) * kGroup];
      b.Run(shape, t);
    }
    int touched = 0, total = 0;
    for (const HeadStepStats& s : stats) {
      touched += s.blocks_touched;
      total += s.blocks_total;
    }
    if (frac) *frac = static_cast<double>(touched) / total;
  };
  auto run_step = [&](KvCache& kv, const AttentionBackend& b, double* frac) {
    run_batch({&kv}, b, 1, frac);
  };
  {
    // The arithmetic alone: a 1K-token cache (768 KiB) stays in L2 when
    // stepped over and over.
    KvCache kv = PeakedCache(1024, absl::GetFlag(FLAGS_hot_fraction), dir);
    const DenseAttention dense;
    const int inner = 200;
    const double t = Time(reps, [&] {
      for (int i = 0; i < inner; ++i) run_step(kv, dense, nullptr);
    }) / inner;
    std::printf("dense on a cache-resident KV (1024 tokens, stepped %d times): %.2f GB/s\n", inner,
                2.0 * kKvHeads * 1024 * kDim * sizeof(uint16_t) / t / 1e9);
  }
  if (threads > 1) {
    std::printf("a step of %d sequences on %d threads (bw: %d cores reading)\n", threads, threads,
                threads);
  }
  std::printf("%8s %10s %8s %8s %7s %9s | %10s %8s %8s | %10s %8s %8s %9s\n", "context", "dense ms",
              "GB/s", "bw GB/s", "of bw", "pages GB/s", "topk ms", "vs dense", "KV frac", "psa ms",
              "vs dense", "KV frac", "overhead");

  const std::string rank_flag = absl::GetFlag(FLAGS_rank);
  const absl::StatusOr<AttentionPolicy::Rank> ranked =
      rank_flag.empty() ? AttentionPolicy{}.rank
                        : AttentionPolicy::ParseRank(rank_flag);
  if (!ranked.ok()) {
    std::fprintf(stderr, "--rank: %s\n", std::string(ranked.status().message()).c_str());
    return 1;
  }
  const AttentionPolicy::Rank rank = *ranked;
  for (int ctx : contexts) {
    // The batch: the cache and threads - 1 copies of it (same content,
    // other memory: every thread reads its own sequence from memory).
    KvCache kv = PeakedCache(ctx, absl::GetFlag(FLAGS_hot_fraction), dir);
    std::vector<KvCache> copies(threads - 1, kv);
    std::vector<KvCache*> batch = {&kv};
    for (KvCache& c : copies) batch.push_back(&c);
    auto step = [&](const AttentionBackend& b, double* frac) {
      run_batch(batch, b, threads, frac);
    };
    DenseAttention dense;
    AttentionPolicy pp;
    pp.kind = AttentionPolicy::Kind::kPsa;
    pp.rank = rank;
    pp.epsilon = static_cast<float>(absl::GetFlag(FLAGS_epsilon));
    SparseAttention psa(pp);
    double psa_frac = 0;
    step(psa, &psa_frac);
    AttentionPolicy tp;
    tp.kind = AttentionPolicy::Kind::kTopK;
    tp.rank = rank;
    tp.top_k = absl::GetFlag(FLAGS_top_k) > 0
                   ? absl::GetFlag(FLAGS_top_k)
                   : std::max(3, static_cast<int>(std::lround(psa_frac * ctx / kBlock)));
    SparseAttention topk(tp);
    // PSA's selection alone: scoring, stop weights and ranking for every
    // block, then one block attended before a stop at a tiny epsilon; no
    // sink or newest blocks (those are attention, not selection).
    AttentionPolicy select_only = pp;
    select_only.epsilon = 1e-6f;
    select_only.group_blocks = 1;
    select_only.min_blocks = 0;
    select_only.sink_blocks = select_only.local_blocks = 0;
    SparseAttention selection(select_only);

    double td = 1e30, tbw = 1e30, tpages = 1e30;
    for (int r = 0; r < reps; ++r) {  // interleaved: all see the same machine, each after a sweep
      tbw = std::min(tbw, TimeRead(bw_buf, bw_floats, threads));
      td = std::min(td, Time(1, [&] { step(dense, nullptr); }));
      tbw = std::min(tbw, TimeRead(bw_buf, bw_floats, threads));
      tpages = std::min(tpages, Time(1, [&] {
#pragma omp parallel for num_threads(threads)
        for (int i = 0; i < threads; ++i) TimePagePattern(*batch[i]);
      }));
    }
    const double bandwidth = bw_floats * sizeof(float) / tbw;
    double topk_frac = 0;
    step(topk, &topk_frac);
    const double tt = Time(reps, [&] { step(topk, nullptr); });
    const double tp_ = Time(reps, [&] { step(psa, nullptr); });
    const double ts = Time(reps, [&] { step(selection, nullptr); });
    const double bytes = 2.0 * threads * kKvHeads * ctx * kDim * sizeof(uint16_t);
    std::printf("%8d %10.3f %8.2f %8.2f %6.0f%% %10.2f | %10.3f %8.3f %8.3f | %10.3f %8.3f %8.3f %8.0f%%\n",
                ctx, td * 1e3, bytes / td / 1e9, bandwidth / 1e9, 100 * bytes / td / bandwidth,
                bytes / tpages / 1e9, tt * 1e3, tt / td, topk_frac, tp_ * 1e3, tp_ / td, psa_frac,
                100 * std::min(1.0, ts / tp_));
  }
  return 0;
}

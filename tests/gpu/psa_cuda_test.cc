// The CUDA decode kernels (compute_worker/attention/cuda/) against the CPU
// engine on the same KV: dense against DenseAttention and a full-budget
// top-k, top-k and PSA against SparseAttention given the CPU engine's own
// block order and stop scores; the block scores against psa_math.h. Every
// test that needs a GPU skips, saying so, where there is none (ctest label
// `gpu`); the plan tests run anywhere. psa_cuda_emulated_test runs the same
// tests on the CPU, the kernels' sources under tests/gpu/emulation/.
//
// Tolerances: the GPU and the CPU sparse engine compute the same fp32
// online softmax over the same blocks, summed in another order and with
// expf for the CPU's polynomial exp: outputs within 1e-4 relative L2 per
// head (observed far below). DenseAttention rounds probabilities to fp16
// (llama.cpp parity): within 2e-3. Blocks attended equal, except where the
// CPU's captured mass sits within 1e-4 of epsilon (a rounding can flip
// that stop by an iteration).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/attention/cuda/page_pool.h"
#include "compute_worker/attention/cuda/psa_cuda.h"
#include "compute_worker/attention/psa_math.h"
#include "compute_worker/attention/rank_scores.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/model/ggml_types.h"
#include "tests/gpu/gpu_testing.h"

namespace psa {
namespace {

using gpu_testing::Batch;
using gpu_testing::CpuDecode;
using gpu_testing::CpuSelection;
using gpu_testing::DeviceBatch;
using gpu_testing::GpuDecode;
using gpu_testing::HeadRelErr;
using gpu_testing::HostCandidates;
using gpu_testing::Result;
using gpu_testing::Shape;

constexpr double kSameMath = 1e-4;
constexpr double kSameAsDense = 2e-3;
// Mixed lengths in one batch: one-block sequences, full and partial tails,
// long enough for PSA to stop early (250 blocks; 63 under the CPU
// emulation, which runs every GPU thread as a fiber, and with
// PSA_GPU_SMALL=1, for compute-sanitizer).
std::vector<int> Lengths() {
#if defined(PSA_CUDA_EMULATION)
  const bool small = true;
#else
  const bool small = std::getenv("PSA_GPU_SMALL") != nullptr;
#endif
  if (small) return {5, 16, 37, 1000};
  return {5, 16, 37, 1000, 4000};
}
const std::vector<int> kLengths = Lengths();

std::vector<Shape> Shapes() {
  // compute-sanitizer (PSA_GPU_SMALL=1): one shape per head dim.
  if (std::getenv("PSA_GPU_SMALL") != nullptr) return {Shape{2, 3, 64}, Shape{2, 4, 128}};
  std::vector<Shape> shapes;
  for (int d : {64, 128}) {
    for (int group : {1, 3, 4}) shapes.push_back(Shape{2, group, d});
  }
  return shapes;
}

std::string Name(const Shape& s) {
  return "head_dim " + std::to_string(s.head_dim) + ", group " + std::to_string(s.group);
}

AttentionPolicy Policy(AttentionPolicy::Kind kind) {
  AttentionPolicy p;
  p.kind = kind;
  return p;
}

TEST(PsaCudaTest, DenseEqualsTheCpuEngine) {
  PSA_SKIP_WITHOUT_GPU();
  AttentionPolicy every = Policy(AttentionPolicy::Kind::kTopK);
  every.top_k = 1 << 20;
  const SparseAttention all(every);
  const DenseAttention dense;
  for (const Shape& shape : Shapes()) {
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 1);
    const DeviceBatch dev = gpu_testing::Upload(b);
    const Result exact = CpuDecode(all, b), llama = CpuDecode(dense, b);
    for (int sm_count : {0, 132}) {  // one CTA per (sequence, KV head); split-KV
      const Result gpu = GpuDecode(cuda::DecodeMode::kDense, AttentionPolicy{}, b, dev, nullptr,
                                   sm_count);
      for (size_t x = 0; x < gpu.blocks.size(); ++x) {
        SCOPED_TRACE(Name(shape) + ", sm_count " + std::to_string(sm_count) + ", head " +
                     std::to_string(x));
        EXPECT_LT(HeadRelErr(gpu, exact, x, shape.head_dim), kSameMath);
        EXPECT_LT(HeadRelErr(gpu, llama, x, shape.head_dim), kSameAsDense);
        EXPECT_EQ(gpu.blocks[x], llama.blocks[x]);
        EXPECT_EQ(gpu.captured[x], 1.0f);
      }
    }
  }
}

TEST(PsaCudaTest, TopKEqualsTheCpuEngine) {
  PSA_SKIP_WITHOUT_GPU();
  for (const Shape& shape : Shapes()) {
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 2);
    const DeviceBatch dev = gpu_testing::Upload(b);
    for (int k : {1, 4, 24}) {
      AttentionPolicy p = Policy(AttentionPolicy::Kind::kTopK);
      p.top_k = k;
      const HostCandidates cand = CpuSelection(b, p);
      const Result cpu = CpuDecode(SparseAttention(p), b);
      const Result gpu = GpuDecode(cuda::DecodeMode::kTopK, p, b, dev, &cand, 0);
      for (size_t x = 0; x < gpu.blocks.size(); ++x) {
        SCOPED_TRACE(Name(shape) + ", k " + std::to_string(k) + ", head " + std::to_string(x));
        EXPECT_LT(HeadRelErr(gpu, cpu, x, shape.head_dim), kSameMath);
        EXPECT_EQ(gpu.blocks[x], cpu.blocks[x]);
        EXPECT_EQ(gpu.iterations[x], cpu.iterations[x]);
        EXPECT_EQ(gpu.captured[x], cpu.captured[x]);
      }
    }
  }
}

TEST(PsaCudaTest, PsaEqualsTheCpuEngine) {
  PSA_SKIP_WITHOUT_GPU();
  struct Case {
    float eps;
    bool certified, share_reads;
    int min_blocks;
  };
  const Case cases[] = {{0.9f, false, true, 24}, {0.9f, false, true, 0}, {0.99f, false, false, 0},
                        {0.9f, true, true, 0},   {0.8f, true, false, 8}, {1.0f, false, true, 0}};
  int stopped_early = 0;
  for (const Shape& shape : Shapes()) {
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 3);
    const DeviceBatch dev = gpu_testing::Upload(b);
    for (const Case& c : cases) {
      AttentionPolicy p = Policy(AttentionPolicy::Kind::kPsa);
      p.epsilon = c.eps;
      p.certified = c.certified;
      p.share_reads = c.share_reads;
      p.min_blocks = c.min_blocks;
      const HostCandidates cand = CpuSelection(b, p);
      const Result cpu = CpuDecode(SparseAttention(p), b);
      const Result gpu = GpuDecode(cuda::DecodeMode::kPsa, p, b, dev, &cand, 0);
      for (size_t x = 0; x < gpu.blocks.size(); ++x) {
        SCOPED_TRACE(Name(shape) + ", " + p.ToString() + ", head " + std::to_string(x));
        if (std::fabs(cpu.captured[x] - c.eps) < 1e-4) continue;  // a rounding may flip it
        EXPECT_EQ(gpu.blocks[x], cpu.blocks[x]);
        EXPECT_EQ(gpu.iterations[x], cpu.iterations[x]);
        EXPECT_NEAR(gpu.captured[x], cpu.captured[x], 1e-4);
        EXPECT_LT(HeadRelErr(gpu, cpu, x, shape.head_dim), kSameMath);
        const int n_blocks = (b.caches[x / shape.n_head()]->length() + 15) / 16;
        stopped_early += cpu.blocks[x] < n_blocks / 2;
      }
    }
  }
  EXPECT_GT(stopped_early, 0) << "no head stopped early: the data is not peaked enough";
}

TEST(PsaCudaTest, BlockScoresAndMetadataMatchTheSharedMath) {
  PSA_SKIP_WITHOUT_GPU();
  for (const Shape& shape : Shapes()) {
    SCOPED_TRACE(Name(shape));
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 4);
    const DeviceBatch dev = gpu_testing::Upload(b);
    AttentionPolicy p;
    p.rank = AttentionPolicy::Rank::kEstimate;
    const HostCandidates cand = CpuSelection(b, p);  // for begin and max_n_cand
    const int d = shape.head_dim, group = shape.group;
    const size_t total = cand.order.size();
    auto begin = gpu_testing::ToDevice(cand.begin);
    auto ub = gpu_testing::DeviceZeros<float>(total * group);
    auto centre = gpu_testing::DeviceZeros<float>(total * group);
    auto mean = gpu_testing::DeviceZeros<float>(total * group);
    auto gscore = gpu_testing::DeviceZeros<float>(total);
    auto estimate = gpu_testing::DeviceZeros<float>(total);
    // The rank estimate needs the heads' scores.
    EXPECT_EQ(cuda::RunBlockScores(dev.view, shape.n_head(), shape.scale(),
                                   gpu_testing::ToSelection(p), dev.q.get(), begin.get(),
                                   cand.max_n_cand, nullptr, centre.get(), nullptr, estimate.get(),
                                   nullptr),
              cudaErrorInvalidValue);
    ASSERT_EQ(cuda::RunBlockScores(dev.view, shape.n_head(), shape.scale(),
                                   gpu_testing::ToSelection(p), dev.q.get(), begin.get(),
                                   cand.max_n_cand, ub.get(), centre.get(), mean.get(),
                                   estimate.get(), nullptr),
              cudaSuccess);
    p.rank = AttentionPolicy::Rank::kBound;
    ASSERT_EQ(cuda::RunBlockScores(dev.view, shape.n_head(), shape.scale(), gpu_testing::ToSelection(p),
                                   dev.q.get(), begin.get(), cand.max_n_cand, ub.get(),
                                   centre.get(), nullptr, gscore.get(), nullptr),
              cudaSuccess);
    // Mean scores need the mean keys.
    cuda::PagedKv no_mean = dev.view;
    no_mean.kmean = nullptr;
    EXPECT_EQ(cuda::RunBlockScores(no_mean, shape.n_head(), shape.scale(), gpu_testing::ToSelection(p),
                                   dev.q.get(), begin.get(), cand.max_n_cand, ub.get(),
                                   centre.get(), mean.get(), gscore.get(), nullptr),
              cudaErrorInvalidValue);
    // The metadata recomputed from the pages.
    auto kmax = gpu_testing::DeviceZeros<uint16_t>(dev.kmax.n);
    auto kmin = gpu_testing::DeviceZeros<uint16_t>(dev.kmin.n);
    auto kmean = gpu_testing::DeviceZeros<uint16_t>(dev.kmean.n);
    ASSERT_EQ(cuda::RunBlockMetadata(dev.view, b.max_len / 16, kmax.get(), kmin.get(), kmean.get(),
                                     nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto ub_h = gpu_testing::ToHost(ub), centre_h = gpu_testing::ToHost(centre);
    const auto mean_h = gpu_testing::ToHost(mean);
    const auto gscore_h = gpu_testing::ToHost(gscore), estimate_h = gpu_testing::ToHost(estimate);
    const auto kmax_h = gpu_testing::ToHost(kmax), kmin_h = gpu_testing::ToHost(kmin);
    const auto kmean_h = gpu_testing::ToHost(kmean);
    const auto kmax_ref = gpu_testing::ToHost(dev.kmax), kmin_ref = gpu_testing::ToHost(dev.kmin);
    const auto kmean_ref = gpu_testing::ToHost(dev.kmean);
    for (size_t i = 0; i < kmax_ref.size(); ++i) {  // -0 and +0 compare equal
      ASSERT_EQ(Fp16ToFp32(kmax_h[i]), Fp16ToFp32(kmax_ref[i])) << "kmax element " << i;
      ASSERT_EQ(Fp16ToFp32(kmin_h[i]), Fp16ToFp32(kmin_ref[i])) << "kmin element " << i;
      // The mean bit for bit as the CPU cache computes it.
      ASSERT_EQ(Fp16ToFp32(kmean_h[i]), Fp16ToFp32(kmean_ref[i])) << "kmean element " << i;
    }
    for (size_t s = 0; s < b.caches.size(); ++s) {
      const KvCache& kv = *b.caches[s];
      const PsaLayout lay = PsaLayoutOf(kv.length(), kv.full_blocks(), 16, p.sink_blocks,
                                        p.local_blocks);
      for (int h = 0; h < shape.n_head_kv; ++h) {
        const int base = cand.begin[s * shape.n_head_kv + h];
        for (int c = 0; c < lay.n_cand(); ++c) {
          std::vector<float> hi(d), lo(d), mu(d);
          for (int i = 0; i < d; ++i) {
            hi[i] = Fp16ToFp32(kv.KeyMax(0, h, lay.sink + c)[i]);
            lo[i] = Fp16ToFp32(kv.KeyMin(0, h, lay.sink + c)[i]);
            mu[i] = Fp16ToFp32(kv.KeyMean(0, h, lay.sink + c)[i]);
          }
          float best = -INFINITY;
          for (int g = 0; g < group; ++g) {
            const float* q = b.q.data() + (s * shape.n_head() + h * group + g) * d;
            const size_t at = static_cast<size_t>(base) * group + g * lay.n_cand() + c;
            const float u = PsaBoxBound(q, hi.data(), lo.data(), d, shape.scale());
            const float m = PsaCentreScore(q, hi.data(), lo.data(), d, shape.scale());
            ASSERT_NEAR(ub_h[at], u, 1e-4f * (1 + std::fabs(u))) << "candidate " << c;
            ASSERT_NEAR(centre_h[at], m, 1e-4f * (1 + std::fabs(m))) << "candidate " << c;
            const float mk = PsaMeanScore(q, mu.data(), d, shape.scale());
            ASSERT_NEAR(mean_h[at], mk, 1e-4f * (1 + std::fabs(mk))) << "candidate " << c;
            best = std::max(best, ub_h[at]);
          }
          ASSERT_EQ(gscore_h[base + c], best);
        }
        // The estimate from the device's own head scores, as the CPU makes it.
        const int n = lay.n_cand();
        if (n <= 0) continue;
        std::vector<float> want(n), r(n);
        const size_t at = static_cast<size_t>(base) * group;
        EstimateGroupScores(ub_h.data() + at, centre_h.data() + at, group, n, r.data(),
                            want.data());
        for (int c = 0; c < n; ++c) {
          ASSERT_NEAR(estimate_h[base + c], want[c], 1e-4f * (1 + std::fabs(want[c])))
              << "candidate " << c;
        }
      }
    }
  }
}

// RunBlockOrder against BlockRanking over the same scores: the device's
// block scores of real caches, and made-up scores full of ties, NaNs,
// signed zeros and infinities over sequences of 0 to 300 candidates.
TEST(PsaCudaTest, BlockOrderEqualsTheCpuRanking) {
  PSA_SKIP_WITHOUT_GPU();
  auto check = [](const cuda::PagedKv& view, const AttentionPolicy& p,
                  const std::vector<int>& begin, int max_n_cand, const std::vector<float>& score,
                  const std::vector<int>& seq_len) {
    auto begin_d = gpu_testing::ToDevice(begin);
    auto score_d = gpu_testing::ToDevice(score);
    auto order_d = gpu_testing::DeviceZeros<int>(score.size());
    const size_t bytes = cuda::BlockOrderWorkspaceBytes(view.n_seq, view.n_head_kv, max_n_cand);
    auto work = gpu_testing::DeviceZeros<float>(bytes / sizeof(float) + 2);  // raw workspace
    ASSERT_EQ(cuda::RunBlockOrder(view, gpu_testing::ToSelection(p), begin_d.get(), max_n_cand,
                                  score_d.get(), order_d.get(), work.get(), nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<int> order = gpu_testing::ToHost(order_d);
    for (int s = 0; s < view.n_seq; ++s) {
      const PsaLayout lay = PsaLayoutOf(seq_len[s], seq_len[s] / 16, 16, p.sink_blocks,
                                        p.local_blocks);
      for (int h = 0; h < view.n_head_kv; ++h) {
        const int base = begin[s * view.n_head_kv + h], n = lay.n_cand();
        if (n <= 0) continue;
        BlockRanking ranking;
        ranking.Reset(score.data() + base, n);
        ranking.Extend(n);
        for (int k = 0; k < n; ++k) {
          ASSERT_EQ(order[base + k], ranking.order()[k])
              << "sequence " << s << ", head " << h << ", rank " << k << " of " << n;
        }
      }
    }
  };
  const AttentionPolicy p;
  {  // real caches: their device block scores
    const Shape shape{2, 4, 64};
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 5);
    const DeviceBatch dev = gpu_testing::Upload(b);
    const HostCandidates cand = CpuSelection(b, p);
    auto begin = gpu_testing::ToDevice(cand.begin);
    auto gscore = gpu_testing::DeviceZeros<float>(cand.order.size());
    auto ub = gpu_testing::DeviceZeros<float>(cand.order.size() * shape.group);
    auto centre = gpu_testing::DeviceZeros<float>(cand.order.size() * shape.group);
    ASSERT_EQ(cuda::RunBlockScores(dev.view, shape.n_head(), shape.scale(),
                                   gpu_testing::ToSelection(p), dev.q.get(), begin.get(),
                                   cand.max_n_cand, ub.get(), centre.get(), nullptr, gscore.get(),
                                   nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    check(dev.view, p, cand.begin, cand.max_n_cand, gpu_testing::ToHost(gscore), kLengths);
  }
  {  // made-up scores; only seq_len is read
    const std::vector<int> seq_len = {1, 16, 40, 100, 700, 4850};
    const int n_head_kv = 2;
    std::vector<int> begin;
    int total = 0, max_n = 0;
    for (int len : seq_len) {
      const int n = PsaLayoutOf(len, len / 16, 16, p.sink_blocks, p.local_blocks).n_cand();
      for (int h = 0; h < n_head_kv; ++h) {
        begin.push_back(total);
        total += std::max(n, 0);
      }
      max_n = std::max(max_n, n);
    }
    std::vector<float> score(total);
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> pick(0, 9);
    std::normal_distribution<float> value(0.0f, 2.0f);
    for (float& x : score) {
      const int k = pick(rng);
      x = k == 0 ? NAN : k == 1 ? -0.0f : k == 2 ? 0.0f : k == 3 ? INFINITY
          : k == 4 ? -INFINITY : k == 5 ? 0.25f : value(rng);
    }
    auto len_d = gpu_testing::ToDevice(seq_len);
    cuda::PagedKv view;
    view.n_seq = static_cast<int>(seq_len.size());
    view.n_head_kv = n_head_kv;
    view.head_dim = 64;
    view.seq_len = len_d.get();
    check(view, p, begin, max_n, score, seq_len);
  }
}

// Through a GPU page pool holding an eighth of the pages, the rest read
// from mapped host memory: every step's output, blocks and iterations are
// bit-equal to the all-resident run (residency never changes a result),
// the pool fills with what the steps read, and it evicts to make room.
TEST(PsaCudaTest, APoolFarSmallerThanTheKvGivesTheSameResults) {
  PSA_SKIP_WITHOUT_GPU();
  const Shape shape{2, 4, 64};
  const Batch b = gpu_testing::MakeBatch(shape, kLengths, 9);
  const DeviceBatch dev = gpu_testing::Upload(b);
  const AttentionPolicy p;
  const HostCandidates cand = CpuSelection(b, p);
  const Result ref_psa = GpuDecode(cuda::DecodeMode::kPsa, p, b, dev, &cand, 0);
  const Result ref_dense = GpuDecode(cuda::DecodeMode::kDense, p, b, dev, nullptr, 0);

  // Every page in pinned, mapped host memory, as the worker's host pool.
  const std::vector<uint16_t> pages = gpu_testing::ToHost(dev.pool);
  const size_t n_pages = dev.pages.n, page_elems = dev.pool.n / n_pages;
  void* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(&pinned, pages.size() * sizeof(uint16_t), cudaHostAllocMapped),
            cudaSuccess);
  uint16_t* host = static_cast<uint16_t*>(pinned);
  std::copy(pages.begin(), pages.end(), host);
  std::vector<const void*> host_pages(n_pages);
  for (size_t i = 0; i < n_pages; ++i) host_pages[i] = host + i * page_elems;
  const int n_slots = std::max<int>(4, static_cast<int>(n_pages / 8));
  auto make_pool = [&](std::unique_ptr<cuda::GpuPagePool>* out) {
    return cuda::GpuPagePool::Create(host_pages, page_elems * sizeof(uint16_t), n_slots,
                                     static_cast<int>(n_pages), out);
  };
  std::unique_ptr<cuda::GpuPagePool> pool;
  DeviceBatch pooled = dev;
  // Both ways of moving pages: a DMA copy per page, and the gather kernel.
  for (const cuda::PageCopy how : {cuda::PageCopy::kDma, cuda::PageCopy::kGather}) {
    SCOPED_TRACE(how == cuda::PageCopy::kDma ? "DMA" : "gather");
    ASSERT_EQ(make_pool(&pool), cudaSuccess);
    pool->set_page_copy(how);
    pooled.view.pages = pool->table();
    auto begin = gpu_testing::ToDevice(cand.begin);
    auto order = gpu_testing::ToDevice(cand.order);
    std::vector<int64_t> from_host;
    for (int step = 0; step < 4; ++step) {
      SCOPED_TRACE(step);
      const Result r = GpuDecode(cuda::DecodeMode::kPsa, p, b, pooled, &cand, 0);
      ASSERT_EQ(r.out, ref_psa.out);
      ASSERT_EQ(r.blocks, ref_psa.blocks);
      ASSERT_EQ(r.iterations, ref_psa.iterations);
      auto blocks = gpu_testing::ToDevice(r.blocks);
      const int64_t before = pool->stats().read_from_host;
      ASSERT_EQ(pool->RecordReads(cuda::DecodeMode::kPsa, pooled.view, shape.n_head(),
                                  gpu_testing::ToSelection(p), begin.get(), order.get(),
                                  blocks.get(), nullptr),
                cudaSuccess);
      ASSERT_EQ(pool->Refill(nullptr), cudaSuccess);
      from_host.push_back(pool->stats().read_from_host - before);
      EXPECT_LE(pool->stats().resident, n_slots);
    }
    const cuda::PagePoolStats st = pool->stats();
    std::printf("pool: %d slots of %zu pages; host reads per step %lld, %lld, %lld, %lld; "
                "%lld copied in, %lld evicted\n",
                n_slots, n_pages, static_cast<long long>(from_host[0]),
                static_cast<long long>(from_host[1]), static_cast<long long>(from_host[2]),
                static_cast<long long>(from_host[3]), static_cast<long long>(st.copied_in),
                static_cast<long long>(st.evicted));
    EXPECT_EQ(from_host[0], st.pages_read / 4) << "nothing was resident at the first step";
    EXPECT_LT(from_host[1], from_host[0]) << "the pool served none of the second step";
    EXPECT_EQ(st.resident, n_slots) << "the pool did not fill";
    EXPECT_GT(st.pages_read / 4, n_slots) << "the steps fit the pool: make it smaller";
    EXPECT_GT(st.evicted, 0);
  }
  const cuda::PagePoolStats st = pool->stats();
  // Dense through the same, now partly resident, pool.
  const Result dense = GpuDecode(cuda::DecodeMode::kDense, p, b, pooled, nullptr, 0);
  EXPECT_EQ(dense.out, ref_dense.out);
  ASSERT_EQ(pool->RecordReads(cuda::DecodeMode::kDense, pooled.view, shape.n_head(),
                              gpu_testing::ToSelection(p), nullptr, nullptr, nullptr, nullptr),
            cudaSuccess);
  ASSERT_EQ(pool->Refill(nullptr), cudaSuccess);
  int64_t all_blocks = 0;
  for (int len : kLengths) all_blocks += (len + 15) / 16 * shape.n_head_kv;
  EXPECT_EQ(pool->stats().pages_read - st.pages_read, all_blocks);
  // Prefetch: the pages a step is about to read brought in ahead (the
  // sinks, the newest blocks and the order's prefix each (s, h) takes):
  // that many fewer host reads, the same result.
  {
    std::unique_ptr<cuda::GpuPagePool> ahead;
    ASSERT_EQ(make_pool(&ahead), cudaSuccess);
    DeviceBatch view = dev;
    view.view.pages = ahead->table();
    std::vector<int> want;
    int table = 0;
    for (int s = 0; s < static_cast<int>(b.caches.size()); ++s) {
      const int len = b.caches[s]->length(), n_blocks = (len + 15) / 16;
      const PsaLayout lay = PsaLayoutOf(len, len / 16, 16, p.sink_blocks, p.local_blocks);
      for (int h = 0; h < shape.n_head_kv; ++h, table += n_blocks) {
        int most = 0;
        for (int g = 0; g < shape.group; ++g) {
          most = std::max(most, ref_psa.blocks[s * shape.n_head() + h * shape.group + g]);
        }
        const int taken = std::clamp(most - lay.forced(), 0, lay.n_cand());
        for (int blk = 0; blk < lay.sink; ++blk) want.push_back(table + blk);
        for (int blk = lay.local_begin; blk < n_blocks; ++blk) want.push_back(table + blk);
        const int base = cand.begin[s * shape.n_head_kv + h];
        for (int k = 0; k < taken; ++k) want.push_back(table + lay.sink + cand.order[base + k]);
      }
    }
    const int read = static_cast<int>(want.size());
    want.resize(std::min<size_t>(want.size(), n_slots));
    ASSERT_EQ(ahead->Prefetch(want, nullptr), cudaSuccess);
    EXPECT_EQ(ahead->stats().resident, static_cast<int>(want.size()));
    const Result r = GpuDecode(cuda::DecodeMode::kPsa, p, b, view, &cand, 0);
    EXPECT_EQ(r.out, ref_psa.out);
    auto blocks = gpu_testing::ToDevice(r.blocks);
    auto begin = gpu_testing::ToDevice(cand.begin);
    auto order = gpu_testing::ToDevice(cand.order);
    ASSERT_EQ(ahead->RecordReads(cuda::DecodeMode::kPsa, view.view, shape.n_head(),
                                 gpu_testing::ToSelection(p), begin.get(), order.get(),
                                 blocks.get(), nullptr),
              cudaSuccess);
    ASSERT_EQ(ahead->Refill(nullptr), cudaSuccess);
    EXPECT_EQ(ahead->stats().pages_read, read);
    EXPECT_EQ(ahead->stats().read_from_host, read - static_cast<int>(want.size()));
    EXPECT_EQ(ahead->Prefetch({static_cast<int>(n_pages)}, nullptr), cudaErrorInvalidValue);
  }
  // A table entry it did not make is refused, as are bad arguments.
  EXPECT_EQ(pool->RecordReads(cuda::DecodeMode::kDense, dev.view, shape.n_head(),
                              gpu_testing::ToSelection(p), nullptr, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::GpuPagePool::Create(host_pages, 100, 4, 4, &pool), cudaErrorInvalidValue);
  pool.reset();
  ASSERT_EQ(cudaFreeHost(pinned), cudaSuccess);
}

// Appending each sequence's last token (its rows taken out first) writes
// the pages and the completed blocks' metadata back as the CPU cache has
// them, through the page table and, write-through, a second (host) copy.
TEST(PsaCudaTest, AppendWritesRowsAndMetadataAsTheCpuCache) {
  PSA_SKIP_WITHOUT_GPU();
  for (const Shape& shape : {Shape{2, 1, 64}, Shape{3, 2, 128}}) {
    SCOPED_TRACE(Name(shape));
    const Batch b = gpu_testing::MakeBatch(shape, kLengths, 12);
    const DeviceBatch dev = gpu_testing::Upload(b);
    const int d = shape.head_dim, hkv = shape.n_head_kv;
    const int n_seq = static_cast<int>(b.caches.size());
    const std::vector<uint16_t> pool_ref = gpu_testing::ToHost(dev.pool);
    const std::vector<uint16_t> kmax_ref = gpu_testing::ToHost(dev.kmax);
    const std::vector<uint16_t> kmin_ref = gpu_testing::ToHost(dev.kmin);
    const std::vector<uint16_t> kmean_ref = gpu_testing::ToHost(dev.kmean);
    const size_t page_elems = b.caches[0]->page_elements();
    std::vector<uint16_t> pool = pool_ref, kmax = kmax_ref, kmin = kmin_ref, kmean = kmean_ref;
    std::vector<int> pos, table;
    std::vector<float> k(static_cast<size_t>(n_seq) * hkv * d), v(k.size());
    int pages = 0;
    for (int s = 0; s < n_seq; ++s) {
      const KvCache& kv = *b.caches[s];
      const int p = kv.length() - 1, row = p % 16;
      pos.push_back(p);
      for (int h = 0; h < hkv; ++h) {
        table.push_back(pages);
        const uint16_t* src = kv.Page(0, h, p / 16);
        const size_t page = static_cast<size_t>(pages + p / 16);
        for (int i = 0; i < d; ++i) {
          k[(static_cast<size_t>(s) * hkv + h) * d + i] = Fp16ToFp32(src[row * d + i]);
          v[(static_cast<size_t>(s) * hkv + h) * d + i] = Fp16ToFp32(src[(16 + row) * d + i]);
          pool[page * page_elems + row * d + i] = 0;  // taken out
          pool[page * page_elems + (16 + row) * d + i] = 0;
          if (row == 15) kmax[page * d + i] = kmin[page * d + i] = kmean[page * d + i] = 0;
        }
        pages += (kv.length() + 15) / 16;
      }
    }
    ASSERT_EQ(cudaMemcpy(dev.pool.get(), pool.data(), pool.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dev.kmax.get(), kmax.data(), kmax.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dev.kmin.get(), kmin.data(), kmin.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dev.kmean.get(), kmean.data(), kmean.size() * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    auto host_copy = gpu_testing::ToDevice(pool);  // the write-through copy
    std::vector<const uint16_t*> host_ptrs(dev.pages.n);
    for (size_t i = 0; i < host_ptrs.size(); ++i) host_ptrs[i] = host_copy.get() + i * page_elems;
    auto host_table = gpu_testing::ToDevice(host_ptrs);
    auto pos_d = gpu_testing::ToDevice(pos);
    auto k_d = gpu_testing::ToDevice(k), v_d = gpu_testing::ToDevice(v);
    ASSERT_EQ(cuda::RunAppend(dev.view, host_table.get(), pos_d.get(), k_d.get(), v_d.get(),
                              dev.kmax.get(), dev.kmin.get(), dev.kmean.get(), nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(gpu_testing::ToHost(dev.pool), pool_ref);
    EXPECT_EQ(gpu_testing::ToHost(host_copy), pool_ref);
    const std::vector<uint16_t> kmax_got = gpu_testing::ToHost(dev.kmax);
    const std::vector<uint16_t> kmin_got = gpu_testing::ToHost(dev.kmin);
    const std::vector<uint16_t> kmean_got = gpu_testing::ToHost(dev.kmean);
    for (size_t i = 0; i < kmax_ref.size(); ++i) {  // -0 and +0 compare equal
      ASSERT_EQ(Fp16ToFp32(kmax_got[i]), Fp16ToFp32(kmax_ref[i])) << "kmax element " << i;
      ASSERT_EQ(Fp16ToFp32(kmin_got[i]), Fp16ToFp32(kmin_ref[i])) << "kmin element " << i;
      ASSERT_EQ(Fp16ToFp32(kmean_got[i]), Fp16ToFp32(kmean_ref[i])) << "kmean element " << i;
    }
  }
}

#if !defined(PSA_CUDA_EMULATION)  // graphs: a real device's
// A whole selection step on the device — block scores, the order, PSA
// decode — needs no host synchronisation, so it is
// captured as one CUDA graph; replayed, it gives the stream-run result.
TEST(PsaCudaTest, AStepIsCapturedAsACudaGraph) {
  PSA_SKIP_WITHOUT_GPU();
  const Shape shape{2, 4, 64};
  const Batch b = gpu_testing::MakeBatch(shape, kLengths, 13);
  const DeviceBatch dev = gpu_testing::Upload(b);
  const AttentionPolicy p;
  const cuda::Selection sel = gpu_testing::ToSelection(p);
  const HostCandidates cand = CpuSelection(b, p);  // begin and max_n_cand
  const int n_seq = static_cast<int>(b.caches.size());
  const size_t total = cand.order.size(), heads = static_cast<size_t>(n_seq) * shape.n_head();
  auto begin = gpu_testing::ToDevice(cand.begin);
  auto ub = gpu_testing::DeviceZeros<float>(total * shape.group);
  auto mean = gpu_testing::DeviceZeros<float>(total * shape.group);
  auto gscore = gpu_testing::DeviceZeros<float>(total);
  auto order = gpu_testing::DeviceZeros<int>(total);
  auto order_work = gpu_testing::DeviceZeros<float>(
      cuda::BlockOrderWorkspaceBytes(n_seq, shape.n_head_kv, cand.max_n_cand) / 4 + 2);
  cuda::DecodePlan plan;
  ASSERT_EQ(cuda::PlanDecode(cuda::DecodeMode::kPsa, n_seq, shape.n_head(), shape.n_head_kv,
                             shape.head_dim, shape.scale(), sel, b.max_len, 0, &plan),
            cudaSuccess);
  auto work = gpu_testing::DeviceZeros<float>(plan.workspace_bytes / 4 + 2);
  auto out = gpu_testing::DeviceZeros<float>(heads * shape.head_dim);
  auto blocks = gpu_testing::DeviceZeros<int>(heads);
  cuda::DecodeOutputs o;
  o.out = out.get();
  o.blocks = blocks.get();
  cuda::Candidates c;
  c.begin = begin.get();
  c.order = order.get();
  c.stop_x = mean.get();
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  auto step = [&] {
    EXPECT_EQ(cuda::RunBlockScores(dev.view, shape.n_head(), shape.scale(), sel, dev.q.get(),
                                   begin.get(), cand.max_n_cand, ub.get(), nullptr, mean.get(),
                                   gscore.get(), stream),
              cudaSuccess);
    EXPECT_EQ(cuda::RunBlockOrder(dev.view, sel, begin.get(), cand.max_n_cand, gscore.get(),
                                  order.get(), order_work.get(), stream),
              cudaSuccess);
    EXPECT_EQ(cuda::RunDecode(plan, dev.view, dev.q.get(), c, o, work.get(), stream),
              cudaSuccess);
  };
  step();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<float> direct = gpu_testing::ToHost(out);
  const std::vector<int> direct_blocks = gpu_testing::ToHost(blocks);
  ASSERT_EQ(cudaMemset(out.get(), 0, heads * shape.head_dim * sizeof(float)), cudaSuccess);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  step();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(gpu_testing::ToHost(out), direct);
  EXPECT_EQ(gpu_testing::ToHost(blocks), direct_blocks);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
#endif

// No device needed: the plan and the argument checks.
TEST(PsaCudaTest, PlansSplitDenseAndRefuseUnsupportedShapes) {
  cuda::DecodePlan plan;
  const cuda::Selection sel;
  ASSERT_EQ(cuda::PlanDecode(cuda::DecodeMode::kDense, 1, 9, 3, 64, 0.125f, sel, 131072, 132, &plan),
            cudaSuccess);
  EXPECT_GT(plan.splits, 1);
  EXPECT_GE(static_cast<long>(plan.splits) * plan.blocks_per_split, 131072 / 16);
  EXPECT_GT(plan.workspace_bytes, 0u);
  ASSERT_EQ(cuda::PlanDecode(cuda::DecodeMode::kDense, 64, 32, 8, 128, 0.088f, sel, 8192, 0, &plan),
            cudaSuccess);
  EXPECT_EQ(plan.splits, 1);
  EXPECT_EQ(plan.workspace_bytes, 0u);
  ASSERT_EQ(cuda::PlanDecode(cuda::DecodeMode::kPsa, 4, 32, 8, 128, 0.088f, sel, 8192, 132, &plan),
            cudaSuccess);
  EXPECT_EQ(plan.splits, 1);
  EXPECT_TRUE(cuda::DecodeSupported(64, 8));
  EXPECT_FALSE(cuda::DecodeSupported(96, 1));
  EXPECT_FALSE(cuda::DecodeSupported(64, 9));
  EXPECT_EQ(cuda::PlanDecode(cuda::DecodeMode::kDense, 1, 9, 3, 80, 0.1f, sel, 100, 1, &plan),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::PlanDecode(cuda::DecodeMode::kDense, 1, 10, 3, 64, 0.1f, sel, 100, 1, &plan),
            cudaErrorInvalidValue);
  // Ordered modes without candidates are refused before any launch.
  ASSERT_EQ(cuda::PlanDecode(cuda::DecodeMode::kTopK, 1, 3, 3, 64, 0.125f, sel, 100, 1, &plan),
            cudaSuccess);
  cuda::PagedKv kv;
  kv.n_seq = 1;
  kv.n_head_kv = 3;
  kv.head_dim = 64;
  EXPECT_EQ(cuda::RunDecode(plan, kv, nullptr, cuda::Candidates{}, cuda::DecodeOutputs{}, nullptr,
                            nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace psa

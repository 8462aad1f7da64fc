#include "tests/gpu/gpu_testing.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>

#include "compute_worker/attention/rank_scores.h"
#include "compute_worker/attention/block_layout.h"
#include "compute_worker/attention/block_ranking.h"
#include "compute_worker/model/ggml_types.h"
#include "compute_worker/model/llama_model.h"

namespace psa::gpu_testing {
namespace {

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
  }
}

}  // namespace

bool HaveDevice(std::string* why) {
  static const std::string* reason = [] {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return new std::string(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e));
    }
    return n > 0 ? new std::string() : new std::string("no CUDA device");
  }();
  *why = *reason;
  return reason->empty();
}

template <typename T>
DeviceArray<T> DeviceZeros(size_t n) {
  DeviceArray<T> a;
  a.n = n;
  void* p = nullptr;
  Check(cudaMalloc(&p, std::max<size_t>(1, n) * sizeof(T)), "cudaMalloc");
  a.mem = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  Check(cudaMemset(p, 0, std::max<size_t>(1, n) * sizeof(T)), "cudaMemset");
  return a;
}

template <typename T>
DeviceArray<T> ToDevice(const std::vector<T>& host) {
  DeviceArray<T> a = DeviceZeros<T>(host.size());
  if (!host.empty()) {
    Check(cudaMemcpy(a.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
          "cudaMemcpy to device");
  }
  return a;
}

template <typename T>
std::vector<T> ToHost(const DeviceArray<T>& dev) {
  std::vector<T> host(dev.n);
  if (dev.n > 0) {
    Check(cudaMemcpy(host.data(), dev.get(), dev.n * sizeof(T), cudaMemcpyDeviceToHost),
          "cudaMemcpy to host");
  }
  return host;
}

float Shape::scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

AttentionShape Shape::cpu() const {
  return AttentionShape{n_head(), n_head_kv, head_dim, scale()};
}

Batch MakeBatch(const Shape& shape, const std::vector<int>& lengths, uint32_t seed) {
  Batch b;
  b.shape = shape;
  const int d = shape.head_dim, hkv = shape.n_head_kv;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 15);
  std::vector<float> dir(static_cast<size_t>(hkv) * d);
  for (float& x : dir) x = n(rng);
  for (int len : lengths) {
    auto kv = std::make_unique<KvCache>(1, hkv, d);
    kv->Reserve(len);
    for (int h = 0; h < hkv; ++h) {
      bool hot = false;
      for (int t = 0; t < len; ++t) {
        if (t % KvCache::kDefaultBlockSize == 0) hot = pick(rng) == 0;
        for (int i = 0; i < d; ++i) {
          kv->KeySlot(0, h, t)[i] = Fp32ToFp16(n(rng) + (hot ? dir[h * d + i] : 0.0f));
          kv->ValueSlot(0, h, t)[i] = Fp32ToFp16(n(rng));
        }
      }
    }
    kv->Commit(len);
    b.max_len = std::max(b.max_len, len);
    b.caches.push_back(std::move(kv));
    for (int h = 0; h < hkv; ++h) {
      for (int g = 0; g < shape.group; ++g) {
        for (int i = 0; i < d; ++i) b.q.push_back(dir[h * d + i] + 0.5f * n(rng));
      }
    }
  }
  return b;
}

DeviceBatch Upload(const Batch& b) {
  const int d = b.shape.head_dim, hkv = b.shape.n_head_kv;
  const int n_seq = static_cast<int>(b.caches.size());
  const size_t page_elems = b.caches.empty() ? 0 : b.caches[0]->page_elements();
  std::vector<int> table, seq_len;
  size_t pages = 0;
  for (const auto& kv : b.caches) {
    const int n_blocks = (kv->length() + kv->block_size() - 1) / kv->block_size();
    seq_len.push_back(kv->length());
    for (int h = 0; h < hkv; ++h) {
      table.push_back(static_cast<int>(pages));
      pages += n_blocks;
    }
  }
  std::vector<uint16_t> pool(pages * page_elems), kmax(pages * d), kmin(pages * d),
      kmean(pages * d);
  for (int s = 0; s < n_seq; ++s) {
    const KvCache& kv = *b.caches[s];
    const int n_blocks = (kv.length() + kv.block_size() - 1) / kv.block_size();
    for (int h = 0; h < hkv; ++h) {
      for (int blk = 0; blk < n_blocks; ++blk) {
        const size_t at = table[s * hkv + h] + static_cast<size_t>(blk);
        std::copy_n(kv.Page(0, h, blk), page_elems, pool.begin() + at * page_elems);
        if (blk < kv.full_blocks()) {
          std::copy_n(kv.KeyMax(0, h, blk), d, kmax.begin() + at * d);
          std::copy_n(kv.KeyMin(0, h, blk), d, kmin.begin() + at * d);
          std::copy_n(kv.KeyMean(0, h, blk), d, kmean.begin() + at * d);
        }
      }
    }
  }
  DeviceBatch dev;
  dev.pool = ToDevice(pool);
  dev.kmax = ToDevice(kmax);
  dev.kmin = ToDevice(kmin);
  dev.kmean = ToDevice(kmean);
  std::vector<const uint16_t*> page_ptrs(pages);
  for (size_t i = 0; i < pages; ++i) page_ptrs[i] = dev.pool.get() + i * page_elems;
  dev.pages = ToDevice(page_ptrs);
  dev.table = ToDevice(table);
  dev.seq_len = ToDevice(seq_len);
  dev.q = ToDevice(b.q);
  dev.view.n_seq = n_seq;
  dev.view.n_head_kv = hkv;
  dev.view.head_dim = d;
  dev.view.pages = dev.pages.get();
  dev.view.table = dev.table.get();
  dev.view.seq_len = dev.seq_len.get();
  dev.view.kmax = dev.kmax.get();
  dev.view.kmin = dev.kmin.get();
  dev.view.kmean = dev.kmean.get();
  return dev;
}

HostCandidates CpuSelection(const Batch& b, const AttentionPolicy& p) {
  HostCandidates c;
  const int d = b.shape.head_dim, group = b.shape.group, hkv = b.shape.n_head_kv;
  int total = 0;
  for (size_t s = 0; s < b.caches.size(); ++s) {
    const KvCache& kv = *b.caches[s];
    const BlockLayout lay = LayoutOf(kv, kv.length(), p);
    const int n = lay.n_cand();
    for (int h = 0; h < hkv; ++h) {
      c.begin.push_back(total);
      const float* qs[kMaxGqaGroup];
      for (int g = 0; g < group; ++g) {
        qs[g] = b.q.data() + ((s * b.shape.n_head()) + h * group + g) * static_cast<size_t>(d);
      }
      std::vector<float> ub(static_cast<size_t>(group) * n), centre(ub.size()), mean(ub.size()),
          gscore(n);
      RankScores(kv.KeyBounds(0, h), p.rank, qs, group, b.shape.scale(), lay.sink, n, ub.data(),
                 centre.data(), gscore.data(), mean.data());
      BlockRanking ranking;
      ranking.Reset(gscore.data(), n);
      ranking.Extend(n);
      c.order.insert(c.order.end(), ranking.order().begin(), ranking.order().end());
      const std::vector<float>& x = p.certified ? ub : mean;
      c.stop_x.insert(c.stop_x.end(), x.begin(), x.end());
      total += n;
      c.max_n_cand = std::max(c.max_n_cand, n);
    }
  }
  return c;
}

cuda::Selection ToSelection(const AttentionPolicy& p) {
  cuda::Selection s;
  s.epsilon = p.epsilon;
  s.group_blocks = p.group_blocks;
  s.min_blocks = p.min_blocks;
  s.certified = p.certified;
  s.share_reads = p.share_reads;
  s.top_k = p.top_k;
  s.sink_blocks = p.sink_blocks;
  s.local_blocks = p.local_blocks;
  s.rank_by_bound = p.rank == AttentionPolicy::Rank::kBound;
  return s;
}

Result CpuDecode(const AttentionBackend& backend, const Batch& b) {
  const int d = b.shape.head_dim, group = b.shape.group, n_head = b.shape.n_head();
  const size_t heads = b.caches.size() * n_head;
  Result r;
  r.out.assign(heads * d, 0.0f);
  std::vector<HeadStepStats> stats(heads);
  for (size_t s = 0; s < b.caches.size(); ++s) {
    for (int h = 0; h < b.shape.n_head_kv; ++h) {
      const size_t head0 = s * n_head + static_cast<size_t>(h) * group;
      AttentionTask t;
      t.kv = b.caches[s].get();
      t.kv_head = h;
      t.q_pos0 = t.kv->length() - 1;
      t.n_q = 1;
      t.q = b.q.data() + head0 * d;
      t.q_stride = n_head * d;
      t.out = r.out.data() + head0 * d;
      t.out_stride = n_head * d;
      t.stats = stats.data() + head0;
      backend.Run(b.shape.cpu(), t);
    }
  }
  for (const HeadStepStats& st : stats) {
    r.blocks.push_back(st.blocks_touched);
    r.iterations.push_back(st.iterations);
    r.captured.push_back(st.captured);
  }
  return r;
}

Result GpuDecode(cuda::DecodeMode mode, const AttentionPolicy& p, const Batch& b,
                 const DeviceBatch& dev, const HostCandidates* cand, int sm_count) {
  const Shape& sh = b.shape;
  const int n_seq = static_cast<int>(b.caches.size());
  cuda::DecodePlan plan;
  Check(cuda::PlanDecode(mode, n_seq, sh.n_head(), sh.n_head_kv, sh.head_dim, sh.scale(),
                         ToSelection(p), b.max_len, sm_count, &plan),
        "PlanDecode");
  DeviceArray<uint8_t> workspace = DeviceZeros<uint8_t>(plan.workspace_bytes);
  DeviceArray<int> begin, order;
  DeviceArray<float> stop_x;
  cuda::Candidates c;
  if (cand != nullptr) {
    begin = ToDevice(cand->begin);
    order = ToDevice(cand->order);
    stop_x = ToDevice(cand->stop_x);
    c.begin = begin.get();
    c.order = order.get();
    c.stop_x = stop_x.get();
  }
  const size_t heads = static_cast<size_t>(n_seq) * sh.n_head();
  DeviceArray<float> out = DeviceZeros<float>(heads * sh.head_dim);
  DeviceArray<float> captured = DeviceZeros<float>(heads);
  DeviceArray<int> blocks = DeviceZeros<int>(heads), iterations = DeviceZeros<int>(heads);
  cuda::DecodeOutputs o;
  o.out = out.get();
  o.blocks = blocks.get();
  o.iterations = iterations.get();
  o.captured = captured.get();
  Check(cuda::RunDecode(plan, dev.view, dev.q.get(), c, o, workspace.get(), nullptr), "RunDecode");
  Check(cudaDeviceSynchronize(), "decode kernels");
  return Result{ToHost(out), ToHost(blocks), ToHost(iterations), ToHost(captured)};
}

double HeadRelErr(const Result& a, const Result& ref, int x, int head_dim) {
  double num = 0, den = 0;
  for (int i = 0; i < head_dim; ++i) {
    const double e = a.out[static_cast<size_t>(x) * head_dim + i];
    const double r = ref.out[static_cast<size_t>(x) * head_dim + i];
    num += (e - r) * (e - r);
    den += r * r;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

template DeviceArray<float> ToDevice(const std::vector<float>&);
template DeviceArray<int> ToDevice(const std::vector<int>&);
template DeviceArray<uint16_t> ToDevice(const std::vector<uint16_t>&);
template DeviceArray<const uint16_t*> ToDevice(const std::vector<const uint16_t*>&);
template DeviceArray<float> DeviceZeros<float>(size_t);
template DeviceArray<int> DeviceZeros<int>(size_t);
template DeviceArray<uint16_t> DeviceZeros<uint16_t>(size_t);
template std::vector<float> ToHost(const DeviceArray<float>&);
template std::vector<int> ToHost(const DeviceArray<int>&);
template std::vector<uint16_t> ToHost(const DeviceArray<uint16_t>&);

}  // namespace psa::gpu_testing

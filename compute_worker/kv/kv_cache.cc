#include "compute_worker/kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "compute_worker/model/ggml_types.h"

namespace psa {

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int block_size)
    : n_layer_(n_layer),
      n_head_kv_(n_head_kv),
      head_dim_(head_dim),
      block_size_(block_size > 0 ? block_size : kDefaultBlockSize),
      pages_(static_cast<size_t>(n_layer) * n_head_kv),
      slab_cursors_(pages_.size()),
      kmax_(n_layer),
      kmin_(n_layer),
      kmean_(n_layer),
      bounds_(static_cast<size_t>(n_layer) * n_head_kv, BlockBounds(head_dim)),
      read_hint_(static_cast<size_t>(n_layer) * n_head_kv, 0) {}

KvCache::KvCache(int n_layer, int n_head_kv, int head_dim, int block_size, KvPaging paging)
    : KvCache(n_layer, n_head_kv, head_dim, block_size) {
  pooled_.paging = paging;
  pooled_.handles.resize(pages_.size());
  pooled_.overflow.resize(pages_.size());
}

KvCache::PooledPages& KvCache::PooledPages::operator=(PooledPages&& o) noexcept {
  if (this == &o) return *this;
  Release();
  paging = o.paging;
  handles = std::move(o.handles);
  overflow = std::move(o.overflow);
  o.paging = KvPaging{};
  o.handles.clear();
  o.overflow.clear();
  return *this;
}

void KvCache::PooledPages::Release() {
  for (auto& table : handles) {
    for (BlockPool::Handle h : table) {
      if (h.valid()) paging.pool->Free(h);  // a no-op if it was evicted
    }
  }
  int64_t overflowed = 0;
  for (auto& table : overflow) {
    for (auto& page : table) overflowed += page != nullptr;
  }
  if (paging.counters != nullptr) paging.counters->overflow_pages -= overflowed;
  handles.clear();
  overflow.clear();
}

KvCache::KvCache(const KvCache& other) { *this = other; }

KvCache& KvCache::operator=(const KvCache& other) {
  if (this == &other) return *this;
  if (other.paged()) std::abort();  // documented: pool-backed caches are not copied
  n_layer_ = other.n_layer_;
  n_head_kv_ = other.n_head_kv_;
  head_dim_ = other.head_dim_;
  block_size_ = other.block_size_;
  length_ = 0;
  capacity_ = 0;
  table_blocks_ = 0;
  pooled_ = PooledPages{};
  pages_.assign(static_cast<size_t>(n_layer_) * n_head_kv_, {});
  kmax_.assign(n_layer_, {});
  kmin_.assign(n_layer_, {});
  kmean_.assign(n_layer_, {});
  bounds_.assign(pages_.size(), BlockBounds(head_dim_));
  slabs_.clear();
  slab_cursors_.assign(pages_.size(), SlabCursor{});
  read_hint_.assign(pages_.size(), 0);
  durability_ = std::make_shared<KvDurability>();
  durable_id_.clear();
  durable_blocks_ = 0;
  fetch_failure_ = std::make_unique<FetchFailure>();
  const int blocks = other.capacity_ / block_size_;
  GrowTables(other.table_blocks_);
  kmax_ = other.kmax_;
  kmin_ = other.kmin_;
  kmean_ = other.kmean_;
  bounds_ = other.bounds_;
  length_ = other.length_;
  for (int l = 0; l < n_layer_; ++l) AllocatePrivateBlocks(l, blocks);
  capacity_ = other.capacity_;
  for (size_t t = 0; t < pages_.size(); ++t) {
    for (int b = 0; b < blocks; ++b) {
      std::memcpy(pages_[t][b], other.pages_[t][b], page_bytes());
    }
  }
  return *this;
}

void KvCache::GrowTables(int blocks) {
  if (blocks <= table_blocks_) return;
  const int new_blocks = std::max(blocks, std::max(4, table_blocks_ * 2));
  const size_t row = head_dim_;
  for (int l = 0; l < n_layer_; ++l) {
    for (auto* meta : {&kmax_[l], &kmin_[l], &kmean_[l]}) {
      std::vector<uint16_t> grown(static_cast<size_t>(n_head_kv_) * new_blocks * row);
      for (int h = 0; h < n_head_kv_ && full_blocks() > 0; ++h) {
        std::memcpy(grown.data() + h * new_blocks * row, meta->data() + h * table_blocks_ * row,
                    static_cast<size_t>(full_blocks()) * row * sizeof(uint16_t));
      }
      meta->swap(grown);
    }
  }
  for (size_t t = 0; t < pages_.size(); ++t) {
    pages_[t].resize(new_blocks, nullptr);
    bounds_[t].Reserve(new_blocks);
    if (paged()) {
      pooled_.handles[t].resize(new_blocks);
      pooled_.overflow[t].resize(new_blocks);
    }
  }
  table_blocks_ = new_blocks;
}

void KvCache::Reserve(int n) {
  if (n <= capacity_) return;
  const int old_blocks = capacity_ / block_size_;
  if (!paged()) {
    // Private memory grows geometrically: few, large allocations.
    int new_cap = std::max(n, std::max(64, capacity_ * 2));
    new_cap = (new_cap + block_size_ - 1) / block_size_ * block_size_;
    GrowTables(new_cap / block_size_);
    for (int l = 0; l < n_layer_; ++l) AllocatePrivateBlocks(l, new_cap / block_size_ - old_blocks);
    capacity_ = new_cap;
    return;
  }
  // Pool pages are taken only as positions need them: the budget is shared.
  const int new_blocks = (n + block_size_ - 1) / block_size_;
  GrowTables(new_blocks);
  for (size_t t = 0; t < pages_.size(); ++t) {
    for (int b = old_blocks; b < new_blocks; ++b) AllocatePooledPage(t, b);
  }
  capacity_ = new_blocks * block_size_;
}

void KvCache::AllocatePrivateBlocks(int layer, int count) {
  const size_t page_bytes = page_elements() * sizeof(uint16_t);
  const size_t slab_pages = std::max<size_t>(1, kPageSlabBytes / page_bytes);
  const int first = capacity_ / block_size_;
  // One head's pages of consecutive blocks are adjacent: decode attention
  // sweeps one (layer, head) at a time, and with the heads' pages
  // interleaved a sweep of K read 2 KiB of every 12 KiB.
  for (int h = 0; h < n_head_kv_; ++h) {
    const size_t t = PageTable(layer, h);
    SlabCursor& cur = slab_cursors_[t];
    for (int i = 0; i < count; ++i) {
      if (cur.left == 0) {
        // Not zeroed: attention reads only committed rows, and pages are
        // touched as rows are written rather than all at once. A growth
        // of less than a huge page per table takes exactly what it needs
        // (plain heap memory, 4 KiB pages). From the first growth of a
        // huge page or more on, the table takes 2 MiB slabs (huge pages;
        // their unused end is kept for its next growth), the first of them
        // preceded by a plain slab of (t + 1) / (tables + 1) of a huge page:
        // every table then crosses into a new huge page at a different
        // position, and none in the step that made the growth.
        // In step, all tables would fault their next huge page in the same
        // decode step (every 8K tokens with 16-token blocks, 90 x 2 MiB
        // zeroed by the kernel: a 0.45 s stall on a 2-core VM), instead of
        // one table every ~90 tokens.
        const size_t want = static_cast<size_t>(count - i);
        size_t pages = std::min(want, slab_pages);
        if (cur.huge) {
          pages = slab_pages;
        } else if (want >= slab_pages) {
          cur.huge = true;
          pages = slab_pages * (t + 1) / (pages_.size() + 1);
          if (pages == 0) pages = slab_pages;
        }
        slabs_.push_back(AllocatePageSlab(pages * page_bytes));
        cur.next = reinterpret_cast<uint16_t*>(slabs_.back().get());
        cur.left = pages;
      }
      pages_[t][first + i] = cur.next;
      cur.next += page_elements();
      --cur.left;
    }
  }
}

void KvCache::AllocatePooledPage(size_t t, int b) {
  absl::StatusOr<BlockPool::Handle> h = pooled_.paging.pool->Allocate();
  if (h.ok()) {
    pooled_.handles[t][b] = *h;
    pages_[t][b] = static_cast<uint16_t*>(pooled_.paging.pool->data(*h));
    return;
  }
  // Every slot is pinned or private: this page lives outside the budget
  // until it is stored (ApplyDurability frees it then).
  pooled_.overflow[t][b].reset(new uint16_t[page_elements()]);
  pages_[t][b] = pooled_.overflow[t][b].get();
  if (pooled_.paging.counters != nullptr) ++pooled_.paging.counters->overflow_pages;
}

void KvCache::Commit(int n) {
  const int first = full_blocks(), last = n / block_size_;
  length_ = n;
  std::vector<float> key(head_dim_), mx(head_dim_), mn(head_dim_), sum(head_dim_);
  for (int l = 0; l < n_layer_; ++l) {
    for (int h = 0; h < n_head_kv_; ++h) {
      const KvRows keys = Keys(l, h);  // blocks [first, last) are private: just written
      for (int b = first; b < last; ++b) {
        std::fill(mx.begin(), mx.end(), -INFINITY);
        std::fill(mn.begin(), mn.end(), INFINITY);
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int t = b * block_size_; t < (b + 1) * block_size_; ++t) {
          DequantizeRow(GgmlType::kF16, keys.row(t), key.data(), head_dim_);
          for (int d = 0; d < head_dim_; ++d) {
            mx[d] = std::max(mx[d], key[d]);
            mn[d] = std::min(mn[d], key[d]);
            sum[d] += key[d];
          }
        }
        for (int d = 0; d < head_dim_; ++d) sum[d] /= static_cast<float>(block_size_);
        const size_t at = (static_cast<size_t>(h) * table_blocks_ + b) * head_dim_;
        QuantizeRow(GgmlType::kF16, mx.data(), kmax_[l].data() + at, head_dim_);  // exact
        QuantizeRow(GgmlType::kF16, mn.data(), kmin_[l].data() + at, head_dim_);
        QuantizeRow(GgmlType::kF16, sum.data(), kmean_[l].data() + at, head_dim_);
        bounds_[PageTable(l, h)].Set(b, kmax_[l].data() + at, kmin_[l].data() + at,
                                     kmean_[l].data() + at);
      }
    }
  }
}

size_t KvCache::bytes() const {
  const size_t meta = static_cast<size_t>(3) * n_layer_ * n_head_kv_ * table_blocks_ * head_dim_;
  size_t pages = 0;
  if (!paged()) {
    pages = pages_.size() * static_cast<size_t>(capacity_ / block_size_);
  } else {
    for (const auto& table : pooled_.overflow) {
      for (const auto& p : table) pages += p != nullptr;
    }
  }
  size_t bounds = 0;
  for (const BlockBounds& b : bounds_) bounds += b.bytes();
  return (pages * page_elements() + meta) * sizeof(uint16_t) + bounds;
}

void KvCache::ApplyDurability() {
  std::string id;
  int n = 0;
  durability_->Get(&id, &n);
  n = std::min(n, full_blocks());
  if (n <= durable_blocks_) return;
  if (paged()) {
    for (size_t t = 0; t < pages_.size(); ++t) {
      for (int b = durable_blocks_; b < n; ++b) {
        if (pooled_.handles[t][b].valid()) pooled_.paging.pool->MarkEvictable(pooled_.handles[t][b]);
        if (pooled_.overflow[t][b] != nullptr) {
          pooled_.overflow[t][b].reset();  // stored: fetched back into the pool if needed
          if (pooled_.paging.counters != nullptr) --pooled_.paging.counters->overflow_pages;
        }
        pages_[t][b] = nullptr;  // read through the handle from now on
      }
    }
  }
  durable_id_ = id;
  durable_blocks_ = n;
}

absl::Status KvCache::AdoptStored(const std::string& sequence_id, int n_blocks,
                                  const std::vector<std::string>& layer_metadata) {
  if (!paged() || length_ != 0) {
    return absl::FailedPreconditionError("AdoptStored needs an empty pool-backed cache");
  }
  const size_t record = static_cast<size_t>(n_head_kv_) * 3 * head_dim_ * sizeof(uint16_t);
  if (n_blocks <= 0 || static_cast<int>(layer_metadata.size()) != n_layer_) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected metadata of ", n_layer_, " layers, got ", layer_metadata.size()));
  }
  for (const std::string& m : layer_metadata) {
    if (m.size() < record * n_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("layer metadata holds ", m.size() / record,
                                                     " blocks, expected ", n_blocks));
    }
  }
  GrowTables(n_blocks);
  const size_t d = head_dim_;
  for (int l = 0; l < n_layer_; ++l) {
    const auto* src = reinterpret_cast<const uint16_t*>(layer_metadata[l].data());
    for (int b = 0; b < n_blocks; ++b) {
      for (int h = 0; h < n_head_kv_; ++h) {
        const uint16_t* rec = src + (static_cast<size_t>(b) * n_head_kv_ + h) * 3 * d;
        const size_t at = (static_cast<size_t>(h) * table_blocks_ + b) * d;
        std::memcpy(kmax_[l].data() + at, rec, d * sizeof(uint16_t));
        std::memcpy(kmin_[l].data() + at, rec + d, d * sizeof(uint16_t));
        std::memcpy(kmean_[l].data() + at, rec + 2 * d, d * sizeof(uint16_t));
        bounds_[PageTable(l, h)].Set(b, rec, rec + d, rec + 2 * d);
      }
    }
  }
  length_ = capacity_ = n_blocks * block_size_;  // every page absent until read
  durability_->Update(sequence_id, n_blocks);
  durable_id_ = sequence_id;
  durable_blocks_ = n_blocks;
  return absl::OkStatus();
}

absl::Status KvCache::fetch_status() const {
  absl::MutexLock lock(&fetch_failure_->mu);
  return fetch_failure_->status;
}

void KvCache::SetFetchFailure(const absl::Status& s) const {
  absl::MutexLock lock(&fetch_failure_->mu);
  if (fetch_failure_->status.ok()) fetch_failure_->status = s;
}

}  // namespace psa

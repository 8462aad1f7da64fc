#include "compute_worker/kv/kv_page_reader.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace psa {

KvPageReader::KvPageReader(KvCache& kv, int layer, int kv_head)
    : kv_(kv),
      layer_(layer),
      kv_head_(kv_head),
      table_(kv.PageTable(layer, kv_head)),
      paged_(kv.paged()) {
  if (!paged_) {
    direct_ = kv.pages_[table_].data();
    return;
  }
  const size_t n = kv.pages_[table_].size();
  ptr_.assign(n, nullptr);
  waiting_.assign(n, 0);
  absl::MutexLock lock(&mu_);
  arrived_.assign(n, 0);
}

KvPageReader::~KvPageReader() {
  if (!paged_) return;
  absl::Status failure;
  {
    absl::MutexLock lock(&mu_);
    auto idle = [this] {
      mu_.AssertHeld();
      return in_flight_ == 0;
    };
    if (in_flight_ > 0) {
      // Fetches write into memory we own: wait for them, as stall time
      // (pages fetched ahead and never read keep the task waiting too).
      const absl::Time start = absl::Now();
      mu_.Await(absl::Condition(&idle));
      if (KvPagingCounters* c = kv_.pooled_.paging.counters) {
        c->stall_ns += absl::ToInt64Nanoseconds(absl::Now() - start);
      }
    }
    failure = failure_;
  }
  if (KvPagingCounters* c = kv_.pooled_.paging.counters) {
    c->unread_fetches += std::count(waiting_.begin(), waiting_.end(), 1);
  }
  BlockPool* pool = kv_.pooled_.paging.pool;
  pool->Unpin(pinned_);
  for (size_t i = 0; i < fetched_.size(); ++i) {
    const BlockPool::Handle h = fetched_[i];
    if (failure.ok()) {
      // Fetched ahead but never read: first to go, not most recently used.
      pool->MarkEvictable(h, /*cold=*/waiting_[fetched_block_[i]] != 0);
    } else {
      pool->Free(h);  // garbage: the cache's handle goes stale, a later read refetches
    }
  }
  if (!failure.ok()) kv_.SetFetchFailure(failure);
}

void KvPageReader::Prefetch(absl::Span<const int> blocks) {
  if (!paged_) return;
  const KvPaging& paging = kv_.pooled_.paging;
  std::vector<int> want;
  std::vector<uint16_t*> dsts;
  auto flush = [&] {
    if (want.empty()) return;
    const int n = static_cast<int>(want.size());
    if (paging.counters != nullptr) {
      paging.counters->page_fetches += n;
      paging.counters->fetch_bytes += n * kv_.page_bytes();
    }
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
    }
    paging.fetcher->FetchPages(
        kv_.durable_id(), layer_, kv_head_, want, dsts,
        [this, got = want](absl::Status status) {
          absl::MutexLock lock(&mu_);
          for (int b : got) arrived_[b] = 1;
          if (!status.ok() && failure_.ok()) {
            failure_ = absl::Status(status.code(),
                                    absl::StrCat("fetching KV pages: ", status.message()));
          }
          --in_flight_;
        });
    want.clear();
    dsts.clear();
  };
  for (int b : blocks) {
    if (ptr_[b] != nullptr) continue;  // readable or on its way
    if (uint16_t* own = kv_.pages_[table_][b]; own != nullptr) {
      ptr_[b] = own;  // still private to the cache
      continue;
    }
    if (paging.counters != nullptr) ++paging.counters->page_reads;
    BlockPool::Handle& h = kv_.pooled_.handles[table_][b];
    if (void* p = paging.pool->TryPin(h)) {
      ptr_[b] = static_cast<uint16_t*>(p);
      pinned_.push_back(h);
      continue;
    }
    uint16_t* dst;
    if (absl::StatusOr<BlockPool::Handle> slot = paging.pool->Allocate(); slot.ok()) {
      h = *slot;  // private until the reader ends: nobody else can take it
      fetched_.push_back(h);
      fetched_block_.push_back(b);
      dst = static_cast<uint16_t*>(paging.pool->data(h));
    } else {
      h = BlockPool::Handle{};
      scratch_.emplace_back(new uint16_t[kv_.page_elements()]);
      dst = scratch_.back().get();
      if (paging.counters != nullptr) ++paging.counters->scratch_pages;
    }
    if (b >= kv_.durable_blocks()) {
      // Not resident and not stored: cannot happen unless the cache's
      // bookkeeping is broken. Fail loudly rather than read garbage.
      std::memset(dst, 0, kv_.page_bytes());
      absl::MutexLock lock(&mu_);
      arrived_[b] = 1;
      if (failure_.ok()) {
        failure_ = absl::InternalError(absl::StrCat("KV page of block ", b, " is missing"));
      }
    } else {
      want.push_back(b);
      dsts.push_back(dst);
    }
    ptr_[b] = dst;
    waiting_[b] = 1;
    if (static_cast<int>(want.size()) == kMaxBlocksPerFetch) flush();
  }
  flush();
}

void KvPageReader::Resident(int first, int n, uint8_t* resident) const {
  if (!paged_) {
    std::fill(resident, resident + n, 1);
    return;
  }
  const std::vector<BlockPool::Handle>& handles = kv_.pooled_.handles[table_];
  kv_.pooled_.paging.pool->Holding(absl::MakeConstSpan(handles).subspan(first, n), resident);
  const std::vector<uint16_t*>& own = kv_.pages_[table_];
  for (int i = 0; i < n; ++i) {
    if (own[first + i] != nullptr || ptr_[first + i] != nullptr) resident[i] = 1;
  }
}

const uint16_t* KvPageReader::WaitPage(int b) {
  if (ptr_[b] == nullptr) Prefetch({b});
  if (waiting_[b]) {
    absl::MutexLock lock(&mu_);
    if (!arrived_[b]) {
      const absl::Time start = absl::Now();
      auto here = [this, b] {
        mu_.AssertHeld();
        return arrived_[b] != 0;
      };
      mu_.Await(absl::Condition(&here));
      if (KvPagingCounters* c = kv_.pooled_.paging.counters) {
        c->stall_ns += absl::ToInt64Nanoseconds(absl::Now() - start);
      }
    }
    if (!failure_.ok()) std::memset(ptr_[b], 0, kv_.page_bytes());
    waiting_[b] = 0;
  }
  return ptr_[b];
}

KvRows KvPageReader::Keys() const {
  return KvRows{paged_ ? ptr_.data() : direct_, 0, kv_.block_size(), kv_.head_dim()};
}

KvRows KvPageReader::Values() const {
  return KvRows{paged_ ? ptr_.data() : direct_,
                static_cast<size_t>(kv_.block_size()) * kv_.head_dim(), kv_.block_size(),
                kv_.head_dim()};
}

}  // namespace psa

// GpuPagePool (page_pool.h): the record kernel that lists a step's reads
// from host memory, the kernel that applies Refill's table updates, and the
// host side's CLOCK replacement.
#include "compute_worker/attention/cuda/page_pool.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "compute_worker/attention/cuda/dispatch.cuh"
#include "compute_worker/attention/psa_math.h"

namespace psa::cuda {
namespace {

constexpr int kRecordThreads = 128;
constexpr int kApplyThreads = 256;

struct TableUpdate {
  const uint16_t* ptr;  // the page's new address: a slot, or its host copy
  int page;
  int slot;             // -1: back to host memory
};

// Grid (n_head_kv, n_seq): the pages (s, h) read in the step, in the
// decode kernel's terms: every block in dense mode; else the sinks, the
// newest blocks and the first `taken` candidates of the order, taken = the
// most any head of the group attended beyond the forced blocks (the group
// shares its reads).
__global__ void __launch_bounds__(kRecordThreads)
    RecordReadsKernel(bool dense, PagedKv kv, int n_head, int sink_blocks, int local_blocks,
                      const int* cand_begin, const int* order, const int* blocks,
                      const int* slot_of, unsigned char* ref, int* misses, int max_misses,
                      int* counts) {
  const int h = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  const int sh = s * kv.n_head_kv + h, group = n_head / kv.n_head_kv;
  const int n_keys = kv.seq_len[s];
  const int n_blocks = (n_keys + kPageRows - 1) / kPageRows;
  const PsaLayout lay =
      PsaLayoutOf(n_keys, n_keys / kPageRows, kPageRows, sink_blocks, local_blocks);
  int total = n_blocks;
  if (!dense) {
    int most = 0;
    for (int g = 0; g < group; ++g) most = PsaMax(most, blocks[s * n_head + h * group + g]);
    total = lay.forced() + PsaMin(PsaMax(most - lay.forced(), 0), lay.n_cand());
  }
  const int newest = n_blocks - lay.local_begin;
  int read = 0, from_host = 0;
  for (int i = t; i < total; i += kRecordThreads) {
    int blk = i;
    if (!dense) {
      blk = i < lay.sink ? i
            : i < lay.sink + newest ? lay.local_begin + (i - lay.sink)
                                    : lay.sink + order[cand_begin[sh] + (i - lay.forced())];
    }
    const int page = kv.table[sh] + blk;
    const int slot = slot_of[page];
    ++read;
    if (slot >= 0) {
      ref[slot] = 1;
    } else {
      ++from_host;
      const int k = atomicAdd(&counts[0], 1);
      if (k < max_misses) misses[k] = page;
    }
  }
  if (read > 0) atomicAdd(&counts[1], read);
  if (from_host > 0) atomicAdd(&counts[2], from_host);
}

struct GatherItem {
  const uint4* src;  // the mapped host page
  uint4* dst;        // its slot
};

constexpr int kGatherWarps = 8;

// A warp per page, 16 bytes a lane at a time, straight from host memory.
__global__ void __launch_bounds__(32 * kGatherWarps)
    GatherPagesKernel(const GatherItem* items, int n, int chunks) {
  const int item = blockIdx.x * kGatherWarps + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (item >= n) return;
  const GatherItem it = items[item];
  for (int i = lane; i < chunks; i += 32) it.dst[i] = it.src[i];
}

__global__ void ApplyUpdatesKernel(const TableUpdate* updates, int n, const uint16_t** table,
                                   int* slot_of) {
  const int i = blockIdx.x * kApplyThreads + threadIdx.x;
  if (i >= n) return;
  table[updates[i].page] = updates[i].ptr;
  slot_of[updates[i].page] = updates[i].slot;
}

}  // namespace

cudaError_t GpuPagePool::Create(const std::vector<const void*>& host_pages, size_t page_bytes,
                                int n_slots, int max_misses, std::unique_ptr<GpuPagePool>* out) {
  if (host_pages.empty() || page_bytes == 0 || page_bytes % 16 != 0 || n_slots < 1 ||
      max_misses < 1) {
    return cudaErrorInvalidValue;
  }
  std::unique_ptr<GpuPagePool> p(new GpuPagePool());
  p->page_bytes_ = page_bytes;
  p->n_pages_ = static_cast<int>(host_pages.size());
  p->n_slots_ = n_slots;
  p->max_misses_ = max_misses;
  p->host_src_ = host_pages;
  p->host_ptrs_.resize(host_pages.size());
  for (size_t i = 0; i < host_pages.size(); ++i) {
    void* dev = nullptr;  // the device's address of the mapped host page
    if (cudaError_t e = cudaHostGetDevicePointer(&dev, const_cast<void*>(host_pages[i]), 0);
        e != cudaSuccess) {
      return e;  // not registered mapped
    }
    p->host_ptrs_[i] = static_cast<const uint16_t*>(dev);
    if (reinterpret_cast<uintptr_t>(dev) % 16 != 0) return cudaErrorInvalidValue;
  }
  p->page_of_slot_.assign(n_slots, -1);
  p->slot_of_page_.assign(host_pages.size(), -1);
  p->clock_.assign(n_slots, 0);
  const size_t n = host_pages.size();
  cudaError_t e = cudaSuccess;
  auto alloc = [&e](auto** ptr, size_t bytes) {
    if (e == cudaSuccess) e = cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
  };
  alloc(&p->slots_, static_cast<size_t>(n_slots) * page_bytes);
  alloc(&p->table_, n * sizeof(uint16_t*));
  alloc(&p->host_table_, n * sizeof(uint16_t*));
  alloc(&p->slot_of_, n * sizeof(int));
  alloc(&p->ref_, static_cast<size_t>(n_slots));
  alloc(&p->misses_, static_cast<size_t>(max_misses) * sizeof(int));
  alloc(&p->counts_, 3 * sizeof(int));
  alloc(&p->updates_, 2 * static_cast<size_t>(n_slots) * sizeof(TableUpdate));
  alloc(&p->gathers_, static_cast<size_t>(n_slots) * sizeof(GatherItem));
  if (e == cudaSuccess) {
    e = cudaMemcpy(p->table_, p->host_ptrs_.data(), n * sizeof(uint16_t*), cudaMemcpyHostToDevice);
  }
  if (e == cudaSuccess) {
    e = cudaMemcpy(p->host_table_, p->host_ptrs_.data(), n * sizeof(uint16_t*),
                   cudaMemcpyHostToDevice);
  }
  if (e == cudaSuccess) e = cudaMemset(p->slot_of_, 0xff, n * sizeof(int));  // -1
  if (e == cudaSuccess) e = cudaMemset(p->ref_, 0, static_cast<size_t>(n_slots));
  if (e == cudaSuccess) e = cudaMemset(p->counts_, 0, 3 * sizeof(int));
  if (e != cudaSuccess) return e;
  *out = std::move(p);
  return cudaSuccess;
}

GpuPagePool::~GpuPagePool() {
  for (void* ptr : {static_cast<void*>(slots_), static_cast<void*>(table_),
                    static_cast<void*>(host_table_),
                    static_cast<void*>(slot_of_), static_cast<void*>(ref_),
                    static_cast<void*>(misses_), static_cast<void*>(counts_),
                    static_cast<void*>(updates_), static_cast<void*>(gathers_)}) {
    if (ptr != nullptr) cudaFree(ptr);
  }
}

cudaError_t GpuPagePool::RecordReads(DecodeMode mode, const PagedKv& kv, int n_head,
                                     const Selection& sel, const int* cand_begin,
                                     const int* order, const int* blocks, cudaStream_t stream) {
  const bool dense = mode == DecodeMode::kDense;
  if (kv.n_seq <= 0) return cudaSuccess;
  if (kv.pages != table_ || n_head % kv.n_head_kv != 0 ||
      (!dense && (cand_begin == nullptr || order == nullptr || blocks == nullptr))) {
    return cudaErrorInvalidValue;
  }
  PSA_LAUNCH(RecordReadsKernel, dim3(kv.n_head_kv, kv.n_seq), dim3(kRecordThreads), stream,
             dense, kv, n_head, sel.sink_blocks, sel.local_blocks, cand_begin, order, blocks,
             slot_of_, ref_, misses_, max_misses_, counts_);
  return cudaGetLastError();
}

cudaError_t GpuPagePool::Refill(cudaStream_t stream) {
  int counts[3] = {0, 0, 0};
  cudaError_t e = cudaMemcpyAsync(counts, counts_, sizeof(counts), cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return e;
  stats_.pages_read += counts[1];
  stats_.read_from_host += counts[2];
  const int listed = std::min(counts[0], max_misses_);
  std::vector<int> misses(listed);
  if (listed > 0) {
    e = cudaMemcpyAsync(misses.data(), misses_, listed * sizeof(int), cudaMemcpyDeviceToHost,
                        stream);
  }
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(clock_.data(), ref_, clock_.size(), cudaMemcpyDeviceToHost, stream);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return e;
  e = BringIn(misses, stream);
  if (e == cudaSuccess) e = cudaMemsetAsync(counts_, 0, 3 * sizeof(int), stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e;
}

cudaError_t GpuPagePool::Prefetch(const std::vector<int>& pages, cudaStream_t stream) {
  for (int page : pages) {
    if (page < 0 || page >= n_pages_) return cudaErrorInvalidValue;
  }
  cudaError_t e = cudaMemcpyAsync(clock_.data(), ref_, clock_.size(), cudaMemcpyDeviceToHost,
                                  stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess) e = BringIn(pages, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e;
}

cudaError_t GpuPagePool::BringIn(const std::vector<int>& misses, cudaStream_t stream) {
  cudaError_t e = cudaSuccess;
  // CLOCK: the hand clears a set bit and moves on; takes a free slot or
  // one whose bit is clear. Pages brought in now are not taken again in the
  // same refill (no thrash when the misses outnumber the slots).
  std::vector<TableUpdate> updates;
  std::vector<GatherItem> gathers;
  std::vector<unsigned char> fresh(n_slots_, 0);
  int brought = 0;
  for (int page : misses) {
    if (slot_of_page_[page] >= 0 || brought == n_slots_) continue;  // listed twice; full
    int slot = -1;
    for (int step = 0; step < 2 * n_slots_ && slot < 0; ++step) {
      const int at = hand_;
      hand_ = (hand_ + 1) % n_slots_;
      if (fresh[at]) continue;
      if (page_of_slot_[at] >= 0 && clock_[at]) {
        clock_[at] = 0;
        continue;
      }
      slot = at;
    }
    if (slot < 0) break;
    if (const int old = page_of_slot_[slot]; old >= 0) {
      updates.push_back({host_ptrs_[old], old, -1});
      slot_of_page_[old] = -1;
      ++stats_.evicted;
      --stats_.resident;
    }
    uint16_t* dst = slots_ + static_cast<size_t>(slot) * (page_bytes_ / sizeof(uint16_t));
    if (copy_ == PageCopy::kGather) {
      gathers.push_back({reinterpret_cast<const uint4*>(host_ptrs_[page]),
                         reinterpret_cast<uint4*>(dst)});
    } else {
      e = cudaMemcpyAsync(dst, host_src_[page], page_bytes_, cudaMemcpyHostToDevice, stream);
      if (e != cudaSuccess) return e;
    }
    updates.push_back({dst, page, slot});
    page_of_slot_[slot] = page;
    slot_of_page_[page] = slot;
    clock_[slot] = 1;  // survives the hand's next pass
    fresh[slot] = 1;
    ++brought;
    ++stats_.copied_in;
    ++stats_.resident;
  }
  if (!gathers.empty()) {
    e = cudaMemcpyAsync(gathers_, gathers.data(), gathers.size() * sizeof(GatherItem),
                        cudaMemcpyHostToDevice, stream);
    if (e != cudaSuccess) return e;
    const int n = static_cast<int>(gathers.size());
    PSA_LAUNCH(GatherPagesKernel, dim3((n + kGatherWarps - 1) / kGatherWarps),
               dim3(32 * kGatherWarps), stream, static_cast<const GatherItem*>(gathers_), n,
               static_cast<int>(page_bytes_ / 16));
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  e = cudaMemcpyAsync(ref_, clock_.data(), clock_.size(), cudaMemcpyHostToDevice, stream);
  if (e == cudaSuccess && !updates.empty()) {
    e = cudaMemcpyAsync(updates_, updates.data(), updates.size() * sizeof(TableUpdate),
                        cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) {
      const int n = static_cast<int>(updates.size());
      PSA_LAUNCH(ApplyUpdatesKernel, dim3((n + kApplyThreads - 1) / kApplyThreads),
                 dim3(kApplyThreads), stream,
                 static_cast<const TableUpdate*>(updates_), n, table_, slot_of_);
      e = cudaGetLastError();
    }
  }
  // The copies read `updates`, `gathers` and `clock_` (host memory) until done.
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  return e;
}

}  // namespace psa::cuda

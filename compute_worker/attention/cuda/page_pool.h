// GpuPagePool: a budget of GPU page slots in front of the worker's host
// page memory, shared by every layer and sequence (the paper's unified
// block pool). Every page has an entry in a device page table, the `pages`
// array PagedKv reads: a GPU slot's address when the page is resident,
// else the page's host address (pinned and mapped), which the kernels then
// read over the bus. So a step is right whatever is resident, and which
// blocks it attends never depends on residency; residency only makes it
// fast. After a step, RecordReads marks the pages it read (CLOCK bits of
// their slots) and lists, on the device, those it read from host memory;
// Refill copies them into slots (CLOCK eviction: a slot read since the hand
// last passed stays) and points the table at them, for the next steps,
// which mostly read the same blocks.
//
// Host API (g++ and nvcc compile it); page_pool.cu holds the kernels.
// Ownership: the pool owns its slots and tables; the host pages are the
// caller's, pinned and mapped (cudaHostAlloc(..., cudaHostAllocMapped), or
// cudaHostRegister(..., cudaHostRegisterMapped) of the host pool's slabs)
// for the pool's life. Thread-compatible; RecordReads and Refill go on the
// stream of the steps (or one ordered after them), so no step reads a slot
// while it is refilled.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_CUDA_PAGE_POOL_H_
#define PSA_COMPUTE_WORKER_ATTENTION_CUDA_PAGE_POOL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "compute_worker/attention/cuda/psa_cuda.h"

namespace psa::cuda {

// How Refill moves pages: a cudaMemcpyAsync (DMA) per page, or one gather
// kernel in which a warp per page reads the mapped host page over the bus
// (no per-copy launch cost; the bench's paging runs compare the two).
enum class PageCopy { kDma, kGather };

struct PagePoolStats {
  int64_t pages_read = 0;       // pages the recorded steps read
  int64_t read_from_host = 0;   // of them, read over the bus (not resident)
  int64_t copied_in = 0;        // pages Refill brought into slots
  int64_t evicted = 0;          // resident pages whose slot was taken
  int resident = 0;             // pages in slots now
};

class GpuPagePool {
 public:
  // host_pages[p]: page p's host address, page_bytes long (16-byte
  // aligned); n_slots GPU slots; at most max_misses host reads recorded
  // between two Refills (more are read, just not listed).
  static cudaError_t Create(const std::vector<const void*>& host_pages, size_t page_bytes,
                            int n_slots, int max_misses, std::unique_ptr<GpuPagePool>* out);
  ~GpuPagePool();

  // The device page table, [n_pages]: what PagedKv::pages should be.
  const uint16_t* const* table() const { return table_; }
  // The host pages' device addresses, [n_pages]: RunAppend's host_pages,
  // so appended rows reach the host copy of a resident page too.
  const uint16_t* const* host_table() const { return host_table_; }

  // After a decode step of `mode` over `kv` (its pages = table()) with the
  // candidates `cand_begin` / `order` (ordered modes) and `blocks`, the
  // step's DecodeOutputs::blocks ([n_seq][n_head]): marks the pages it read
  // and lists those read from host memory. Asynchronous on `stream`.
  cudaError_t RecordReads(DecodeMode mode, const PagedKv& kv, int n_head, const Selection& sel,
                          const int* cand_begin, const int* order, const int* blocks,
                          cudaStream_t stream);

  // Brings the listed pages into slots and updates the table; waits for
  // `stream` (to read the list), so call it off the critical path.
  cudaError_t Refill(cudaStream_t stream);

  // Brings `pages` (ids into the table) into slots ahead of the steps that
  // will read them (e.g. the order's prefix), by the same CLOCK rule; at
  // most n_slots of them. Waits for `stream`.
  cudaError_t Prefetch(const std::vector<int>& pages, cudaStream_t stream);

  PagePoolStats stats() const { return stats_; }
  void set_page_copy(PageCopy how) { copy_ = how; }

 private:
  GpuPagePool() = default;
  // Copies `pages` not resident yet into slots (CLOCK) and updates the table.
  cudaError_t BringIn(const std::vector<int>& pages, cudaStream_t stream);

  size_t page_bytes_ = 0;
  int n_pages_ = 0, n_slots_ = 0, max_misses_ = 0;
  std::vector<const void*> host_src_;       // the host pages (copy sources)
  std::vector<const uint16_t*> host_ptrs_;  // their device-visible addresses
  std::vector<int> page_of_slot_;           // -1: free
  std::vector<int> slot_of_page_;           // -1: not resident
  std::vector<unsigned char> clock_;        // host copy of the CLOCK bits
  int hand_ = 0;
  PageCopy copy_ = PageCopy::kDma;
  PagePoolStats stats_;
  // Device memory.
  uint16_t* slots_ = nullptr;               // n_slots * page_bytes
  const uint16_t** table_ = nullptr;        // [n_pages]
  const uint16_t** host_table_ = nullptr;   // [n_pages], never changes
  int* slot_of_ = nullptr;                  // [n_pages], -1: host
  unsigned char* ref_ = nullptr;            // [n_slots] CLOCK bits
  int* misses_ = nullptr;                   // [max_misses]
  int* counts_ = nullptr;                   // [0] misses listed, [1] pages read, [2] from host
  void* updates_ = nullptr;                 // Refill's table updates
  void* gathers_ = nullptr;                 // Refill's (source, destination) pairs
};

}  // namespace psa::cuda

#endif  // PSA_COMPUTE_WORKER_ATTENTION_CUDA_PAGE_POOL_H_

// Memory for KV pages, handed out in slabs. A slab of kPageSlabBytes or more
// is aligned to 2 MiB and advised for transparent huge pages: attention
// sweeps thousands of 4 KiB pages a step, and with 4 KiB mappings every page
// costs a TLB miss and a page walk (dense decode at 128K tokens ran ~10%
// slower). Smaller slabs (short sequences) take plain heap memory.
#ifndef PSA_COMPUTE_WORKER_KV_PAGE_SLAB_H_
#define PSA_COMPUTE_WORKER_KV_PAGE_SLAB_H_

#include <cstddef>
#include <memory>

namespace psa {

constexpr size_t kPageSlabBytes = size_t{2} << 20;

struct PageSlabFree {
  void operator()(char* p) const;
};
using PageSlab = std::unique_ptr<char, PageSlabFree>;

// At least `bytes` of uninitialised memory (huge pages when bytes >=
// kPageSlabBytes and the kernel allows them). Throws std::bad_alloc.
PageSlab AllocatePageSlab(size_t bytes);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_PAGE_SLAB_H_

#include "compute_worker/kv/page_slab.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace psa {

void PageSlabFree::operator()(char* p) const { std::free(p); }

PageSlab AllocatePageSlab(size_t bytes) {
  const bool huge = bytes >= kPageSlabBytes;
  if (huge) bytes = (bytes + kPageSlabBytes - 1) / kPageSlabBytes * kPageSlabBytes;
  void* p = huge ? std::aligned_alloc(kPageSlabBytes, bytes) : std::malloc(bytes);
  if (p == nullptr) throw std::bad_alloc();
  // Advice only: with THP off (or "never") the slab keeps 4 KiB pages.
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  return PageSlab(static_cast<char*>(p));
}

}  // namespace psa

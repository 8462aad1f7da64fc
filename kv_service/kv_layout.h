// KV layouts: the checks on a psa.v1.KvLayout and the sizes of one block
// under it, shared by the store (BlockStore) and anything that builds
// blocks for it.
//
// Plain functions of their arguments: they own nothing, keep no state and
// are safe to call from any thread.
#ifndef PSA_KV_SERVICE_KV_LAYOUT_H_
#define PSA_KV_SERVICE_KV_LAYOUT_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "proto/psa/v1/kv_service.pb.h"

namespace psa {

// Checks a layout's fields; the error names the field to fix.
absl::Status ValidateKvLayout(const psa::v1::KvLayout& layout);
// Bytes of one block's K+V data / metadata under a valid layout.
uint64_t KvBlockDataBytes(const psa::v1::KvLayout& layout);
uint64_t KvBlockMetadataBytes(const psa::v1::KvLayout& layout);
size_t KvDtypeBytes(psa::v1::KvDtype dtype);

}  // namespace psa

#endif  // PSA_KV_SERVICE_KV_LAYOUT_H_

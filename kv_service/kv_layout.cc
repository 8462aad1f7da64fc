#include "kv_service/kv_layout.h"

#include "absl/strings/str_cat.h"

namespace psa {
namespace {

// Generous bounds that catch garbage without limiting real models.
constexpr uint32_t kMaxLayers = 1024;
constexpr uint32_t kMaxKvHeads = 1024;
constexpr uint32_t kMaxHeadDim = 4096;
constexpr uint32_t kMaxBlockSize = 4096;

}  // namespace

size_t KvDtypeBytes(psa::v1::KvDtype dtype) {
  switch (dtype) {
    case psa::v1::KV_DTYPE_F16:
    case psa::v1::KV_DTYPE_BF16:
      return 2;
    case psa::v1::KV_DTYPE_F32:
      return 4;
    default:
      return 0;
  }
}

absl::Status ValidateKvLayout(const psa::v1::KvLayout& l) {
  auto in_range = [](const char* name, uint32_t v, uint32_t max) -> absl::Status {
    if (v == 0 || v > max) {
      return absl::InvalidArgumentError(
          absl::StrCat("layout.", name, " is ", v, "; it must be in [1, ", max, "]"));
    }
    return absl::OkStatus();
  };
  if (absl::Status s = in_range("num_layers", l.num_layers(), kMaxLayers); !s.ok()) return s;
  if (absl::Status s = in_range("num_kv_heads", l.num_kv_heads(), kMaxKvHeads); !s.ok()) return s;
  if (absl::Status s = in_range("head_dim", l.head_dim(), kMaxHeadDim); !s.ok()) return s;
  if (absl::Status s = in_range("block_size", l.block_size(), kMaxBlockSize); !s.ok()) return s;
  if (KvDtypeBytes(l.dtype()) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout.dtype is ", l.dtype(), "; use KV_DTYPE_F16, KV_DTYPE_BF16 or KV_DTYPE_F32"));
  }
  if (l.model_id().empty()) {
    return absl::InvalidArgumentError(
        "layout.model_id is empty; name the weights the KV was computed with");
  }
  return absl::OkStatus();
}

uint64_t KvBlockDataBytes(const psa::v1::KvLayout& l) {
  return 2ull * l.num_kv_heads() * l.block_size() * l.head_dim() * KvDtypeBytes(l.dtype());
}

uint64_t KvBlockMetadataBytes(const psa::v1::KvLayout& l) {
  return 3ull * l.num_kv_heads() * l.head_dim() * KvDtypeBytes(l.dtype());
}

}  // namespace psa

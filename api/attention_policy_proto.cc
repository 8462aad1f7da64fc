#include "api/attention_policy_proto.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace psa {

// Far above any context's block count; also keeps a uint32 from wrapping
// into a negative int.
constexpr uint32_t kMaxTopKBlocks = 1u << 24;

absl::StatusOr<AttentionPolicy> PolicyFromProto(const v1::AttentionPolicy& requested,
                                                const AttentionPolicy& server_default) {
  AttentionPolicy policy = server_default;
  switch (requested.kind()) {
    case v1::AttentionPolicy::KIND_DEFAULT:
      break;
    case v1::AttentionPolicy::KIND_DENSE:
      policy.kind = AttentionPolicy::Kind::kDense;
      break;
    case v1::AttentionPolicy::KIND_TOPK:
      policy.kind = AttentionPolicy::Kind::kTopK;
      break;
    case v1::AttentionPolicy::KIND_PSA:
      policy.kind = AttentionPolicy::Kind::kPsa;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("attention.kind ", requested.kind(), " is not a known policy"));
  }
  if (requested.epsilon() != 0) policy.epsilon = requested.epsilon();
  if (requested.top_k_blocks() > kMaxTopKBlocks) {
    return absl::InvalidArgumentError(absl::StrCat("attention.top_k_blocks must be <= ",
                                                   kMaxTopKBlocks, ", got ",
                                                   requested.top_k_blocks()));
  }
  if (requested.top_k_blocks() != 0) policy.top_k = static_cast<int>(requested.top_k_blocks());
  if (absl::Status s = policy.Validate(); !s.ok()) return s;
  return policy;
}

AttentionPolicy ClientUnsetPolicy() {
  AttentionPolicy p;
  p.epsilon = 0;
  p.top_k = 0;
  return p;
}

absl::StatusOr<v1::AttentionPolicy> PolicyToProto(const AttentionPolicy& policy,
                                                  const AttentionPolicy& unset) {
  // The wire carries these; compare the rest.
  AttentionPolicy rest = policy;
  rest.kind = unset.kind;
  rest.epsilon = unset.epsilon;
  rest.top_k = unset.top_k;
  if (rest != unset) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention policy ", policy.ToString(),
        ": a request carries only the kind, eps and k; the other options are the worker's "
        "settings (psa-worker --attention)"));
  }
  if (!(policy.epsilon >= 0 && policy.epsilon <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("epsilon must be in (0, 1], got ", policy.epsilon));
  }
  if (policy.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 1, got ", policy.top_k));
  }
  v1::AttentionPolicy out;
  switch (policy.kind) {
    case AttentionPolicy::Kind::kDense: out.set_kind(v1::AttentionPolicy::KIND_DENSE); break;
    case AttentionPolicy::Kind::kTopK: out.set_kind(v1::AttentionPolicy::KIND_TOPK); break;
    case AttentionPolicy::Kind::kPsa: out.set_kind(v1::AttentionPolicy::KIND_PSA); break;
  }
  out.set_epsilon(policy.epsilon);
  out.set_top_k_blocks(static_cast<uint32_t>(policy.top_k));
  return out;
}

}  // namespace psa

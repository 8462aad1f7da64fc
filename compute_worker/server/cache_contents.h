// CacheContents: what a sequence's KV cache holds, as the KV service names
// it. Blocks are named by the tokens they hold (PrefixStore); but the same
// tokens give different KV when a sparse policy's decode steps made them
// (a decode row is attended sparsely, a prompt row densely), so positions
// from `decode_from` on also carry the policy that decoded them. Blocks a
// prompt prefill made stay shareable by every request with that prefix;
// decoded blocks only by a resume of the same generation under the same
// policy. A `salt` (a tenant's scope) joins every name: requests with
// different salts share no block. A view: the tokens outlive it.
#ifndef PSA_COMPUTE_WORKER_SERVER_CACHE_CONTENTS_H_
#define PSA_COMPUTE_WORKER_SERVER_CACHE_CONTENTS_H_

#include <string>

#include "absl/types/span.h"
#include "common/attention_policy.h"
#include "compute_worker/attention/attention.h"
#include "compute_worker/model/tokenizer.h"

namespace psa {

struct CacheContents {
  absl::Span<const TokenId> tokens;  // in cache order
  int decode_from = 0;               // tokens[decode_from, ...) came from decode steps
  std::string decoded_by;            // their policy; empty: dense (equal to a prefill's)
  std::string salt;                  // prefix-sharing scope; empty: shared by all
};

// The name of the policy that decodes under `attention`, for CacheContents.
inline std::string DecodedBy(const AttentionBackend& attention) {
  return attention.name() == "dense" ? std::string() : attention.Describe();
}
// The same from the policy a request resolved to (its backend's Describe()).
inline std::string DecodedBy(const AttentionPolicy& policy) {
  return policy.kind == AttentionPolicy::Kind::kDense ? std::string() : policy.ToString();
}

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_CACHE_CONTENTS_H_

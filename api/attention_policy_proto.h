// Conversion between AttentionPolicy (common/attention_policy.h) and its
// wire form psa.v1.AttentionPolicy, both ways. The wire form carries the
// kind and the per-request knobs (epsilon, top_k_blocks); everything else
// is the serving worker's setting. Stateless functions; thread-safe.
#ifndef PSA_API_ATTENTION_POLICY_PROTO_H_
#define PSA_API_ATTENTION_POLICY_PROTO_H_

#include "absl/status/statusor.h"
#include "common/attention_policy.h"
#include "proto/psa/v1/generation.pb.h"

namespace psa {

// The policy a request asks for: `server_default` with the kind and the
// knobs the request sets (0 / KIND_DEFAULT: the server's), validated.
// INVALID_ARGUMENT naming the field otherwise.
absl::StatusOr<AttentionPolicy> PolicyFromProto(const v1::AttentionPolicy& requested,
                                                const AttentionPolicy& server_default);

// A client's wire form of `policy`: kind, epsilon and top_k as they are
// (0 leaves the server's default). Options the wire does not carry must
// equal `unset`'s, else INVALID_ARGUMENT saying they are worker settings.
// Clients parse their --attention text against ClientUnsetPolicy().
absl::StatusOr<v1::AttentionPolicy> PolicyToProto(const AttentionPolicy& policy,
                                                  const AttentionPolicy& unset);

// The base a client parses against: epsilon and top_k 0 ("the server's"),
// the rest defaults.
AttentionPolicy ClientUnsetPolicy();

}  // namespace psa

#endif  // PSA_API_ATTENTION_POLICY_PROTO_H_

// Retrieval heads: (layer, KV head) sites whose query heads copy from far
// back in the context — attend to an earlier occurrence of the current token
// (a duplicate-token head) or to the token after it (an induction head) — at
// one key that block metadata does not reveal. That key's block holds 15
// unrelated keys, so neither its key box nor its mean key ranks it high,
// and when the selection misses it the head's output is wrong outright.
// On SmolLM2-135M at 8K every large miss of the estimate ranking came from
// one such site, L7.2 (docs/attention.md, "Retrieval heads"). Sparse
// policies attend these sites densely on decode rows
// (AttentionTask::retrieval_head, AttentionPolicy::retrieval_dense).
//
// Which sites they are is a property of the model, measured offline on the
// tuning essays (`psa_accuracy --sites_csv`: the sites whose output error
// under the estimate ranking at 1/8 of the KV stands out, confirmed by
// attending them densely) and kept in the model registry
// (RegisteredModel::retrieval_heads). A model the registry does not know
// has none unless --retrieval_heads names them. Every worker serving a
// model marks the same sites, so answers do not depend on which one serves.
// Stateless functions; thread-safe.
#ifndef PSA_COMPUTE_WORKER_RUNTIME_RETRIEVAL_HEADS_H_
#define PSA_COMPUTE_WORKER_RUNTIME_RETRIEVAL_HEADS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "compute_worker/model/llama_model.h"

namespace psa {

// The --retrieval_heads flag's help, for every binary that has it.
inline constexpr char kRetrievalHeadsFlagHelp[] =
    "Sites (L<layer>.<KV head>, comma-separated) whose decode rows sparse policies attend "
    "densely (compute_worker/runtime/retrieval_heads.h): 'registry' (the model registry's "
    "entry for this GGUF file; none if it is not registered), 'none', or a list, e.g. "
    "L7.2,L17.1.";

// "L7.2,L17.1" (layer.KV head) -> a LlamaRuntime::SetRetrievalHeads() mask
// for a model of hp's shape; "" or "none": empty (no site). INVALID_ARGUMENT
// naming the entry that is malformed or outside the model.
absl::StatusOr<std::vector<bool>> ParseRetrievalHeads(absl::string_view sites,
                                                      const LlamaHparams& hp);

// The marked sites of `mask` as "L7.2 L17.1" (empty: none).
std::string SiteNames(const std::vector<bool>& mask, int n_head_kv);

// The sites a --retrieval_heads flag value names for a model whose GGUF
// file has sha256 `model_sha256`: "registry" (the default), the registry's
// entry for that file (none if it is not registered); otherwise a list as
// ParseRetrievalHeads takes. `described`, if given, receives a line for
// logs, e.g. "L7.2 L17.1 L18.2 (registry: smollm2-135m)".
absl::StatusOr<std::vector<bool>> ResolveRetrievalHeads(absl::string_view flag,
                                                        const std::string& model_sha256,
                                                        const LlamaHparams& hp,
                                                        std::string* described = nullptr);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_RUNTIME_RETRIEVAL_HEADS_H_

// The models PSA-Serve knows by name (compute_worker/model/models.tsv, compiled
// in): what --model resolves a name to. scripts/fetch_model.sh NAME downloads
// and checks the file; the binaries only look for it in the model cache.
// Immutable, thread-safe.
#ifndef PSA_COMPUTE_WORKER_MODEL_MODEL_REGISTRY_H_
#define PSA_COMPUTE_WORKER_MODEL_MODEL_REGISTRY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/attention_policy.h"

namespace psa {

struct RegisteredModel {
  std::string name;    // e.g. "qwen2.5-coder-1.5b"
  std::string file;    // file name in the cache's models/ folder
  std::string sha256;  // of the whole file
  int64_t bytes = 0;
  // Sites sparse policies attend densely, e.g. "L7.2,L17.1" (empty: none):
  // compute_worker/runtime/retrieval_heads.h.
  std::string retrieval_heads;
  // The default policy for this model, e.g. "psa:eps=0.9" (empty: the
  // built-in defaults): DefaultPolicyFor().
  std::string attention;
  std::string about;   // one line: family, quantisation, context
};

// Every registered model, in the registry's order.
const std::vector<RegisteredModel>& ModelRegistry();

// The registered model whose file has this sha256, or null.
const RegisteredModel* RegisteredBySha256(const std::string& sha256);

// The policy a worker serving the file with this sha256 parses its
// --attention over: the registry's `attention` for it, else AttentionPolicy{}.
// INTERNAL if the registry's entry does not parse or validate (the
// registry test guards it).
absl::StatusOr<AttentionPolicy> DefaultPolicyFor(const std::string& sha256);

// The model cache's models/ folder: $PSA_CACHE_DIR/models, else
// ~/.cache/psa-serve/models.
std::string ModelCacheDir();

// A --model value: a path to an existing file is returned as is; a registry
// name becomes its file in the cache. NOT_FOUND, saying how to fetch it, when
// a named model is not in the cache or the value is neither a file nor a name.
absl::StatusOr<std::string> ResolveModelPath(const std::string& name_or_path);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_MODEL_REGISTRY_H_

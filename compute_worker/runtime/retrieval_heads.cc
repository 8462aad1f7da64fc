#include "compute_worker/runtime/retrieval_heads.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "compute_worker/model/model_registry.h"

namespace psa {

absl::StatusOr<std::vector<bool>> ParseRetrievalHeads(absl::string_view sites,
                                                      const LlamaHparams& hp) {
  std::vector<bool> mask;
  sites = absl::StripAsciiWhitespace(sites);
  if (sites.empty() || sites == "none" || sites == "-") return mask;
  mask.assign(static_cast<size_t>(hp.n_layer) * hp.n_head_kv, false);
  for (absl::string_view e : absl::StrSplit(sites, ',', absl::SkipWhitespace())) {
    e = absl::StripAsciiWhitespace(e);
    int l = -1, h = -1;
    const std::vector<absl::string_view> parts = absl::StrSplit(e.substr(1), '.');
    if ((e[0] != 'L' && e[0] != 'l') || parts.size() != 2 || !absl::SimpleAtoi(parts[0], &l) ||
        !absl::SimpleAtoi(parts[1], &h)) {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", e, "\" is not a site: L<layer>.<KV head>, e.g. L7.2"));
    }
    if (l < 0 || l >= hp.n_layer || h < 0 || h >= hp.n_head_kv) {
      return absl::InvalidArgumentError(absl::StrCat("site \"", e, "\" is outside the model (",
                                                     hp.n_layer, " layers, ", hp.n_head_kv,
                                                     " KV heads)"));
    }
    mask[static_cast<size_t>(l) * hp.n_head_kv + h] = true;
  }
  return mask;
}

std::string SiteNames(const std::vector<bool>& mask, int n_head_kv) {
  std::vector<std::string> names;
  for (size_t i = 0; i < mask.size(); ++i) {
    if (mask[i]) names.push_back(absl::StrCat("L", i / n_head_kv, ".", i % n_head_kv));
  }
  return absl::StrJoin(names, " ");
}

absl::StatusOr<std::vector<bool>> ResolveRetrievalHeads(absl::string_view flag,
                                                        const std::string& model_sha256,
                                                        const LlamaHparams& hp,
                                                        std::string* described) {
  std::string source = "--retrieval_heads";
  absl::string_view sites = flag;
  if (flag == "registry") {
    const RegisteredModel* m = RegisteredBySha256(model_sha256);
    source = m != nullptr ? absl::StrCat("registry: ", m->name) : "registry: not registered";
    sites = m != nullptr ? absl::string_view(m->retrieval_heads) : absl::string_view();
  }
  absl::StatusOr<std::vector<bool>> mask = ParseRetrievalHeads(sites, hp);
  if (!mask.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", mask.status().message()));
  }
  if (described != nullptr) {
    const std::string names = SiteNames(*mask, hp.n_head_kv);
    *described = absl::StrCat(names.empty() ? "none" : names, " (", source, ")");
  }
  return mask;
}

}  // namespace psa

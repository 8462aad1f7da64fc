#include "common/attention_policy.h"

#include <cmath>
#include <type_traits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace psa {
namespace {

// ",rank=bound" where set, then
// ",sink=N,local=N" where they differ from the defaults, then ",noretrieval".
std::string ForcedBlocks(const AttentionPolicy& p) {
  const AttentionPolicy d;
  return absl::StrCat(p.rank == AttentionPolicy::Rank::kBound ? ",rank=bound" : "",
                      p.sink_blocks != d.sink_blocks ? absl::StrCat(",sink=", p.sink_blocks) : "",
                      p.local_blocks != d.local_blocks ? absl::StrCat(",local=", p.local_blocks)
                                                       : "",
                      p.retrieval_dense ? "" : ",noretrieval");
}

}  // namespace

absl::Status AttentionPolicy::Validate() const {
  if (kind == Kind::kPsa) {
    if (!(epsilon > 0.0f && epsilon <= 1.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("epsilon must be in (0, 1], got ", epsilon));
    }
    if (group_blocks < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("group_blocks must be >= 1, got ", group_blocks));
    }
  }
  if (kind == Kind::kPsa && !(resident_bias >= 0.0f && resident_bias <= 100.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("resident_bias must be in [0, 100], got ", resident_bias));
  }
  if (kind == Kind::kTopK && top_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 1, got ", top_k));
  }
  if (sparse_prefill_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse_prefill_rows must be >= 0, got ", sparse_prefill_rows));
  }
  if (min_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("min_blocks must be >= 0, got ", min_blocks));
  }
  if (sink_blocks < 0 || local_blocks < 0) {
    return absl::InvalidArgumentError("sink_blocks and local_blocks must be >= 0");
  }
  return absl::OkStatus();
}

std::string AttentionPolicy::ToString(absl::string_view variant) const {
  switch (kind) {
    case Kind::kDense: return "dense";
    case Kind::kTopK:
      return absl::StrCat("topk(k=", top_k, variant,
                          sparse_prefill_rows > 0 ? absl::StrCat(",prefill=", sparse_prefill_rows) : "",
                          ForcedBlocks(*this), ")");
    case Kind::kPsa:
      return absl::StrCat("psa(eps=", epsilon, ",G=", group_blocks,
                          min_blocks > 0 ? absl::StrCat(",min_blocks=", min_blocks) : "",
                          !variant.empty() ? variant : certified ? ",certified" : "",
                          share_reads ? "" : ",solo",
                          resident_bias != AttentionPolicy{}.resident_bias
                              ? absl::StrCat(",rb=", resident_bias)
                              : "",
                          sparse_prefill_rows > 0 ? absl::StrCat(",prefill=", sparse_prefill_rows) : "",
                          ForcedBlocks(*this), ")");
  }
  return "?";
}

namespace {

// The "none" value of every option, which ToString() omits and the exact
// form KIND(...) starts from.
AttentionPolicy Bare(AttentionPolicy::Kind kind) {
  AttentionPolicy p;
  p.kind = kind;
  p.min_blocks = 0;
  return p;
}

bool KindOf(absl::string_view word, AttentionPolicy::Kind* kind) {
  if (word == "dense") *kind = AttentionPolicy::Kind::kDense;
  else if (word == "topk") *kind = AttentionPolicy::Kind::kTopK;
  else if (word == "psa") *kind = AttentionPolicy::Kind::kPsa;
  else return false;
  return true;
}

// Callers prefix the flag or field name: "--attention \"psa:x\": ...".
absl::Status Bad(absl::string_view spec, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("\"", spec, "\": ", why));
}

template <typename T>
bool Number(absl::string_view s, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    return absl::SimpleAtof(s, out) && std::isfinite(*out);
  } else {
    return absl::SimpleAtoi(s, out);
  }
}

// Applies one option (a word or name=value) to p.
absl::Status ApplyOption(absl::string_view spec, absl::string_view opt, AttentionPolicy* p) {
  const size_t eq = opt.find('=');
  if (eq == absl::string_view::npos) {
    float x;
    if (Number(opt, &x)) {  // a bare number: the kind's main knob
      if (p->kind == AttentionPolicy::Kind::kPsa) {
        p->epsilon = x;
        return absl::OkStatus();
      }
      if (p->kind == AttentionPolicy::Kind::kTopK && Number(opt, &p->top_k)) return absl::OkStatus();
      return Bad(spec, absl::StrCat("a bare number (\"", opt, "\") sets psa's eps or topk's k"));
    }
    if (opt == "certified") p->certified = true;
    else if (opt == "solo") p->share_reads = false;
    else if (opt == "noretrieval") p->retrieval_dense = false;
    else {
      return Bad(spec, absl::StrCat("unknown option \"", opt,
                                    "\" (options: eps= G= min_blocks= k= rb= prefill= sink= "
                                    "local= rank= certified solo noretrieval)"));
    }
    return absl::OkStatus();
  }
  const absl::string_view name = opt.substr(0, eq), value = opt.substr(eq + 1);
  if (name == "rank") {
    absl::StatusOr<AttentionPolicy::Rank> rank = AttentionPolicy::ParseRank(value);
    if (!rank.ok()) return Bad(spec, rank.status().message());
    p->rank = *rank;
    return absl::OkStatus();
  }
  bool ok;
  if (name == "eps" || name == "epsilon") ok = Number(value, &p->epsilon);
  else if (name == "G" || name == "group_blocks") ok = Number(value, &p->group_blocks);
  else if (name == "min_blocks") ok = Number(value, &p->min_blocks);
  else if (name == "k" || name == "top_k") ok = Number(value, &p->top_k);
  else if (name == "rb" || name == "resident_bias") ok = Number(value, &p->resident_bias);
  else if (name == "prefill" || name == "sparse_prefill_rows") ok = Number(value, &p->sparse_prefill_rows);
  else if (name == "sink" || name == "sink_blocks") ok = Number(value, &p->sink_blocks);
  else if (name == "local" || name == "local_blocks") ok = Number(value, &p->local_blocks);
  else return Bad(spec, absl::StrCat("unknown option \"", name, "\""));
  if (!ok) return Bad(spec, absl::StrCat(name, " needs a number, got \"", value, "\""));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<AttentionPolicy> AttentionPolicy::Parse(absl::string_view spec,
                                                       const AttentionPolicy& base) {
  const absl::string_view s = absl::StripAsciiWhitespace(spec);
  const size_t cut = s.find_first_of(":(");
  Kind kind;
  if (!KindOf(s.substr(0, cut), &kind)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "must be dense, topk or psa, optionally with options (e.g. psa:eps=0.95 or topk:k=128), "
        "not \"", spec, "\""));
  }
  AttentionPolicy p = base;
  p.kind = kind;
  absl::string_view opts;
  if (cut != absl::string_view::npos) {
    if (s[cut] == '(') {
      if (s.back() != ')') return Bad(spec, "missing \")\"");
      p = Bare(kind);
      opts = s.substr(cut + 1, s.size() - cut - 2);
    } else {
      opts = s.substr(cut + 1);
    }
  }
  if (kind == Kind::kDense && !opts.empty()) return Bad(spec, "dense takes no options");
  for (absl::string_view opt : absl::StrSplit(opts, ',', absl::SkipWhitespace())) {
    if (absl::Status st = ApplyOption(spec, absl::StripAsciiWhitespace(opt), &p); !st.ok()) {
      return st;
    }
  }
  return p;
}

absl::StatusOr<std::vector<AttentionPolicy>> AttentionPolicy::ParseList(
    absl::string_view specs, const AttentionPolicy& base, std::vector<std::string>* texts) {
  // Regroup the comma-separated words: each kind starts a policy, the
  // words after it up to the next kind are its options.
  std::vector<std::string> groups;
  for (absl::string_view word : absl::StrSplit(specs, ',', absl::SkipWhitespace())) {
    word = absl::StripAsciiWhitespace(word);
    Kind kind;
    if (KindOf(word.substr(0, word.find_first_of(":(")), &kind)) {
      groups.emplace_back(word);
    } else if (groups.empty()) {
      return Bad(specs, "a policy list starts with dense, topk or psa");
    } else {
      const bool exact = groups.back().find('(') != std::string::npos;
      std::string& g = groups.back();
      if (exact) {  // psa(eps=0.9,G=4): the split cut inside the parentheses
        absl::StrAppend(&g, ",", word);
      } else {
        absl::StrAppend(&g, g.find(':') == std::string::npos ? ":" : ",", word);
      }
    }
  }
  std::vector<AttentionPolicy> out;
  for (const std::string& g : groups) {
    absl::StatusOr<AttentionPolicy> p = Parse(g, base);
    if (!p.ok()) return p.status();
    out.push_back(*p);
  }
  if (out.empty()) return Bad(specs, "no policy given");
  if (texts != nullptr) *texts = std::move(groups);
  return out;
}

absl::StatusOr<AttentionPolicy::Rank> AttentionPolicy::ParseRank(absl::string_view name) {
  if (name == "estimate") return Rank::kEstimate;
  if (name == "bound") return Rank::kBound;
  return absl::InvalidArgumentError(
      absl::StrCat("rank must be estimate or bound, got \"", name, "\""));
}

bool AttentionPolicy::operator==(const AttentionPolicy& o) const {
  return kind == o.kind && epsilon == o.epsilon && group_blocks == o.group_blocks &&
         certified == o.certified && min_blocks == o.min_blocks &&
         share_reads == o.share_reads && resident_bias == o.resident_bias &&
         top_k == o.top_k && rank == o.rank &&
         sparse_prefill_rows == o.sparse_prefill_rows && sink_blocks == o.sink_blocks &&
         local_blocks == o.local_blocks && retrieval_dense == o.retrieval_dense;
}

}  // namespace psa

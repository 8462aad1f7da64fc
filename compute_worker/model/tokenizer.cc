#include "compute_worker/model/tokenizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace psa {
namespace {

constexpr double kNoMerge = std::numeric_limits<double>::infinity();
constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581 '▁'

// GPT-2's reversible byte <-> printable-code-point map.
struct ByteMap {
  uint32_t byte_to_cp[256];
  absl::flat_hash_map<uint32_t, uint8_t> cp_to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_cp[b] = printable ? b : 256 + n++;
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteMap& Bytes() {
  static const ByteMap* m = new ByteMap();
  return *m;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& f) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  auto model = f.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  if (*model == "gpt2") {
    t->kind_ = Kind::kBytePairGpt2;
  } else if (*model == "llama") {
    t->kind_ = Kind::kSentencePiece;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer model '", *model, "' is not supported (supported: gpt2, llama)"));
  }
  auto tokens = f.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  t->tokens_ = **tokens;
  const size_t n = t->tokens_.size();
  if (n == 0) return absl::InvalidArgumentError("tokenizer.ggml.tokens is empty");

  if (f.Find("tokenizer.ggml.token_type") != nullptr) {
    auto types = f.GetIntArray("tokenizer.ggml.token_type");
    if (!types.ok()) return types.status();
    t->types_ = std::move(*types);
  } else {
    t->types_.assign(n, kNormal);
  }
  if (t->types_.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ",
                                                   t->types_.size(), " entries for ", n,
                                                   " tokens"));
  }
  if (f.Find("tokenizer.ggml.scores") != nullptr) {
    auto scores = f.GetFloatArray("tokenizer.ggml.scores");
    if (!scores.ok()) return scores.status();
    t->scores_ = std::move(*scores);
    if (t->scores_.size() != n) {
      return absl::InvalidArgumentError("tokenizer.ggml.scores size differs from tokens");
    }
  } else if (t->kind_ == Kind::kSentencePiece) {
    return absl::InvalidArgumentError("SentencePiece tokenizer needs tokenizer.ggml.scores");
  }

  for (size_t i = 0; i < n; ++i) t->token_to_id_.try_emplace(t->tokens_[i], static_cast<TokenId>(i));

  auto special_id = [&](const std::string& key, TokenId dflt) -> absl::StatusOr<TokenId> {
    if (f.Find(key) == nullptr) return dflt;
    auto v = f.GetInt(key);
    if (!v.ok()) return v.status();
    if (*v < 0 || *v >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(absl::StrCat(key, " = ", *v, " is outside the vocabulary"));
    }
    return static_cast<TokenId>(*v);
  };
  const bool spm = t->kind_ == Kind::kSentencePiece;
  for (auto [key, dst, dflt] : {std::tuple{"tokenizer.ggml.bos_token_id", &t->bos_id_, spm ? 1 : -1},
                                std::tuple{"tokenizer.ggml.eos_token_id", &t->eos_id_, spm ? 2 : -1},
                                std::tuple{"tokenizer.ggml.eot_token_id", &t->eot_id_, -1},
                                std::tuple{"tokenizer.ggml.unknown_token_id", &t->unk_id_, spm ? 0 : -1}}) {
    auto id = special_id(key, dflt);
    if (!id.ok()) return id.status();
    *dst = *id;
  }
  t->add_bos_ = spm;
  if (f.Find("tokenizer.ggml.add_bos_token") != nullptr) {
    auto v = f.GetBool("tokenizer.ggml.add_bos_token");
    if (!v.ok()) return v.status();
    t->add_bos_ = *v;
  }
  t->add_space_prefix_ = spm;
  if (f.Find("tokenizer.ggml.add_space_prefix") != nullptr) {
    auto v = f.GetBool("tokenizer.ggml.add_space_prefix");
    if (!v.ok()) return v.status();
    t->add_space_prefix_ = *v;
  }

  if (!spm) {
    std::string pre_name;
    if (f.Find("tokenizer.ggml.pre") != nullptr) {
      auto p = f.GetString("tokenizer.ggml.pre");
      if (!p.ok()) return p.status();
      pre_name = *p;
    }
    auto pre = PreTokenizerFromName(pre_name);
    if (!pre.ok()) return pre.status();
    t->pre_ = *pre;
    t->ignore_merges_ = t->pre_ == PreTokenizerKind::kLlama3;
    auto merges = f.GetStringArray("tokenizer.ggml.merges");
    if (!merges.ok()) return merges.status();
    t->merge_rank_.reserve((*merges)->size());
    for (size_t r = 0; r < (*merges)->size(); ++r) {
      const std::string& m = (**merges)[r];
      const size_t sp = m.find(' ', 1);
      if (sp == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("tokenizer merge ", r, " ('", m,
                                                       "') has no space separator"));
      }
      t->merge_rank_.try_emplace(m, static_cast<int32_t>(r));
    }
  }

  std::fill(std::begin(t->byte_tokens_), std::end(t->byte_tokens_), -1);
  if (spm) {
    for (int b = 0; b < 256; ++b) {
      t->byte_tokens_[b] = t->Lookup(absl::StrFormat("<0x%02X>", b));
    }
  }

  for (size_t i = 0; i < n; ++i) {
    const int32_t ty = t->types_[i];
    if ((ty == kControl || ty == kUserDefined) && !t->tokens_[i].empty()) {
      t->special_.push_back(static_cast<TokenId>(i));
    }
  }
  std::stable_sort(t->special_.begin(), t->special_.end(), [&](TokenId a, TokenId b) {
    return t->tokens_[a].size() > t->tokens_[b].size();
  });

  for (TokenId id : {t->eos_id_, t->eot_id_}) {
    if (id >= 0) t->end_of_generation_.push_back(id);
  }
  for (std::string_view s : {"<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>",
                             "<end_of_turn>", "<|end|>"}) {
    const TokenId id = t->Lookup(s);
    if (id >= 0 && t->types_[id] == kControl) t->end_of_generation_.push_back(id);
  }
  t->max_input_bytes_per_token_ = t->MaxInputBytesPerToken();
  if (!spm) {  // each input byte is one symbol first; one the vocabulary lacks is dropped
    for (int b = 0; b < 256; ++b) {
      std::string s;
      AppendUtf8(Bytes().byte_to_cp[b], &s);
      t->droppable_[b] = t->Lookup(s) < 0;
    }
  }
  return t;
}

size_t Tokenizer::EncodableBytes(std::string_view text) const {
  size_t dropped = 0;
  for (unsigned char c : text) dropped += droppable_[c];
  return text.size() - dropped;
}

int Tokenizer::MaxInputBytesPerToken() const {
  // SentencePiece emits a token per symbol or per byte (fallback), never
  // nothing; byte-level BPE drops only the droppable_ bytes (a symbol it
  // cannot spell), each alone. A token covers at most its text's length in input bytes
  // (U+2581 is 3 bytes standing for a space, or for itself); a byte-level
  // BPE token covers one input byte per code point of its text; a special
  // matched in the text covers its text.
  size_t most = 1;
  for (const std::string& s : tokens_) {
    size_t covers = s.size();
    if (kind_ == Kind::kBytePairGpt2) {
      covers = 0;
      for (unsigned char c : s) covers += (c & 0xC0) != 0x80;
    }
    most = std::max(most, covers);
  }
  for (TokenId id : special_) most = std::max(most, tokens_[id].size());
  return static_cast<int>(std::min<size_t>(most, std::numeric_limits<int>::max()));
}

TokenId Tokenizer::Lookup(std::string_view text) const {
  auto it = token_to_id_.find(absl::string_view(text.data(), text.size()));
  return it == token_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::IsEndOfGeneration(TokenId id) const {
  return std::find(end_of_generation_.begin(), end_of_generation_.end(), id) !=
         end_of_generation_.end();
}

template <typename RankFn>
std::vector<std::string> Tokenizer::MergeSymbols(std::vector<std::string> symbols,
                                                 RankFn rank) const {
  struct Pair {
    double rank;
    int left, right;
    size_t size;  // combined byte length when queued: detects stale entries
  };
  struct Worse {
    bool operator()(const Pair& a, const Pair& b) const {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    }
  };
  const int n = static_cast<int>(symbols.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  std::priority_queue<Pair, std::vector<Pair>, Worse> queue;
  auto try_queue = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const double k = rank(symbols[l], symbols[r]);
    if (k != kNoMerge) queue.push({k, l, r, symbols[l].size() + symbols[r].size()});
  };
  for (int i = 0; i + 1 < n; ++i) try_queue(i, i + 1);
  while (!queue.empty()) {
    const Pair p = queue.top();
    queue.pop();
    if (symbols[p.left].empty() || symbols[p.right].empty() || next[p.left] != p.right ||
        symbols[p.left].size() + symbols[p.right].size() != p.size) {
      continue;  // stale: one side was merged since
    }
    symbols[p.left] += symbols[p.right];
    symbols[p.right].clear();
    next[p.left] = next[p.right];
    if (next[p.right] >= 0) prev[next[p.right]] = p.left;
    try_queue(prev[p.left], p.left);
    try_queue(p.left, next[p.left]);
  }
  std::vector<std::string> out;
  for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) out.push_back(std::move(symbols[i]));
  return out;
}

void Tokenizer::EncodeFragmentBpe(std::string_view text, std::vector<TokenId>* out) const {
  const ByteMap& bm = Bytes();
  for (std::string_view word : PreTokenize(pre_, text)) {
    std::vector<std::string> symbols;
    std::string whole;
    for (unsigned char b : word) {
      std::string s;
      AppendUtf8(bm.byte_to_cp[b], &s);
      whole += s;
      symbols.push_back(std::move(s));
    }
    if (ignore_merges_) {
      if (TokenId id = Lookup(whole); id >= 0) {
        out->push_back(id);
        continue;
      }
    }
    std::string key;
    auto rank = [&](const std::string& l, const std::string& r) -> double {
      key.assign(l).append(" ").append(r);
      auto it = merge_rank_.find(key);
      return it == merge_rank_.end() ? kNoMerge : it->second;
    };
    for (const std::string& s : MergeSymbols(std::move(symbols), rank)) {
      if (TokenId id = Lookup(s); id >= 0) {
        out->push_back(id);
        continue;
      }
      // Not in the vocabulary (an incomplete vocab): emit its characters.
      for (size_t i = 0; i < s.size();) {
        const int len = Utf8SequenceLength(std::string_view(s).substr(i));
        if (TokenId id = Lookup(s.substr(i, len)); id >= 0) out->push_back(id);
        i += len;
      }
    }
  }
}

void Tokenizer::EncodeFragmentSpm(std::string_view text, std::vector<TokenId>* out) const {
  std::vector<std::string> symbols;
  for (size_t i = 0; i < text.size();) {
    int len = Utf8SequenceLength(text.substr(i));
    symbols.emplace_back(text.substr(i, len));
    i += len;
  }
  std::string key;
  auto rank = [&](const std::string& l, const std::string& r) -> double {
    key.assign(l).append(r);
    TokenId id = Lookup(key);
    return id < 0 ? kNoMerge : -static_cast<double>(scores_[id]);
  };
  for (const std::string& s : MergeSymbols(std::move(symbols), rank)) {
    if (TokenId id = Lookup(s); id >= 0) {
      out->push_back(id);
      continue;
    }
    for (unsigned char b : s) {  // byte fallback
      const TokenId id = byte_tokens_[b];
      out->push_back(id >= 0 ? id : unk_id_);
    }
  }
}

std::vector<TokenId> Tokenizer::Encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  std::vector<TokenId> out;
  if (add_bos && bos_id_ >= 0) out.push_back(bos_id_);
  bool prev_special = true;  // SentencePiece: space prefix at start and after specials
  auto raw = [&](std::string_view frag) {
    if (frag.empty()) return;
    if (kind_ == Kind::kBytePairGpt2) {
      EncodeFragmentBpe(frag, &out);
    } else {
      std::string s;
      if (add_space_prefix_ && prev_special) s = " ";
      s.append(frag);
      std::string escaped;
      for (char c : s) {
        if (c == ' ') escaped.append(kSpmSpace); else escaped.push_back(c);
      }
      EncodeFragmentSpm(escaped, &out);
    }
    prev_special = false;
  };
  size_t pos = 0, frag_start = 0;
  while (pos < text.size()) {
    TokenId match = -1;
    for (TokenId id : special_) {
      if (!parse_special && types_[id] == kControl) continue;
      const std::string& s = tokens_[id];
      if (text.compare(pos, s.size(), s) == 0) {
        match = id;
        break;
      }
    }
    if (match < 0) {
      ++pos;
      continue;
    }
    raw(text.substr(frag_start, pos - frag_start));
    out.push_back(match);
    prev_special = true;
    pos += tokens_[match].size();
    frag_start = pos;
  }
  raw(text.substr(frag_start));
  return out;
}

std::string Tokenizer::TokenBytes(TokenId id, bool render_special) const {
  if (id < 0 || id >= vocab_size()) return {};
  const int32_t ty = types_[id];
  const std::string& s = tokens_[id];
  if (ty == kControl || ty == kUnknown || ty == kUnused) return render_special ? s : std::string();
  if (ty == kUserDefined) return s;
  if (kind_ == Kind::kSentencePiece) {
    if (ty == kByte) {
      for (int b = 0; b < 256; ++b) {
        if (byte_tokens_[b] == id) return std::string(1, static_cast<char>(b));
      }
      return {};  // a byte token that is not "<0xXX>": nothing to render
    }
    std::string out;
    for (size_t i = 0; i < s.size();) {
      if (s.compare(i, kSpmSpace.size(), kSpmSpace) == 0) {
        out.push_back(' ');
        i += kSpmSpace.size();
      } else {
        out.push_back(s[i++]);
      }
    }
    return out;
  }
  const ByteMap& bm = Bytes();
  std::string out;
  for (size_t i = 0; i < s.size();) {
    int len;
    const uint32_t cp = DecodeUtf8(std::string_view(s).substr(i), &len);
    auto it = bm.cp_to_byte.find(cp);
    if (it != bm.cp_to_byte.end()) out.push_back(static_cast<char>(it->second));
    else out.append(s, i, len);
    i += len;
  }
  return out;
}

std::string Tokenizer::Decode(const std::vector<TokenId>& ids, bool render_special) const {
  std::string out;
  for (TokenId id : ids) out += TokenBytes(id, render_special);
  if (kind_ == Kind::kSentencePiece && add_space_prefix_ && !out.empty() && out[0] == ' ') {
    out.erase(0, 1);
  }
  return out;
}

}  // namespace psa

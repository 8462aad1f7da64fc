// Tokenizer built from GGUF metadata (tokenizer.ggml.*):
//   - "gpt2": byte-level BPE with merge ranks (SmolLM2, Llama 3, Qwen2);
//   - "llama": SentencePiece-style BPE with scores and byte fallback (Llama 2).
// Control and user-defined tokens are matched in the text before BPE runs
// (control tokens only when parse_special is set), as llama.cpp does.
#ifndef PSA_COMPUTE_WORKER_MODEL_TOKENIZER_H_
#define PSA_COMPUTE_WORKER_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/pre_tokenizer.h"

namespace psa {

using TokenId = int32_t;

class Tokenizer {
 public:
  enum class Kind { kBytePairGpt2, kSentencePiece };
  // GGUF token types.
  enum TokenType : int32_t {
    kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6,
  };

  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);

  // Text -> ids. add_bos prepends BOS when the model has one.
  std::vector<TokenId> Encode(std::string_view text, bool add_bos, bool parse_special) const;
  // Ids -> text. Control tokens are rendered only if render_special.
  // Ids out of range are skipped.
  std::string Decode(const std::vector<TokenId>& ids, bool render_special = false) const;
  // Raw bytes of one token (may be a partial UTF-8 sequence).
  std::string TokenBytes(TokenId id, bool render_special = false) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  const std::string& TokenText(TokenId id) const { return tokens_[id]; }
  TokenId bos_id() const { return bos_id_; }
  TokenId eos_id() const { return eos_id_; }
  bool add_bos_default() const { return add_bos_; }
  // End-of-generation: EOS, EOT and the usual end-of-turn tokens.
  bool IsEndOfGeneration(TokenId id) const;
  // Id of an exact token text, or -1.
  TokenId Lookup(std::string_view text) const;
  Kind kind() const { return kind_; }
  // The most bytes of Encode()'s input that one token it returns can stand
  // for (specials, SentencePiece's escaped spaces and byte fallback
  // included); at least 1.
  int max_input_bytes_per_token() const { return max_input_bytes_per_token_; }
  // The bytes of `text` that Encode() cannot drop: all but those whose
  // byte-level symbol the vocabulary lacks (Encode() drops what it cannot
  // spell; e.g. 0xFF in most BPE vocabularies). A text encodes to at least
  // ceil(EncodableBytes(text) / max_input_bytes_per_token()) tokens, BOS
  // aside: what lets a server refuse a prompt that cannot fit its context
  // before paying to tokenize it. One pass over the bytes.
  size_t EncodableBytes(std::string_view text) const;

 private:
  Tokenizer() = default;
  void EncodeFragmentBpe(std::string_view text, std::vector<TokenId>* out) const;
  void EncodeFragmentSpm(std::string_view text, std::vector<TokenId>* out) const;
  int MaxInputBytesPerToken() const;  // computes max_input_bytes_per_token()
  // Shared merge loop: symbols are merged pairwise by ascending rank.
  template <typename RankFn>
  std::vector<std::string> MergeSymbols(std::vector<std::string> symbols, RankFn rank) const;

  Kind kind_ = Kind::kBytePairGpt2;
  PreTokenizerKind pre_ = PreTokenizerKind::kGpt2;
  bool ignore_merges_ = false;    // Llama 3: whole words in the vocab skip BPE
  bool add_space_prefix_ = false; // SentencePiece: "▁" before the text
  bool add_bos_ = false;
  TokenId bos_id_ = -1, eos_id_ = -1, eot_id_ = -1, unk_id_ = -1;
  std::vector<std::string> tokens_;
  std::vector<int32_t> types_;
  std::vector<float> scores_;
  absl::flat_hash_map<std::string, TokenId> token_to_id_;
  absl::flat_hash_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
  std::vector<TokenId> special_;   // matched in text, longest first
  std::vector<TokenId> end_of_generation_;
  TokenId byte_tokens_[256];       // SentencePiece "<0xXX>" ids (or -1)
  int max_input_bytes_per_token_ = 1;
  bool droppable_[256] = {};  // bytes Encode() may drop (BPE: no symbol in the vocabulary)
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_TOKENIZER_H_

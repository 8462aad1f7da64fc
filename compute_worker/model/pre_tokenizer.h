// Pre-tokenisation: splits text into the "words" that byte-level BPE merges
// within, reproducing the split regexes of the tokenizers we support (GPT-2,
// SmolLM/StarCoder, Llama 3, Qwen2) with hand-written scanners, since their
// regexes need look-ahead that RE2 lacks. Unicode classes come from ICU.
#ifndef PSA_COMPUTE_WORKER_MODEL_PRE_TOKENIZER_H_
#define PSA_COMPUTE_WORKER_MODEL_PRE_TOKENIZER_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace psa {

enum class PreTokenizerKind {
  kGpt2,     // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kSmolLm,   // every digit alone, then kGpt2 (also StarCoder, Refact)
  kLlama3,   // Llama 3's pattern: case-insensitive contractions, \p{N}{1,3}, ...
  kQwen2,    // Llama 3's pattern with single digits
};

// Maps GGUF's tokenizer.ggml.pre value ("" / "default" / "gpt-2" / "smollm" /
// "llama-bpe" / "qwen2" ...) to a kind; INVALID_ARGUMENT for unknown ones.
absl::StatusOr<PreTokenizerKind> PreTokenizerFromName(std::string_view name);

// Splits UTF-8 text into words (byte ranges of `text`, concatenating to it).
// Invalid UTF-8 bytes are treated as single non-letter, non-digit symbols.
std::vector<std::string_view> PreTokenize(PreTokenizerKind kind, std::string_view text);

// UTF-8 helpers shared by the tokenizers.
// Length in bytes of the sequence starting at s[0]; 1 for invalid bytes.
int Utf8SequenceLength(std::string_view s);
uint32_t DecodeUtf8(std::string_view s, int* len);  // U+FFFD for invalid
void AppendUtf8(uint32_t cp, std::string* out);

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_PRE_TOKENIZER_H_

#include "compute_worker/model/pre_tokenizer.h"

#include <unicode/uchar.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace psa {
namespace {

// A decoded code point with its byte extent in the source text.
struct Cp {
  uint32_t c;
  size_t begin, end;
};

constexpr uint32_t kInvalid = 0xFFFFFFFF;

bool IsLetter(uint32_t c) {
  return c != kInvalid && (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_L_MASK) != 0;
}
bool IsNumber(uint32_t c) {
  return c != kInvalid && (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_N_MASK) != 0;
}
bool IsSpace(uint32_t c) { return c != kInvalid && u_isUWhiteSpace(static_cast<UChar32>(c)); }
bool IsOther(uint32_t c) { return !IsSpace(c) && !IsLetter(c) && !IsNumber(c); }
uint32_t Lower(uint32_t c) { return c == kInvalid ? c : u_tolower(static_cast<UChar32>(c)); }

std::vector<Cp> Decode(std::string_view text) {
  std::vector<Cp> cps;
  cps.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    int len;
    uint32_t c = DecodeUtf8(text.substr(i), &len);
    if (c == 0xFFFD && !(len == 3 && text.substr(i, 3) == "\xEF\xBF\xBD")) c = kInvalid;
    cps.push_back({c, i, i + len});
    i += len;
  }
  return cps;
}

// Length (in code points) of a contraction at cps[i], or 0.
size_t Contraction(const std::vector<Cp>& cps, size_t i, bool ignore_case) {
  if (cps[i].c != '\'' || i + 1 >= cps.size()) return 0;
  auto at = [&](size_t k) -> uint32_t {
    if (k >= cps.size()) return 0;
    return ignore_case ? Lower(cps[k].c) : cps[k].c;
  };
  const uint32_t a = at(i + 1), b = at(i + 2);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  return 0;
}

// End of the whitespace alternatives `\s+(?!\S)|\s+` starting at i.
size_t WhitespaceRun(const std::vector<Cp>& cps, size_t i) {
  size_t j = i;
  while (j < cps.size() && IsSpace(cps[j].c)) ++j;
  if (j < cps.size() && j - i > 1) --j;  // leave one space for the next word
  return j;
}

template <typename Pred>
size_t RunWhile(const std::vector<Cp>& cps, size_t i, Pred p) {
  while (i < cps.size() && p(cps[i].c)) ++i;
  return i;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t Gpt2Next(const std::vector<Cp>& cps, size_t i) {
  if (size_t n = Contraction(cps, i, false)) return i + n;
  const size_t k = (cps[i].c == ' ' && i + 1 < cps.size()) ? i + 1 : i;
  const uint32_t c = cps[k].c;
  if (k < cps.size()) {
    if (IsLetter(c)) return RunWhile(cps, k, IsLetter);
    if (IsNumber(c)) return RunWhile(cps, k, IsNumber);
    if (IsOther(c)) return RunWhile(cps, k, IsOther);
  }
  return WhitespaceRun(cps, i);
}

// Llama 3 / Qwen2:
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t Llama3Next(const std::vector<Cp>& cps, size_t i, size_t max_digits) {
  if (size_t n = Contraction(cps, i, true)) return i + n;
  const uint32_t c = cps[i].c;
  auto is_crlf = [](uint32_t x) { return x == '\r' || x == '\n'; };
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (IsLetter(c)) return RunWhile(cps, i, IsLetter);
  if (!is_crlf(c) && !IsNumber(c) && i + 1 < cps.size() && IsLetter(cps[i + 1].c)) {
    return RunWhile(cps, i + 1, IsLetter);
  }
  if (IsNumber(c)) {
    size_t j = i;
    while (j < cps.size() && j - i < max_digits && IsNumber(cps[j].c)) ++j;
    return j;
  }
  // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
  const size_t k = (c == ' ' && i + 1 < cps.size()) ? i + 1 : i;
  if (IsOther(cps[k].c)) {
    size_t j = RunWhile(cps, k, IsOther);
    return RunWhile(cps, j, is_crlf);
  }
  // `\s*[\r\n]+`: the longest whitespace run that ends in CR/LF.
  size_t end = RunWhile(cps, i, IsSpace);
  size_t last_nl = end;
  while (last_nl > i && !is_crlf(cps[last_nl - 1].c)) --last_nl;
  if (last_nl > i) return last_nl;
  return WhitespaceRun(cps, i);
}

}  // namespace

absl::StatusOr<PreTokenizerKind> PreTokenizerFromName(std::string_view name) {
  if (name.empty() || name == "default" || name == "gpt-2" || name == "gpt2") {
    return PreTokenizerKind::kGpt2;
  }
  if (name == "smollm" || name == "starcoder" || name == "refact") return PreTokenizerKind::kSmolLm;
  if (name == "llama-bpe" || name == "llama3" || name == "smaug-bpe") return PreTokenizerKind::kLlama3;
  if (name == "qwen2" || name == "deepseek-r1-qwen") return PreTokenizerKind::kQwen2;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown pre-tokenizer '", std::string(name),
                   "' (supported: default, gpt-2, smollm, starcoder, refact, llama-bpe, qwen2)"));
}

std::vector<std::string_view> PreTokenize(PreTokenizerKind kind, std::string_view text) {
  std::vector<std::string_view> words;
  const std::vector<Cp> cps = Decode(text);
  auto emit = [&](size_t a, size_t b) {
    words.push_back(text.substr(cps[a].begin, cps[b - 1].end - cps[a].begin));
  };
  if (kind == PreTokenizerKind::kSmolLm) {
    // First split out every digit, then apply GPT-2 within the pieces between.
    size_t start = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (i < cps.size() && !IsNumber(cps[i].c)) continue;
      if (i > start) {
        std::vector<Cp> piece(cps.begin() + start, cps.begin() + i);
        for (size_t p = 0; p < piece.size();) {
          size_t q = Gpt2Next(piece, p);
          emit(start + p, start + q);
          p = q;
        }
      }
      if (i < cps.size()) emit(i, i + 1);
      start = i + 1;
    }
    return words;
  }
  for (size_t i = 0; i < cps.size();) {
    size_t j;
    switch (kind) {
      case PreTokenizerKind::kLlama3: j = Llama3Next(cps, i, 3); break;
      case PreTokenizerKind::kQwen2: j = Llama3Next(cps, i, 1); break;
      default: j = Gpt2Next(cps, i); break;
    }
    if (j <= i) j = i + 1;  // never stall
    emit(i, j);
    i = j;
  }
  return words;
}

int Utf8SequenceLength(std::string_view s) {
  int len;
  DecodeUtf8(s, &len);
  return len;
}

uint32_t DecodeUtf8(std::string_view s, int* len) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  *len = 1;
  if (n == 0) return 0xFFFD;
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return b0;
  int need;
  uint32_t cp, min;
  if ((b0 & 0xE0) == 0xC0) { need = 1; cp = b0 & 0x1F; min = 0x80; }
  else if ((b0 & 0xF0) == 0xE0) { need = 2; cp = b0 & 0x0F; min = 0x800; }
  else if ((b0 & 0xF8) == 0xF0) { need = 3; cp = b0 & 0x07; min = 0x10000; }
  else return 0xFFFD;
  if (n < static_cast<size_t>(need) + 1) return 0xFFFD;
  for (int k = 1; k <= need; ++k) {
    if ((p[k] & 0xC0) != 0x80) return 0xFFFD;
    cp = (cp << 6) | (p[k] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0xFFFD;
  *len = need + 1;
  return cp;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace psa

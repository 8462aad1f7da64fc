#include "tests/unit/tiny_gguf.h"

#include "compute_worker/model/pre_tokenizer.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace psa::testing {
namespace {

// resize + memcpy rather than insert(): GCC 12 reports a false
// -Wstringop-overflow on small vector<uint8_t> range inserts.
void PutBytes(std::vector<uint8_t>* out, const void* bytes, size_t n) {
  const size_t at = out->size();
  out->resize(at + n);
  if (n > 0) std::memcpy(out->data() + at, bytes, n);
}

template <typename T>
void Put(std::vector<uint8_t>* out, T value) {
  static_assert(std::is_trivially_copyable_v<T>);
  PutBytes(out, &value, sizeof(T));  // host is little-endian, as GGUF
}

void PutString(std::vector<uint8_t>* out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  PutBytes(out, s.data(), s.size());
}

uint64_t AlignUp(uint64_t x, uint64_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}


// GPT-2's bytes_to_unicode(): printable bytes map to themselves, the rest to
// 256, 257, ... in byte order.
std::vector<std::string> Gpt2ByteTokens() {
  std::vector<std::string> tokens(256);
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    AppendUtf8(printable ? b : 256 + n++, &tokens[b]);
  }
  return tokens;
}

constexpr int32_t kNormal = 1, kUnknown = 2, kControl = 3, kByte = 6;

// Adds the tokenizer keys; returns the vocabulary size.
int64_t AddGpt2Tokenizer(GgufWriter* w) {
  std::vector<std::string> tokens = Gpt2ByteTokens();
  // "Ġ" is the byte-level form of ' '.
  const std::vector<std::string> merges = {"Ġ t",   "h e", "i n", "Ġ a", "e r", "o n",
                                           "Ġt he", "r e", "Ġ s", "a t", "Ġ w", "o r"};
  for (const std::string& m : merges) {
    const size_t sp = m.find(' ');
    tokens.push_back(m.substr(0, sp) + m.substr(sp + 1));
  }
  std::vector<int32_t> types(tokens.size(), kNormal);
  const int32_t im_start = static_cast<int32_t>(tokens.size());
  for (const char* special : {"<|im_start|>", "<|im_end|>"}) {
    tokens.push_back(special);
    types.push_back(kControl);
  }
  w->AddString("tokenizer.ggml.model", "gpt2");
  w->AddString("tokenizer.ggml.pre", "default");
  w->AddStringArray("tokenizer.ggml.tokens", tokens);
  w->AddI32Array("tokenizer.ggml.token_type", types);
  w->AddStringArray("tokenizer.ggml.merges", merges);
  w->AddU32("tokenizer.ggml.bos_token_id", im_start);
  w->AddU32("tokenizer.ggml.eos_token_id", im_start + 1);
  w->AddBool("tokenizer.ggml.add_bos_token", false);
  w->AddString("tokenizer.chat_template",
               "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}");
  return static_cast<int64_t>(tokens.size());
}

int64_t AddLlamaTokenizer(GgufWriter* w) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {kUnknown, kControl, kControl};
  std::vector<float> scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof(hex), "<0x%02X>", b);
    tokens.push_back(hex);
    types.push_back(kByte);
    scores.push_back(0);
  }
  // SentencePiece merges whichever adjacent pair forms the highest-scoring
  // piece, so longer pieces score higher.
  const std::vector<std::string> pieces = {"▁",  "a",  "e",  "h",  "i",  "n",  "o",   "r",
                                           "s",  "t",  "w",  "▁t", "he", "▁a", "in",  "er",
                                           "on", "re", "▁s", "at", "▁w", "or", "▁the"};
  for (const std::string& p : pieces) {
    int chars = 0;
    for (unsigned char c : p) chars += (c & 0xC0) != 0x80;
    tokens.push_back(p);
    types.push_back(kNormal);
    scores.push_back(static_cast<float>(chars) - 10.0f);
  }
  w->AddString("tokenizer.ggml.model", "llama");
  w->AddStringArray("tokenizer.ggml.tokens", tokens);
  w->AddF32Array("tokenizer.ggml.scores", scores);
  w->AddI32Array("tokenizer.ggml.token_type", types);
  w->AddU32("tokenizer.ggml.bos_token_id", 1);
  w->AddU32("tokenizer.ggml.eos_token_id", 2);
  w->AddU32("tokenizer.ggml.unknown_token_id", 0);
  w->AddBool("tokenizer.ggml.add_bos_token", true);
  w->AddString("tokenizer.chat_template",
               "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
               "{{ message['content'] + eos_token }}{% endif %}{% endfor %}");
  return static_cast<int64_t>(tokens.size());
}

// Deterministic uniform values in [-scale, scale) (not std::uniform_real_
// distribution, whose output differs between standard libraries).
class Random {
 public:
  explicit Random(uint32_t seed) : gen_(seed) {}
  float Uniform(float scale) { return scale * (static_cast<float>(gen_() >> 8) * 0x1p-23f - 1.0f); }
  std::vector<float> Values(int64_t n, float center, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = center + Uniform(scale);
    return v;
  }

 private:
  std::mt19937 gen_;
};

}  // namespace

void GgufWriter::AddScalar(const std::string& key, GgufType type, const void* value, size_t size) {
  std::vector<uint8_t> bytes(size);
  std::memcpy(bytes.data(), value, size);
  AddRaw(key, static_cast<uint32_t>(type), std::move(bytes));
}

void GgufWriter::AddString(const std::string& key, const std::string& value) {
  std::vector<uint8_t> bytes;
  PutString(&bytes, value);
  AddRaw(key, static_cast<uint32_t>(GgufType::kString), std::move(bytes));
}

void GgufWriter::AddU32(const std::string& key, uint32_t value) {
  AddScalar(key, GgufType::kU32, &value, sizeof(value));
}

void GgufWriter::AddI32(const std::string& key, int32_t value) {
  AddScalar(key, GgufType::kI32, &value, sizeof(value));
}

void GgufWriter::AddU64(const std::string& key, uint64_t value) {
  AddScalar(key, GgufType::kU64, &value, sizeof(value));
}

void GgufWriter::AddF32(const std::string& key, float value) {
  AddScalar(key, GgufType::kF32, &value, sizeof(value));
}

void GgufWriter::AddBool(const std::string& key, bool value) {
  const uint8_t b = value ? 1 : 0;
  AddScalar(key, GgufType::kBool, &b, 1);
}

void GgufWriter::AddStringArray(const std::string& key, const std::vector<std::string>& values) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, static_cast<uint32_t>(GgufType::kString));
  Put<uint64_t>(&bytes, values.size());
  for (const std::string& s : values) PutString(&bytes, s);
  AddRaw(key, static_cast<uint32_t>(GgufType::kArray), std::move(bytes));
}

void GgufWriter::AddI32Array(const std::string& key, const std::vector<int32_t>& values) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, static_cast<uint32_t>(GgufType::kI32));
  Put<uint64_t>(&bytes, values.size());
  for (int32_t v : values) Put(&bytes, v);
  AddRaw(key, static_cast<uint32_t>(GgufType::kArray), std::move(bytes));
}

void GgufWriter::AddF32Array(const std::string& key, const std::vector<float>& values) {
  std::vector<uint8_t> bytes;
  Put<uint32_t>(&bytes, static_cast<uint32_t>(GgufType::kF32));
  Put<uint64_t>(&bytes, values.size());
  for (float v : values) Put(&bytes, v);
  AddRaw(key, static_cast<uint32_t>(GgufType::kArray), std::move(bytes));
}

void GgufWriter::AddRaw(const std::string& key, uint32_t type, std::vector<uint8_t> value) {
  Kv kv{key, {}};
  Put(&kv.typed_value, type);
  PutBytes(&kv.typed_value, value.data(), value.size());
  kv_.push_back(std::move(kv));
}

void GgufWriter::AddTensor(const std::string& name, GgmlType type, std::vector<int64_t> shape,
                           std::vector<uint8_t> data) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  if (data.size() != RowBytes(type, shape.at(0)) * (n / shape[0])) {
    throw std::invalid_argument(absl::StrCat("tensor '", name, "': ", data.size(),
                                             " bytes do not match its shape and type"));
  }
  tensors_.push_back(Tensor{name, static_cast<uint32_t>(type),
                            std::vector<uint64_t>(shape.begin(), shape.end()), std::move(data),
                            std::nullopt});
}

void GgufWriter::AddTensorInfo(const std::string& name, uint32_t type, std::vector<uint64_t> dims,
                               uint64_t offset) {
  tensors_.push_back(Tensor{name, type, std::move(dims), {}, offset});
}

bool GgufWriter::RemoveKey(const std::string& key) {
  const size_t before = kv_.size();
  kv_.erase(std::remove_if(kv_.begin(), kv_.end(), [&](const Kv& kv) { return kv.key == key; }),
            kv_.end());
  return kv_.size() != before;
}

bool GgufWriter::RemoveTensor(const std::string& name) {
  const size_t before = tensors_.size();
  tensors_.erase(std::remove_if(tensors_.begin(), tensors_.end(),
                                [&](const Tensor& t) { return t.name == name; }),
                 tensors_.end());
  return tensors_.size() != before;
}

std::vector<uint8_t> GgufWriter::Finish(uint32_t version, uint64_t alignment) const {
  const bool write_alignment = alignment != 32;
  std::vector<uint8_t> out;
  PutBytes(&out, "GGUF", 4);
  Put<uint32_t>(&out, version);
  Put<uint64_t>(&out, tensors_.size());
  Put<uint64_t>(&out, kv_.size() + (write_alignment ? 1 : 0));
  for (const Kv& kv : kv_) {
    PutString(&out, kv.key);
    PutBytes(&out, kv.typed_value.data(), kv.typed_value.size());
  }
  if (write_alignment) {
    PutString(&out, "general.alignment");
    Put<uint32_t>(&out, static_cast<uint32_t>(GgufType::kU32));
    Put<uint32_t>(&out, static_cast<uint32_t>(alignment));
  }

  std::vector<uint8_t> data;
  for (const Tensor& t : tensors_) {
    PutString(&out, t.name);
    Put<uint32_t>(&out, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) Put(&out, d);
    Put(&out, t.type);
    uint64_t offset = t.offset.value_or(0);
    if (!t.offset.has_value()) {
      offset = AlignUp(data.size(), alignment);
      data.resize(offset);
      PutBytes(&data, t.data.data(), t.data.size());
    }
    Put(&out, offset);
  }
  out.resize(AlignUp(out.size(), alignment));
  PutBytes(&out, data.data(), data.size());
  return out;
}

std::vector<uint8_t> EncodeTensor(GgmlType type, const std::vector<float>& values,
                                  int64_t row_len) {
  const int64_t rows = static_cast<int64_t>(values.size()) / row_len;
  const size_t row_bytes = RowBytes(type, row_len);
  std::vector<uint8_t> out(row_bytes * rows);
  for (int64_t r = 0; r < rows; ++r) {
    QuantizeRow(type, values.data() + r * row_len, out.data() + r * row_bytes, row_len);
  }
  return out;
}

GgufWriter TinyLlamaWriter(const TinyModelSpec& spec) {
  GgufWriter w;
  const std::string& arch = spec.architecture;
  w.AddString("general.architecture", arch);
  w.AddString("general.name", "tiny-random-" + arch);
  w.AddU32(arch + ".block_count", spec.n_layer);
  w.AddU32(arch + ".context_length", spec.n_ctx);
  w.AddU32(arch + ".embedding_length", spec.n_embd);
  w.AddU32(arch + ".feed_forward_length", spec.n_ff);
  w.AddU32(arch + ".attention.head_count", spec.n_head);
  w.AddU32(arch + ".attention.head_count_kv", spec.n_head_kv);
  w.AddF32(arch + ".rope.freq_base", spec.rope_base);
  w.AddF32(arch + ".attention.layer_norm_rms_epsilon", 1e-5f);

  int64_t n_vocab = 0;
  if (spec.tokenizer == "gpt2") {
    n_vocab = AddGpt2Tokenizer(&w);
  } else if (spec.tokenizer == "llama") {
    n_vocab = AddLlamaTokenizer(&w);
  } else {
    throw std::invalid_argument("TinyModelSpec::tokenizer must be gpt2 or llama");
  }
  w.AddU32(arch + ".vocab_size", static_cast<uint32_t>(n_vocab));

  // Small weights (|w| <= 0.1) and norms near 1 keep activations in range.
  Random rng(spec.seed);
  const int64_t d = spec.n_embd;
  const int64_t kv = static_cast<int64_t>(spec.n_embd / spec.n_head) * spec.n_head_kv;
  auto matrix = [&](const std::string& name, GgmlType type, int64_t cols, int64_t rows) {
    w.AddTensor(name, type, {cols, rows},
                EncodeTensor(type, rng.Values(cols * rows, 0, 0.1f), cols));
  };
  auto norm = [&](const std::string& name) {
    w.AddTensor(name, GgmlType::kF32, {d},
                EncodeTensor(GgmlType::kF32, rng.Values(d, 1, 0.05f), d));
  };
  matrix("token_embd.weight", spec.embd_type, d, n_vocab);
  for (int i = 0; i < spec.n_layer; ++i) {
    const std::string p = absl::StrCat("blk.", i, ".");
    norm(p + "attn_norm.weight");
    matrix(p + "attn_q.weight", spec.weight_type, d, d);
    matrix(p + "attn_k.weight", spec.weight_type, d, kv);
    matrix(p + "attn_v.weight", spec.weight_type, d, kv);
    if (arch == "qwen2") {
      for (auto [name, n] : {std::pair{"attn_q.bias", d}, std::pair{"attn_k.bias", kv},
                             std::pair{"attn_v.bias", kv}}) {
        w.AddTensor(p + name, GgmlType::kF32, {n},
                    EncodeTensor(GgmlType::kF32, rng.Values(n, 0, 0.5f), n));
      }
    }
    matrix(p + "attn_output.weight", spec.weight_type, d, d);
    norm(p + "ffn_norm.weight");
    matrix(p + "ffn_gate.weight", spec.weight_type, d, spec.n_ff);
    matrix(p + "ffn_up.weight", spec.weight_type, d, spec.n_ff);
    matrix(p + "ffn_down.weight", spec.weight_type, spec.n_ff, d);
  }
  norm("output_norm.weight");
  if (spec.rope_freq_factors) {  // 1 for fast pairs up to 8 for the slowest, as Llama 3.1
    const int64_t half = d / spec.n_head / 2;
    std::vector<float> f(half);
    for (int64_t i = 0; i < half; ++i) f[i] = 1.0f + 7.0f * static_cast<float>(i) / half;
    w.AddTensor("rope_freqs.weight", GgmlType::kF32, {half}, EncodeTensor(GgmlType::kF32, f, half));
  }
  if (!spec.tied_output) matrix("output.weight", spec.weight_type, d, n_vocab);
  return w;
}

std::vector<uint8_t> BuildTinyLlamaGguf(const TinyModelSpec& spec) {
  return TinyLlamaWriter(spec).Finish();
}

std::string WriteTempFile(const std::vector<uint8_t>& bytes, const std::string& name) {
  // One directory per process: ctest runs test cases in parallel processes.
  struct TempDir {
    std::filesystem::path path;
    TempDir()
        : path(std::filesystem::path(::testing::TempDir()) / absl::StrCat("psa_test_", getpid())) {
      std::filesystem::create_directories(path);
    }
    ~TempDir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static TempDir dir;
  const std::filesystem::path file = dir.path / name;
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error(absl::StrCat("cannot write ", file.string()));
  return file.string();
}

}  // namespace psa::testing

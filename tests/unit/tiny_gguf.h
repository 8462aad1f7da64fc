// Test support: builds GGUF images in memory, including complete tiny random
// Llama models, so tests never depend on downloaded model files.
#ifndef PSA_TESTS_UNIT_TINY_GGUF_H_
#define PSA_TESTS_UNIT_TINY_GGUF_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "compute_worker/model/ggml_types.h"

namespace psa::testing {

// GGUF metadata value type ids (the spec's gguf_metadata_value_type).
enum class GgufType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

// Writes GGUF v2/v3 images. Entries are written in insertion order and never
// de-duplicated, so tests can also produce deliberately invalid files.
class GgufWriter {
 public:
  void AddString(const std::string& key, const std::string& value);
  void AddU32(const std::string& key, uint32_t value);
  void AddI32(const std::string& key, int32_t value);
  void AddU64(const std::string& key, uint64_t value);
  void AddF32(const std::string& key, float value);
  void AddBool(const std::string& key, bool value);
  void AddStringArray(const std::string& key, const std::vector<std::string>& values);
  void AddI32Array(const std::string& key, const std::vector<int32_t>& values);
  void AddF32Array(const std::string& key, const std::vector<float>& values);
  // A key whose type id and encoded value are given verbatim.
  void AddRaw(const std::string& key, uint32_t type, std::vector<uint8_t> value);

  // A tensor with data; Finish() places it, aligned, in the data section.
  // `shape` lists ne0 (the row length) first.
  void AddTensor(const std::string& name, GgmlType type, std::vector<int64_t> shape,
                 std::vector<uint8_t> data);
  // A tensor descriptor only, written verbatim (any type id, rank, offset).
  void AddTensorInfo(const std::string& name, uint32_t type, std::vector<uint64_t> dims,
                     uint64_t offset);

  // Remove every entry with this key / tensor name; false if there was none.
  bool RemoveKey(const std::string& key);
  bool RemoveTensor(const std::string& name);

  // The file image. general.alignment is written only if alignment != 32,
  // as the spec makes 32 the default.
  std::vector<uint8_t> Finish(uint32_t version = 3, uint64_t alignment = 32) const;

 private:
  struct Kv {
    std::string key;
    std::vector<uint8_t> typed_value;  // u32 type id, then the value
  };
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> dims;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;  // set for descriptor-only tensors
  };
  void AddScalar(const std::string& key, GgufType type, const void* value, size_t size);

  std::vector<Kv> kv_;
  std::vector<Tensor> tensors_;
};

struct TinyModelSpec {
  int n_layer = 2;
  int n_embd = 64;
  int n_head = 4;
  int n_head_kv = 2;
  int n_ff = 96;
  int n_ctx = 256;
  GgmlType weight_type = GgmlType::kQ4_1;
  GgmlType embd_type = GgmlType::kQ8_0;
  bool tied_output = true;
  float rope_base = 10000.0f;
  std::string tokenizer = "gpt2";  // or "llama"
  // "llama", or "qwen2" (Q/K/V biases, NeoX RoPE: as Qwen2 GGUFs are).
  std::string architecture = "llama";
  bool rope_freq_factors = false;  // write rope_freqs.weight (Llama 3.1 scaling)
  uint32_t seed = 1;
};

// Encodes `values` (rows of `row_len` elements) as `type` with QuantizeRow.
std::vector<uint8_t> EncodeTensor(GgmlType type, const std::vector<float>& values, int64_t row_len);

// A writer holding a complete random Llama model, for tests that edit it
// (remove a tensor, change a key) before calling Finish().
GgufWriter TinyLlamaWriter(const TinyModelSpec& spec);
// The finished image of TinyLlamaWriter(spec).
std::vector<uint8_t> BuildTinyLlamaGguf(const TinyModelSpec& spec);

// Writes `bytes` to `name` in a temp directory private to this process
// (removed at exit) and returns the path.
std::string WriteTempFile(const std::vector<uint8_t>& bytes, const std::string& name);

}  // namespace psa::testing

#endif  // PSA_TESTS_UNIT_TINY_GGUF_H_

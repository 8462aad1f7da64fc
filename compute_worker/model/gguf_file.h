// GGUF container reader (versions 2 and 3).
//
// The file is memory-mapped read-only. Open() validates the header, every
// metadata entry and every tensor descriptor (type, shape, offset, size,
// alignment) against the file size before returning, so a GgufFile that
// exists is safe to read: tensor data pointers never point outside the map.
#ifndef PSA_COMPUTE_WORKER_MODEL_GGUF_FILE_H_
#define PSA_COMPUTE_WORKER_MODEL_GGUF_FILE_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "compute_worker/model/ggml_types.h"

namespace psa {

// One metadata value. Arrays keep their element type; string arrays are
// materialised (tokenizer vocabularies), numeric arrays point into the map.
struct GgufValue {
  enum class Type : uint32_t {
    kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6,
    kBool = 7, kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
  };
  Type type = Type::kU8;
  // Scalars (integers, bools) widen to int64/uint64, floats to double.
  std::variant<int64_t, uint64_t, double, std::string> scalar;
  // Arrays.
  Type array_type = Type::kU8;
  uint64_t array_size = 0;
  const uint8_t* array_data = nullptr;    // numeric arrays: raw little-endian
  std::vector<std::string> strings;       // string arrays
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  // ne[0] is the fastest-varying (row length), as in ggml.
  std::vector<int64_t> shape;
  uint64_t offset = 0;   // relative to the data section
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;

  int64_t n_elements() const;
  int64_t rows() const;  // product of shape[1..]
};

class GgufFile {
 public:
  // Maps and validates `path`. Errors name the file and what is wrong.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory image (no copy; `data` must outlive the object).
  // Used by the fuzz target and tests.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(const uint8_t* data,
                                                         size_t size,
                                                         std::string name);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  const std::string& name() const { return name_; }
  const std::map<std::string, GgufValue>& metadata() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* Find(std::string_view key) const;
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Typed accessors: NOT_FOUND if missing, INVALID_ARGUMENT if of another type.
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  // Numeric array converted to the requested type.
  absl::StatusOr<std::vector<int32_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<float>> GetFloatArray(std::string_view key) const;
  absl::StatusOr<const std::vector<std::string>*> GetStringArray(
      std::string_view key) const;

 private:
  GgufFile() = default;
  absl::Status ParseImage();

  std::string name_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when we own an mmap
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_MODEL_GGUF_FILE_H_

#include "compute_worker/model/gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace psa {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kDefaultAlignment = 32;
// Sanity limits: far above any real model, low enough that a corrupt count
// cannot make us allocate gigabytes before noticing the file is too short.
constexpr uint64_t kMaxStringBytes = 64ull << 20;
constexpr uint64_t kMaxArrayElems = 1ull << 30;
constexpr uint32_t kMaxDims = 4;

// Bounds-checked little-endian cursor over the file image.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t pos() const { return pos_; }

  template <typename T>
  absl::Status Read(T* out, const char* what) {
    if (size_ - pos_ < sizeof(T)) return Truncated(what, sizeof(T));
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status ReadString(std::string* out, const char* what) {
    uint64_t n = 0;
    if (auto s = Read(&n, what); !s.ok()) return s;
    if (n > kMaxStringBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": string length ", n, " at offset ", pos_ - 8, " is implausible"));
    }
    if (size_ - pos_ < n) return Truncated(what, n);
    out->assign(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return absl::OkStatus();
  }
  absl::Status Skip(uint64_t n, const char* what, const uint8_t** start) {
    if (size_ - pos_ < n) return Truncated(what, n);
    *start = data_ + pos_;
    pos_ += n;
    return absl::OkStatus();
  }

 private:
  absl::Status Truncated(const char* what, uint64_t need) const {
    return absl::InvalidArgumentError(absl::StrCat(
        "file truncated while reading ", what, " at offset ", pos_, " (need ", need,
        " bytes, ", size_ - pos_, " left)"));
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

size_t ScalarSize(GgufValue::Type t) {
  using T = GgufValue::Type;
  switch (t) {
    case T::kU8: case T::kI8: case T::kBool: return 1;
    case T::kU16: case T::kI16: return 2;
    case T::kU32: case T::kI32: case T::kF32: return 4;
    case T::kU64: case T::kI64: case T::kF64: return 8;
    default: return 0;
  }
}

bool IsKnownType(uint32_t t) { return t <= 12; }

absl::Status ReadScalar(Cursor& c, GgufValue::Type t, GgufValue* v, const char* what) {
  using T = GgufValue::Type;
  switch (t) {
#define PSA_READ_INT(TYPE_ENUM, CTYPE, VARIANT_TYPE)          \
  case TYPE_ENUM: {                                           \
    CTYPE x = 0;                                                  \
    if (auto s = c.Read(&x, what); !s.ok()) return s;         \
    v->scalar = static_cast<VARIANT_TYPE>(x);                 \
    return absl::OkStatus();                                  \
  }
    PSA_READ_INT(T::kU8, uint8_t, int64_t)
    PSA_READ_INT(T::kI8, int8_t, int64_t)
    PSA_READ_INT(T::kU16, uint16_t, int64_t)
    PSA_READ_INT(T::kI16, int16_t, int64_t)
    PSA_READ_INT(T::kU32, uint32_t, int64_t)
    PSA_READ_INT(T::kI32, int32_t, int64_t)
    PSA_READ_INT(T::kI64, int64_t, int64_t)
    PSA_READ_INT(T::kU64, uint64_t, uint64_t)
    PSA_READ_INT(T::kF32, float, double)
    PSA_READ_INT(T::kF64, double, double)
#undef PSA_READ_INT
    case T::kBool: {
      uint8_t x = 0;
      if (auto s = c.Read(&x, what); !s.ok()) return s;
      if (x > 1) return absl::InvalidArgumentError(absl::StrCat(what, ": bool value ", x));
      v->scalar = static_cast<int64_t>(x);
      return absl::OkStatus();
    }
    case T::kString: {
      std::string str;
      if (auto s = c.ReadString(&str, what); !s.ok()) return s;
      v->scalar = std::move(str);
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat(what, ": bad value type"));
  }
}

}  // namespace

int64_t GgufTensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t GgufTensorInfo::rows() const {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    auto msg = absl::StrCat("cannot open model file ", path, ": ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  if (st.st_size == 0) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": file is empty, not a GGUF model"));
  }
  void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mmap of ", path, " failed: ", std::strerror(errno)));
  }
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->name_ = path;
  f->base_ = static_cast<const uint8_t*>(map);
  f->size_ = st.st_size;
  f->mapping_ = map;
  if (auto s = f->ParseImage(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(const uint8_t* data, size_t size,
                                                          std::string name) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->name_ = std::move(name);
  f->base_ = data;
  f->size_ = size;
  if (auto s = f->ParseImage(); !s.ok()) return s;
  return f;
}

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) munmap(mapping_, size_);
}

absl::Status GgufFile::ParseImage() {
  Cursor c(base_, size_);
  uint32_t magic = 0;
  if (auto s = c.Read(&magic, "magic"); !s.ok()) return s;
  if (magic != kMagic) {
    return absl::InvalidArgumentError("not a GGUF file (bad magic; expected 'GGUF')");
  }
  if (auto s = c.Read(&version_, "version"); !s.ok()) return s;
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported GGUF version ", version_, " (supported: 2, 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  if (auto s = c.Read(&n_tensors, "tensor count"); !s.ok()) return s;
  if (auto s = c.Read(&n_kv, "metadata count"); !s.ok()) return s;
  // Every entry needs at least a few bytes: reject counts the file can't hold.
  if (n_kv > size_ / 12 || n_tensors > size_ / 24) {
    return absl::InvalidArgumentError(absl::StrCat(
        "implausible counts: ", n_tensors, " tensors, ", n_kv, " metadata entries for a ", size_,
        "-byte file (truncated or corrupt)"));
  }

  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    if (auto s = c.ReadString(&key, "metadata key"); !s.ok()) return s;
    uint32_t raw_type = 0;
    if (auto s = c.Read(&raw_type, "metadata type"); !s.ok()) return s;
    if (!IsKnownType(raw_type)) {
      return absl::InvalidArgumentError(
          absl::StrCat("metadata '", key, "' has unknown value type ", raw_type));
    }
    GgufValue v;
    v.type = static_cast<GgufValue::Type>(raw_type);
    if (v.type == GgufValue::Type::kArray) {
      uint32_t elem = 0;
      if (auto s = c.Read(&elem, "array element type"); !s.ok()) return s;
      if (!IsKnownType(elem) || elem == static_cast<uint32_t>(GgufValue::Type::kArray)) {
        return absl::InvalidArgumentError(
            absl::StrCat("metadata '", key, "' has unsupported array element type ", elem));
      }
      v.array_type = static_cast<GgufValue::Type>(elem);
      if (auto s = c.Read(&v.array_size, "array length"); !s.ok()) return s;
      if (v.array_size > kMaxArrayElems) {
        return absl::InvalidArgumentError(
            absl::StrCat("metadata '", key, "' array length ", v.array_size, " is implausible"));
      }
      if (v.array_type == GgufValue::Type::kString) {
        if (v.array_size > (size_ - c.pos()) / 8) {
          return absl::InvalidArgumentError(absl::StrCat(
              "metadata '", key, "': ", v.array_size,
              " strings cannot fit in the rest of the file (truncated or corrupt)"));
        }
        v.strings.resize(v.array_size);
        for (auto& s : v.strings) {
          if (auto st = c.ReadString(&s, key.c_str()); !st.ok()) return st;
        }
      } else {
        const uint64_t bytes = v.array_size * ScalarSize(v.array_type);
        if (auto s = c.Skip(bytes, key.c_str(), &v.array_data); !s.ok()) return s;
      }
    } else {
      if (auto s = ReadScalar(c, v.type, &v, key.c_str()); !s.ok()) return s;
    }
    if (!kv_.emplace(key, std::move(v)).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate metadata key '", key, "'"));
    }
  }

  uint64_t alignment = kDefaultAlignment;
  if (const GgufValue* a = Find("general.alignment")) {
    const auto* x = std::get_if<int64_t>(&a->scalar);
    if (x == nullptr || *x <= 0 || (*x & (*x - 1)) != 0) {
      return absl::InvalidArgumentError("general.alignment must be a power of two");
    }
    alignment = *x;
  }

  tensors_.resize(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo& t = tensors_[i];
    if (auto s = c.ReadString(&t.name, "tensor name"); !s.ok()) return s;
    uint32_t n_dims = 0;
    if (auto s = c.Read(&n_dims, "tensor rank"); !s.ok()) return s;
    if (n_dims == 0 || n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' has rank ", n_dims, " (1..4 allowed)"));
    }
    t.shape.resize(n_dims);
    int64_t n_elems = 1;
    for (auto& d : t.shape) {
      uint64_t x = 0;
      if (auto s = c.Read(&x, "tensor dimension"); !s.ok()) return s;
      if (x == 0 || x > (1ull << 40) || n_elems > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(x)) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", t.name, "' has invalid dimension ", x));
      }
      d = static_cast<int64_t>(x);
      n_elems *= d;
    }
    uint32_t raw_type = 0;
    if (auto s = c.Read(&raw_type, "tensor type"); !s.ok()) return s;
    if (!IsSupportedType(raw_type)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' has ggml type ", raw_type,
          ", which this runtime does not support (", std::string(SupportedTypeNames()), ")"));
    }
    t.type = static_cast<GgmlType>(raw_type);
    // Rows are whole blocks: 32 elements, or 256 for the K-quants.
    if (t.shape[0] % BlockElements(t.type) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' row length ", t.shape[0], " is not a multiple of ",
          std::string(TypeName(t.type)), "'s block size (", BlockElements(t.type), " elements)"));
    }
    if (auto s = c.Read(&t.offset, "tensor offset"); !s.ok()) return s;
    if (t.offset % alignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' offset ", t.offset,
                                                     " is not aligned to ", alignment));
    }
    // Bounded by the file size first: the product could wrap past 2^64.
    const uint64_t row_bytes = RowBytes(t.type, t.shape[0]);
    if (static_cast<uint64_t>(t.rows()) > size_ / row_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' (", n_elems, " ", std::string(TypeName(t.type)),
          " elements) is larger than the file: the file is truncated or corrupt"));
    }
    t.n_bytes = row_bytes * t.rows();
    if (!tensor_index_.emplace(t.name, i).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", t.name, "'"));
    }
  }

  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  if (data_start > size_) {
    return absl::InvalidArgumentError("file truncated before the tensor data section");
  }
  const uint64_t data_size = size_ - data_start;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' (", t.n_bytes, " bytes at data offset ", t.offset,
          ") extends past the end of the file (data section is ", data_size,
          " bytes): the file is truncated or corrupt"));
    }
    t.data = base_ + data_start + t.offset;
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_.find(std::string(key));
  return it == kv_.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
absl::Status Missing(std::string_view key) {
  return absl::NotFoundError(absl::StrCat("metadata key '", std::string(key), "' is missing"));
}
absl::Status WrongType(std::string_view key, std::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("metadata key '", std::string(key), "' is not ", std::string(want)));
}
}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValue::Type::kString) return WrongType(key, "a string");
  return std::get<std::string>(v->scalar);
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (const auto* x = std::get_if<int64_t>(&v->scalar); x && v->type != GgufValue::Type::kBool &&
                                                       v->type != GgufValue::Type::kArray) {
    return *x;
  }
  if (const auto* x = std::get_if<uint64_t>(&v->scalar);
      x && v->type == GgufValue::Type::kU64 && *x <= static_cast<uint64_t>(INT64_MAX)) {
    return static_cast<int64_t>(*x);
  }
  return WrongType(key, "an integer");
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type == GgufValue::Type::kF32 || v->type == GgufValue::Type::kF64) {
    return std::get<double>(v->scalar);
  }
  return WrongType(key, "a float");
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValue::Type::kBool) return WrongType(key, "a bool");
  return std::get<int64_t>(v->scalar) != 0;
}

namespace {
template <typename Out>
absl::StatusOr<std::vector<Out>> NumericArray(const GgufValue* v, std::string_view key) {
  using T = GgufValue::Type;
  if (v == nullptr) return Missing(key);
  if (v->type != T::kArray || v->array_data == nullptr) return WrongType(key, "a numeric array");
  std::vector<Out> out(v->array_size);
  const uint8_t* p = v->array_data;
  for (uint64_t i = 0; i < v->array_size; ++i) {
    switch (v->array_type) {
#define PSA_CASE(E, C)                     \
  case E: {                                \
    C x;                                   \
    std::memcpy(&x, p + i * sizeof(C), sizeof(C)); \
    out[i] = static_cast<Out>(x);          \
    break;                                 \
  }
      PSA_CASE(T::kU8, uint8_t)
      PSA_CASE(T::kI8, int8_t)
      PSA_CASE(T::kBool, uint8_t)
      PSA_CASE(T::kU16, uint16_t)
      PSA_CASE(T::kI16, int16_t)
      PSA_CASE(T::kU32, uint32_t)
      PSA_CASE(T::kI32, int32_t)
      PSA_CASE(T::kF32, float)
      PSA_CASE(T::kU64, uint64_t)
      PSA_CASE(T::kI64, int64_t)
      PSA_CASE(T::kF64, double)
#undef PSA_CASE
      default:
        return WrongType(key, "a numeric array");
    }
  }
  return out;
}
}  // namespace

absl::StatusOr<std::vector<int32_t>> GgufFile::GetIntArray(std::string_view key) const {
  return NumericArray<int32_t>(Find(key), key);
}

absl::StatusOr<std::vector<float>> GgufFile::GetFloatArray(std::string_view key) const {
  return NumericArray<float>(Find(key), key);
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::GetStringArray(
    std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->type != GgufValue::Type::kArray || v->array_type != GgufValue::Type::kString) {
    return WrongType(key, "a string array");
  }
  return &v->strings;
}

}  // namespace psa

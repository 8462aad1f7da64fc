#include "tests/unit/gguf_file_testing.h"

#include <cstring>
#include <utility>

namespace psa::testing {

absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image,
                                                     size_t size) {
  return GgufFile::Parse(image.data(), size, "test.gguf");
}
absl::StatusOr<std::unique_ptr<GgufFile>> ParseImage(const std::vector<uint8_t>& image) {
  return ParseImage(image, image.size());
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LoadImage(const std::vector<uint8_t>& image) {
  auto file = ParseImage(image);
  if (!file.ok()) return file.status();
  return LlamaModel::FromGguf(std::move(*file));
}

TinyModelSpec SmallSpec() {
  TinyModelSpec spec;
  spec.n_layer = 1;
  spec.n_embd = 32;
  spec.n_head = 2;
  spec.n_head_kv = 1;
  spec.n_ff = 32;
  return spec;
}

std::vector<uint8_t> U64Bytes(uint64_t x) {
  std::vector<uint8_t> b(8);
  std::memcpy(b.data(), &x, 8);
  return b;
}

std::vector<uint8_t> ArrayHeader(GgufType elem, uint64_t count) {
  std::vector<uint8_t> b(12);
  const uint32_t e = static_cast<uint32_t>(elem);
  std::memcpy(b.data(), &e, 4);
  std::memcpy(b.data() + 4, &count, 8);
  return b;
}

GgufWriter MinimalWriter() {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddTensor("t", GgmlType::kF32, {32}, std::vector<uint8_t>(128));
  return w;
}

}  // namespace psa::testing

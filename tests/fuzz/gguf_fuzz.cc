// libFuzzer target for the GGUF reader and the model loader on top of it.
// Build and run instructions: tests/CMakeLists.txt (PSA_BUILD_FUZZ).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "compute_worker/model/ggml_types.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/llama_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = psa::GgufFile::Parse(data, size, "fuzz");
  if (!file.ok()) return 0;
  const psa::GgufFile& f = **file;

  // Read what the parser vouched for, so ASan checks every bound it claimed:
  // numeric arrays, and the first and last byte of each tensor.
  volatile uint8_t sink = 0;
  for (const auto& [key, value] : f.metadata()) {
    if (value.type == psa::GgufValue::Type::kArray) (void)f.GetFloatArray(key);
  }
  for (const psa::GgufTensorInfo& t : f.tensors()) {
    if (t.n_bytes > 0) sink = sink + t.data[0] + t.data[t.n_bytes - 1];
  }
  // Decode the first row of every tensor (any type the parser accepts:
  // IsSupportedType): each block layout reads only the bytes RowBytes
  // promised, whatever the fuzzer put in its scales and codes.
  std::vector<float> row;
  for (const psa::GgufTensorInfo& t : f.tensors()) {
    if (t.shape[0] > (1 << 16)) continue;  // keep runs fast
    row.resize(t.shape[0]);
    psa::DequantizeRow(t.type, t.data, row.data(), t.shape[0]);
    sink = sink + (row[0] != row[t.shape[0] - 1]);
  }

  auto model = psa::LlamaModel::FromGguf(std::move(*file));
  if (!model.ok()) return 0;
  // A loaded model's tokenizer must cope with its own vocabulary.
  const psa::Tokenizer& tok = (*model)->tokenizer();
  std::vector<psa::TokenId> ids = tok.Encode("<s>Hi the water! <|im_end|>", true, true);
  for (psa::TokenId id = 0; id < tok.vocab_size(); ++id) ids.push_back(id);
  (void)tok.Decode(ids, /*render_special=*/true);
  return 0;
}

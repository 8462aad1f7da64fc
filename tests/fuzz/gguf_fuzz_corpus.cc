// Writes the seed corpus for gguf_fuzz: tiny valid models covering both
// tokenizers, both GGUF versions, several weight types (the 32-element ones
// and two K-quants) and a non-default alignment.
// Usage: gguf_fuzz_corpus <output directory>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/unit/tiny_gguf.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <output directory>\n", argv[0]);
    return 2;
  }
  using psa::GgmlType;
  using psa::testing::TinyModelSpec;
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);

  // Small shapes: the fuzzer mutates faster when seeds are a few KiB.
  TinyModelSpec base;
  base.n_layer = 1;
  base.n_embd = 32;
  base.n_head = 2;
  base.n_head_kv = 1;
  base.n_ff = 32;
  struct Seed {
    const char* name;
    GgmlType weights;
    const char* tokenizer;
    bool tied;
    uint32_t version;
    uint64_t alignment;
    int width = 32;  // n_embd and n_ff: K-quant rows need multiples of 256
  };
  const Seed seeds[] = {
      {"gpt2_q4_1_v3", GgmlType::kQ4_1, "gpt2", true, 3, 32},
      {"llama_q4_0_v2", GgmlType::kQ4_0, "llama", false, 2, 32},
      {"gpt2_q8_0_align64", GgmlType::kQ8_0, "gpt2", false, 3, 64},
      {"llama_f16_v3", GgmlType::kF16, "llama", true, 3, 32},
      {"gpt2_bf16_v3", GgmlType::kBF16, "gpt2", true, 3, 32},
      {"llama_q5_0_v3", GgmlType::kQ5_0, "llama", false, 3, 32},
      {"gpt2_q5_1_v3", GgmlType::kQ5_1, "gpt2", true, 3, 32},
      // One super-block per row; larger seeds, so only one per layout family.
      {"gpt2_q4_k_v3", GgmlType::kQ4_K, "gpt2", false, 3, 32, 256},
      {"llama_q6_k_v3", GgmlType::kQ6_K, "llama", true, 3, 32, 256},
  };
  for (const Seed& s : seeds) {
    TinyModelSpec spec = base;
    spec.weight_type = s.weights;
    spec.n_embd = spec.n_ff = s.width;
    spec.tokenizer = s.tokenizer;
    spec.tied_output = s.tied;
    const std::vector<uint8_t> image =
        psa::testing::TinyLlamaWriter(spec).Finish(s.version, s.alignment);
    std::ofstream out(dir / (std::string(s.name) + ".gguf"), std::ios::binary);
    out.write(reinterpret_cast<const char*>(image.data()),
              static_cast<std::streamsize>(image.size()));
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", s.name);
      return 1;
    }
  }
  return 0;
}

// libFuzzer target for what the worker's Generation handler runs on a
// psa.v1.GenerateRequest before scheduling it (generation_service.cc:
// Admit, then Prepare): AdmitGenerateRequest, PolicyFromProto, the prompt's
// tokens, ToGenerationRequest, ValidateGenerationRequest. The tokenizers are
// tiny models' (tests/unit/tiny_gguf.h), gpt2 and llama kinds. Structure
// aware: proto_mutator.h. Build and run: tests/CMakeLists.txt
// (PSA_BUILD_FUZZ).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "api/attention_policy_proto.h"
#include "common/attention_policy.h"
#include "compute_worker/model/gguf_file.h"
#include "compute_worker/model/tokenizer.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/server/request_admission.h"
#include "proto/psa/v1/generation.pb.h"
#include "tests/fuzz/proto_mutator.h"
#include "tests/unit/tiny_gguf.h"

namespace {

using psa::v1::GenerateRequest;

struct Worker {
  std::vector<uint8_t> gguf;  // the parsed file points into it
  std::unique_ptr<psa::Tokenizer> tok;
  psa::AdmissionLimits limits;
  int max_context = 0;
};

Worker MakeWorker(const std::string& kind) {
  Worker w;
  psa::testing::TinyModelSpec spec;
  spec.tokenizer = kind;
  w.gguf = psa::testing::BuildTinyLlamaGguf(spec);
  auto file = psa::GgufFile::Parse(w.gguf.data(), w.gguf.size(), "tiny");
  if (!file.ok()) std::abort();
  auto tok = psa::Tokenizer::FromGguf(**file);
  if (!tok.ok()) std::abort();
  w.tok = std::move(*tok);
  // As GenerationService's Limits(), with a small context and prompt bound
  // so that inputs libFuzzer can reach cross them.
  w.max_context = 64;
  w.limits.n_vocab = w.tok->vocab_size();
  w.limits.max_context = w.max_context;
  w.limits.default_max_tokens = 16;
  w.limits.max_prompt_bytes = 1024;
  w.limits.max_input_bytes_per_token = w.tok->max_input_bytes_per_token();
  w.limits.tokenizer = w.tok.get();
  w.limits.adds_bos = w.tok->add_bos_default() && w.tok->bos_id() >= 0;
  return w;
}

#define PSA_CHECK(cond)                                      \
  do {                                                       \
    if (!(cond)) {                                           \
      fprintf(stderr, "check failed: %s\n", #cond);          \
      std::abort();                                          \
    }                                                        \
  } while (0)

void Run(const Worker& w, const GenerateRequest& request, const psa::AttentionPolicy& server) {
  absl::Status s = psa::AdmitGenerateRequest(request, w.limits);
  // The handler converts the policy once admitted; convert it anyway.
  absl::StatusOr<psa::AttentionPolicy> policy = psa::PolicyFromProto(request.attention(), server);
  if (policy.ok()) (void)policy->ToString();
  static const bool debug = std::getenv("PSA_FUZZ_DEBUG") != nullptr;
  if (debug) fprintf(stderr, "admit: %s\n", s.ToString().c_str());
  if (!s.ok()) return;
  const psa::Tokenizer& tok = *w.tok;
  const int max_tokens = psa::EffectiveMaxTokens(request, w.limits);
  PSA_CHECK(max_tokens >= 0);
  std::vector<psa::TokenId> prompt;
  switch (request.prompt_case()) {
    case GenerateRequest::kText: {
      prompt = tok.Encode(request.text(), tok.add_bos_default(), /*parse_special=*/false);
      // The bound admission relied on (CheckTextFits).
      const int per = tok.max_input_bytes_per_token();
      const size_t bos = w.limits.adds_bos ? 1 : 0;
      if (per > 0) {
        PSA_CHECK((prompt.size() - std::min(prompt.size(), bos)) * per >=
                  tok.EncodableBytes(request.text()));
      }
      break;
    }
    case GenerateRequest::kChat: {
      // EncodeChat is the service's (chat template); its messages' texts
      // are tokenized with specials parsed.
      std::string all;
      for (const auto& m : request.chat().messages()) all += m.role() + m.content();
      prompt = tok.Encode(all, tok.add_bos_default(), /*parse_special=*/true);
      break;
    }
    case GenerateRequest::kTokenIds:
      prompt = psa::PromptTokenIds(request);
      break;
    default:
      PSA_CHECK(false && "admitted a request without a prompt");
  }
  psa::GenerationRequest gen = psa::ToGenerationRequest(request, std::move(prompt), w.limits);
  if (policy.ok()) gen.attention = nullptr;
  absl::Status v = psa::ValidateGenerationRequest(gen, w.limits.n_vocab, w.max_context);
  if (debug) fprintf(stderr, "validate: %s\n", v.ToString().c_str());
  if (!v.ok()) return;
  // What the scheduler may rely on.
  PSA_CHECK(!gen.prompt.empty());
  for (psa::TokenId id : gen.prompt) PSA_CHECK(id >= 0 && id < w.limits.n_vocab);
  PSA_CHECK(gen.max_tokens >= 0);
  PSA_CHECK(gen.resumed >= 0 && gen.resumed <= static_cast<int>(gen.prompt.size()));
  PSA_CHECK(static_cast<int64_t>(gen.prompt.size()) - gen.resumed + gen.max_tokens <=
                w.max_context ||
            static_cast<int64_t>(gen.prompt.size()) + gen.max_tokens <= w.max_context);
  PSA_CHECK(gen.sampling.Validate().ok());
  for (const std::string& stop : gen.stop_strings) PSA_CHECK(!stop.empty());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  psa::fuzz::QuietProtobuf();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  return psa::fuzz::MutateSerialized<GenerateRequest>(data, size, max_size, seed);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Worker* gpt2 = new Worker(MakeWorker("gpt2"));
  static const Worker* llama = new Worker(MakeWorker("llama"));
  static const psa::AttentionPolicy* server = new psa::AttentionPolicy();
  GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  Run(*gpt2, request, *server);
  Run(*llama, request, *server);
  return 0;
}

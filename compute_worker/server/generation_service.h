// GenerationService: psa.v1.Generation on a compute worker. Admits requests
// by what their sizes and numbers alone decide (request_admission.h) on
// gRPC's callback thread, turns text and chat prompts into token ids on its
// PromptQueue (never on gRPC's threads, which answer health checks too),
// picks the attention policy (the request's or the server default), runs
// them on the BatchScheduler and streams tokens back as they are sampled.
//
// Ownership: borrows the model, scheduler, prefix store and registry; owns
// its prompt queue. Thread-safety: gRPC calls it from any thread.
#ifndef PSA_COMPUTE_WORKER_SERVER_GENERATION_SERVICE_H_
#define PSA_COMPUTE_WORKER_SERVER_GENERATION_SERVICE_H_

#include <memory>
#include <string>

#include "api/resume_auth.h"
#include "common/metrics.h"
#include "compute_worker/model/llama_model.h"
#include "compute_worker/attention/sparse_attention.h"
#include "compute_worker/server/batch_scheduler.h"
#include "compute_worker/server/prefix_store.h"
#include "compute_worker/server/prompt_queue.h"
#include "compute_worker/server/request_admission.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace psa {

struct GenerationServiceOptions {
  std::string model_id;              // reported in ModelInfo (GGUF sha256)
  std::string served_name;           // reported in ModelInfo: what clients call the model
  AttentionPolicy default_attention; // for requests that name none
  int default_max_tokens = 256;
  uint64_t max_prompt_bytes = 4 << 20;  // text/chat prompts longer than this are refused
  PromptQueue::Options prompt_queue;     // templating and tokenizing prompts
  // Checks the router's signature of GenerateRequest.resume; null: every
  // resume is refused. Must outlive the service.
  const ResumeAuth* resume_auth = nullptr;
};

class GenerationService final : public psa::v1::Generation::CallbackService {
 public:
  // `model`, `scheduler` and `registry` must outlive the service.
  // `prefix_store` (optional) loads published prompt prefixes from the KV
  // service before a request is scheduled.
  GenerationService(const LlamaModel* model, int max_context, BatchScheduler* scheduler,
                    PrefixStore* prefix_store, metrics::Registry* registry,
                    GenerationServiceOptions options);

  grpc::ServerWriteReactor<psa::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const psa::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const psa::v1::TokenizeRequest* request,
                                     psa::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const psa::v1::GetModelInfoRequest* request,
                                         psa::v1::ModelInfo* response) override;

 private:
  class GenerateReactor;
  struct Metrics {
    explicit Metrics(metrics::Registry* registry);
    metrics::Family<metrics::Counter>& requests;  // by finish reason / error code
    metrics::Histogram& ttft;
    metrics::Histogram& inter_token;
    metrics::Histogram& e2e;
    metrics::Counter& prompt_tokens;
    metrics::Counter& generation_tokens;
    metrics::Counter& kv_blocks_touched;
    metrics::Counter& kv_blocks_total;
    metrics::Histogram& kv_selected_fraction;
  };

  // The request's prompt as token ids (an admitted request's: its sizes
  // are checked). Tokenizes: runs on the prompt queue.
  absl::StatusOr<std::vector<TokenId>> PromptTokens(const psa::v1::GenerateRequest& request) const;
  // A chat formatted with the model's template and tokenized; with
  // `max_tokens` >= 0, refused before tokenizing if its formatted text
  // cannot fit the context with them.
  absl::StatusOr<std::vector<TokenId>> EncodeChat(const psa::v1::ChatPrompt& chat,
                                                  int max_tokens) const;
  absl::StatusOr<AttentionPolicy> Policy(const psa::v1::AttentionPolicy& requested) const;

  const LlamaModel* const model_;
  const int max_context_;
  BatchScheduler* const scheduler_;
  PrefixStore* const prefix_store_;
  const GenerationServiceOptions options_;
  const AdmissionLimits limits_;
  Metrics metrics_;
  PromptQueue prompt_queue_;  // last: its destructor runs what is queued
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_GENERATION_SERVICE_H_

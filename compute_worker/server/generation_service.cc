#include "compute_worker/server/generation_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "api/attention_policy_proto.h"
#include "api/generate_stream_writer.h"
#include "common/grpc_status.h"

namespace psa {
namespace {

using psa::v1::GenerateRequest;
using psa::v1::GenerateResponse;

std::string FinishLabel(const absl::Status& status, const std::string& finish_reason) {
  return status.ok() ? finish_reason : absl::StatusCodeToString(status.code());
}

// gRPC cancels a call when its deadline passes; a cancellation this close
// to the deadline (or after it) is the deadline's doing.
constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(20);

AdmissionLimits Limits(const LlamaModel& model, int max_context,
                       const GenerationServiceOptions& options) {
  const Tokenizer& tok = model.tokenizer();
  AdmissionLimits limits;
  limits.n_vocab = model.hparams().n_vocab;
  limits.max_context = max_context;
  limits.default_max_tokens = options.default_max_tokens;
  limits.max_prompt_bytes = options.max_prompt_bytes;
  limits.max_input_bytes_per_token = tok.max_input_bytes_per_token();
  limits.tokenizer = &tok;
  limits.adds_bos = tok.add_bos_default() && tok.bos_id() >= 0;
  return limits;
}

}  // namespace

GenerationService::Metrics::Metrics(metrics::Registry* r)
    : requests(r->AddCounter("psa_worker_requests_total",
                             "Finished generations by outcome (finish reason or error code)")),
      ttft(r->AddHistogram("psa_worker_time_to_first_token_seconds",
                           "From arrival to the first generated token",
                           metrics::LatencyBuckets())
               .Add()),
      inter_token(r->AddHistogram("psa_worker_inter_token_latency_seconds",
                                  "Time between consecutive tokens of a sequence",
                                  metrics::ExponentialBuckets(0.001, 2.0, 14))
                      .Add()),
      e2e(r->AddHistogram("psa_worker_e2e_request_latency_seconds",
                          "From arrival to the last token", metrics::LatencyBuckets())
              .Add()),
      prompt_tokens(r->AddCounter("psa_worker_prompt_tokens_total", "Prompt tokens processed")
                        .Add()),
      generation_tokens(
          r->AddCounter("psa_worker_generation_tokens_total", "Tokens generated").Add()),
      kv_blocks_touched(r->AddCounter("psa_worker_attention_kv_blocks_read_total",
                                      "KV blocks decode attention read (all layers and heads)")
                            .Add()),
      kv_blocks_total(r->AddCounter("psa_worker_attention_kv_blocks_dense_total",
                                    "KV blocks dense attention would have read")
                          .Add()),
      kv_selected_fraction(r->AddHistogram("psa_worker_attention_selected_fraction",
                                           "Per request: KV blocks read over dense's",
                                           {0.01, 0.02, 0.05, 0.1, 0.125, 0.15, 0.2, 0.25,
                                            0.3, 0.4, 0.5, 0.75, 1.0})
                               .Add()) {}

// One Generate call. Lives until both gRPC (OnDone) and the scheduler
// (on_finish) are done with it. Tokens that arrive while a write is in
// flight are merged into the next message, so a slow reader never holds up
// the scheduler.
class GenerationService::GenerateReactor final : public GenerateStreamWriter {
 public:
  // One producer reference: the scheduler (or whatever fails before it).
  // `request` stays valid until the call is finished.
  GenerateReactor(GenerationService* service, grpc::CallbackServerContext* ctx,
                  const GenerateRequest& request)
      : GenerateStreamWriter(/*producers=*/1),
        service_(service),
        start_(absl::Now()),
        deadline_(absl::FromChrono(ctx->deadline())) {
    absl::Status s = Admit(*ctx, request);
    if (s.ok()) s = Start(request);
    if (!s.ok()) FailBeforeScheduling(s);
  }

  void OnClientGone() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    if (id_ != 0) service_->scheduler_->Cancel(id_);
  }

 private:
  // What the request's sizes and numbers decide, on gRPC's thread; a
  // resume only from the router.
  absl::Status Admit(const grpc::CallbackServerContext& ctx, const GenerateRequest& request) {
    if (request.has_resume()) {
      const ResumeAuth* auth = service_->options_.resume_auth;
      if (auth == nullptr) {
        return absl::PermissionDeniedError(
            "resume is set by the router only, and this worker takes none: start the router "
            "and the workers with the same --resume_secret_file");
      }
      const auto& metadata = ctx.client_metadata();
      auto it = metadata.find(ResumeAuth::kMetadataKey);
      const std::string_view signature =
          it == metadata.end() ? std::string_view()
                               : std::string_view(it->second.data(), it->second.size());
      if (absl::Status s = auth->Verify(request, signature); !s.ok()) return s;
    }
    if (absl::Status s = AdmitGenerateRequest(request, service_->limits_); !s.ok()) return s;
    absl::StatusOr<AttentionPolicy> policy = service_->Policy(request.attention());
    if (!policy.ok()) return policy.status();
    policy_ = *policy;
    attention_name_ = policy_.kind == AttentionPolicy::Kind::kDense ? "dense" : policy_.ToString();
    return absl::OkStatus();
  }

  // Prepares the generation here if its prompt is token ids, or on the
  // prompt queue if it must be templated and tokenized.
  absl::Status Start(const GenerateRequest& request) {
    if (request.prompt_case() == GenerateRequest::kTokenIds) return Prepare(request);
    uint64_t bytes = request.text().size();
    for (const auto& m : request.chat().messages()) bytes += m.content().size();
    return service_->prompt_queue_.Post(bytes, [this, &request] {
      absl::Status s = ClientGone();  // while the prompt waited
      if (s.ok()) s = Prepare(request);
      if (!s.ok()) FailBeforeScheduling(s);
    });
  }

  // OK while the client is there; else why it is not.
  absl::Status ClientGone() {
    absl::MutexLock lock(&mu_);
    return ClientGoneLocked();
  }
  absl::Status ClientGoneLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!cancelled_) return absl::OkStatus();
    if (absl::Now() + kDeadlineSlack >= deadline_) {
      return absl::DeadlineExceededError("the request's deadline passed before it was scheduled");
    }
    return absl::CancelledError("the client cancelled the request");
  }

  // Builds the generation, then schedules it, after a prefix lookup in the
  // KV service when the worker has one.
  absl::Status Prepare(const GenerateRequest& request) {
    absl::StatusOr<std::vector<TokenId>> prompt = service_->PromptTokens(request);
    if (!prompt.ok()) return prompt.status();
    GenerationRequest gen = ToGenerationRequest(request, std::move(*prompt), service_->limits_);
    const LlamaHparams& hp = service_->model_->hparams();
    if (absl::Status s = ValidateGenerationRequest(gen, hp.n_vocab, service_->max_context_);
        !s.ok()) {
      return s;
    }
    if (service_->prefix_store_ == nullptr) return Schedule(std::move(gen), nullptr);
    auto kv = std::make_unique<KvCache>(service_->scheduler_->NewCache());
    std::vector<TokenId> prompt_copy = gen.prompt;
    const int decode_from = static_cast<int>(gen.prompt.size()) - gen.resumed;
    std::string salt = gen.cache_salt;  // before the callback below moves gen
    service_->prefix_store_->LoadAsync(
        std::move(prompt_copy), decode_from, DecodedBy(policy_), std::move(salt),
        std::move(kv),
        [this, gen = std::move(gen)](std::unique_ptr<KvCache> kv, int tokens) mutable {
          absl::Status s = Schedule(std::move(gen), tokens > 0 ? std::move(kv) : nullptr);
          if (!s.ok()) FailBeforeScheduling(s);
        });
    return absl::OkStatus();
  }

  absl::Status Schedule(GenerationRequest gen, std::unique_ptr<KvCache> preloaded) {
    SequenceEvents events;
    events.on_token = [this](TokenId token, const std::string& text) { OnToken(token, text); };
    events.on_finish = [this](const absl::Status& status, const SequenceSummary& summary) {
      OnFinish(status, summary);
    };
    absl::MutexLock lock(&mu_);  // OnClientGone must see id_
    if (absl::Status s = ClientGoneLocked(); !s.ok()) return s;
    absl::StatusOr<uint64_t> id =
        service_->scheduler_->Submit(std::move(gen), MakeAttention(policy_), deadline_,
                                     std::move(events), std::move(preloaded));
    if (!id.ok()) return id.status();
    id_ = *id;
    return absl::OkStatus();
  }

  // The scheduler will never call back: finish with `s` and drop its reference.
  void FailBeforeScheduling(const absl::Status& s) {
    service_->metrics_.requests.Add({{"outcome", FinishLabel(s, "")}}).Increment();
    Close(ToGrpcStatus(s));
    Unref();
  }

  void OnToken(TokenId token, const std::string& text) {
    const absl::Time now = absl::Now();
    if (last_token_ != absl::InfinitePast()) {
      service_->metrics_.inter_token.Observe(absl::ToDoubleSeconds(now - last_token_));
    }
    last_token_ = now;
    GenerateResponse message;
    message.add_token_ids(token);
    message.set_text(ValidUtf8(text));
    Push(message);
  }

  void OnFinish(const absl::Status& status, const SequenceSummary& summary) {
    Metrics& m = service_->metrics_;
    m.requests.Add({{"outcome", FinishLabel(status, summary.finish_reason)}}).Increment();
    m.prompt_tokens.Increment(summary.prompt_tokens);
    m.generation_tokens.Increment(summary.completion_tokens);
    if (summary.completion_tokens > 0) m.ttft.Observe(summary.time_to_first_token_seconds);
    m.e2e.Observe(summary.total_seconds);
    m.kv_blocks_touched.Increment(summary.kv_blocks_touched);
    m.kv_blocks_total.Increment(summary.kv_blocks_total);
    if (summary.kv_blocks_total > 0) {
      m.kv_selected_fraction.Observe(double(summary.kv_blocks_touched) / summary.kv_blocks_total);
    }
    if (!status.ok()) {
      Close(ToGrpcStatus(status));
    } else {
      GenerateResponse last;
      last.set_finish_reason(summary.finish_reason);
      psa::v1::Usage* usage = last.mutable_usage();
      usage->set_prompt_tokens(summary.prompt_tokens);
      usage->set_completion_tokens(summary.completion_tokens);
      usage->set_time_to_first_token_seconds(summary.time_to_first_token_seconds);
      usage->set_total_seconds(summary.total_seconds);
      usage->set_kv_blocks_touched(summary.kv_blocks_touched);
      usage->set_kv_blocks_total(summary.kv_blocks_total);
      usage->set_attention(attention_name_);
      Push(last);
      Close(grpc::Status::OK);
    }
    Unref();
  }

  GenerationService* const service_;
  const absl::Time start_;
  absl::Time last_token_ = absl::InfinitePast();  // scheduler thread only
  std::string attention_name_;
  AttentionPolicy policy_;
  const absl::Time deadline_;

  absl::Mutex mu_;  // the sequence's id and whether the client left
  uint64_t id_ ABSL_GUARDED_BY(mu_) = 0;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

GenerationService::GenerationService(const LlamaModel* model, int max_context,
                                     BatchScheduler* scheduler, PrefixStore* prefix_store,
                                     metrics::Registry* registry,
                                     GenerationServiceOptions options)
    : model_(model),
      max_context_(max_context),
      scheduler_(scheduler),
      prefix_store_(prefix_store),
      options_(std::move(options)),
      limits_(Limits(*model, max_context, options_)),
      metrics_(registry),
      prompt_queue_(options_.prompt_queue) {
  auto& running = registry->AddGauge("psa_worker_requests_running",
                                     "Sequences in the running batch").Add();
  auto& waiting = registry->AddGauge("psa_worker_requests_waiting",
                                     "Sequences queued for the batch").Add();
  // The same under the names vLLM exports, which load balancers and
  // autoscalers (e.g. KEDA, the Gateway API inference extension) read.
  auto& vllm_running = registry->AddGauge("vllm:num_requests_running",
                                          "Alias of psa_worker_requests_running").Add();
  auto& vllm_waiting = registry->AddGauge("vllm:num_requests_waiting",
                                          "Alias of psa_worker_requests_waiting").Add();
  registry->AddCollector([scheduler, &running, &waiting, &vllm_running, &vllm_waiting] {
    const BatchScheduler::Load load = scheduler->load();
    running.Set(load.running);
    waiting.Set(load.waiting);
    vllm_running.Set(load.running);
    vllm_waiting.Set(load.waiting);
  });
}

absl::StatusOr<std::vector<TokenId>> GenerationService::EncodeChat(
    const psa::v1::ChatPrompt& chat, int max_tokens) const {
  if (chat.messages_size() == 0) return absl::InvalidArgumentError("chat has no messages");
  std::vector<ChatMessage> messages;
  uint64_t bytes = 0;
  for (const auto& m : chat.messages()) {
    messages.push_back(ChatMessage{m.role(), m.content()});
    bytes += m.content().size();
  }
  if (bytes > options_.max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chat is ", bytes, " bytes (its messages' contents together); the worker takes at most ",
        options_.max_prompt_bytes, " (--max_request_bytes)"));
  }
  absl::StatusOr<std::string> text = model_->chat_template().Apply(messages, true);
  if (!text.ok()) return text.status();
  if (max_tokens >= 0) {
    absl::Status s = CheckTextFits("chat (formatted with the model's chat template)", *text,
                                   max_tokens, limits_);
    if (!s.ok()) return s;
  }
  const Tokenizer& tok = model_->tokenizer();
  return tok.Encode(*text, tok.add_bos_default(), /*parse_special=*/true);
}

absl::StatusOr<std::vector<TokenId>> GenerationService::PromptTokens(
    const GenerateRequest& request) const {
  const Tokenizer& tok = model_->tokenizer();
  switch (request.prompt_case()) {
    case GenerateRequest::kText:
      return tok.Encode(request.text(), tok.add_bos_default(), /*parse_special=*/false);
    case GenerateRequest::kChat:
      return EncodeChat(request.chat(), EffectiveMaxTokens(request, limits_));
    case GenerateRequest::kTokenIds:
      return PromptTokenIds(request);
    default:
      return absl::InvalidArgumentError("the request has no prompt: set text, chat or token_ids");
  }
}

absl::StatusOr<AttentionPolicy> GenerationService::Policy(
    const psa::v1::AttentionPolicy& requested) const {
  return PolicyFromProto(requested, options_.default_attention);
}

grpc::ServerWriteReactor<GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* ctx, const GenerateRequest* request) {
  return new GenerateReactor(this, ctx, *request);
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* ctx,
                                                      const psa::v1::TokenizeRequest* request,
                                                      psa::v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  uint64_t bytes = request->text().size();
  for (const auto& m : request->chat().messages()) bytes += m.content().size();
  absl::Status status;
  if (request->input_case() == psa::v1::TokenizeRequest::kText &&
      request->text().size() > options_.max_prompt_bytes) {
    status = absl::InvalidArgumentError(absl::StrCat(
        "text is ", request->text().size(), " bytes; the worker takes at most ",
        options_.max_prompt_bytes, " (--max_request_bytes)"));
  } else if (request->input_case() == psa::v1::TokenizeRequest::INPUT_NOT_SET) {
    status = absl::InvalidArgumentError("set text or chat");
  } else {
    // Tokenizing takes seconds for MiB: on the prompt queue, not here.
    status = prompt_queue_.Post(bytes, [this, ctx, request, response, reactor] {
      absl::Status s;
      if (ctx->IsCancelled()) {
        s = absl::CancelledError("the client left before the text was tokenized");
      } else if (request->input_case() == psa::v1::TokenizeRequest::kText) {
        const Tokenizer& tok = model_->tokenizer();
        for (TokenId t : tok.Encode(request->text(), tok.add_bos_default(), false)) {
          response->add_token_ids(t);
        }
      } else {
        absl::StatusOr<std::vector<TokenId>> ids = EncodeChat(request->chat(), -1);
        s = ids.status();
        if (ids.ok()) {
          for (TokenId t : *ids) response->add_token_ids(t);
        }
      }
      reactor->Finish(ToGrpcStatus(s));
    });
  }
  if (!status.ok()) reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(
    grpc::CallbackServerContext* ctx, const psa::v1::GetModelInfoRequest* request,
    psa::v1::ModelInfo* response) {
  const LlamaHparams& hp = model_->hparams();
  response->set_model_id(options_.model_id);
  response->set_served_name(options_.served_name);
  response->set_name(model_->Describe());
  response->set_architecture("llama");
  response->set_num_layers(hp.n_layer);
  response->set_num_heads(hp.n_head);
  response->set_num_kv_heads(hp.n_head_kv);
  response->set_head_dim(hp.head_dim);
  response->set_vocab_size(hp.n_vocab);
  response->set_max_context(max_context_);
  response->set_default_attention(options_.default_attention.ToString());
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace psa

#include "compute_worker/server/batch_scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "compute_worker/runtime/sampler.h"

namespace psa {

struct BatchScheduler::Sequence {
  Sequence(uint64_t id, GenerationRequest req, std::unique_ptr<AttentionBackend> attn,
           absl::Time deadline, SequenceEvents ev, KvCache cache, const Tokenizer& tokenizer)
      : id(id),
        request(std::move(req)),
        attention(std::move(attn)),
        deadline(deadline),
        events(std::move(ev)),
        kv(std::move(cache)),
        state(tokenizer, request),
        sampler(request.sampling, request.prompt, request.resumed),
        submitted(absl::Now()) {}

  const uint64_t id;
  const GenerationRequest request;
  const std::unique_ptr<AttentionBackend> attention;
  const absl::Time deadline;
  SequenceEvents events;
  KvCache kv;
  GenerationState state;  // refers to `request`
  Sampler sampler;
  const absl::Time submitted;
  // What is prefilled into the cache: the prompt, or after a rebuild the
  // prompt and the tokens generated before the last (fed as `next`).
  std::vector<TokenId> replay;  // empty: the prompt
  const std::vector<TokenId>& context() const { return replay.empty() ? request.prompt : replay; }
  size_t prefilled = 0;  // context tokens already in the cache
  int preloaded = 0;     // of which came with Submit
  int rebuilds = 0;
  TokenId next = -1;     // sampled, to be fed at the next step
  std::vector<HeadStepStats> stats;
  SequenceSummary summary;
  bool done = false;  // finished (events delivered); retired after the step
  // Where the request's prompt stops being prompt (resumed tokens follow).
  size_t decode_from() const { return request.prompt.size() - request.resumed; }
  // The request's prompt as the KV service names it.
  CacheContents prompt_contents() const {
    return CacheContents{request.prompt, static_cast<int>(decode_from()), DecodedBy(*attention),
                         request.cache_salt};
  }
};

BatchScheduler::BatchScheduler(LlamaRuntime* runtime, Options options)
    : runtime_(runtime), options_(options) {
  thread_ = std::thread([this] { Loop(); });
}

BatchScheduler::~BatchScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
  const absl::Status gone = absl::UnavailableError("the worker is shutting down");
  for (auto& seq : running_) Finish(seq.get(), gone);
  for (auto& seq : waiting_) Finish(seq.get(), gone);
}

absl::StatusOr<uint64_t> BatchScheduler::Submit(GenerationRequest request,
                                                std::unique_ptr<AttentionBackend> attention,
                                                absl::Time deadline, SequenceEvents events,
                                                std::unique_ptr<KvCache> preloaded) {
  const LlamaModel& model = runtime_->model();
  if (absl::Status s = ValidateGenerationRequest(request, model.hparams().n_vocab,
                                                 runtime_->max_context());
      !s.ok()) {
    return s;
  }
  absl::MutexLock lock(&mu_);
  if (stop_) return absl::UnavailableError("the worker is shutting down");
  if (preloaded != nullptr && preloaded->length() >= static_cast<int>(request.prompt.size())) {
    return absl::InvalidArgumentError("a preloaded cache must leave a prompt token to prefill");
  }
  // Room: a free place in the batch (counting those about to join it) or
  // in the queue.
  const int queued = waiting_.size();
  if (running_count_ + queued >= options_.max_running && queued >= options_.max_waiting) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the worker's queue is full (", waiting_.size(), " waiting, ", running_count_,
        " running); retry later or on another worker"));
  }
  const uint64_t id = next_id_++;
  KvCache cache = preloaded != nullptr ? std::move(*preloaded) : runtime_->NewCache();
  const int preloaded_tokens = cache.length();
  waiting_.push_back(std::make_unique<Sequence>(id, std::move(request), std::move(attention),
                                                deadline, std::move(events), std::move(cache),
                                                model.tokenizer()));
  waiting_.back()->prefilled = preloaded_tokens;
  waiting_.back()->preloaded = preloaded_tokens;
  cancelled_[id] = false;
  return id;
}

void BatchScheduler::Cancel(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = cancelled_.find(id);
  if (it != cancelled_.end()) it->second = true;
}

BatchScheduler::Load BatchScheduler::load() {
  absl::MutexLock lock(&mu_);
  return Load{running_count_, static_cast<int>(waiting_.size())};
}

void BatchScheduler::Finish(Sequence* seq, const absl::Status& status) {
  seq->summary.prompt_tokens = seq->request.prompt.size() - seq->request.resumed;
  seq->summary.completion_tokens = seq->state.tokens().size();
  seq->summary.finish_reason = seq->state.finish_reason();
  seq->summary.total_seconds = absl::ToDoubleSeconds(absl::Now() - seq->submitted);
  if (seq->events.on_finish) seq->events.on_finish(status, seq->summary);
  seq->events = SequenceEvents();  // exactly once
  seq->done = true;
}

void BatchScheduler::Loop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this] {
        mu_.AssertHeld();
        return stop_ || !waiting_.empty() || !running_.empty();
      };
      mu_.Await(absl::Condition(&has_work));
      if (stop_) return;
      while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
        running_.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
      running_count_ = running_.size();
    }
    Step();
  }
}

bool BatchScheduler::Step() {
  // Drop what was cancelled or ran out of time. (Events are delivered
  // outside the lock: a callback may call back into the scheduler.) gRPC
  // cancels a call when its deadline passes, so a cancellation at (or a
  // hair before) the deadline is the deadline's doing: DEADLINE_EXCEEDED,
  // not finish_reason "cancelled". `now` is read after the flags.
  std::vector<char> cancelled(running_.size());
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < running_.size(); ++i) cancelled[i] = cancelled_[running_[i]->id];
  }
  const absl::Time now = absl::Now();
  constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(20);
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence* seq = running_[i].get();
    if (now > seq->deadline || (cancelled[i] && now + kDeadlineSlack >= seq->deadline)) {
      Finish(seq, absl::DeadlineExceededError("the request's deadline passed"));
    } else if (cancelled[i]) {
      seq->state.Cancel();
      Finish(seq, absl::OkStatus());
    }
  }
  Retire();

  // Blocks the KV service stored since the last step become evictable.
  for (auto& seq : running_) seq->kv.ApplyDurability();

  // Decode rows first (one each), then prompt chunks within the budget.
  std::vector<BatchEntry> batch;
  std::vector<Sequence*> owners;
  int budget = options_.step_tokens;
  for (auto& seq : running_) {
    if (seq->prefilled < seq->context().size()) continue;
    batch.push_back(BatchEntry{&seq->kv, {&seq->next, 1}, true, seq->attention.get(),
                               &seq->stats});
    owners.push_back(seq.get());
    --budget;
  }
  for (auto& seq : running_) {
    const std::vector<TokenId>& context = seq->context();
    const size_t left = context.size() - seq->prefilled;
    if (left == 0 || budget <= 0) continue;
    size_t chunk = std::min<size_t>(left, budget);
    // Positions a decode step produced (resumed tokens, or a rebuild's
    // generated ones) are recomputed as decode steps, one per pass: a
    // sparse policy attends a prompt row densely, a decode row sparsely,
    // and the output must not depend on which path built the cache.
    if (seq->attention->name() != "dense") {
      const size_t decode_from = seq->decode_from();
      chunk = seq->prefilled >= decode_from ? 1 : std::min(chunk, decode_from - seq->prefilled);
    }
    // A replay's last token is sampled already (`next`): no logits wanted.
    const bool logits = chunk == left && seq->replay.empty();
    batch.push_back(BatchEntry{&seq->kv, {context.data() + seq->prefilled, chunk}, logits,
                               seq->attention.get(), nullptr,
                               /*prompt=*/seq->prefilled < seq->decode_from()});
    owners.push_back(seq.get());
    budget -= chunk;
  }
  if (batch.empty()) return false;

  std::vector<float> logits;
  const absl::Status status = runtime_->Forward(batch, &logits);
  const int n_vocab = runtime_->model().hparams().n_vocab;
  size_t row = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence* seq = owners[i];
    const float* row_logits = batch[i].want_logits ? logits.data() + row++ * n_vocab : nullptr;
    if (!status.ok()) {  // validated on submit: this is a bug, not bad input
      Finish(seq, absl::InternalError(absl::StrCat("forward pass failed: ", status.message())));
      continue;
    }
    if (absl::Status fetched = seq->kv.fetch_status(); !fetched.ok()) {
      // Attention read pages that never arrived: this step's output is
      // wrong and is dropped. The token history is the truth: recompute
      // the cache from it (a few times at most).
      if (seq->rebuilds < kMaxRebuilds) {
        Rebuild(seq);
      } else {
        Finish(seq, absl::UnavailableError(absl::StrCat(
                        "the KV service could not return this sequence's blocks (",
                        fetched.message(), ") ", seq->rebuilds,
                        " times; resubmit with the tokens so far to continue")));
      }
      continue;
    }
    if (!seq->replay.empty() && seq->prefilled < seq->replay.size()) {
      seq->prefilled += batch[i].tokens.size();  // rebuilding: nothing to sample yet
      continue;
    }
    const bool decode = seq->prefilled == seq->context().size();
    if (decode) {
      for (const HeadStepStats& h : seq->stats) {
        seq->summary.kv_blocks_touched += h.blocks_touched;
        seq->summary.kv_blocks_total += h.blocks_total;
      }
      if (options_.on_decode_stats) options_.on_decode_stats(seq->stats, seq->attention.get());
      if (options_.on_block_filled && seq->kv.length() % seq->kv.block_size() == 0) {
        // The original prompt, then every generated token (the resumed
        // ones included: they end the request's prompt and begin tokens()).
        const std::vector<TokenId>& prompt = seq->request.prompt;
        const size_t decode_from = seq->decode_from();
        std::vector<TokenId> sequence(prompt.begin(), prompt.begin() + decode_from);
        const std::vector<TokenId>& generated = seq->state.tokens();
        sequence.insert(sequence.end(), generated.begin(), generated.end());
        options_.on_block_filled(CacheContents{sequence, static_cast<int>(decode_from),
                                               DecodedBy(*seq->attention),
                                               seq->request.cache_salt},
                                 seq->kv);
      }
    } else {
      seq->prefilled += batch[i].tokens.size();
      if (seq->prefilled == seq->request.prompt.size()) {
        if (options_.on_prompt_prefilled) {
          options_.on_prompt_prefilled(seq->prompt_contents(), seq->kv, seq->preloaded);
        }
      } else if (options_.on_prompt_chunk) {
        options_.on_prompt_chunk(seq->prompt_contents(), seq->kv);
      }
    }
    if (row_logits == nullptr) continue;
    if (!seq->state.finish_reason().empty()) {  // max_tokens 0
      Finish(seq, absl::OkStatus());
      continue;
    }
    seq->next = seq->sampler.Sample(row_logits, n_vocab);
    if (seq->state.tokens().empty()) {
      seq->summary.time_to_first_token_seconds =
          absl::ToDoubleSeconds(absl::Now() - seq->submitted);
    }
    const GenerationState::Step step = seq->state.Accept(seq->next);
    if (seq->events.on_token) {
      seq->events.on_token(seq->next, seq->state.TakeResumedText() + step.text);
    }
    if (step.finished) Finish(seq, absl::OkStatus());
  }
  Retire();
  return true;
}

void BatchScheduler::Rebuild(Sequence* seq) {
  ++seq->rebuilds;
  seq->kv = runtime_->NewCache();
  seq->prefilled = 0;
  seq->preloaded = 0;
  seq->replay.clear();
  const std::vector<TokenId>& generated = seq->state.tokens();
  if (!generated.empty()) {
    // Decoding: the cache must hold the prompt and every generated token
    // but the last, which the next step feeds (`next`).
    seq->replay = seq->request.prompt;
    seq->replay.insert(seq->replay.end(), generated.begin(), generated.end() - 1);
  }
  if (options_.on_rebuild) options_.on_rebuild();
}

void BatchScheduler::Retire() {
  absl::MutexLock lock(&mu_);
  for (auto& seq : running_) {
    if (!seq->done) continue;
    cancelled_.erase(seq->id);
    seq.reset();
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  running_count_ = running_.size();
}

}  // namespace psa

// BatchScheduler: continuous batching of many generations over one
// LlamaRuntime. A single loop thread owns the runtime; every step it runs
// one Forward() over all running sequences (one decode token each, plus
// prompt chunks of new ones within the step's token budget). Sequences join
// and leave between steps; cancellation and deadlines take effect at the
// next step.
#ifndef PSA_COMPUTE_WORKER_SERVER_BATCH_SCHEDULER_H_
#define PSA_COMPUTE_WORKER_SERVER_BATCH_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "compute_worker/runtime/generator.h"
#include "compute_worker/server/cache_contents.h"
#include "compute_worker/runtime/llama_runtime.h"

namespace psa {

struct SequenceSummary {
  std::string finish_reason;  // "eos", "stop", "length", "cancelled"
  int prompt_tokens = 0;
  int completion_tokens = 0;
  double time_to_first_token_seconds = 0;
  double total_seconds = 0;
  int64_t kv_blocks_touched = 0;
  int64_t kv_blocks_total = 0;
};

// Called on the scheduler thread; must not block.
struct SequenceEvents {
  std::function<void(TokenId token, const std::string& text)> on_token;
  // Exactly once, last. A non-OK status ends the sequence with an error.
  std::function<void(const absl::Status& status, const SequenceSummary& summary)> on_finish;
};

class BatchScheduler {
 public:
  struct Options {
    int max_running = 64;   // sequences decoding together
    int max_waiting = 256;  // queued beyond that; more is RESOURCE_EXHAUSTED
    int step_tokens = 512;  // rows per step (decode tokens + prompt chunks)
    // Called on the scheduler thread once a sequence's prompt is in its
    // cache, with the tokens that came preloaded (e.g. to publish it).
    std::function<void(const CacheContents& prompt, const KvCache& kv, int preloaded_tokens)>
        on_prompt_prefilled;
    // Called on the scheduler thread after each prompt chunk but the last,
    // with the prompt and the cache so far (e.g. to store full blocks
    // behind the computation).
    std::function<void(const CacheContents& prompt, const KvCache& kv)> on_prompt_chunk;
    // Called on the scheduler thread when a decode step fills a block, with
    // every token of the sequence so far (the cache holds all but the last).
    std::function<void(const CacheContents& sequence, const KvCache& kv)> on_block_filled;
    // Called on the scheduler thread when a sequence's cache is rebuilt from
    // its tokens (the KV service lost blocks it needed).
    std::function<void()> on_rebuild;
    // Called on the scheduler thread after every decode step of a sequence
    // with what attention did: stats[layer * n_head + head], and the
    // sequence's attention (null: the runtime's default).
    std::function<void(const std::vector<HeadStepStats>& stats,
                       const AttentionBackend* attention)>
        on_decode_stats;
  };
  struct Load {
    int running = 0;
    int waiting = 0;
  };

  BatchScheduler(LlamaRuntime* runtime, Options options);
  // Finishes every sequence with UNAVAILABLE and stops the loop.
  ~BatchScheduler();

  // Validates and queues a generation; `attention` (null: the runtime's
  // default) lives as long as the sequence. Returns an id for Cancel().
  // `preloaded` (optional) already holds a prefix of the prompt: only the
  // rest is prefilled.
  absl::StatusOr<uint64_t> Submit(GenerationRequest request,
                                  std::unique_ptr<AttentionBackend> attention,
                                  absl::Time deadline, SequenceEvents events,
                                  std::unique_ptr<KvCache> preloaded = nullptr);
  // An empty cache of the kind sequences use (e.g. to preload a prefix into).
  KvCache NewCache() const { return runtime_->NewCache(); }
  // Ends the sequence at the next step (finish_reason "cancelled"); no-op
  // for unknown or finished ids. Thread-safe.
  void Cancel(uint64_t id);
  Load load();

 private:
  struct Sequence;
  void Loop();
  // One Forward() over the running sequences; false when there was nothing to do.
  bool Step();
  void Finish(Sequence* seq, const absl::Status& status);
  // Replaces the cache with an empty one and replays the sequence's tokens
  // into it: after a failed page fetch, the token history is the truth.
  void Rebuild(Sequence* seq);
  static constexpr int kMaxRebuilds = 2;
  // Removes finished sequences from running_.
  void Retire();

  LlamaRuntime* const runtime_;
  const Options options_;

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<std::unique_ptr<Sequence>> waiting_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, bool> cancelled_ ABSL_GUARDED_BY(mu_);  // id -> flag
  int running_count_ ABSL_GUARDED_BY(mu_) = 0;

  std::vector<std::unique_ptr<Sequence>> running_;  // loop thread only
  std::thread thread_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_BATCH_SCHEDULER_H_

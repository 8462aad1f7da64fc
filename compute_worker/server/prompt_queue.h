// PromptQueue: runs the CPU-heavy part of admitting a generation — chat
// templating and tokenizing a text prompt, which takes seconds for a few
// MiB — on threads of its own. gRPC's callback threads, which also answer
// the health checks the router polls, only queue the work and return. Small
// prompts (up to kSmallBytes, milliseconds each) go first, and large ones
// never hold every thread, so a burst of large prompts delays other large
// prompts only: never a health check, nor an ordinary prompt for long.
//
// Ownership: owns its threads. A task must keep alive what it touches
// (callers pass a reactor that holds a reference until the task ran).
// Thread-safety: Post() and queued() are thread-safe. The destructor runs
// every task already queued, then joins the threads.
#ifndef PSA_COMPUTE_WORKER_SERVER_PROMPT_QUEUE_H_
#define PSA_COMPUTE_WORKER_SERVER_PROMPT_QUEUE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace psa {

class PromptQueue {
 public:
  static constexpr uint64_t kSmallBytes = 64 << 10;

  struct Options {
    int threads = 2;                        // tasks that run at once (large: one fewer)
    int max_queued = 256;                   // waiting tasks; more are refused
    uint64_t max_queued_bytes = 256 << 20;  // their prompts' bytes; more are refused
  };

  explicit PromptQueue(Options options);
  ~PromptQueue();
  PromptQueue(const PromptQueue&) = delete;
  PromptQueue& operator=(const PromptQueue&) = delete;

  // Queues `task`, whose prompt is `bytes` long; RESOURCE_EXHAUSTED (saying
  // what is queued) when that would exceed a limit. A refused task is
  // dropped without running.
  absl::Status Post(uint64_t bytes, std::function<void()> task);

  // Tasks waiting (not those running).
  int queued();

 private:
  struct Task {
    uint64_t bytes = 0;
    std::function<void()> run;
  };
  void Loop();
  // Whether a thread may take a task now.
  bool ReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  const int threads_for_large_;  // threads - 1 (1 if threads is 1)
  absl::Mutex mu_;
  std::deque<Task> small_ ABSL_GUARDED_BY(mu_);
  std::deque<Task> large_ ABSL_GUARDED_BY(mu_);
  int large_running_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_PROMPT_QUEUE_H_

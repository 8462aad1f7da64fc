#include "compute_worker/server/prompt_queue.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace psa {

PromptQueue::PromptQueue(Options options)
    : options_(options), threads_for_large_(std::max(1, options.threads - 1)) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    threads_.emplace_back([this] { Loop(); });
  }
}

PromptQueue::~PromptQueue() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

absl::Status PromptQueue::Post(uint64_t bytes, std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  const size_t queued = small_.size() + large_.size();
  if (static_cast<int>(queued) >= options_.max_queued ||
      (queued > 0 && queued_bytes_ + bytes > options_.max_queued_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the worker has ", queued, " prompts (", queued_bytes_,
        " bytes) waiting to be tokenized, at its limit of ", options_.max_queued,
        " prompts or ", options_.max_queued_bytes, " bytes; retry later or on another worker"));
  }
  queued_bytes_ += bytes;
  (bytes <= kSmallBytes ? small_ : large_).push_back(Task{bytes, std::move(task)});
  return absl::OkStatus();
}

int PromptQueue::queued() {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(small_.size() + large_.size());
}

bool PromptQueue::ReadyLocked() const {
  return stop_ || !small_.empty() || (!large_.empty() && large_running_ < threads_for_large_);
}

void PromptQueue::Loop() {
  while (true) {
    Task task;
    bool large = false;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &PromptQueue::ReadyLocked));
      if (!small_.empty()) {
        task = std::move(small_.front());
        small_.pop_front();
      } else if (!large_.empty() && large_running_ < threads_for_large_) {
        task = std::move(large_.front());
        large_.pop_front();
        large = true;
        ++large_running_;
      } else {
        return;  // stopping, and nothing left this thread may run
      }
      queued_bytes_ -= task.bytes;
    }
    task.run();
    if (large) {
      absl::MutexLock lock(&mu_);
      --large_running_;
    }
  }
}

}  // namespace psa

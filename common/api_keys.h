// ApiKeys: the bearer keys a server accepts and the tenant each belongs to,
// read from a file an operator edits (or a Kubernetes Secret updates):
//
//   # one key per line, optionally followed by its tenant
//   sk-live-9f2c...   team-a
//   sk-live-41d0...   team-b
//   sk-ops-77aa...                (no tenant: "")
//
// The file is re-read when its modification time or size changes (looked at
// at most once a second), so keys are added and revoked without a restart;
// a file that becomes unreadable or malformed keeps the last good keys (and
// says so on stderr). Keys are held as SHA-256 digests and looked up by
// digest, so the comparison leaks no key bytes through timing.
//
// Thread-safe: Check() may be called from any thread.
#ifndef PSA_COMMON_API_KEYS_H_
#define PSA_COMMON_API_KEYS_H_

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace psa {

class ApiKeys {
 public:
  // Reads `path` once; an unreadable file, a malformed line or no key at all
  // is an error naming the line.
  static absl::StatusOr<std::unique_ptr<ApiKeys>> Load(const std::string& path);

  // The tenant of the key in an "authorization" value ("Bearer KEY");
  // UNAUTHENTICATED, with what to send, when it is missing or unknown.
  absl::StatusOr<std::string> Check(absl::string_view authorization);

  // Keys known now (after any reload).
  size_t size();

 private:
  explicit ApiKeys(std::string path) : path_(std::move(path)) {}
  // Parses the file: digest -> tenant.
  static absl::StatusOr<std::map<std::string, std::string>> Read(const std::string& path);
  void MaybeReload() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  absl::Mutex mu_;
  std::map<std::string, std::string> tenants_ ABSL_GUARDED_BY(mu_);  // SHA-256 -> tenant
  absl::Time next_look_ ABSL_GUARDED_BY(mu_);
  int64_t mtime_ns_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t size_ ABSL_GUARDED_BY(mu_) = -1;
};

}  // namespace psa

#endif  // PSA_COMMON_API_KEYS_H_

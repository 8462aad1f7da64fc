#include "common/api_keys.h"

#include <openssl/sha.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

namespace psa {
namespace {

std::string Digest(absl::string_view key) {
  unsigned char out[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), out);
  return std::string(reinterpret_cast<const char*>(out), sizeof(out));
}

bool Stat(const std::string& path, int64_t* mtime_ns, int64_t* size) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return false;
  *mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  *size = st.st_size;
  return true;
}

}  // namespace

absl::StatusOr<std::map<std::string, std::string>> ApiKeys::Read(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the API keys file ", path));
  std::map<std::string, std::string> tenants;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(l, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() > 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": expected KEY [TENANT], got ", fields.size(), " fields"));
    }
    if (fields[0].size() < 16) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": a key must have at least 16 characters"));
    }
    tenants[Digest(fields[0])] = fields.size() == 2 ? std::string(fields[1]) : "";
  }
  if (tenants.empty()) return absl::InvalidArgumentError(absl::StrCat(path, " holds no key"));
  return tenants;
}

absl::StatusOr<std::unique_ptr<ApiKeys>> ApiKeys::Load(const std::string& path) {
  std::unique_ptr<ApiKeys> keys(new ApiKeys(path));
  absl::MutexLock lock(&keys->mu_);
  Stat(path, &keys->mtime_ns_, &keys->size_);
  absl::StatusOr<std::map<std::string, std::string>> read = Read(path);
  if (!read.ok()) return read.status();
  keys->tenants_ = std::move(*read);
  keys->next_look_ = absl::Now() + absl::Seconds(1);
  return keys;
}

void ApiKeys::MaybeReload() {
  const absl::Time now = absl::Now();
  if (now < next_look_) return;
  next_look_ = now + absl::Seconds(1);
  int64_t mtime_ns = 0, size = 0;
  if (!Stat(path_, &mtime_ns, &size) || (mtime_ns == mtime_ns_ && size == size_)) return;
  absl::StatusOr<std::map<std::string, std::string>> read = Read(path_);
  if (!read.ok()) {
    std::fprintf(stderr, "api keys: keeping the last %zu keys: %s\n", tenants_.size(),
                 std::string(read.status().message()).c_str());
    return;  // looked at again once the file changes
  }
  mtime_ns_ = mtime_ns;
  size_ = size;
  tenants_ = std::move(*read);
  std::fprintf(stderr, "api keys: reloaded %s, %zu keys\n", path_.c_str(), tenants_.size());
}

absl::StatusOr<std::string> ApiKeys::Check(absl::string_view authorization) {
  absl::string_view key = absl::StripAsciiWhitespace(authorization);
  if (key.empty()) {
    return absl::UnauthenticatedError(
        "an API key is required: send \"authorization: Bearer KEY\" (HTTP: the Authorization "
        "header; gRPC: metadata)");
  }
  if (!absl::ConsumePrefix(&key, "Bearer ") && !absl::ConsumePrefix(&key, "bearer ")) {
    return absl::UnauthenticatedError("the authorization value must be \"Bearer KEY\"");
  }
  const std::string digest = Digest(absl::StripAsciiWhitespace(key));
  absl::MutexLock lock(&mu_);
  MaybeReload();
  auto it = tenants_.find(digest);
  if (it == tenants_.end()) return absl::UnauthenticatedError("the API key is not valid");
  return it->second;
}

size_t ApiKeys::size() {
  absl::MutexLock lock(&mu_);
  MaybeReload();
  return tenants_.size();
}

}  // namespace psa

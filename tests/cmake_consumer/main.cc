// Builds against the installed SDK; asks an unreachable server for model
// info and expects a clean UNAVAILABLE.
#include <cstdio>

#include "client/psa_client.h"

int main() {
  psa::client::ClientOptions options;
  options.target = "127.0.0.1:1";
  options.timeout = absl::Seconds(5);
  auto client = psa::client::Client::Connect(options);
  if (!client.ok()) return 1;
  auto info = (*client)->GetModelInfo();
  std::printf("%s\n", info.status().ToString().c_str());
  return info.status().code() == absl::StatusCode::kUnavailable ? 0 : 1;
}

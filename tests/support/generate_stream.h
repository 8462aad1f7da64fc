// Reads a psa.v1.Generation stream to its end, for integration tests.
#ifndef PSA_TESTS_SUPPORT_GENERATE_STREAM_H_
#define PSA_TESTS_SUPPORT_GENERATE_STREAM_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/create_channel.h"
#include "proto/psa/v1/generation.grpc.pb.h"

namespace psa::testing {

struct Streamed {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  std::string finish_reason;
  psa::v1::Usage usage;
  int messages = 0;
};

// Runs `request` on `address`; `on_message` sees the stream so far after
// each message and returns false to cancel the call. `metadata` is sent
// with the call.
inline Streamed StreamGenerate(const std::string& address, const psa::v1::GenerateRequest& request,
                               absl::Duration timeout = absl::Seconds(120),
                               const std::function<bool(const Streamed&)>& on_message = nullptr,
                               const std::multimap<std::string, std::string>& metadata = {}) {
  auto stub = psa::v1::Generation::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  for (const auto& [key, value] : metadata) ctx.AddMetadata(key, value);
  Streamed out;
  auto reader = stub->Generate(&ctx, request);
  psa::v1::GenerateResponse r;
  while (reader->Read(&r)) {
    ++out.messages;
    for (uint32_t t : r.token_ids()) out.tokens.push_back(static_cast<int32_t>(t));
    out.text += r.text();
    if (!r.finish_reason().empty()) {
      out.finish_reason = r.finish_reason();
      out.usage = r.usage();
    }
    if (on_message && !on_message(out)) ctx.TryCancel();
  }
  out.status = reader->Finish();
  return out;
}

}  // namespace psa::testing

#endif  // PSA_TESTS_SUPPORT_GENERATE_STREAM_H_

#include "tests/integration/kv_service_testing.h"

#include <utility>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/support/kv_blocks.h"

namespace psa::testing {

psa::v1::KvLayout ModelLayout() { return ModelShapedLayout("smollm2-135m-test"); }

std::unique_ptr<ServerProcess> StartShard(std::vector<std::string> extra) {
  std::vector<std::string> args = {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto p = ServerProcess::Start(PSA_KV_SERVICE_BIN, args);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

std::unique_ptr<KvClient> ClientFor(const std::vector<std::string>& shards,
                                    uint64_t max_message) {
  KvClientOptions options;
  options.shards = shards;
  options.max_message_bytes = max_message;
  options.rpc_timeout = absl::Seconds(5);
  auto client = KvClient::Connect(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(*client);
}

std::vector<psa::v1::KvBlock> SequenceBlocks(const psa::v1::KvLayout& l, uint32_t layers,
                                             uint32_t blocks, uint64_t seed) {
  std::vector<psa::v1::KvBlock> out;
  for (uint32_t layer = 0; layer < layers; ++layer) {
    for (uint32_t i = 0; i < blocks; ++i) out.push_back(MakeBlock(l, layer, i, seed));
  }
  return out;
}

}  // namespace psa::testing

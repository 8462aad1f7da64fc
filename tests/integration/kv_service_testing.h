// Helpers shared by the kv_service_test sources: psa-kv-service shards as
// real processes on loopback (PSA_KV_SERVICE_BIN, a compile definition of
// the test binary), clients for them and model-shaped test blocks.
#ifndef PSA_TESTS_INTEGRATION_KV_SERVICE_TESTING_H_
#define PSA_TESTS_INTEGRATION_KV_SERVICE_TESTING_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv_service/kv_client.h"
#include "proto/psa/v1/kv_service.pb.h"
#include "tests/support/server_process.h"

namespace psa::testing {

// The layout of the test model ("smollm2-135m-test"): 30 layers, 3 KV heads.
psa::v1::KvLayout ModelLayout();

// Starts a shard on ephemeral ports with `extra` flags; null (and a test
// failure) if it did not start.
std::unique_ptr<ServerProcess> StartShard(std::vector<std::string> extra = {});

// A client of `shards` with a 5 s RPC timeout and this message limit.
std::unique_ptr<KvClient> ClientFor(const std::vector<std::string>& shards,
                                    uint64_t max_message = 64ull << 20);

// Blocks 0..blocks-1 of layers 0..layers-1, layer by layer (MakeBlock's
// content for `seed`).
std::vector<psa::v1::KvBlock> SequenceBlocks(const psa::v1::KvLayout& l, uint32_t layers,
                                             uint32_t blocks, uint64_t seed);

}  // namespace psa::testing

#endif  // PSA_TESTS_INTEGRATION_KV_SERVICE_TESTING_H_

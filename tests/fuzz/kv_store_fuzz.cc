// libFuzzer target for the KV service's handlers at the store level: each
// input is a run of psa.v1 KV requests (kv_fuzz.proto) applied in order to
// one small BlockStore with the calls KvServiceImpl makes for them
// (kv_service_impl.cc: OpenSequence, WriteBlocks, AnswerFetch, GetMetadata,
// LeaseSequence, ReleaseSequence, GetStats), checking what they return.
// Structure aware: proto_mutator.h. Build and run: tests/CMakeLists.txt
// (PSA_BUILD_FUZZ).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kv_service/block_store.h"
#include "kv_service/kv_layout.h"
#include "tests/fuzz/kv_fuzz.pb.h"
#include "tests/fuzz/proto_mutator.h"

namespace {

#define PSA_CHECK(cond)                             \
  do {                                              \
    if (!(cond)) {                                  \
      fprintf(stderr, "check failed: %s\n", #cond); \
      std::abort();                                 \
    }                                               \
  } while (0)

absl::Time g_now = absl::FromUnixSeconds(1700000000);
absl::Time FakeNow() { return g_now; }

void CheckStats(psa::BlockStore& store, uint64_t capacity) {
  const psa::BlockStoreStats s = store.Stats();
  PSA_CHECK(s.bytes_stored <= capacity);
  PSA_CHECK(s.unique_blocks <= s.blocks || s.sequences == 0 || s.unique_blocks <= s.blocks);
  PSA_CHECK(s.capacity_bytes == capacity);
}

void Fetch(psa::BlockStore& store, const psa::v1::FetchBlocksRequest& request,
           uint64_t max_bytes) {
  std::vector<std::shared_ptr<const std::string>> blocks;
  for (const psa::v1::BlockQuery& query : request.queries()) {
    if (query.kv_head() > static_cast<uint32_t>(std::numeric_limits<int>::max())) continue;
    psa::BlockStore::ByteRange range;
    blocks.clear();
    absl::Status s = store.ReadRefs(
        query.sequence_id(), query.layer(),
        query.has_kv_head() ? static_cast<int>(query.kv_head()) : psa::BlockStore::kAllHeads,
        query.block_indices(), max_bytes, &blocks, &range);
    if (!s.ok()) continue;
    PSA_CHECK(blocks.size() == static_cast<size_t>(query.block_indices_size()));
    PSA_CHECK(blocks.size() * range.length <= max_bytes);
    volatile char sink = 0;
    for (const auto& b : blocks) {
      // What EncodeAnswer copies out: every byte of the range must exist.
      PSA_CHECK(b != nullptr);
      PSA_CHECK(range.offset <= b->size() && range.length <= b->size() - range.offset);
      if (range.length > 0) sink = sink + (*b)[range.offset] + (*b)[range.offset + range.length - 1];
    }
    std::string out;
    uint64_t block_bytes = 0;
    if (!query.has_kv_head()) {
      s = store.Read(query.sequence_id(), query.layer(), query.block_indices(), max_bytes, &out,
                     &block_bytes);
      PSA_CHECK(s.ok());
      PSA_CHECK(out.size() == block_bytes * blocks.size());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  psa::fuzz::QuietProtobuf();
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  return psa::fuzz::MutateSerialized<psa::fuzz::KvFuzzInput>(data, size, max_size, seed);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  psa::fuzz::KvFuzzInput input;
  if (!input.ParseFromArray(data, static_cast<int>(size))) return 0;
  if (input.ops_size() > 64) return 0;
  g_now = absl::FromUnixSeconds(1700000000);
  psa::BlockStore::Options options;
  options.capacity_bytes = input.capacity_bytes() == 0 ? 64 << 10 : input.capacity_bytes() % (1 << 20);
  options.now = &FakeNow;
  const uint64_t capacity = options.capacity_bytes;
  const uint64_t max_fetch =
      input.max_fetch_bytes() == 0 ? 16 << 10 : input.max_fetch_bytes() % (1 << 20);
  psa::BlockStore store(options);
  std::map<std::string, psa::v1::KvLayout> layouts;  // as opened

  for (psa::fuzz::KvFuzzOp& op : *input.mutable_ops()) {
    g_now += absl::Milliseconds(op.advance_ms());
    switch (op.op_case()) {
      case psa::fuzz::KvFuzzOp::kOpen: {
        const auto& r = op.open();
        if (!r.has_layout()) break;  // the handler refuses it
        bool created = false;
        std::vector<uint32_t> blocks;
        absl::Status s =
            r.has_prefix_from()
                ? store.OpenLinked(r.sequence_id(), r.layout(), r.prefix_from().sequence_id(),
                                   r.prefix_from().num_blocks(), &created, &blocks)
                : store.Open(r.sequence_id(), r.layout(), &created, &blocks);
        if (s.ok()) {
          PSA_CHECK(psa::ValidateKvLayout(r.layout()).ok());
          PSA_CHECK(blocks.size() == r.layout().num_layers());
          layouts[r.sequence_id()] = r.layout();
        }
        break;
      }
      case psa::fuzz::KvFuzzOp::kWrite: {
        psa::v1::WriteBlocksRequest* r = op.mutable_write();
        auto it = layouts.find(r->sequence_id());
        if (input.fit_blocks() && it != layouts.end()) {
          for (psa::v1::KvBlock& b : *r->mutable_blocks()) {
            b.mutable_data()->resize(psa::KvBlockDataBytes(it->second), 'k');
            b.mutable_metadata()->resize(psa::KvBlockMetadataBytes(it->second), 'm');
          }
        }
        std::vector<psa::BlockWrite> writes;
        for (const psa::v1::KvBlock& b : r->blocks()) {
          writes.push_back(psa::BlockWrite{b.layer(), b.index(), b.data(), b.metadata()});
        }
        absl::StatusOr<psa::WriteResult> result = store.Write(r->sequence_id(), writes);
        if (result.ok()) {
          PSA_CHECK(result->written + result->unchanged == writes.size());
          PSA_CHECK(result->shared <= result->written);
        }
        break;
      }
      case psa::fuzz::KvFuzzOp::kFetch:
        Fetch(store, op.fetch(), max_fetch);
        break;
      case psa::fuzz::KvFuzzOp::kMetadata: {
        std::vector<std::string> per_layer;
        std::vector<uint32_t> blocks;
        absl::Status s = store.ReadMetadata(op.metadata().sequence_id(), &per_layer, &blocks);
        if (s.ok()) PSA_CHECK(per_layer.size() == blocks.size());
        break;
      }
      case psa::fuzz::KvFuzzOp::kLease: {
        const auto& r = op.lease();
        absl::StatusOr<psa::LeaseResult> lease =
            store.Lease(r.sequence_id(), r.lease_id(), absl::Milliseconds(r.ttl_ms()));
        if (lease.ok()) (void)absl::ToUnixMillis(lease->expires);
        break;
      }
      case psa::fuzz::KvFuzzOp::kRelease: {
        absl::StatusOr<uint64_t> freed = store.Release(op.release().sequence_id());
        if (freed.ok()) layouts.erase(op.release().sequence_id());
        break;
      }
      case psa::fuzz::KvFuzzOp::kStats:
      default:
        break;
    }
    CheckStats(store, capacity);
  }
  return 0;
}

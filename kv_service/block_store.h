// BlockStore: the KV service's in-memory store, independent of gRPC.
//
// sequences -> layers -> blocks. Blocks are immutable once written and are
// kept by content: identical blocks (e.g. a shared prompt prefix) are held
// once and reference counted. Memory is capped at `capacity_bytes`; when a
// write needs room, least-recently-used sequences that no lease pins are
// evicted. Every method is thread-safe. A method that returns an error has
// changed nothing. Layout checks and block sizes: kv_layout.h. The LRU
// order, leases and eviction are defined in block_store_eviction.cc.
#ifndef PSA_KV_SERVICE_BLOCK_STORE_H_
#define PSA_KV_SERVICE_BLOCK_STORE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kv_service/kv_layout.h"
#include "proto/psa/v1/kv_service.pb.h"

namespace psa {

struct BlockWrite {
  uint32_t layer = 0;
  uint32_t index = 0;
  absl::string_view data;
  absl::string_view metadata;
};

struct WriteResult {
  uint64_t written = 0;    // new blocks
  uint64_t unchanged = 0;  // identical rewrites of existing blocks
  uint64_t shared = 0;     // new blocks whose content was already held
};

struct LeaseResult {
  uint64_t lease_id = 0;  // 0 once the lease ended
  absl::Time expires;
};

struct BlockStoreStats {
  uint64_t sequences = 0;
  uint64_t blocks = 0;
  uint64_t unique_blocks = 0;
  uint64_t bytes_stored = 0;
  uint64_t capacity_bytes = 0;
  uint64_t evictions = 0;
  uint64_t leases = 0;
};

class BlockStore {
 public:
  struct Options {
    uint64_t capacity_bytes = 1ull << 30;
    // Injected for tests of lease expiry.
    absl::Time (*now)() = &absl::Now;
  };
  explicit BlockStore(Options options);
  BlockStore(const BlockStore&) = delete;
  BlockStore& operator=(const BlockStore&) = delete;

  // Creates `id` with `layout`, or checks that an existing sequence has the
  // same layout. Fills `blocks_per_layer` with what is stored.
  absl::Status Open(const std::string& id, const psa::v1::KvLayout& layout,
                    bool* created, std::vector<uint32_t>* blocks_per_layer);

  // Creates `id` holding the first `num_blocks` blocks of every layer of
  // `source` (same layout), shared by reference. An existing `id` is left
  // as it is (created = false) if its layout matches.
  absl::Status OpenLinked(const std::string& id, const psa::v1::KvLayout& layout,
                          const std::string& source, uint32_t num_blocks, bool* created,
                          std::vector<uint32_t>* blocks_per_layer);

  // Appends blocks atomically: all or none. Within each layer the new
  // indices must continue the stored ones without gaps; rewriting a stored
  // block with identical bytes is allowed and ignored.
  absl::StatusOr<WriteResult> Write(const std::string& id,
                                    absl::Span<const BlockWrite> blocks);

  // Which bytes of each block a read returns.
  struct ByteRange {
    uint64_t offset = 0;
    uint64_t length = 0;
  };
  static constexpr int kAllHeads = -1;

  // References to the data of `indices` of `layer`, in order, valid for as
  // long as they are held (even if the sequence is released meanwhile).
  // With kv_head >= 0 only that head's part of each block (its K then V) is
  // wanted: *range says which bytes; otherwise all of them. Refuses
  // (RESOURCE_EXHAUSTED) a read of more than `max_bytes`.
  absl::Status ReadRefs(const std::string& id, uint32_t layer, int kv_head,
                        absl::Span<const uint32_t> indices, uint64_t max_bytes,
                        std::vector<std::shared_ptr<const std::string>>* blocks,
                        ByteRange* range);

  // Appends the data of `indices` of `layer`, in order, to `out`; refuses
  // (RESOURCE_EXHAUSTED) a read of more than `max_bytes`.
  absl::Status Read(const std::string& id, uint32_t layer,
                    absl::Span<const uint32_t> indices, uint64_t max_bytes,
                    std::string* out, uint64_t* block_bytes);

  // Each layer's concatenated block metadata.
  absl::Status ReadMetadata(const std::string& id,
                            std::vector<std::string>* per_layer,
                            std::vector<uint32_t>* blocks_per_layer);

  // New lease (lease_id 0), renewal, or end (ttl zero).
  absl::StatusOr<LeaseResult> Lease(const std::string& id, uint64_t lease_id,
                                    absl::Duration ttl);

  // Drops a sequence; returns the bytes that freed.
  absl::StatusOr<uint64_t> Release(const std::string& id);

  BlockStoreStats Stats();

 private:
  struct Block {
    std::string data;
    std::string metadata;
    size_t hash;
    uint64_t bytes() const { return data.size() + metadata.size(); }
  };
  using BlockRef = std::shared_ptr<const Block>;
  struct ContentEntry {
    BlockRef block;
    uint64_t refs = 0;
  };
  struct Sequence {
    psa::v1::KvLayout layout;
    std::vector<std::vector<BlockRef>> layers;
    absl::flat_hash_map<uint64_t, absl::Time> leases;  // lease id -> expiry
    std::list<std::string>::iterator lru;              // position in lru_
  };

  Sequence* FindLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TouchLocked(Sequence* seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool LeasedLocked(Sequence* seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The held block with this content, or null.
  const ContentEntry* FindContentLocked(size_t hash, absl::string_view data,
                                        absl::string_view metadata) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The content entry that owns `block` (which must be stored).
  ContentEntry* EntryLocked(const BlockRef& block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evicts LRU unleased sequences other than `keep` until `needed` more
  // bytes fit; evicts nothing and fails if that is impossible.
  absl::Status MakeRoomLocked(uint64_t needed, const Sequence* keep)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t RemoveLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnrefLocked(const BlockRef& block, uint64_t* freed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Sequence>> sequences_
      ABSL_GUARDED_BY(mu_);
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);  // front: most recent
  absl::flat_hash_map<size_t, std::vector<ContentEntry>> content_
      ABSL_GUARDED_BY(mu_);
  uint64_t bytes_stored_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t unique_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_lease_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace psa

#endif  // PSA_KV_SERVICE_BLOCK_STORE_H_

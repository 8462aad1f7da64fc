// PrefixStore: the worker's side of the KV service. After a prompt is
// prefilled, its full KV blocks are published to the KV service (behind the
// computation, by a background writer); before a prompt is prefilled, the
// longest prefix any worker already published is fetched instead of
// recomputed. The KV service is a cache: any failure here means "prefill it
// yourself", never a wrong token.
//
// Identity: block i of a prompt is named by a chained SHA-256 over the model
// id, the block size and every token up to the end of block i, so equal
// names mean equal token prefixes on equal weights. A prompt of n full blocks
// is stored under "P/h(n)" (P: the hash of its first `checkpoint_blocks`
// blocks, or of all n if fewer, so related prefixes share a shard), and
// linked, without copying, under "P/h(k)" for every multiple k of
// checkpoint_blocks below n; a later prompt sharing only a multiple of
// checkpoint_blocks with it still finds its prefix. Blocks that hold
// positions a sparse policy's decode steps made are named with that policy
// mixed into the chain (CacheContents): only a resume of the same
// generation under the same policy finds them.
#ifndef PSA_COMPUTE_WORKER_SERVER_PREFIX_STORE_H_
#define PSA_COMPUTE_WORKER_SERVER_PREFIX_STORE_H_

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/metrics.h"
#include "compute_worker/model/tokenizer.h"
#include "compute_worker/kv/kv_cache.h"
#include "compute_worker/server/cache_contents.h"
#include "kv_service/kv_client.h"

namespace psa {

class PrefixStore {
 public:
  struct Options {
    int checkpoint_blocks = 32;  // links every 512 tokens at block size 16
    int max_queued_writes = 8;   // prompts waiting to be published; more are dropped
    absl::Duration fetch_timeout = absl::Seconds(30);
    int loader_threads = 2;      // prompts looked up and fetched at once
    // Worker settings besides the policy that change what decode steps
    // compute (the retrieval heads it marks, e.g. "retrieval:L7.2,L17.1"):
    // joins the policy in the names of decoded blocks, so workers that
    // differ in them never adopt each other's. Empty: the policy alone.
    std::string decode_settings;
  };
  // `client` and `registry` must outlive the store. `layout` describes the
  // worker's KV (model id = weights' sha256).
  PrefixStore(KvClient* client, psa::v1::KvLayout layout, Options options,
              metrics::Registry* registry);
  ~PrefixStore();  // publishes what is queued, then stops

  // Fills the empty `kv` with the longest published prefix of `prompt`
  // (whole blocks, leaving at least one token to prefill) and returns its
  // length in tokens; 0 (and `kv` empty) when none is found or anything
  // fails. A pool-backed cache takes only the metadata (its pages are read
  // on demand); a private one fetches every block.
  int Load(const CacheContents& prompt, KvCache* kv);

  // Load() on one of the store's loader threads; `done` gets the cache and
  // the tokens loaded.
  using LoadDone = std::function<void(std::unique_ptr<KvCache> kv, int tokens)>;
  // `prompt` as in CacheContents.
  void LoadAsync(std::vector<TokenId> prompt, int decode_from, std::string decoded_by,
                 std::string salt, std::unique_ptr<KvCache> kv, LoadDone done);

  // Queues the full prompt blocks of `kv` that the KV service does not
  // hold yet for publishing (linking those it holds). Copies now, writes
  // later, then tells kv.durability().
  void Publish(const CacheContents& prompt, const KvCache& kv);

  // During a long prefill: once the cache holds checkpoint_blocks full
  // blocks more than the KV service does, stores them (linking what is
  // stored), so a pool-backed cache can evict them before the prompt ends.
  void PublishPrefix(const CacheContents& prompt, const KvCache& kv);

  // During decode: when the cache's full blocks reach a multiple of
  // checkpoint_blocks, publishes the sequence so far (the prompt, then the
  // generated tokens the cache holds) under its own name, linking what is
  // already stored and writing only the blocks after it. A generation
  // resumed elsewhere from its prompt plus the tokens so far then loads all
  // but the last few hundred tokens instead of recomputing them, and a
  // pool-backed cache may evict the stored pages.
  // `sequence`: every token the cache holds or will (prompt, then generated).
  void PublishCheckpoint(const CacheContents& sequence, const KvCache& kv);

  // Waits until every queued prompt is written (tests, shutdown).
  void Flush();

  // Chained block names of the first n_blocks blocks of `c.tokens` (hex);
  // from the first block holding a position >= c.decode_from on, with
  // c.decoded_by mixed in (when not empty); c.salt, when not empty, seeds
  // the chain, so no name is shared across salts.
  static std::vector<std::string> BlockHashes(const std::string& model_id, int block_size,
                                              const CacheContents& c, int n_blocks);
  // `c` with `decode_settings` (Options::decode_settings) joined to its
  // decoded_by, if it has one: what BlockHashes names.
  static CacheContents WithSettings(const CacheContents& c, const std::string& decode_settings);

 private:
  // BlockHashes of `c`'s first n_blocks for this worker: its model, block
  // size and decode settings.
  std::vector<std::string> NamesOf(const CacheContents& c, int n_blocks) const;
  struct PendingWrite {
    std::vector<std::string> hashes;       // per block
    int n_blocks = 0;
    int link_blocks = 0;                   // [0, link_blocks): linked from link_source
    std::string link_source;
    std::shared_ptr<KvDurability> durability;  // told once written
    std::vector<psa::v1::KvBlock> blocks;  // [link_blocks, n_blocks) of all layers
  };
  // Publishes the prompt's full blocks in `kv` if at least min_new_blocks
  // of them are not stored yet.
  void PublishPromptBlocks(const CacheContents& prompt, const KvCache& kv, int min_new_blocks);
  // Queues the write of blocks [0, n) named by `hashes`.
  void Plan(std::vector<std::string> hashes, int n, const KvCache& kv);
  // Copies blocks [first, last) of every layer.
  void Export(const KvCache& kv, int first, int last, std::vector<psa::v1::KvBlock>* out) const;
  void Enqueue(PendingWrite w);
  std::string SequenceId(const std::vector<std::string>& hashes, int n_blocks) const;
  void WriteLoop();
  void Write(PendingWrite& w);

  KvClient* const client_;
  const psa::v1::KvLayout layout_;
  const Options options_;

  metrics::Counter& query_tokens_;
  metrics::Counter& hit_tokens_;
  metrics::Counter& fetch_bytes_;
  metrics::Histogram& load_seconds_;
  metrics::Counter& write_bytes_;
  metrics::Family<metrics::Counter>& errors_;
  // Publishes not made by design (queue full, pages evicted): not errors.
  metrics::Family<metrics::Counter>& publishes_dropped_;

  struct PendingLoad {
    std::vector<TokenId> prompt;
    int decode_from = 0;
    std::string decoded_by;
    std::string salt;
    std::unique_ptr<KvCache> kv;
    LoadDone done;
  };
  void LoadLoop();

  absl::Mutex mu_;
  std::deque<PendingLoad> loads_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> loaders_;
  std::deque<PendingWrite> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread writer_;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_SERVER_PREFIX_STORE_H_

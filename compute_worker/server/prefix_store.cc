#include "compute_worker/server/prefix_store.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace psa {
namespace {

constexpr int kFetchChunkBlocks = 64;  // blocks per fetch query
constexpr absl::Duration kLeaseTtl = absl::Seconds(60);

std::string Sha256(absl::string_view a, absl::string_view b) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx, a.data(), a.size());
  EVP_DigestUpdate(ctx, b.data(), b.size());
  EVP_DigestFinal_ex(ctx, digest, &len);
  EVP_MD_CTX_free(ctx);
  return std::string(reinterpret_cast<char*>(digest), len);
}

}  // namespace

PrefixStore::PrefixStore(KvClient* client, psa::v1::KvLayout layout, Options options,
                         metrics::Registry* r)
    : client_(client),
      layout_(std::move(layout)),
      options_(options),
      query_tokens_(r->AddCounter("psa_worker_prefix_cache_queries_total",
                                  "Prompt tokens looked up in the KV service prefix cache")
                        .Add()),
      hit_tokens_(r->AddCounter("psa_worker_prefix_cache_hits_total",
                                "Prompt tokens loaded from the KV service instead of computed")
                      .Add()),
      fetch_bytes_(r->AddCounter("psa_worker_kv_fetch_bytes_total",
                                 "KV block bytes fetched from the KV service").Add()),
      load_seconds_(r->AddHistogram("psa_worker_prefix_load_seconds",
                                    "Time to look up and fetch a prompt prefix",
                                    metrics::LatencyBuckets())
                        .Add()),
      write_bytes_(r->AddCounter("psa_worker_kv_write_bytes_total",
                                 "KV block bytes published to the KV service").Add()),
      errors_(r->AddCounter("psa_worker_kv_errors_total",
                            "KV service operations that failed (the worker computed instead)")),
      publishes_dropped_(r->AddCounter(
          "psa_worker_kv_publishes_dropped_total",
          "Background publishes left out by design, not errors: reason=queue_full (more "
          "prompts to publish than the queue holds, under load) or pages_evicted (the cache's "
          "pages were already evicted to the KV service under another name)")) {
  publishes_dropped_.Add({{"reason", "queue_full"}});
  publishes_dropped_.Add({{"reason", "pages_evicted"}});
  writer_ = std::thread([this] { WriteLoop(); });
  for (int i = 0; i < options_.loader_threads; ++i) {
    loaders_.emplace_back([this] { LoadLoop(); });
  }
}

PrefixStore::~PrefixStore() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (auto& t : loaders_) t.join();
  writer_.join();
}

void PrefixStore::LoadAsync(std::vector<TokenId> prompt, int decode_from, std::string decoded_by,
                            std::string salt, std::unique_ptr<KvCache> kv, LoadDone done) {
  absl::MutexLock lock(&mu_);
  loads_.push_back(PendingLoad{std::move(prompt), decode_from, std::move(decoded_by),
                               std::move(salt), std::move(kv), std::move(done)});
}

void PrefixStore::LoadLoop() {
  while (true) {
    PendingLoad load;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this] {
        mu_.AssertHeld();
        return stop_ || !loads_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (loads_.empty()) return;
      load = std::move(loads_.front());
      loads_.pop_front();
    }
    const int tokens =
        Load(CacheContents{load.prompt, load.decode_from, load.decoded_by, load.salt},
             load.kv.get());
    load.done(std::move(load.kv), tokens);
  }
}

CacheContents PrefixStore::WithSettings(const CacheContents& c,
                                        const std::string& decode_settings) {
  if (c.decoded_by.empty() || decode_settings.empty()) return c;
  CacheContents named = c;
  named.decoded_by = absl::StrCat(c.decoded_by, "+", decode_settings);
  return named;
}

std::vector<std::string> PrefixStore::NamesOf(const CacheContents& c, int n_blocks) const {
  return BlockHashes(layout_.model_id(), layout_.block_size(),
                     WithSettings(c, options_.decode_settings), n_blocks);
}

std::vector<std::string> PrefixStore::BlockHashes(const std::string& model_id, int block_size,
                                                  const CacheContents& c, int n_blocks) {
  std::vector<std::string> out;
  const absl::Span<const TokenId> tokens = c.tokens;
  // v2 (2026-12-07): block metadata records gained the mean key, and PSA's
  // stop changed with it; workers of either side never share a sequence.
  std::string h = Sha256(absl::StrCat("psa-prefix-v2/", model_id, "/", block_size), "");
  // A salted chain starts elsewhere: unsalted names stay as they were.
  if (!c.salt.empty()) h = Sha256(h, absl::StrCat("salt/", c.salt));
  for (int b = 0; b < n_blocks; ++b) {
    if (!c.decoded_by.empty() && (b + 1) * block_size > c.decode_from &&
        b * block_size <= c.decode_from) {
      // The first block a decode step wrote into: the policy joins the chain.
      h = Sha256(h, absl::StrCat("decoded-from/", c.decode_from, "/", c.decoded_by));
    }
    std::string bytes(static_cast<size_t>(block_size) * 4, '\0');
    for (int t = 0; t < block_size; ++t) {
      const uint32_t id = tokens[static_cast<size_t>(b) * block_size + t];
      for (int k = 0; k < 4; ++k) bytes[t * 4 + k] = static_cast<char>(id >> (8 * k));
    }
    h = Sha256(h, bytes);
    out.push_back(absl::BytesToHexString(absl::string_view(h).substr(0, 16)));
  }
  return out;
}

std::string PrefixStore::SequenceId(const std::vector<std::string>& hashes, int n_blocks) const {
  const int placement = std::min(n_blocks, options_.checkpoint_blocks);
  return absl::StrCat(hashes[placement - 1], "/", hashes[n_blocks - 1]);
}

int PrefixStore::Load(const CacheContents& contents, KvCache* kv) {
  const absl::Span<const TokenId> prompt = contents.tokens;
  const absl::Time start = absl::Now();
  query_tokens_.Increment(prompt.size());
  const int B = layout_.block_size();
  const int usable = prompt.empty() ? 0 : static_cast<int>((prompt.size() - 1) / B);
  if (usable == 0) return 0;
  const std::vector<std::string> hashes = NamesOf(contents, usable);
  std::vector<int> candidates = {usable};
  for (int k = (usable - 1) / options_.checkpoint_blocks; k >= 1; --k) {
    candidates.push_back(k * options_.checkpoint_blocks);
  }
  for (int n : candidates) {
    const std::string id = SequenceId(hashes, n);
    absl::StatusOr<psa::v1::LeaseSequenceResponse> lease = client_->Lease(id, 0, kLeaseTtl);
    if (lease.status().code() == absl::StatusCode::kNotFound) continue;
    if (!lease.ok()) {
      errors_.Add({{"op", "lookup"}}).Increment();
      return 0;
    }
    bool loaded = false;
    if (kv->paged()) {
      // Pool-backed: take the metadata only; attention fetches the pages
      // it reads, when it reads them.
      absl::StatusOr<std::vector<psa::v1::LayerMetadata>> meta = client_->ReadMetadata(id);
      if (meta.ok()) {
        std::vector<std::string> layers(layout_.num_layers());
        for (psa::v1::LayerMetadata& m : *meta) {
          if (m.layer() < layers.size()) layers[m.layer()] = std::move(*m.mutable_metadata());
        }
        absl::Status adopted = kv->AdoptStored(id, n, layers);
        loaded = adopted.ok();
      }
      (void)client_->Lease(id, lease->lease_id(), absl::ZeroDuration());
      if (!loaded) {
        errors_.Add({{"op", "fetch"}}).Increment();
        return 0;
      }
      hit_tokens_.Increment(n * B);
      load_seconds_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
      return n * B;
    }
    // Private memory: fetch every layer's blocks [0, n) straight into the
    // cache's pages.
    kv->Reserve(n * B);
    absl::Mutex mu;
    absl::Status failure;
    int pending = 0;
    uint64_t bytes = 0;
    const absl::Time deadline = absl::Now() + options_.fetch_timeout;
    for (uint32_t layer = 0; layer < layout_.num_layers(); ++layer) {
      for (int first = 0; first < n; first += kFetchChunkBlocks) {
        std::vector<uint32_t> indices;
        for (int b = first; b < std::min(n, first + kFetchChunkBlocks); ++b) indices.push_back(b);
        {
          absl::MutexLock lock(&mu);
          ++pending;
        }
        absl::Status s = client_->FetchAsync(
            id, layer, indices, deadline,
            [&, layer, first](absl::Status status, FetchedBlocks got) {
              if (status.ok() && got.block_bytes() != kv->block_elements() * 2) {
                status = absl::InternalError("fetched blocks have the wrong size");
              }
              if (status.ok()) {
                const size_t page = kv->page_bytes();
                for (size_t k = 0; k < got.size(); ++k) {
                  for (int h = 0; h < kv->n_head_kv(); ++h) {
                    got.CopyBytes(k * got.block_bytes() + h * page, page,
                                  reinterpret_cast<char*>(kv->MutablePage(layer, h, first + k)));
                  }
                }
              }
              absl::MutexLock lock(&mu);
              if (!status.ok() && failure.ok()) failure = status;
              bytes += got.size() * got.block_bytes();
              --pending;
            });
        if (!s.ok()) {
          absl::MutexLock lock(&mu);
          --pending;
          if (failure.ok()) failure = s;
        }
      }
    }
    {
      absl::MutexLock lock(&mu);
      auto done = [&] {
        mu.AssertHeld();
        return pending == 0;
      };
      mu.Await(absl::Condition(&done));
    }
    (void)client_->Lease(id, lease->lease_id(), absl::ZeroDuration());
    fetch_bytes_.Increment(bytes);
    if (!failure.ok()) {
      errors_.Add({{"op", "fetch"}}).Increment();
      return 0;  // kv stays empty (length 0): the caller prefills everything
    }
    kv->Commit(n * B);  // recomputes the block metadata from the keys
    kv->durability()->Update(id, n);
    kv->ApplyDurability();
    hit_tokens_.Increment(n * B);
    load_seconds_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
    return n * B;
  }
  load_seconds_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
  return 0;
}

void PrefixStore::Publish(const CacheContents& prompt, const KvCache& kv) {
  PublishPromptBlocks(prompt, kv, 1);
}

void PrefixStore::PublishPrefix(const CacheContents& prompt, const KvCache& kv) {
  PublishPromptBlocks(prompt, kv, options_.checkpoint_blocks);
}

void PrefixStore::PublishPromptBlocks(const CacheContents& prompt, const KvCache& kv,
                                      int min_new_blocks) {
  const int B = layout_.block_size();
  const int n = std::min<int>(prompt.tokens.size() / B, kv.full_blocks());
  if (n - kv.durable_blocks() < min_new_blocks) return;
  Plan(NamesOf(prompt, n), n, kv);
}

void PrefixStore::PublishCheckpoint(const CacheContents& sequence, const KvCache& kv) {
  const int B = layout_.block_size();
  const int C = options_.checkpoint_blocks;
  const int n = kv.full_blocks();
  if (n == 0 || n % C != 0 || n <= kv.durable_blocks()) return;  // most steps: nothing to do
  if (sequence.tokens.size() < static_cast<size_t>(n) * B) return;  // not the cache's tokens
  Plan(NamesOf(sequence, n), n, kv);
}

void PrefixStore::Plan(std::vector<std::string> hashes, int n, const KvCache& kv) {
  PendingWrite w;
  w.n_blocks = n;
  w.hashes = std::move(hashes);
  w.durability = kv.durability();
  // Link what the KV service already holds for this cache, write the rest.
  // A link must stay on one shard: same placement key.
  const std::string id = SequenceId(w.hashes, n);
  if (kv.durable_blocks() > 0 &&
      KvClient::PlacementKey(kv.durable_id()) == KvClient::PlacementKey(id)) {
    w.link_blocks = kv.durable_blocks();
    w.link_source = kv.durable_id();
  }
  for (uint32_t layer = 0; layer < layout_.num_layers(); ++layer) {
    for (int h = 0; h < static_cast<int>(layout_.num_kv_heads()); ++h) {
      for (int b = w.link_blocks; b < n; ++b) {
        if (kv.Page(layer, h, b) == nullptr) {
          // Evicted (stored elsewhere, not linkable from here): keep what
          // is stored; the cache stays as durable as it was.
          publishes_dropped_.Add({{"reason", "pages_evicted"}}).Increment();
          return;
        }
      }
    }
  }
  Export(kv, w.link_blocks, n, &w.blocks);
  Enqueue(std::move(w));
}

void PrefixStore::Export(const KvCache& kv, int first, int last,
                         std::vector<psa::v1::KvBlock>* out) const {
  const int d = layout_.head_dim(), heads = layout_.num_kv_heads();
  for (uint32_t layer = 0; layer < layout_.num_layers(); ++layer) {
    for (int b = first; b < last; ++b) {
      psa::v1::KvBlock block;
      block.set_layer(layer);
      block.set_index(b);
      // The cache's pages, heads in order, are the KV service's block.
      std::string* data = block.mutable_data();
      data->reserve(kv.block_elements() * 2);
      for (int h = 0; h < heads; ++h) {
        data->append(reinterpret_cast<const char*>(kv.Page(layer, h, b)), kv.page_bytes());
      }
      std::string* meta = block.mutable_metadata();
      for (int h = 0; h < heads; ++h) {
        meta->append(reinterpret_cast<const char*>(kv.KeyMax(layer, h, b)), d * 2);
        meta->append(reinterpret_cast<const char*>(kv.KeyMin(layer, h, b)), d * 2);
        meta->append(reinterpret_cast<const char*>(kv.KeyMean(layer, h, b)), d * 2);
      }
      out->push_back(std::move(block));
    }
  }
}

void PrefixStore::Enqueue(PendingWrite w) {
  absl::MutexLock lock(&mu_);
  if (static_cast<int>(queue_.size()) >= options_.max_queued_writes) {
    publishes_dropped_.Add({{"reason", "queue_full"}}).Increment();
    return;
  }
  queue_.push_back(std::move(w));
}

void PrefixStore::Flush() {
  absl::MutexLock lock(&mu_);
  auto idle = [this] {
    mu_.AssertHeld();
    return queue_.empty() && !writing_;
  };
  mu_.Await(absl::Condition(&idle));
}

void PrefixStore::WriteLoop() {
  while (true) {
    PendingWrite w;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this] {
        mu_.AssertHeld();
        return stop_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stop_ with nothing left
      w = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
    }
    Write(w);
    absl::MutexLock lock(&mu_);
    writing_ = false;
  }
}

void PrefixStore::Write(PendingWrite& w) {
  const std::string id = SequenceId(w.hashes, w.n_blocks);
  absl::StatusOr<psa::v1::OpenSequenceResponse> opened =
      w.link_blocks > 0 ? client_->OpenLinked(id, layout_, w.link_source, w.link_blocks)
                        : client_->Open(id, layout_);
  if (!opened.ok()) {
    errors_.Add({{"op", "publish"}}).Increment();
    return;
  }
  bool complete = opened->blocks_per_layer_size() > 0;
  for (uint32_t n : opened->blocks_per_layer()) complete = complete && n >= uint32_t(w.n_blocks);
  if (!complete) {  // identical rewrites are no-ops, so a partial one just resumes
    absl::StatusOr<psa::v1::WriteBlocksResponse> written = client_->Write(id, w.blocks);
    if (!written.ok()) {
      errors_.Add({{"op", "publish"}}).Increment();
      return;
    }
    uint64_t bytes = 0;
    for (const auto& b : w.blocks) bytes += b.data().size() + b.metadata().size();
    write_bytes_.Increment(bytes);
  }
  for (int k = options_.checkpoint_blocks; k < w.n_blocks; k += options_.checkpoint_blocks) {
    if (!client_->OpenLinked(SequenceId(w.hashes, k), layout_, id, k).ok()) {
      errors_.Add({{"op", "link"}}).Increment();
    }
  }
  w.durability->Update(id, w.n_blocks);  // the cache may evict these pages now
}

}  // namespace psa

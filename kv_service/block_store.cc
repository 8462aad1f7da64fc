// BlockStore: opening, writing and reading sequences (see block_store.h).
// The LRU order, leases, reference counts and eviction are in
// block_store_eviction.cc; layout checks in kv_layout.cc.
#include "kv_service/block_store.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"

namespace psa {
namespace {

// A generous bound that catches garbage without limiting real ids.
constexpr size_t kMaxSequenceIdBytes = 256;

absl::Status CheckId(const std::string& id) {
  if (id.empty()) return absl::InvalidArgumentError("sequence_id is empty");
  if (id.size() > kMaxSequenceIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence_id is ", id.size(), " bytes; the limit is ", kMaxSequenceIdBytes));
  }
  return absl::OkStatus();
}

std::string LayoutString(const psa::v1::KvLayout& l) {
  return absl::StrCat("model_id=\"", l.model_id(), "\" layers=", l.num_layers(),
                      " kv_heads=", l.num_kv_heads(), " head_dim=", l.head_dim(),
                      " block_size=", l.block_size(),
                      " dtype=", psa::v1::KvDtype_Name(l.dtype()));
}

bool SameLayout(const psa::v1::KvLayout& a, const psa::v1::KvLayout& b) {
  return a.model_id() == b.model_id() && a.num_layers() == b.num_layers() &&
         a.num_kv_heads() == b.num_kv_heads() && a.head_dim() == b.head_dim() &&
         a.block_size() == b.block_size() && a.dtype() == b.dtype();
}

size_t ContentHash(absl::string_view data, absl::string_view metadata) {
  return absl::Hash<std::pair<absl::string_view, absl::string_view>>()(
      std::make_pair(data, metadata));
}

}  // namespace

BlockStore::BlockStore(Options options) : options_(options) {}

BlockStore::Sequence* BlockStore::FindLocked(const std::string& id) {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : it->second.get();
}

absl::Status BlockStore::Open(const std::string& id, const psa::v1::KvLayout& layout,
                              bool* created, std::vector<uint32_t>* blocks_per_layer) {
  if (absl::Status s = CheckId(id); !s.ok()) return s;
  if (absl::Status s = ValidateKvLayout(layout); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindLocked(id);
  *created = seq == nullptr;
  if (seq == nullptr) {
    auto fresh = std::make_unique<Sequence>();
    fresh->layout = layout;
    fresh->layers.resize(layout.num_layers());
    lru_.push_front(id);
    fresh->lru = lru_.begin();
    seq = fresh.get();
    sequences_.emplace(id, std::move(fresh));
  } else if (!SameLayout(seq->layout, layout)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence \"", id, "\" exists with layout {", LayoutString(seq->layout),
        "}; the request has {", LayoutString(layout),
        "}. Use a new sequence_id or release this one first"));
  }
  TouchLocked(seq);
  blocks_per_layer->clear();
  for (const auto& layer : seq->layers) blocks_per_layer->push_back(layer.size());
  return absl::OkStatus();
}

absl::Status BlockStore::OpenLinked(const std::string& id, const psa::v1::KvLayout& layout,
                                    const std::string& source, uint32_t num_blocks,
                                    bool* created, std::vector<uint32_t>* blocks_per_layer) {
  if (absl::Status s = CheckId(id); !s.ok()) return s;
  if (absl::Status s = ValidateKvLayout(layout); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (Sequence* existing = FindLocked(id); existing != nullptr) {
    if (!SameLayout(existing->layout, layout)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence \"", id, "\" exists with layout {", LayoutString(existing->layout),
          "}; the request has {", LayoutString(layout), "}"));
    }
    *created = false;
    blocks_per_layer->clear();
    for (const auto& layer : existing->layers) blocks_per_layer->push_back(layer.size());
    TouchLocked(existing);
    return absl::OkStatus();
  }
  Sequence* src = FindLocked(source);
  if (src == nullptr) {
    return absl::NotFoundError(absl::StrCat("prefix_from sequence \"", source,
                                            "\" is not stored (never written, released or evicted)"));
  }
  if (!SameLayout(src->layout, layout)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "prefix_from sequence \"", source, "\" has layout {", LayoutString(src->layout),
        "}; the request has {", LayoutString(layout), "}"));
  }
  for (size_t l = 0; l < src->layers.size(); ++l) {
    if (src->layers[l].size() < num_blocks) {
      return absl::OutOfRangeError(absl::StrCat(
          "prefix_from asks for ", num_blocks, " blocks but layer ", l, " of \"", source,
          "\" holds ", src->layers[l].size()));
    }
  }
  auto fresh = std::make_unique<Sequence>();
  fresh->layout = layout;
  fresh->layers.resize(layout.num_layers());
  for (size_t l = 0; l < src->layers.size(); ++l) {
    fresh->layers[l].assign(src->layers[l].begin(), src->layers[l].begin() + num_blocks);
    for (const BlockRef& b : fresh->layers[l]) {
      ++EntryLocked(b)->refs;
      ++blocks_;
    }
  }
  lru_.push_front(id);
  fresh->lru = lru_.begin();
  blocks_per_layer->assign(layout.num_layers(), num_blocks);
  sequences_.emplace(id, std::move(fresh));
  TouchLocked(src);
  *created = true;
  return absl::OkStatus();
}

const BlockStore::ContentEntry* BlockStore::FindContentLocked(
    size_t hash, absl::string_view data, absl::string_view metadata) const {
  auto it = content_.find(hash);
  if (it == content_.end()) return nullptr;
  for (const ContentEntry& e : it->second) {
    if (e.block->data == data && e.block->metadata == metadata) return &e;
  }
  return nullptr;
}

absl::StatusOr<WriteResult> BlockStore::Write(const std::string& id,
                                              absl::Span<const BlockWrite> blocks) {
  if (absl::Status s = CheckId(id); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindLocked(id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "sequence \"", id, "\" is not open (never opened, released or evicted); "
        "call OpenSequence first"));
  }
  const psa::v1::KvLayout& layout = seq->layout;
  const uint64_t data_bytes = KvBlockDataBytes(layout);
  const uint64_t meta_bytes = KvBlockMetadataBytes(layout);

  // Validate everything before changing anything.
  WriteResult result;
  std::vector<std::vector<std::pair<uint32_t, size_t>>> fresh(seq->layers.size());
  std::vector<size_t> hashes(blocks.size());
  uint64_t new_unique_bytes = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const BlockWrite& b = blocks[i];
    const std::string where = absl::StrCat("block (layer ", b.layer, ", index ", b.index, ")");
    if (b.layer >= layout.num_layers()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": layer must be below num_layers=", layout.num_layers()));
    }
    if (b.data.size() != data_bytes || b.metadata.size() != meta_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": data is ", b.data.size(), " bytes and metadata ", b.metadata.size(),
          "; the sequence layout {", LayoutString(layout), "} needs ", data_bytes, " and ",
          meta_bytes));
    }
    const auto& stored = seq->layers[b.layer];
    if (b.index < stored.size()) {
      if (stored[b.index]->data != b.data || stored[b.index]->metadata != b.metadata) {
        return absl::FailedPreconditionError(absl::StrCat(
            where, " is already stored with different content; blocks are immutable "
            "(release the sequence to rewrite it)"));
      }
      ++result.unchanged;
      continue;
    }
    hashes[i] = ContentHash(b.data, b.metadata);
    fresh[b.layer].emplace_back(b.index, i);
  }
  for (size_t layer = 0; layer < fresh.size(); ++layer) {
    auto& list = fresh[layer];
    std::sort(list.begin(), list.end());
    const size_t base = seq->layers[layer].size();
    for (size_t k = 0; k < list.size(); ++k) {
      if (list[k].first != base + k) {
        const bool dup = k > 0 && list[k].first == list[k - 1].first;
        return absl::FailedPreconditionError(absl::StrCat(
            "layer ", layer, " holds ", base, " blocks; ",
            dup ? absl::StrCat("block ", list[k].first, " appears twice in one message")
                : absl::StrCat("the next block must be index ", base + k, ", got ",
                               list[k].first, " (no gaps allowed)")));
      }
    }
  }
  // Bytes that new content needs (identical blocks in one message counted once
  // is a refinement not worth the bookkeeping: overestimating is safe).
  for (size_t layer = 0; layer < fresh.size(); ++layer) {
    for (const auto& [index, i] : fresh[layer]) {
      if (FindContentLocked(hashes[i], blocks[i].data, blocks[i].metadata) == nullptr) {
        new_unique_bytes += data_bytes + meta_bytes;
      }
    }
  }
  if (absl::Status s = MakeRoomLocked(new_unique_bytes, seq); !s.ok()) return s;

  for (size_t layer = 0; layer < fresh.size(); ++layer) {
    for (const auto& [index, i] : fresh[layer]) {
      const BlockWrite& b = blocks[i];
      auto& bucket = content_[hashes[i]];
      ContentEntry* entry = nullptr;
      for (ContentEntry& e : bucket) {
        if (e.block->data == b.data && e.block->metadata == b.metadata) entry = &e;
      }
      if (entry == nullptr) {
        auto block = std::make_shared<Block>();
        block->data.assign(b.data.data(), b.data.size());
        block->metadata.assign(b.metadata.data(), b.metadata.size());
        block->hash = hashes[i];
        bucket.push_back(ContentEntry{std::move(block), 0});
        entry = &bucket.back();
        bytes_stored_ += entry->block->bytes();
        ++unique_blocks_;
      } else {
        ++result.shared;
      }
      ++entry->refs;
      seq->layers[layer].push_back(entry->block);
      ++blocks_;
      ++result.written;
    }
  }
  TouchLocked(seq);
  return result;
}

absl::Status BlockStore::ReadRefs(const std::string& id, uint32_t layer, int kv_head,
                                  absl::Span<const uint32_t> indices, uint64_t max_bytes,
                                  std::vector<std::shared_ptr<const std::string>>* blocks,
                                  ByteRange* range) {
  blocks->clear();
  blocks->reserve(indices.size());
  absl::MutexLock lock(&mu_);
  Sequence* seq = FindLocked(id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "sequence \"", id, "\" is not stored (never written, released or evicted)"));
  }
  if (layer >= seq->layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, " is out of range; the sequence has ", seq->layers.size()));
  }
  const uint64_t block_bytes = KvBlockDataBytes(seq->layout);
  *range = ByteRange{0, block_bytes};
  if (kv_head != kAllHeads) {
    if (kv_head < 0 || kv_head >= static_cast<int>(seq->layout.num_kv_heads())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv_head ", kv_head, " is out of range; the layout has ",
          seq->layout.num_kv_heads(), " KV heads"));
    }
    // Blocks are laid out head by head: [head][K B x d][V B x d].
    const uint64_t page = block_bytes / seq->layout.num_kv_heads();
    *range = ByteRange{page * kv_head, page};
  }
  const uint64_t bytes = range->length;
  if (indices.size() * bytes > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        indices.size(), " blocks of ", bytes, " bytes exceed the ", max_bytes,
        "-byte message limit; ask for at most ", max_bytes / bytes, " per request"));
  }
  const auto& stored = seq->layers[layer];
  for (uint32_t index : indices) {
    if (index >= stored.size()) {
      blocks->clear();
      return absl::OutOfRangeError(absl::StrCat(
          "block ", index, " of layer ", layer, " is not stored; the layer holds ",
          stored.size(), " blocks"));
    }
    // Aliasing pointer: owns the block, points at its data.
    blocks->emplace_back(stored[index], &stored[index]->data);
  }
  TouchLocked(seq);
  return absl::OkStatus();
}

absl::Status BlockStore::Read(const std::string& id, uint32_t layer,
                              absl::Span<const uint32_t> indices, uint64_t max_bytes,
                              std::string* out, uint64_t* block_bytes) {
  std::vector<std::shared_ptr<const std::string>> blocks;
  ByteRange range;
  if (absl::Status s = ReadRefs(id, layer, kAllHeads, indices, max_bytes, &blocks, &range);
      !s.ok()) {
    return s;
  }
  *block_bytes = blocks.empty() ? 0 : blocks[0]->size();
  for (const auto& b : blocks) out->append(*b);
  return absl::OkStatus();
}

absl::Status BlockStore::ReadMetadata(const std::string& id,
                                      std::vector<std::string>* per_layer,
                                      std::vector<uint32_t>* blocks_per_layer) {
  std::vector<std::vector<BlockRef>> layers;
  {
    absl::MutexLock lock(&mu_);
    Sequence* seq = FindLocked(id);
    if (seq == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          "sequence \"", id, "\" is not stored (never written, released or evicted)"));
    }
    layers = seq->layers;
    TouchLocked(seq);
  }
  per_layer->assign(layers.size(), std::string());
  blocks_per_layer->assign(layers.size(), 0);
  for (size_t l = 0; l < layers.size(); ++l) {
    (*blocks_per_layer)[l] = layers[l].size();
    for (const BlockRef& b : layers[l]) (*per_layer)[l] += b->metadata;
  }
  return absl::OkStatus();
}

BlockStoreStats BlockStore::Stats() {
  absl::MutexLock lock(&mu_);
  BlockStoreStats s;
  s.sequences = sequences_.size();
  s.blocks = blocks_;
  s.unique_blocks = unique_blocks_;
  s.bytes_stored = bytes_stored_;
  s.capacity_bytes = options_.capacity_bytes;
  s.evictions = evictions_;
  for (auto& [id, seq] : sequences_) {
    LeasedLocked(seq.get());
    s.leases += seq->leases.size();
  }
  return s;
}

}  // namespace psa

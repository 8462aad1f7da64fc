#include "compute_worker/attention/block_layout.h"

#include <algorithm>
#include <cstdint>

namespace psa {

BlockLayout LayoutOf(const KvCache& kv, int n_keys, const AttentionPolicy& p) {
  const int B = kv.block_size();
  // Blocks with metadata: committed and entirely inside the visible range.
  const int n_meta = std::min(kv.full_blocks(), n_keys / B);
  const int sink = std::min(p.sink_blocks, n_meta);
  return BlockLayout{(n_keys + B - 1) / B, sink, std::max(sink, n_meta - p.local_blocks)};
}

int UpfrontCandidates(const AttentionPolicy& p, const BlockLayout& lay, int hint) {
  const int forced = lay.forced();
  const int n = p.kind == AttentionPolicy::Kind::kTopK
                    ? p.top_k - forced
                    : std::max({p.group_blocks, p.min_blocks - forced, hint - forced});
  return std::clamp(n, 0, lay.n_cand());
}

void BiasNonResident(const AttentionPolicy& p, const KvPageReader& reader, const BlockLayout& lay,
                     float* gscore) {
  const int n_cand = lay.n_cand();
  if (p.kind != AttentionPolicy::Kind::kPsa || p.resident_bias <= 0 || n_cand == 0) return;
  thread_local std::vector<uint8_t> resident;
  resident.resize(n_cand);
  reader.Resident(lay.sink, n_cand, resident.data());
  for (int c = 0; c < n_cand; ++c) {
    if (!resident[c]) gscore[c] -= p.resident_bias;
  }
}

}  // namespace psa

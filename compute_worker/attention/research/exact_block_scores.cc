#include "compute_worker/attention/research/exact_block_scores.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "compute_worker/kernels/fp16_kernels.h"

namespace psa {

void ExactBlockScores(const KvCache& kv, int layer, int kv_head, int first_block, int n_cand,
                      const float* const* qs, int group, int d, float scale, float* ub,
                      float* gscore) {
  const KvRows keys = kv.Keys(layer, kv_head);
  const int B = kv.block_size();
  std::vector<float> krow(d), s(B);
  for (int c = 0; c < n_cand; ++c) {
    const int t0 = (first_block + c) * B;
    gscore[c] = -INFINITY;
    for (int g = 0; g < group; ++g) {
      float m = -INFINITY;
      for (int t = 0; t < B; ++t) {
        Fp16RowToFp32(keys.row(t0 + t), krow.data(), d);
        m = std::max(m, s[t] = DotF32(qs[g], krow.data(), d) * scale);
      }
      const float lse = m + static_cast<float>(std::log(ExpShiftSum(s.data(), B, m)));
      ub[static_cast<size_t>(g) * n_cand + c] = lse;
      gscore[c] = std::max(gscore[c], lse);
    }
  }
}

}  // namespace psa

// The order in which sparse attention takes candidate blocks: descending
// score, ties to the lower index. PSA usually reads a few % of the blocks,
// so the order is produced lazily: one linear pass spreads the candidates
// over score buckets (a counting sort on the score's range, which keeps
// bucket order consistent with score order), and a bucket is sorted only
// when the order reaches it. At 128K tokens this is ~10x cheaper than
// repeated partial sorts (nth_element) of the remaining candidates.
#ifndef PSA_COMPUTE_WORKER_ATTENTION_BLOCK_RANKING_H_
#define PSA_COMPUTE_WORKER_ATTENTION_BLOCK_RANKING_H_

#include <vector>

namespace psa {

class BlockRanking {
 public:
  // Candidates [0, n) with scores score[0, n) (NaN ranks last). The
  // scores are copied.
  void Reset(const float* score, int n);
  // Makes order()[0, upto) final (upto is clamped to n); returns how many
  // leading entries are final (>= upto, a whole bucket at a time).
  int Extend(int upto);
  // Candidate indices; final up to the last Extend's return value.
  const std::vector<int>& order() const { return order_; }

 private:
  std::vector<float> key_;
  std::vector<int> order_;
  std::vector<int> bucket_end_;  // end of each bucket in order_, in rank order
  std::vector<int> bucket_of_;   // scratch
  int next_bucket_ = 0;
  int final_ = 0;
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_ATTENTION_BLOCK_RANKING_H_

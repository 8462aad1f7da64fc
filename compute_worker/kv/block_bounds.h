// Block upper bounds and mass estimates for sparse attention's selection,
// from an int8 copy of the key metadata.
//
// A full block's keys lie in the box [kmin, kmax] (KvCache's fp16
// metadata), so for a query q,  max_t q.k_t <= q.c + |q|.r  with centre
// c = (kmax + kmin) / 2 and radius r = (kmax - kmin) / 2. Scoring every
// block this way each decode step is the selection's main cost; this table
// holds the box in 8 bits, the centre rounded to the nearest step and the
// radius widened by the centre's rounding error, so the quantised box still
// contains the exact one. The query is rounded to int8 too, its rounding
// covered by a per-block slack term: the result is still an upper bound
// (the certified stop stays certified), 4x fewer bytes than fp16 max/min
// and, with AVX512-VNNI, 16 blocks x 4 dims per instruction.
//
// The block's mean key, in 8 bits too, scores its typical key: q.mean is
// what PSA's stop weighs a block's unseen mass by (StopRule).
//
// Layout: blocks in tiles of 16; a tile holds, per group of 4 dims, the 4
// centre bytes of each of its 16 blocks (64 bytes: one VNNI operand), then
// the same for the radius and for the mean, then each block's centre step,
// radius step, slack and mean step (fp32).
#ifndef PSA_COMPUTE_WORKER_KV_BLOCK_BOUNDS_H_
#define PSA_COMPUTE_WORKER_KV_BLOCK_BOUNDS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace psa {

class BlockBounds {
 public:
  static constexpr int kTile = 16;  // blocks per tile

  explicit BlockBounds(int head_dim);

  // Makes room for blocks [0, n) (keeps what is set).
  void Reserve(int n);
  // Block b's box from its fp16 key max and min, and its fp16 mean key
  // (head_dim each); b < the reserved count.
  void Set(int b, const uint16_t* kmax, const uint16_t* kmin, const uint16_t* kmean);
  // For blocks [first, last) of those set and heads g < group:
  // ub[g * stride + (b - first)] = scale * (an upper bound of q_g . k over
  // block b's keys) unless ub is null, and gscore[b - first] = the max over
  // the heads. With
  // `centre`, also centre[g * stride + (b - first)] = scale * q_g . (the
  // box's centre), and with `mean` the same for the block's mean key
  // (8-bit steps both).
  void Score(const float* const* qs, int group, float scale, int first, int last, float* ub,
             int stride, float* gscore, float* centre = nullptr, float* mean = nullptr) const;

  size_t bytes() const { return data_.size(); }

 private:
  int head_dim_;
  int quads_;        // groups of 4 dims (the last one zero-padded)
  size_t tile_bytes_;
  std::vector<uint8_t> data_;  // tiles; 64-byte aligned offsets within
};

}  // namespace psa

#endif  // PSA_COMPUTE_WORKER_KV_BLOCK_BOUNDS_H_

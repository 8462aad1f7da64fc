#include "compute_worker/kv/block_bounds.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "compute_worker/kernels/simd_warnings.h"
#include "compute_worker/model/ggml_types.h"
#include "compute_worker/model/llama_model.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa {
namespace {

constexpr int kQuadBytes = 4 * BlockBounds::kTile;  // one group of 4 dims of a tile

// A tile's per-block fp32 fields, after its centre, radius and mean bytes.
struct TileSteps {
  const float* centre;  // [kTile] value of one centre step
  const float* radius;  // [kTile] value of one radius step
  const float* slack;   // [kTile] covers the query's rounding, in q steps
  const float* mean;    // [kTile] value of one mean step
};

// A query in int8 steps: q ~ step * v. Fills v (w bytes, zero-padded) and
// |v| after it; returns the step, and sum(v) in *sum.
float QuantizeQuery(const float* q, int d, int w, int8_t* v, int32_t* sum) {
  std::memset(v, 0, 2 * w);
  int i = 0;
  float amax = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (; i + 16 <= d; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(q + i)));
  amax = _mm512_reduce_max_ps(m);
#endif
  for (; i < d; ++i) amax = std::max(amax, std::fabs(q[i]));
  const float inv = amax > 0 ? 127 / amax : 0;
  *sum = 0;
  i = 0;
#if defined(__AVX512F__)
  __m512i total = _mm512_setzero_si512();
  for (; i + 16 <= d; i += 16) {
    const __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(q + i), _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v + i), _mm512_cvtsepi32_epi8(x));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v + w + i), _mm512_cvtsepi32_epi8(_mm512_abs_epi32(x)));
    total = _mm512_add_epi32(total, x);
  }
  *sum = _mm512_reduce_add_epi32(total);
#endif
  for (; i < d; ++i) {
    const long x = std::clamp(std::lrint(q[i] * inv), -127L, 127L);
    v[i] = static_cast<int8_t>(x);
    v[w + i] = static_cast<int8_t>(std::labs(x));
    *sum += static_cast<int32_t>(x);
  }
  return amax / 127;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Integer sums of kTiles consecutive tiles for kHeads heads: lane j of
// ic[k * kMaxGqaGroup + g] is sum_i centre_ji * v_gi over tile k's block j
// (centre bytes offset by +128), of ir[...] sum_i radius_ji * |v_gi|, and
// with kMean of im[...] sum_i mean_ji * v_gi (offset as the centre's).
// q: each head's 2 * quads 4-byte groups (v, then |v|). Each load of a tile
// serves every head and each broadcast of a query every tile, so the loads
// stay below the multiply-adds.
template <int kHeads, int kTiles, bool kMean>
inline void TileSums(const uint8_t* tile, size_t tile_bytes, int quads, const int32_t* q,
                     __m512i* ic, __m512i* ir, __m512i* im) {
  __m512i c[kTiles][kHeads], r[kTiles][kHeads], m[kTiles][kMean ? kHeads : 1];
  for (int k = 0; k < kTiles; ++k) {
    for (int g = 0; g < kHeads; ++g) c[k][g] = r[k][g] = _mm512_setzero_si512();
    for (int g = 0; g < (kMean ? kHeads : 1); ++g) m[k][g] = _mm512_setzero_si512();
  }
  const size_t rad = static_cast<size_t>(quads) * kQuadBytes, mean = 2 * rad;
  for (int i = 0; i < quads; ++i) {
    __m512i cz[kTiles], rz[kTiles], mz[kTiles];
    for (int k = 0; k < kTiles; ++k) {
      cz[k] = _mm512_loadu_si512(tile + k * tile_bytes + i * kQuadBytes);
      rz[k] = _mm512_loadu_si512(tile + k * tile_bytes + rad + i * kQuadBytes);
      if constexpr (kMean) mz[k] = _mm512_loadu_si512(tile + k * tile_bytes + mean + i * kQuadBytes);
    }
    for (int g = 0; g < kHeads; ++g) {
      const int32_t* qg = q + static_cast<size_t>(2) * g * quads;
      const __m512i qc = _mm512_set1_epi32(qg[i]), qa = _mm512_set1_epi32(qg[quads + i]);
      for (int k = 0; k < kTiles; ++k) {
        c[k][g] = _mm512_dpbusd_epi32(c[k][g], cz[k], qc);
        r[k][g] = _mm512_dpbusd_epi32(r[k][g], rz[k], qa);
        if constexpr (kMean) m[k][g] = _mm512_dpbusd_epi32(m[k][g], mz[k], qc);
      }
    }
  }
  for (int k = 0; k < kTiles; ++k) {
    for (int g = 0; g < kHeads; ++g) {
      ic[k * kMaxGqaGroup + g] = c[k][g];
      ir[k * kMaxGqaGroup + g] = r[k][g];
      if constexpr (kMean) im[k * kMaxGqaGroup + g] = m[k][g];
    }
  }
}

template <int kTiles, bool kMean>
void TileSums(const uint8_t* tile, size_t tile_bytes, int quads, const int32_t* q, int group,
              __m512i* ic, __m512i* ir, __m512i* im) {
  // Four heads at a time, three with the mean: the accumulators stay in registers.
  constexpr int kStep = kMean ? 3 : 4;
  for (int g = 0; g < group; g += kStep) {
    const int32_t* qg = q + static_cast<size_t>(2) * g * quads;
    switch (std::min(kStep, group - g)) {
      case 1: TileSums<1, kTiles, kMean>(tile, tile_bytes, quads, qg, ic + g, ir + g, im + g); break;
      case 2: TileSums<2, kTiles, kMean>(tile, tile_bytes, quads, qg, ic + g, ir + g, im + g); break;
      case 3: TileSums<3, kTiles, kMean>(tile, tile_bytes, quads, qg, ic + g, ir + g, im + g); break;
      default: TileSums<4, kTiles, kMean>(tile, tile_bytes, quads, qg, ic + g, ir + g, im + g); break;
    }
  }
}

template <int kTiles>
void TileSums(bool mean, const uint8_t* tile, size_t tile_bytes, int quads, const int32_t* q,
              int group, __m512i* ic, __m512i* ir, __m512i* im) {
  if (mean) {
    TileSums<kTiles, true>(tile, tile_bytes, quads, q, group, ic, ir, im);
  } else {
    TileSums<kTiles, false>(tile, tile_bytes, quads, q, group, ic, ir, im);
  }
}

// Lanes [j0, j1) of v to dst + (j - j0) when j0 > 0 (the first tile of a
// range), else to dst + j.
inline void StoreLanes(float* dst, int j0, int j1, __m512 v) {
  const __mmask16 upto = static_cast<__mmask16>((1u << j1) - 1);
  if (j0 > 0) {
    _mm512_mask_compressstoreu_ps(dst, upto & static_cast<__mmask16>(~((1u << j0) - 1)), v);
  } else {
    _mm512_mask_storeu_ps(dst, upto, v);
  }
}
#endif

}  // namespace

BlockBounds::BlockBounds(int head_dim)
    : head_dim_(head_dim),
      quads_((head_dim + 3) / 4),
      tile_bytes_(static_cast<size_t>(3) * quads_ * kQuadBytes + 4 * kTile * sizeof(float)) {}

void BlockBounds::Reserve(int n) {
  const size_t tiles = (static_cast<size_t>(n) + kTile - 1) / kTile;
  if (tiles * tile_bytes_ > data_.size()) data_.resize(tiles * tile_bytes_, 0);
}

void BlockBounds::Set(int b, const uint16_t* kmax, const uint16_t* kmin, const uint16_t* kmean) {
  uint8_t* tile = data_.data() + static_cast<size_t>(b / kTile) * tile_bytes_;
  const int j = b % kTile;
  thread_local std::vector<float> c, r;
  thread_local std::vector<int8_t> cq;
  c.resize(head_dim_);
  r.resize(head_dim_);
  cq.resize(head_dim_);
  float cmax = 0, mmax = 0;
  for (int i = 0; i < head_dim_; ++i) {
    const float hi = Fp16ToFp32(kmax[i]), lo = Fp16ToFp32(kmin[i]);
    c[i] = 0.5f * (hi + lo);  // exact: fp16 inputs
    r[i] = 0.5f * (hi - lo);
    cmax = std::max(cmax, std::fabs(c[i]));
    mmax = std::max(mmax, std::fabs(Fp16ToFp32(kmean[i])));
  }
  // The mean to the nearest of 255 steps (an estimate: no widening).
  const float mstep = mmax / 127;
  // Centre to the nearest of 255 steps; the radius grows by the rounding
  // error so the 8-bit box contains the exact one.
  const float cstep = cmax / 127;
  float rmax = 0, csum = 0;
  for (int i = 0; i < head_dim_; ++i) {
    const long v = cstep > 0 ? std::lrint(c[i] / cstep) : 0;
    cq[i] = static_cast<int8_t>(std::clamp(v, -127L, 127L));
    r[i] += std::fabs(c[i] - cstep * cq[i]);
    rmax = std::max(rmax, r[i]);
    csum += std::fabs(static_cast<float>(cq[i]));
  }
  // Radius rounded up, in 255 steps (the step a hair wide so that 255
  // steps always reach rmax).
  const float rstep = rmax / 255 * (1 + 1e-6f);
  float rsum = 0;
  for (int i = 0; i < 4 * quads_; ++i) {
    uint8_t rv = 0;
    if (i < head_dim_ && rstep > 0) {
      rv = static_cast<uint8_t>(std::min(255.0f, std::ceil(r[i] / rstep)));
    }
    rsum += rv;
    const size_t at = static_cast<size_t>(i / 4) * kQuadBytes + 4 * j + i % 4;
    tile[at] = static_cast<uint8_t>((i < head_dim_ ? cq[i] : 0) + 128);  // offset: VNNI's unsigned side
    tile[static_cast<size_t>(quads_) * kQuadBytes + at] = rv;
    long mv = 0;
    if (i < head_dim_ && mstep > 0) mv = std::clamp(std::lrint(Fp16ToFp32(kmean[i]) / mstep), -127L, 127L);
    tile[static_cast<size_t>(2) * quads_ * kQuadBytes + at] = static_cast<uint8_t>(mv + 128);
  }
  // A query rounded to steps of s is off by <= s/2 per dim: its dot with
  // the centre and with the radius moves by <= s/2 * (the L1 norms).
  const float fields[4] = {cstep, rstep, 0.5f * (cstep * csum + rstep * rsum), mstep};
  float* steps = reinterpret_cast<float*>(tile + static_cast<size_t>(3) * quads_ * kQuadBytes);
  for (int f = 0; f < 4; ++f) std::memcpy(steps + f * kTile + j, &fields[f], sizeof(float));
}

void BlockBounds::Score(const float* const* qs, int group, float scale, int first, int last,
                        float* ub, int stride, float* gscore, float* centre, float* mean) const {
  if (first >= last) return;
  const int w = 4 * quads_;
  thread_local std::vector<int8_t> qbytes;  // [group][v (w), |v| (w)]
  qbytes.resize(static_cast<size_t>(2) * group * w);
  float qstep[kMaxGqaGroup];
  int32_t qsum[kMaxGqaGroup];
  for (int g = 0; g < group; ++g) {
    qstep[g] = QuantizeQuery(qs[g], head_dim_, w, qbytes.data() + static_cast<size_t>(2) * g * w,
                             &qsum[g]);
  }
  const int t_end = (last + kTile - 1) / kTile;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i ic[2 * kMaxGqaGroup], ir[2 * kMaxGqaGroup], im[2 * kMaxGqaGroup];  // [tile of the pair][head]
  const auto* q = reinterpret_cast<const int32_t*>(qbytes.data());
#endif
  for (int t = first / kTile; t < t_end; ++t) {
    const uint8_t* cen = data_.data() + static_cast<size_t>(t) * tile_bytes_;
    const uint8_t* rad = cen + static_cast<size_t>(quads_) * kQuadBytes;
    const uint8_t* mea = rad + static_cast<size_t>(quads_) * kQuadBytes;
    const float* f = reinterpret_cast<const float*>(mea + static_cast<size_t>(quads_) * kQuadBytes);
    const TileSteps steps{f, f + kTile, f + 2 * kTile, f + 3 * kTile};
    // Lanes [j0, j1) of the tile are in range; they go to index c0 + j.
    const int j0 = std::max(first - t * kTile, 0), j1 = std::min(last - t * kTile, kTile);
    const int c0 = t * kTile - first;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    // Tiles in pairs: sums for this one and the next, taken on the next pass.
    const int pair = (t - first / kTile) % 2;
    if (pair == 0) {
      if (t + 1 < t_end) {
        TileSums<2>(mean != nullptr, cen, tile_bytes_, quads_, q, group, ic, ir, im);
      } else {
        TileSums<1>(mean != nullptr, cen, tile_bytes_, quads_, q, group, ic, ir, im);
      }
    }
    const __m512 cstep = _mm512_loadu_ps(steps.centre), rstep = _mm512_loadu_ps(steps.radius);
    const __m512 mstep = _mm512_loadu_ps(steps.mean);
    const __m512 slack = _mm512_loadu_ps(steps.slack);
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int g = 0; g < group; ++g) {
      // The centre bytes carry +128: take 128 * sum(v) back out.
      const __m512i icg = ic[pair * kMaxGqaGroup + g], irg = ir[pair * kMaxGqaGroup + g];
      const __m512 cs = _mm512_cvtepi32_ps(_mm512_sub_epi32(icg, _mm512_set1_epi32(128 * qsum[g])));
      const __m512 s = _mm512_set1_ps(qstep[g] * scale);
      __m512 u = _mm512_fmadd_ps(rstep, _mm512_cvtepi32_ps(irg), slack);
      u = _mm512_mul_ps(_mm512_fmadd_ps(cstep, cs, u), s);
      if (centre != nullptr) {
        StoreLanes(centre + static_cast<size_t>(g) * stride + std::max(c0, 0), j0, j1,
                   _mm512_mul_ps(_mm512_mul_ps(cstep, cs), s));
      }
      if (mean != nullptr) {
        const __m512i img = im[pair * kMaxGqaGroup + g];
        const __m512 ms = _mm512_cvtepi32_ps(_mm512_sub_epi32(img, _mm512_set1_epi32(128 * qsum[g])));
        StoreLanes(mean + static_cast<size_t>(g) * stride + std::max(c0, 0), j0, j1,
                   _mm512_mul_ps(_mm512_mul_ps(mstep, ms), s));
      }
      best = _mm512_max_ps(best, u);
      if (ub != nullptr) StoreLanes(ub + static_cast<size_t>(g) * stride + std::max(c0, 0), j0, j1, u);
    }
    StoreLanes(gscore + std::max(c0, 0), j0, j1, best);
#else
    for (int j = j0; j < j1; ++j) {
      float best = -INFINITY;
      for (int g = 0; g < group; ++g) {
        const int8_t* v = qbytes.data() + static_cast<size_t>(2) * g * w;
        int32_t ic = 0, ir = 0, im = 0;
        for (int i = 0; i < w; ++i) {
          const size_t at = static_cast<size_t>(i / 4) * kQuadBytes + 4 * j + i % 4;
          ic += cen[at] * v[i];
          ir += rad[at] * v[w + i];
          im += mea[at] * v[i];
        }
        const float cs = steps.centre[j] * static_cast<float>(ic - 128 * qsum[g]);
        if (mean != nullptr) {
          mean[static_cast<size_t>(g) * stride + c0 + j] =
              qstep[g] * scale * (steps.mean[j] * static_cast<float>(im - 128 * qsum[g]));
        }
        const float u = qstep[g] * scale * (cs + steps.radius[j] * static_cast<float>(ir) + steps.slack[j]);
        if (centre != nullptr) centre[static_cast<size_t>(g) * stride + c0 + j] = qstep[g] * scale * cs;
        if (ub != nullptr) ub[static_cast<size_t>(g) * stride + c0 + j] = u;
        best = std::max(best, u);
      }
      gscore[c0 + j] = best;
    }
#endif
  }
}

}  // namespace psa

PSA_END_AVX512_CODE

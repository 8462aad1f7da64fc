#include "compute_worker/attention/block_ranking.h"

#include <algorithm>
#include <cmath>

#include "compute_worker/kernels/simd_warnings.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

PSA_BEGIN_AVX512_CODE  // GCC 12 false positives: see simd_warnings.h

namespace psa {

void BlockRanking::Reset(const float* score, int n) {
  key_.resize(n);
  order_.resize(n);
  bucket_of_.resize(n);
  int i = 0;
  float lo = INFINITY, hi = -INFINITY;
#if defined(__AVX512F__)
  __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) {
    __m512 s = _mm512_loadu_ps(score + i);
    s = _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_ps(-INFINITY));
    _mm512_storeu_ps(key_.data() + i, s);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(s), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    vlo = _mm512_mask_min_ps(vlo, finite, vlo, s);
    vhi = _mm512_mask_max_ps(vhi, finite, vhi, s);
  }
  lo = _mm512_reduce_min_ps(vlo);
  hi = _mm512_reduce_max_ps(vhi);
#endif
  for (; i < n; ++i) {
    const float s = std::isnan(score[i]) ? -INFINITY : score[i];
    key_[i] = s;
    if (std::isfinite(s)) {
      lo = std::min(lo, s);
      hi = std::max(hi, s);
    }
  }
  // About 8 candidates a bucket on average; the top buckets, the ones a
  // step reads, hold far fewer since hot blocks stand out.
  const int buckets = std::clamp(n / 8, 1, 4096);
  const float inv = hi > lo ? buckets / (hi - lo) : 0.0f;
  // Bucket 0 holds the highest scores. (s - lo) * inv is monotone in s, so
  // a higher score never lands in a later bucket.
  i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    // max_ps returns its second operand for a NaN (inf * 0): bucket 0 from the bottom.
    __m512 up = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(key_.data() + i), _mm512_set1_ps(lo)),
                              _mm512_set1_ps(inv));
    up = _mm512_min_ps(_mm512_max_ps(up, _mm512_setzero_ps()), _mm512_set1_ps(buckets - 1));
    _mm512_storeu_si512(bucket_of_.data() + i,
                        _mm512_sub_epi32(_mm512_set1_epi32(buckets - 1), _mm512_cvttps_epi32(up)));
  }
#endif
  for (; i < n; ++i) {
    const float up = std::clamp((key_[i] - lo) * inv, 0.0f, static_cast<float>(buckets - 1));
    bucket_of_[i] = buckets - 1 - static_cast<int>(std::isnan(up) ? 0.0f : up);
  }
  bucket_end_.assign(buckets, 0);
  for (i = 0; i < n; ++i) ++bucket_end_[bucket_of_[i]];
  int at = 0;
  for (int& e : bucket_end_) {  // counts -> starts
    const int count = e;
    e = at;
    at += count;
  }
  for (int i = 0; i < n; ++i) order_[bucket_end_[bucket_of_[i]]++] = i;  // starts -> ends
  next_bucket_ = 0;
  final_ = 0;
}

int BlockRanking::Extend(int upto) {
  upto = std::min(upto, static_cast<int>(order_.size()));
  while (final_ < upto) {
    const int end = bucket_end_[next_bucket_++];
    std::sort(order_.begin() + final_, order_.begin() + end, [&](int a, int b) {
      return key_[a] > key_[b] || (key_[a] == key_[b] && a < b);
    });
    final_ = end;
  }
  return final_;
}

}  // namespace psa

PSA_END_AVX512_CODE

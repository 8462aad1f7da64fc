// KvCache growth in private memory: contents survive every growth, pages
// never overlap, copies are equal, and the tables cross into new huge pages
// at different positions (not all in one decode step); each full block's
// metadata is its keys' max, min and mean, through growth and copies.
#include "compute_worker/kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "compute_worker/kv/page_slab.h"
#include "compute_worker/model/ggml_types.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

constexpr int kHeads = 3, kDim = 64, kBlock = 16;

uint16_t Pattern(int head, int pos, int i, bool value) {
  return static_cast<uint16_t>((head * 7919 + pos * 31 + i * 3 + (value ? 1 : 0)) & 0x7bff);
}

void ExpectRows(const KvCache& kv, int n) {
  for (int h = 0; h < kHeads; ++h) {
    const KvRows k = kv.Keys(0, h), v = kv.Values(0, h);
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < kDim; ++i) {
        ASSERT_EQ(k.row(t)[i], Pattern(h, t, i, false)) << "head " << h << " pos " << t;
        ASSERT_EQ(v.row(t)[i], Pattern(h, t, i, true)) << "head " << h << " pos " << t;
      }
    }
  }
}

TEST(KvCacheTest, GrowingOneTokenAtATimePastSeveralHugePagesKeepsEveryRow) {
  // 512 blocks of 4 KiB pages fill a 2 MiB slab: grow to ~2.5 of them per head.
  const int n = 20000;
  KvCache kv(1, kHeads, kDim, kBlock);
  for (int pos = 0; pos < n; ++pos) {
    kv.Reserve(pos + 1);  // as decode does
    for (int h = 0; h < kHeads; ++h) {
      for (int i = 0; i < kDim; ++i) {
        kv.KeySlot(0, h, pos)[i] = Pattern(h, pos, i, false);
        kv.ValueSlot(0, h, pos)[i] = Pattern(h, pos, i, true);
      }
    }
    kv.Commit(pos + 1);
  }
  ExpectRows(kv, n);

  // No two pages overlap.
  std::vector<const char*> bases;
  const int blocks = n / kBlock;
  for (int h = 0; h < kHeads; ++h) {
    for (int b = 0; b < blocks; ++b) bases.push_back(reinterpret_cast<const char*>(kv.Page(0, h, b)));
  }
  std::sort(bases.begin(), bases.end());
  for (size_t i = 1; i < bases.size(); ++i) {
    ASSERT_GE(static_cast<size_t>(bases[i] - bases[i - 1]), kv.page_bytes());
  }

  // Past the first 8K tokens (growths of less than a huge page), the first
  // huge (2 MiB-aligned) page of each head starts at a different block, and
  // not at the block that made the growth.
  const int slab_blocks = static_cast<int>(kPageSlabBytes / kv.page_bytes());
  std::set<int> first_huge;
  for (int h = 0; h < kHeads; ++h) {
    for (int b = slab_blocks; b < blocks; ++b) {
      if (reinterpret_cast<uintptr_t>(kv.Page(0, h, b)) % kPageSlabBytes == 0) {
        EXPECT_GT(b, slab_blocks) << "head " << h;
        first_huge.insert(b);
        break;
      }
    }
  }
  EXPECT_EQ(first_huge.size(), static_cast<size_t>(kHeads));

  const KvCache copy = kv;
  EXPECT_EQ(copy.length(), n);
  ExpectRows(copy, n);
}

TEST(KvCacheTest, OneLargeReserveThenCopy) {
  const int n = 9000;
  KvCache kv(1, kHeads, kDim, kBlock);
  kv.Reserve(n);
  for (int pos = 0; pos < n; ++pos) {
    for (int h = 0; h < kHeads; ++h) {
      for (int i = 0; i < kDim; ++i) {
        kv.KeySlot(0, h, pos)[i] = Pattern(h, pos, i, false);
        kv.ValueSlot(0, h, pos)[i] = Pattern(h, pos, i, true);
      }
    }
  }
  kv.Commit(n);
  KvCache copy = kv;
  copy.Reserve(n + 1);  // the copy grows on its own
  ExpectRows(copy, n);
  ExpectRows(kv, n);
}

TEST(KvCacheTest, BlockMetadataIsTheKeysMaxMinAndMeanThroughGrowthAndCopies) {
  const int n = 700;  // growth on the way; the last block partial
  KvCache kv(1, kHeads, kDim, kBlock);
  auto key = [](int h, int pos, int i) {  // spread both ways, fp16-exact
    return Fp16ToFp32(Fp32ToFp16(static_cast<float>((h * 131 + pos * 71 + i * 37) % 199) / 17.0f - 5.5f));
  };
  for (int pos = 0; pos < n; ++pos) {
    kv.Reserve(pos + 1);
    for (int h = 0; h < kHeads; ++h) {
      for (int i = 0; i < kDim; ++i) kv.KeySlot(0, h, pos)[i] = Fp32ToFp16(key(h, pos, i));
    }
    kv.Commit(pos + 1);
  }
  ASSERT_EQ(kv.full_blocks(), n / kBlock);
  auto expect_metadata = [&](const KvCache& c) {
    for (int h = 0; h < kHeads; ++h) {
      for (int b = 0; b < n / kBlock; ++b) {
        for (int i = 0; i < kDim; ++i) {
          float hi = -INFINITY, lo = INFINITY, sum = 0;
          for (int t = 0; t < kBlock; ++t) {  // in row order, as the cache and the GPU sum
            const float x = key(h, b * kBlock + t, i);
            hi = std::max(hi, x);
            lo = std::min(lo, x);
            sum += x;
          }
          ASSERT_EQ(c.KeyMax(0, h, b)[i], Fp32ToFp16(hi)) << "head " << h << " block " << b;
          ASSERT_EQ(c.KeyMin(0, h, b)[i], Fp32ToFp16(lo)) << "head " << h << " block " << b;
          ASSERT_EQ(c.KeyMean(0, h, b)[i], Fp32ToFp16(sum / kBlock)) << "head " << h << " block " << b;
        }
      }
    }
  };
  expect_metadata(kv);
  KvCache copy = kv;
  copy.Reserve(4 * n);  // the copy's tables grow on their own
  expect_metadata(copy);
}

}  // namespace
}  // namespace psa

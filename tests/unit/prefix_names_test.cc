// How the KV service names a sequence's blocks (PrefixStore::BlockHashes):
// by their tokens, and, from the first block a sparse policy's decode step
// wrote into, by that policy too — so a prompt never adopts KV that decode
// steps made, and a resume finds only its own generation's.
#include <string>
#include <vector>

#include "compute_worker/server/prefix_store.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

std::vector<TokenId> Tokens(int n) {
  std::vector<TokenId> t;
  for (int i = 0; i < n; ++i) t.push_back(static_cast<TokenId>(1000 + 7 * i));
  return t;
}

TEST(PrefixNamesTest, DecodedBlocksCarryThePolicyThatDecodedThem) {
  const std::vector<TokenId> tokens = Tokens(16 * 8);
  auto names = [&](int decode_from, const std::string& by) {
    return PrefixStore::BlockHashes("model", 16, CacheContents{tokens, decode_from, by, ""}, 8);
  };
  const std::vector<std::string> prompt = names(16 * 8, "");  // all prompt
  // Dense decode equals a prefill: the same names, shareable.
  EXPECT_EQ(names(40, ""), prompt);
  // A sparse policy decoded from position 40 (inside block 2): blocks 0-1
  // are the prompt's, block 2 on are its own.
  const std::vector<std::string> psa = names(40, "psa(eps=0.9,G=4,min_blocks=24)");
  for (int b = 0; b < 2; ++b) EXPECT_EQ(psa[b], prompt[b]) << b;
  for (int b = 2; b < 8; ++b) EXPECT_NE(psa[b], prompt[b]) << b;
  // From a block boundary: the block that starts there is the first.
  const std::vector<std::string> at = names(48, "psa(eps=0.9,G=4,min_blocks=24)");
  for (int b = 0; b < 3; ++b) EXPECT_EQ(at[b], prompt[b]) << b;
  EXPECT_NE(at[3], prompt[3]);
  // Another policy, or the same one from another position: other names.
  const std::vector<std::string> topk = names(40, "topk(k=64)");
  EXPECT_NE(topk[2], psa[2]);
  EXPECT_NE(at[3], psa[3]);
  // A resume of the same generation computes the same names.
  EXPECT_EQ(names(40, "psa(eps=0.9,G=4,min_blocks=24)"), psa);
}

TEST(PrefixNamesTest, AWorkersDecodeSettingsJoinTheNamesOfDecodedBlocksOnly) {
  std::vector<TokenId> tokens(16 * 8);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<TokenId>(i * 7 + 3);
  auto names = [&](const std::string& by, const std::string& settings) {
    const CacheContents c{tokens, 40, by, ""};
    return PrefixStore::BlockHashes("model", 16, PrefixStore::WithSettings(c, settings), 8);
  };
  const std::string psa = "psa(eps=0.6,G=4,min_blocks=24)";
  const auto plain = names(psa, ""), marked = names(psa, "retrieval:L7.2 L17.1");
  for (int b = 0; b < 2; ++b) EXPECT_EQ(marked[b], plain[b]) << b;  // the prompt's blocks
  for (int b = 2; b < 8; ++b) EXPECT_NE(marked[b], plain[b]) << b;  // decoded under the sites
  EXPECT_NE(names(psa, "retrieval:L7.2"), marked);
  // Dense decode names as a prefill does, whatever the settings.
  EXPECT_EQ(names("", "retrieval:L7.2"), names("", ""));
}

TEST(PrefixNamesTest, ASaltScopesEveryName) {
  const std::vector<TokenId> tokens = Tokens(16 * 4);
  auto names = [&](const std::string& salt) {
    return PrefixStore::BlockHashes("model", 16, CacheContents{tokens, 16 * 4, "", salt}, 4);
  };
  const std::vector<std::string> shared = names(""), a = names("tenant:a"), b = names("tenant:b");
  EXPECT_EQ(names("tenant:a"), a);  // stable
  for (int i = 0; i < 4; ++i) {
    EXPECT_NE(a[i], shared[i]) << i;
    EXPECT_NE(a[i], b[i]) << i;
  }
}

}  // namespace
}  // namespace psa

#include "compute_worker/model/pre_tokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace psa {
namespace {

std::vector<std::string> Split(PreTokenizerKind k, const std::string& text) {
  std::vector<std::string> out;
  for (std::string_view w : PreTokenize(k, text)) out.emplace_back(w);
  return out;
}

using V = std::vector<std::string>;

TEST(PreTokenizerTest, Gpt2WordsSpacesAndContractions) {
  const auto k = PreTokenizerKind::kGpt2;
  EXPECT_EQ(Split(k, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(Split(k, "don't stop"), (V{"don", "'t", " stop"}));
  EXPECT_EQ(Split(k, "we'll they're"), (V{"we", "'ll", " they", "'re"}));
  EXPECT_EQ(Split(k, "a  b"), (V{"a", " ", " b"}));
  EXPECT_EQ(Split(k, "hi  "), (V{"hi", "  "}));
  EXPECT_EQ(Split(k, "x\n\ny"), (V{"x", "\n", "\n", "y"}));
  EXPECT_EQ(Split(k, "123abc!!"), (V{"123", "abc", "!!"}));
  EXPECT_EQ(Split(k, " (x)"), (V{" (", "x", ")"}));
  EXPECT_EQ(Split(k, "Café"), (V{"Café"}));
}

TEST(PreTokenizerTest, SmolLmSplitsEveryDigit) {
  const auto k = PreTokenizerKind::kSmolLm;
  EXPECT_EQ(Split(k, "123abc"), (V{"1", "2", "3", "abc"}));
  EXPECT_EQ(Split(k, "v2 is 10x"), (V{"v", "2", " is", " ", "1", "0", "x"}));
}

TEST(PreTokenizerTest, Llama3GroupsDigitsByThreeAndNewlines) {
  const auto k = PreTokenizerKind::kLlama3;
  EXPECT_EQ(Split(k, "12345"), (V{"123", "45"}));
  EXPECT_EQ(Split(k, "Hello\n\nWorld"), (V{"Hello", "\n\n", "World"}));
  EXPECT_EQ(Split(k, "I'M here"), (V{"I", "'M", " here"}));
  EXPECT_EQ(Split(k, "a !!\nb"), (V{"a", " !!\n", "b"}));
  EXPECT_EQ(Split(k, "(word"), (V{"(word"}));
  EXPECT_EQ(Split(PreTokenizerKind::kQwen2, "123"), (V{"1", "2", "3"}));
}

TEST(PreTokenizerTest, PiecesAlwaysConcatenateToTheInput) {
  std::mt19937 rng(7);
  const std::vector<std::string> atoms = {"a", "Z", " ", "  ", "\n", "\t", "7", "'s", "'", "é",
                                          "日", "🙂", "!", "\xff", "\xe2\x82", ".", "\r\n"};
  for (auto kind : {PreTokenizerKind::kGpt2, PreTokenizerKind::kSmolLm, PreTokenizerKind::kLlama3,
                    PreTokenizerKind::kQwen2}) {
    for (int iter = 0; iter < 300; ++iter) {
      std::string text;
      const int n = rng() % 20;
      for (int i = 0; i < n; ++i) text += atoms[rng() % atoms.size()];
      std::string joined;
      for (const std::string& p : Split(kind, text)) {
        EXPECT_FALSE(p.empty());
        joined += p;
      }
      EXPECT_EQ(joined, text);
    }
  }
}

TEST(PreTokenizerTest, NamesMapToKindsAndUnknownIsAnError) {
  EXPECT_EQ(*PreTokenizerFromName("smollm"), PreTokenizerKind::kSmolLm);
  EXPECT_EQ(*PreTokenizerFromName(""), PreTokenizerKind::kGpt2);
  EXPECT_EQ(*PreTokenizerFromName("llama-bpe"), PreTokenizerKind::kLlama3);
  auto bad = PreTokenizerFromName("klingon");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("klingon"), absl::string_view::npos);
}

TEST(PreTokenizerTest, Utf8Helpers) {
  int len;
  EXPECT_EQ(DecodeUtf8("\xe2\x82\xac", &len), 0x20ACu);
  EXPECT_EQ(len, 3);
  EXPECT_EQ(DecodeUtf8("\xe2\x82", &len), 0xFFFDu);  // truncated
  EXPECT_EQ(len, 1);
  EXPECT_EQ(DecodeUtf8("\xc0\x80", &len), 0xFFFDu);  // overlong
  std::string s;
  AppendUtf8(0x1F642, &s);
  EXPECT_EQ(s, "🙂");
}

}  // namespace
}  // namespace psa

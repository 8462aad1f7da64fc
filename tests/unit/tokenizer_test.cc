// Tokenizers built from tiny generated GGUF vocabularies (the real model's
// tokenizer is checked against llama.cpp in tests/integration/golden_test).
#include "compute_worker/model/tokenizer.h"

#include "compute_worker/model/chat_template.h"
#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

std::unique_ptr<Tokenizer> TinyTokenizer(const std::string& kind) {
  testing::TinyModelSpec spec;
  spec.tokenizer = kind;
  auto bytes = testing::BuildTinyLlamaGguf(spec);
  auto file = GgufFile::Parse(bytes.data(), bytes.size(), "tiny");
  EXPECT_TRUE(file.ok()) << file.status().message();
  auto tok = Tokenizer::FromGguf(**file);
  EXPECT_TRUE(tok.ok()) << tok.status().message();
  return tok.ok() ? std::move(*tok) : nullptr;
}

TEST(TokenizerTest, BytePairRoundTripsAnyBytes) {
  auto tok = TinyTokenizer("gpt2");
  ASSERT_NE(tok, nullptr);
  for (const std::string& text : std::vector<std::string>{"the cat", "  spaces\tand\nlines ", "Ünïcödé 日本 🙂", "x\xff\xfe y",
                                 std::string("nul\0byte", 8)}) {
    const auto ids = tok->Encode(text, false, false);
    EXPECT_EQ(tok->Decode(ids), text);
  }
}

TEST(TokenizerTest, BytePairAppliesMergesByRank) {
  auto tok = TinyTokenizer("gpt2");
  ASSERT_NE(tok, nullptr);
  // " the" must merge fully if the vocabulary has the merges for it.
  const TokenId the = tok->Lookup("\xC4\xA0the");  // "Ġthe"
  if (the >= 0) {
    EXPECT_EQ(tok->Encode(" the", false, false), std::vector<TokenId>{the});
  }
  // Fewer tokens than bytes once merges apply.
  EXPECT_LT(tok->Encode(" the the the", false, false).size(), 12u);
}

TEST(TokenizerTest, SpecialTokensOnlyWhenParsingSpecial) {
  auto tok = TinyTokenizer("gpt2");
  ASSERT_NE(tok, nullptr);
  const TokenId start = tok->Lookup("<|im_start|>");
  ASSERT_GE(start, 0);
  const auto with = tok->Encode("<|im_start|>hi", false, true);
  ASSERT_FALSE(with.empty());
  EXPECT_EQ(with[0], start);
  const auto without = tok->Encode("<|im_start|>hi", false, false);
  EXPECT_EQ(std::count(without.begin(), without.end(), start), 0);
  EXPECT_EQ(tok->Decode(with), "hi");  // control tokens hidden by default
  EXPECT_EQ(tok->Decode(with, true), "<|im_start|>hi");
  EXPECT_TRUE(tok->IsEndOfGeneration(tok->eos_id()));
}

TEST(TokenizerTest, SentencePieceSpacesScoresAndByteFallback) {
  auto tok = TinyTokenizer("llama");
  ASSERT_NE(tok, nullptr);
  const auto ids = tok->Encode("the é", /*add_bos=*/true, false);
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], tok->bos_id());
  // "é" is not a piece: it falls back to its two UTF-8 bytes.
  const TokenId c3 = tok->Lookup("<0xC3>"), a9 = tok->Lookup("<0xA9>");
  ASSERT_GE(c3, 0);
  EXPECT_EQ(ids[ids.size() - 2], c3);
  EXPECT_EQ(ids.back(), a9);
  EXPECT_EQ(tok->Decode(ids), "the é");
  const TokenId the = tok->Lookup("\xE2\x96\x81the");
  if (the >= 0) {
    EXPECT_EQ(ids[1], the);
  }
}

TEST(ChatTemplateTest, ChatMlWithDefaultSystemPrompt) {
  auto t = ChatTemplate::FromJinja(
      "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe "
      "brief.<|im_end|>\n' }}{% endif %}<|im_start|>");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->style(), ChatTemplate::Style::kChatMl);
  EXPECT_EQ(t->default_system(), "Be brief.");
  auto s = t->Apply({{"user", "hi"}}, true);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n");
  s = t->Apply({{"system", "S"}, {"user", "hi"}}, false);
  EXPECT_EQ(*s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n");
}

// Qwen2.5's template: the default system turn is the literal in the
// else-branch, with the newline written as a Jinja escape.
TEST(ChatTemplateTest, QwenDefaultSystemPromptFromTheElseBranch) {
  auto t = ChatTemplate::FromJinja(
      "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- else %}"
      "{%- if messages[0]['role'] == 'system' %}"
      "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
      "{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}"
      "{%- endif %}{%- endif %}");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->style(), ChatTemplate::Style::kChatMl);
  EXPECT_EQ(t->default_system(), "You are Qwen.");
}

TEST(ChatTemplateTest, Llama3Llama2AndErrors) {
  auto l3 = ChatTemplate::FromJinja("<|start_header_id|>...");
  ASSERT_TRUE(l3.ok());
  EXPECT_EQ(*l3->Apply({{"user", "hi"}}, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  auto l2 = ChatTemplate::FromJinja("[INST] ...");
  ASSERT_TRUE(l2.ok());
  EXPECT_EQ(*l2->Apply({{"system", "S"}, {"user", "hi"}}, true),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]");
  EXPECT_FALSE(ChatTemplate::FromJinja("{{ something else }}").ok());
  auto bad_role = l3->Apply({{"robot", "x"}}, true);
  EXPECT_EQ(bad_role.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace psa

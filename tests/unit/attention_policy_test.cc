// AttentionPolicy's one parser, its printed form, and the proto conversion.
#include "common/attention_policy.h"

#include "api/attention_policy_proto.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace psa {
namespace {

using ::testing::HasSubstr;
using Kind = AttentionPolicy::Kind;

TEST(AttentionPolicyTest, ParsesKindsAndOptionsOverTheBase) {
  AttentionPolicy base;
  base.epsilon = 0.8f;
  base.top_k = 32;
  auto dense = AttentionPolicy::Parse("dense", base);
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_EQ(dense->kind, Kind::kDense);

  auto psa = AttentionPolicy::Parse("psa", base);
  ASSERT_TRUE(psa.ok());
  EXPECT_EQ(psa->kind, Kind::kPsa);
  EXPECT_EQ(psa->epsilon, 0.8f);  // the base's
  EXPECT_EQ(psa->min_blocks, 24);

  auto opts = AttentionPolicy::Parse(" psa:eps=0.95, min_blocks=16,G=2,rb=0,solo,prefill=64,"
                                     "sink=2,local=3 ");
  ASSERT_TRUE(opts.ok()) << opts.status();
  EXPECT_EQ(opts->epsilon, 0.95f);
  EXPECT_EQ(opts->min_blocks, 16);
  EXPECT_EQ(opts->group_blocks, 2);
  EXPECT_EQ(opts->resident_bias, 0.0f);
  EXPECT_FALSE(opts->share_reads);
  EXPECT_EQ(opts->sparse_prefill_rows, 64);
  EXPECT_EQ(opts->sink_blocks, 2);
  EXPECT_EQ(opts->local_blocks, 3);

  auto bare_eps = AttentionPolicy::Parse("psa:0.7");
  ASSERT_TRUE(bare_eps.ok());
  EXPECT_EQ(bare_eps->epsilon, 0.7f);
  auto topk = AttentionPolicy::Parse("topk:128");
  ASSERT_TRUE(topk.ok());
  EXPECT_EQ(topk->kind, Kind::kTopK);
  EXPECT_EQ(topk->top_k, 128);
  EXPECT_EQ(AttentionPolicy::Parse("topk:k=96")->top_k, 96);
}

TEST(AttentionPolicyTest, RejectsWhatItCannotReadNamingIt) {
  auto kind = AttentionPolicy::Parse("bogus");
  ASSERT_FALSE(kind.ok());
  EXPECT_EQ(kind.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(kind.status().message(), HasSubstr("must be dense, topk or psa"));
  EXPECT_THAT(kind.status().message(), HasSubstr("\"bogus\""));
  EXPECT_THAT(AttentionPolicy::Parse("psa:bogus").status().message(),
              HasSubstr("unknown option \"bogus\""));
  EXPECT_THAT(AttentionPolicy::Parse("psa:eps=x").status().message(),
              HasSubstr("eps needs a number, got \"x\""));
  EXPECT_THAT(AttentionPolicy::Parse("psa:eps=nan").status().message(),
              HasSubstr("eps needs a number"));
  EXPECT_THAT(AttentionPolicy::Parse("topk:k=1.5").status().message(),
              HasSubstr("k needs a number"));
  EXPECT_THAT(AttentionPolicy::Parse("dense:eps=0.9").status().message(),
              HasSubstr("dense takes no options"));
  EXPECT_THAT(AttentionPolicy::Parse("psa(eps=0.9").status().message(), HasSubstr("missing"));
  EXPECT_THAT(AttentionPolicy::Parse("topk:rank=exact").status().message(),
              HasSubstr("rank must be estimate or bound, got \"exact\""));
  EXPECT_THAT(AttentionPolicy::Parse("psa:depth=3").status().message(),
              HasSubstr("unknown option \"depth\""));
  // Research variants cannot be named: never served.
  EXPECT_THAT(AttentionPolicy::Parse("psa:oracle").status().message(),
              HasSubstr("unknown option \"oracle\""));
  EXPECT_THAT(AttentionPolicy::Parse("psa:min").status().message(),
              HasSubstr("unknown option \"min\""));
  // Parse reads; Validate judges the values.
  auto out_of_range = AttentionPolicy::Parse("psa:eps=1.5");
  ASSERT_TRUE(out_of_range.ok());
  EXPECT_THAT(out_of_range->Validate().message(), HasSubstr("epsilon must be in (0, 1]"));
}

TEST(AttentionPolicyTest, ReadsBackExactlyWhatItPrints) {
  std::vector<AttentionPolicy> policies(8);
  policies[1].kind = Kind::kDense;
  policies[2].kind = Kind::kTopK;
  policies[2].top_k = 128;
  policies[2].sparse_prefill_rows = 32;
  policies[3].min_blocks = 0;
  policies[3].epsilon = 0.95f;
  policies[4].certified = true;
  policies[5].share_reads = false;
  policies[5].resident_bias = 0.5f;
  policies[6].certified = true;
  policies[6].min_blocks = 0;
  policies[7].sink_blocks = 2;
  policies[7].local_blocks = 0;
  policies[7].group_blocks = 8;
  policies[7].rank = AttentionPolicy::Rank::kEstimate;
  policies.push_back(policies[2]);
  policies.back().rank = AttentionPolicy::Rank::kBound;
  // The estimate by default, printed only where the bound is set.
  using Rank = AttentionPolicy::Rank;
  EXPECT_EQ(policies[2].rank, Rank::kEstimate);
  EXPECT_EQ(policies[0].rank, Rank::kEstimate);
  EXPECT_EQ(policies.back().ToString(), "topk(k=128,prefill=32,rank=bound)");
  EXPECT_EQ(policies[7].ToString(), "psa(eps=0.6,G=8,min_blocks=24,sink=2,local=0)");
  policies[7].rank = Rank::kBound;
  EXPECT_EQ(policies[7].ToString(), "psa(eps=0.6,G=8,min_blocks=24,rank=bound,sink=2,local=0)");
  AttentionPolicy explicit_default;
  explicit_default.rank = Rank::kEstimate;
  EXPECT_EQ(explicit_default.ToString(), AttentionPolicy{}.ToString());
  EXPECT_TRUE(explicit_default == AttentionPolicy{});
  EXPECT_EQ(AttentionPolicy::Parse("topk:rank=bound")->rank, Rank::kBound);
  // Retrieval heads read densely unless the policy says otherwise.
  EXPECT_TRUE(AttentionPolicy{}.retrieval_dense);
  AttentionPolicy no_retrieval;
  no_retrieval.retrieval_dense = false;
  EXPECT_EQ(no_retrieval.ToString(), "psa(eps=0.6,G=4,min_blocks=24,noretrieval)");
  EXPECT_FALSE(no_retrieval == AttentionPolicy{});
  EXPECT_FALSE(AttentionPolicy::Parse("topk:k=8,noretrieval")->retrieval_dense);
  policies.push_back(no_retrieval);
  EXPECT_EQ(AttentionPolicy::Parse("psa:rank=estimate", *AttentionPolicy::Parse("psa:rank=bound"))->rank,
            Rank::kEstimate);
  for (const AttentionPolicy& p : policies) {
    auto back = AttentionPolicy::Parse(p.ToString(), AttentionPolicy{});
    ASSERT_TRUE(back.ok()) << p.ToString() << ": " << back.status();
    EXPECT_EQ(back->ToString(), p.ToString());
    EXPECT_EQ(back->rank, p.rank) << p.ToString();
    if (p.kind == Kind::kPsa) {
      EXPECT_TRUE(*back == p) << p.ToString();
    }
  }
  // The exact form does not inherit the base's options.
  AttentionPolicy base;
  base.share_reads = false;
  EXPECT_TRUE(AttentionPolicy::Parse("psa(eps=0.9,G=4)", base)->share_reads);
  EXPECT_FALSE(AttentionPolicy::Parse("psa:eps=0.9", base)->share_reads);
}

TEST(AttentionPolicyTest, ParsesListsWhereEachKindStartsAPolicy) {
  std::vector<std::string> texts;
  auto list = AttentionPolicy::ParseList("dense,topk:k=128,psa:eps=0.95,min_blocks=16,psa(eps=0.9,G=4)",
                                         AttentionPolicy{}, &texts);
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 4u);
  EXPECT_EQ((*list)[0].kind, Kind::kDense);
  EXPECT_EQ((*list)[1].top_k, 128);
  EXPECT_EQ((*list)[2].epsilon, 0.95f);
  EXPECT_EQ((*list)[2].min_blocks, 16);
  EXPECT_EQ((*list)[3].min_blocks, 0);
  EXPECT_EQ(texts, (std::vector<std::string>{"dense", "topk:k=128", "psa:eps=0.95,min_blocks=16",
                                             "psa(eps=0.9,G=4)"}));
  EXPECT_FALSE(AttentionPolicy::ParseList("eps=0.9,psa", AttentionPolicy{}).ok());
  EXPECT_FALSE(AttentionPolicy::ParseList("", AttentionPolicy{}).ok());
  EXPECT_FALSE(AttentionPolicy::ParseList("psa,topk:zz", AttentionPolicy{}).ok());
}

TEST(AttentionPolicyProtoTest, RequestsOverTheServerDefault) {
  AttentionPolicy server;
  server.epsilon = 0.85f;
  server.top_k = 48;
  v1::AttentionPolicy wire;
  auto p = PolicyFromProto(wire, server);  // KIND_DEFAULT, nothing set
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(*p == server);
  wire.set_kind(v1::AttentionPolicy::KIND_TOPK);
  wire.set_top_k_blocks(100);
  p = PolicyFromProto(wire, server);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->kind, Kind::kTopK);
  EXPECT_EQ(p->top_k, 100);
  EXPECT_EQ(p->epsilon, 0.85f);
  // A uint32 that would wrap to a negative int is named as sent.
  wire.set_top_k_blocks(4294967295u);
  EXPECT_THAT(PolicyFromProto(wire, server).status().message(),
              HasSubstr("attention.top_k_blocks must be <= 16777216, got 4294967295"));
  wire.set_top_k_blocks(0);
  wire.set_kind(v1::AttentionPolicy::KIND_PSA);
  wire.set_epsilon(1.5f);
  EXPECT_THAT(PolicyFromProto(wire, server).status().message(), HasSubstr("epsilon"));
  wire.set_kind(static_cast<v1::AttentionPolicy::Kind>(9));
  EXPECT_THAT(PolicyFromProto(wire, server).status().message(),
              HasSubstr("attention.kind 9 is not a known policy"));
}

TEST(AttentionPolicyProtoTest, ClientsSendOnlyWhatTheyNamed) {
  const AttentionPolicy unset = ClientUnsetPolicy();
  auto psa = PolicyToProto(*AttentionPolicy::Parse("psa", unset), unset);
  ASSERT_TRUE(psa.ok());
  EXPECT_EQ(psa->kind(), v1::AttentionPolicy::KIND_PSA);
  EXPECT_EQ(psa->epsilon(), 0.0f);  // the server's default
  EXPECT_EQ(psa->top_k_blocks(), 0u);
  auto eps = PolicyToProto(*AttentionPolicy::Parse("psa:eps=0.95", unset), unset);
  ASSERT_TRUE(eps.ok());
  EXPECT_EQ(eps->epsilon(), 0.95f);
  auto topk = PolicyToProto(*AttentionPolicy::Parse("topk:k=128", unset), unset);
  ASSERT_TRUE(topk.ok());
  EXPECT_EQ(topk->kind(), v1::AttentionPolicy::KIND_TOPK);
  EXPECT_EQ(topk->top_k_blocks(), 128u);
  // Worker-side options do not travel: refused, not dropped.
  auto floor = PolicyToProto(*AttentionPolicy::Parse("psa:min_blocks=8", unset), unset);
  ASSERT_FALSE(floor.ok());
  EXPECT_THAT(floor.status().message(), HasSubstr("worker's settings"));
  // Round trip through the wire over a server default.
  AttentionPolicy server;
  auto back = PolicyFromProto(*eps, server);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->epsilon, 0.95f);
  EXPECT_EQ(back->min_blocks, server.min_blocks);
}

}  // namespace
}  // namespace psa

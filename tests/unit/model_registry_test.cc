// --model's names: the compiled-in registry parses whole, and a name resolves
// to the cache file, or to an error that says how to fetch it.
#include "compute_worker/model/model_registry.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

TEST(ModelRegistryTest, EveryLineOfTheRegistryParses) {
  std::ifstream tsv(PSA_SOURCE_DIR "/compute_worker/model/models.tsv");
  ASSERT_TRUE(tsv.good());
  int lines = 0;
  for (std::string line; std::getline(tsv, line);) lines += !line.empty() && line[0] != '#';
  ASSERT_EQ(ModelRegistry().size(), static_cast<size_t>(lines));
  for (const RegisteredModel& m : ModelRegistry()) {
    EXPECT_EQ(m.sha256.size(), 64u) << m.name;
    EXPECT_GT(m.bytes, 0) << m.name;
    EXPECT_EQ(m.file.substr(m.file.size() - 5), ".gguf") << m.name;
  }
  EXPECT_EQ(ModelRegistry().front().name, "smollm2-135m");
}

TEST(ModelRegistryTest, EachModelsDefaultPolicyParsesAndIsTheWorkersBase) {
  for (const RegisteredModel& m : ModelRegistry()) {
    EXPECT_EQ(RegisteredBySha256(m.sha256), &m);
    absl::StatusOr<AttentionPolicy> p = DefaultPolicyFor(m.sha256);
    ASSERT_TRUE(p.ok()) << m.name << ": " << p.status();
    if (m.attention.empty()) {
      EXPECT_TRUE(*p == AttentionPolicy{}) << m.name;
    }
  }
  // The 0.5B's diffuse attention wants a higher epsilon (docs/attention.md, "Defaults").
  const RegisteredModel& qwen05 = ModelRegistry()[1];
  ASSERT_EQ(qwen05.name, "qwen2.5-coder-0.5b");
  absl::StatusOr<AttentionPolicy> p = DefaultPolicyFor(qwen05.sha256);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->epsilon, 0.9f);
  EXPECT_EQ(p->min_blocks, AttentionPolicy{}.min_blocks);  // the rest: the built-in defaults
  // A worker's --attention parses over it: what it names wins, the rest stays.
  EXPECT_EQ(AttentionPolicy::Parse("psa:eps=0.7", *p)->epsilon, 0.7f);
  EXPECT_EQ(AttentionPolicy::Parse("psa", *p)->epsilon, 0.9f);
  // A file the registry does not know gets the built-in defaults.
  EXPECT_EQ(RegisteredBySha256(std::string(64, '0')), nullptr);
  EXPECT_TRUE(*DefaultPolicyFor(std::string(64, '0')) == AttentionPolicy{});
}

TEST(ModelRegistryTest, NamesResolveInTheCacheAndErrorsSayHowToFetch) {
  const std::filesystem::path cache =
      std::filesystem::path(testing::WriteTempFile({1}, "x")).parent_path() / "cache";
  std::filesystem::create_directories(cache / "models");
  ASSERT_EQ(setenv("PSA_CACHE_DIR", cache.c_str(), 1), 0);
  const RegisteredModel& m = ModelRegistry().back();

  auto missing = ResolveModelPath(m.name);
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("scripts/fetch_model.sh " + m.name),
            std::string::npos)
      << missing.status().message();

  const std::string file = (cache / "models" / m.file).string();
  std::ofstream(file) << "x";
  auto found = ResolveModelPath(m.name);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(*found, file);
  EXPECT_EQ(*ResolveModelPath(file), file);  // a path is a path

  auto unknown = ResolveModelPath("no-such-model");
  ASSERT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("smollm2-135m"), std::string::npos);
  EXPECT_EQ(ResolveModelPath("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace psa

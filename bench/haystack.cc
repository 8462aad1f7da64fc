#include "bench/haystack.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"

namespace psa {

absl::StatusOr<HaystackSplit> ParseHaystackSplit(const std::string& name) {
  if (name == "all") return HaystackSplit::kAll;
  if (name == "tune") return HaystackSplit::kTune;
  if (name == "test") return HaystackSplit::kTest;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown haystack split '", name, "' (all, tune or test)"));
}

absl::StatusOr<std::string> ReadHaystack(const std::string& dir, HaystackSplit split) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".txt" && e.path().filename() != "LICENSE.txt") {
      files.push_back(e.path());
    }
  }
  if (ec || files.empty()) {
    return absl::NotFoundError(absl::StrCat("no essays (*.txt) in ", dir, " (--haystack)"));
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (size_t i = 0; i < files.size(); ++i) {
    if ((split == HaystackSplit::kTune && i % 2 != 0) ||
        (split == HaystackSplit::kTest && i % 2 == 0)) {
      continue;
    }
    const auto& f = files[i];
    std::ifstream in(f);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!text.empty()) text += "\n\n";
    text += ss.str();
  }
  return text;
}

}  // namespace psa

// The long-context evaluation text of the benchmarks: the essays of a folder
// (default ../shared/eval/haystack), in file-name order, separated by blank
// lines; LICENSE.txt is not an essay.
//
// Accuracy settings are chosen on one half of the essays and reported on the
// other: kTune holds the essays at even positions of the name order, kTest
// those at odd positions, so no reported figure comes from text a default was
// fitted to.
#ifndef PSA_BENCH_HAYSTACK_H_
#define PSA_BENCH_HAYSTACK_H_

#include <string>

#include "absl/status/statusor.h"

namespace psa {

enum class HaystackSplit { kAll, kTune, kTest };

// "all", "tune" or "test"; INVALID_ARGUMENT otherwise.
absl::StatusOr<HaystackSplit> ParseHaystackSplit(const std::string& name);

absl::StatusOr<std::string> ReadHaystack(const std::string& dir,
                                         HaystackSplit split = HaystackSplit::kAll);

}  // namespace psa

#endif  // PSA_BENCH_HAYSTACK_H_

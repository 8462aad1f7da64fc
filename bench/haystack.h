// The long-context evaluation text of the benchmarks: the essays of a folder
// (default ../shared/eval/haystack), in file-name order, separated by blank
// lines; LICENSE.txt is not an essay.
#ifndef PSA_BENCH_HAYSTACK_H_
#define PSA_BENCH_HAYSTACK_H_

#include <string>

#include "absl/status/statusor.h"

namespace psa {

absl::StatusOr<std::string> ReadHaystack(const std::string& dir);

}  // namespace psa

#endif  // PSA_BENCH_HAYSTACK_H_

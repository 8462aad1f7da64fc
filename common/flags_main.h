// Command-line parsing for every PSA-Serve binary: Abseil flags, with a
// --help that lists the program's own flags. Depends on Abseil only, so
// light tools (psactl, psa-generate) link it without gRPC.
#ifndef PSA_COMMON_FLAGS_MAIN_H_
#define PSA_COMMON_FLAGS_MAIN_H_

#include <vector>

#include "absl/strings/string_view.h"

namespace psa {

// Sets `usage` as the program usage message, then parses argv as
// absl::ParseCommandLine does and returns the positional arguments
// (argv[0] first). Call at the start of main().
//
// Abseil's --help lists only flags from files named like the binary
// (worker_main.cc is not "psa-worker"), so it printed "No flags matched.";
// here --help and --helpshort list the flags defined in PSA-Serve's own
// sources, with file paths relative to the source root, and --helpfull
// adds Abseil's own flags. The help flags and --version exit 0 (Abseil
// exits 1 after help); a bad or unknown flag still exits 1.
std::vector<char*> ParseFlags(int argc, char** argv, absl::string_view usage);

}  // namespace psa

#endif  // PSA_COMMON_FLAGS_MAIN_H_

#include "common/flags_main.h"

#include <cstdlib>
#include <iostream>
#include <string>

#include "absl/flags/internal/parse.h"
#include "absl/flags/internal/program_name.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

#ifndef PSA_VERSION
#define PSA_VERSION "unknown"
#endif

namespace psa {
namespace {

// Every flag records the file that defines it as __FILE__, as this file
// does; the source root is what precedes "common/flags_main.cc" here.
// Abseil's flags record "./absl/flags/parse.cc" and the like.
absl::string_view SourceRoot() {
  absl::string_view root = __FILE__;
  if (!absl::ConsumeSuffix(&root, "common/flags_main.cc")) return "";
  return root;
}

// Help shows our files relative to the source root, others as recorded.
std::string NormalizeFilename(absl::string_view file) {
  const absl::string_view root = SourceRoot();
  if (!root.empty()) absl::ConsumePrefix(&file, root);
  return std::string(file);
}

// Whether a flag's (normalized) file is one of PSA-Serve's sources: under
// the source root, and not a copy of Abseil built inside the tree.
bool IsOwnSource(absl::string_view file) {
  return !file.empty() && file[0] != '/' && !absl::StartsWith(file, "./") &&
         !absl::StrContains(file, "absl/");
}

std::string VersionString() {
  // Abseil's default adds "Debug build (NDEBUG not #defined)" whenever the
  // Abseil library itself was built so (Debian's is), whatever ours is.
  return absl::StrCat(absl::flags_internal::ShortProgramInvocationName(), " (PSA-Serve ",
                      PSA_VERSION, ")\n");
}

}  // namespace

std::vector<char*> ParseFlags(int argc, char** argv, absl::string_view usage) {
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = IsOwnSource;
  config.contains_helpshort_flags = IsOwnSource;
  config.contains_helppackage_flags = IsOwnSource;
  config.normalize_filename = NormalizeFilename;
  config.version_string = VersionString;
  absl::SetFlagsUsageConfig(config);

  // absl::ParseCommandLine, except that the help flags are handled here:
  // Abseil exits 1 after printing help, which reads as a failure to scripts
  // and CI. Unknown or malformed flags still exit 1 inside the parse.
  // (Internal Abseil API, as of LTS 20220623, the version this builds with.)
  std::vector<char*> positional = absl::flags_internal::ParseCommandLineImpl(
      argc, argv, absl::flags_internal::ArgvListAction::kRemoveParsedArgs,
      absl::flags_internal::UsageFlagsAction::kIgnoreUsage,
      absl::flags_internal::OnUndefinedFlag::kAbortIfUndefined);
  if (absl::flags_internal::HandleUsageFlags(std::cout, absl::ProgramUsageMessage()) != -1) {
    std::cout.flush();
    std::exit(0);
  }
  return positional;
}

}  // namespace psa

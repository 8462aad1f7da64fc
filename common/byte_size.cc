#include "common/byte_size.h"

#include <cctype>
#include <limits>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace psa {

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t digits = 0;
  while (digits < t.size() && std::isdigit(static_cast<unsigned char>(t[digits]))) ++digits;
  uint64_t value;
  if (digits == 0 || !absl::SimpleAtoi(t.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", text, "\" is not a byte size; write e.g. 1073741824, 512MiB or 8GiB"));
  }
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(t.substr(digits)));
  struct Unit {
    const char* name;
    uint64_t scale;
  };
  static constexpr Unit kUnits[] = {
      {"", 1},           {"b", 1},          {"k", 1000},      {"kb", 1000},
      {"kib", 1ull << 10}, {"m", 1000000},  {"mb", 1000000},  {"mib", 1ull << 20},
      {"g", 1000000000}, {"gb", 1000000000}, {"gib", 1ull << 30}, {"t", 1000000000000},
      {"tb", 1000000000000}, {"tib", 1ull << 40}};
  for (const Unit& u : kUnits) {
    if (unit != u.name) continue;
    if (value > std::numeric_limits<uint64_t>::max() / u.scale) {
      return absl::InvalidArgumentError(absl::StrCat("\"", text, "\" is too large"));
    }
    return value * u.scale;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "\"", text, "\" has unknown unit \"", unit, "\"; use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB"));
}

std::string FormatByteSize(uint64_t bytes) {
  static constexpr const char* kNames[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = bytes;
  int i = 0;
  while (v >= 1024 && i < 4) {
    v /= 1024;
    ++i;
  }
  return i == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", v, kNames[i]);
}

}  // namespace psa

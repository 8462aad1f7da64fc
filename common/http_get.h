// A blocking HTTP GET on loopback-style plain HTTP, and a reader of
// Prometheus text: for tests and psactl, which scrape /metrics.
#ifndef PSA_COMMON_HTTP_GET_H_
#define PSA_COMMON_HTTP_GET_H_

#include <string>

#include "absl/status/statusor.h"

namespace psa {

// Returns the body of http://127.0.0.1:<port><path> if the status is 200.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);
// The same from `host` (a name or IPv4 address), with a 5 s timeout.
absl::StatusOr<std::string> HttpGet(const std::string& host, int port, const std::string& path);

// The value of the sample `series` (name plus labels exactly as exposed,
// e.g. `psa_kv_rpcs_total{code="OK",method="GetStats"}`) in a Prometheus
// text exposition, or -1 if absent.
double MetricValue(const std::string& exposition, const std::string& series);

}  // namespace psa

#endif  // PSA_COMMON_HTTP_GET_H_

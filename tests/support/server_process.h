// ServerProcess: runs one of our server binaries as a real child process on
// loopback for integration tests, and stops it when the test ends.
#ifndef PSA_TESTS_SUPPORT_SERVER_PROCESS_H_
#define PSA_TESTS_SUPPORT_SERVER_PROCESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace psa::testing {

class ServerProcess {
 public:
  // Starts `binary` with `args` plus --port_file, and waits (up to
  // `timeout`) until the server has written its ports. Output goes to a
  // log file in the test's temporary directory.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::string& binary, std::vector<std::string> args,
      absl::Duration timeout = absl::Seconds(20));
  ~ServerProcess();  // SIGKILL if still running

  int port(const std::string& name) const;  // e.g. "grpc_port"
  std::string address() const;              // "127.0.0.1:<grpc_port>"
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

  // Sends `signal` and waits for the exit; returns the exit status as from
  // waitpid (WIFEXITED etc.).
  int Stop(int signal, absl::Duration timeout = absl::Seconds(20));

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  bool exited_ = false;
  std::map<std::string, int> ports_;
  std::string log_path_;
};

}  // namespace psa::testing

#endif  // PSA_TESTS_SUPPORT_SERVER_PROCESS_H_

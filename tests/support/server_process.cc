#include "tests/support/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace psa::testing {
namespace {

std::string TempDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir != nullptr ? dir : "/tmp";
}

std::map<std::string, int> ReadPorts(const std::string& path) {
  std::map<std::string, int> ports;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::pair<std::string, std::string> kv = absl::StrSplit(line, '=');
    int port;
    if (absl::SimpleAtoi(kv.second, &port)) ports[kv.first] = port;
  }
  return ports;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::string& binary, std::vector<std::string> args, absl::Duration timeout) {
  static std::atomic<int> counter{0};
  const std::string stem =
      absl::StrCat(TempDir(), "/psa_server_", getpid(), "_", counter++);
  const std::string port_file = stem + ".ports";
  std::unique_ptr<ServerProcess> p(new ServerProcess());
  p->log_path_ = stem + ".log";
  unlink(port_file.c_str());
  args.insert(args.begin(), binary);
  args.push_back("--port_file=" + port_file);

  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    const int log = open(p->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (log >= 0) {
      dup2(log, 1);
      dup2(log, 2);
    }
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  p->pid_ = pid;
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      p->exited_ = true;
      std::ifstream log(p->log_path_);
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      return absl::InternalError(absl::StrCat(binary, " exited during start-up: ", text));
    }
    if (access(port_file.c_str(), F_OK) == 0) {
      p->ports_ = ReadPorts(port_file);
      return p;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::DeadlineExceededError(absl::StrCat(binary, " did not start within ", 
                                                  absl::FormatDuration(timeout)));
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !exited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

int ServerProcess::port(const std::string& name) const {
  auto it = ports_.find(name);
  return it == ports_.end() ? 0 : it->second;
}

std::string ServerProcess::address() const {
  return absl::StrCat("127.0.0.1:", port("grpc_port"));
}

int ServerProcess::Stop(int signal, absl::Duration timeout) {
  if (exited_) return 0;
  kill(pid_, signal);
  const absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  while (waitpid(pid_, &status, WNOHANG) != pid_) {
    if (absl::Now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  exited_ = true;
  return status;
}

}  // namespace psa::testing

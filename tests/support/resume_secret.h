// The resume secret of test clusters: a file to pass as
// --resume_secret_file to the router and the workers a test starts, so the
// router's failover resumes are accepted, and the same secret for tests
// that sign a resume themselves (ResumeAuth). Test code; thread-safe (the
// file is written once).
#ifndef PSA_TESTS_SUPPORT_RESUME_SECRET_H_
#define PSA_TESTS_SUPPORT_RESUME_SECRET_H_

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace psa::testing {

inline constexpr char kResumeSecret[] = "psa-test-resume-secret-0123456789";

// "--resume_secret_file=PATH" for a router or worker of a test cluster.
inline std::string ResumeSecretFlag() {
  static const std::string* flag = [] {
    const char* dir = std::getenv("TEST_TMPDIR");
    const std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/psa_resume_secret_" +
                             std::to_string(getpid());
    std::ofstream(path) << kResumeSecret << "\n";
    return new std::string("--resume_secret_file=" + path);
  }();
  return *flag;
}

}  // namespace psa::testing

#endif  // PSA_TESTS_SUPPORT_RESUME_SECRET_H_

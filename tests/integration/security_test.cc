// TLS and API keys against the real binaries on loopback, with certificates
// made at test time by the openssl CLI: a KV shard requiring mutual TLS
// refuses plaintext clients, clients without a certificate and clients that
// trust another CA; the router refuses gRPC calls and HTTP requests without
// a valid key and picks up a changed keys file without a restart; HTTPS on
// the router serves the same API.
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/tls.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "proto/psa/v1/generation.grpc.pb.h"
#include "common/http_get.h"
#include "tests/support/server_process.h"
#include "tests/unit/tiny_gguf.h"

namespace psa {
namespace {

using ::psa::testing::ServerProcess;

// A CA, a server certificate for 127.0.0.1 and a client certificate signed
// by it, and a second, unrelated CA. In a folder of this process's own:
// ctest runs the tests of this file in parallel, each a process.
class Certificates {
 public:
  Certificates() : dir_(absl::StrCat(::testing::TempDir(), "/certs_", getpid())) {
    const std::string d = dir_;
    const std::string script = absl::StrCat(
        "set -e; rm -rf ", d, "; mkdir -p ", d, "; cd ", d, "\n",
        "for ca in ca other_ca; do openssl req -x509 -newkey rsa:2048 -nodes -days 2 "
        "-subj /CN=$ca -keyout $ca.key -out $ca.pem 2>/dev/null; done\n",
        "for who in server client; do openssl req -newkey rsa:2048 -nodes -subj /CN=$who "
        "-keyout $who.key -out $who.csr 2>/dev/null; done\n",
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext\n",
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile san.ext -out server.pem 2>/dev/null\n",
        "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
        "-out client.pem 2>/dev/null\n");
    ok_ = std::system(script.c_str()) == 0;
  }
  bool ok() const { return ok_; }
  std::string operator()(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
  bool ok_ = false;
};

// A health check over `credentials`: OK only if the handshake and the call work.
grpc::Status Health(const std::string& address,
                    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(address, credentials));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(3)));
  grpc::health::v1::HealthCheckResponse response;
  return stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &response);
}

// The HTTP status curl gets for `url` with `args` ("000": no answer, e.g. a
// refused handshake; "none": curl did not run).
std::string HttpStatus(const std::string& args, const std::string& url) {
  const std::string cmd = absl::StrCat("curl -s -o /dev/null -w '%{http_code}' ", args, " ", url);
  std::unique_ptr<FILE, int (*)(FILE*)> p(popen(cmd.c_str(), "r"), pclose);
  char code[8] = {};
  return p && fgets(code, sizeof(code), p.get()) ? std::string(code) : std::string("none");
}

std::shared_ptr<grpc::ChannelCredentials> Creds(const TlsFiles& files) {
  auto c = ChannelCredentials(files);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : nullptr;
}

TEST(SecurityTest, AKvShardWithMutualTlsAcceptsOnlyClientsWithItsCertificates) {
  Certificates certs;
  ASSERT_TRUE(certs.ok()) << "openssl failed";
  auto kv = ServerProcess::Start(
      PSA_KV_SERVICE_BIN,
      {"--listen=127.0.0.1:0", "--metrics_listen=", "--capacity=16MiB",
       "--tls_cert_file=" + certs("server.pem"), "--tls_key_file=" + certs("server.key"),
       "--tls_client_ca_file=" + certs("ca.pem")});
  ASSERT_TRUE(kv.ok()) << kv.status();
  const std::string address = (*kv)->address();

  // A worker's credentials: the CA and a certificate it signed.
  EXPECT_TRUE(Health(address, Creds({certs("ca.pem"), certs("client.pem"), certs("client.key"),
                                     "--kv_tls_"}))
                  .ok());
  // No client certificate, plaintext, or trusting another CA: refused.
  EXPECT_EQ(Health(address, Creds({certs("ca.pem"), "", "", "--kv_tls_"})).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Health(address, grpc::InsecureChannelCredentials()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Health(address, Creds({certs("other_ca.pem"), certs("client.pem"),
                                   certs("client.key"), "--kv_tls_"}))
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // A client certificate from another CA: refused too.
  EXPECT_EQ(Health(address, Creds({certs("ca.pem"), certs("other_ca.pem"),
                                   certs("other_ca.key"), "--kv_tls_"}))
                .error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

// Each service refuses a client it cannot authenticate: a worker with mutual
// TLS (as components/tls runs it) takes only the router's certificate.
TEST(SecurityTest, AWorkerWithMutualTlsRefusesClientsWithoutItsCertificate) {
  Certificates certs;
  ASSERT_TRUE(certs.ok());
  const std::string model = psa::testing::WriteTempFile(
      psa::testing::BuildTinyLlamaGguf(psa::testing::TinyModelSpec{}), "mtls.gguf");
  auto worker = ServerProcess::Start(
      PSA_WORKER_BIN, {"--model=" + model, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                       "--threads=1", "--tls_cert_file=" + certs("server.pem"),
                       "--tls_key_file=" + certs("server.key"),
                       "--tls_client_ca_file=" + certs("ca.pem")});
  ASSERT_TRUE(worker.ok()) << worker.status();
  const std::string address = (*worker)->address();
  EXPECT_TRUE(Health(address, Creds({certs("ca.pem"), certs("client.pem"), certs("client.key"),
                                     "--worker_tls_"}))
                  .ok());
  EXPECT_EQ(Health(address, Creds({certs("ca.pem"), "", "", "--worker_tls_"})).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Health(address, grpc::InsecureChannelCredentials()).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // Readiness stays plain HTTP on the metrics port, for kubelet.
  EXPECT_EQ(HttpGet((*worker)->port("metrics_port"), "/readyz").value_or(""), "ready\n");
}

TEST(SecurityTest, BadTlsFlagsAreRefusedAtStart) {
  Certificates certs;
  ASSERT_TRUE(certs.ok());
  EXPECT_FALSE(ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=",
                                     "--tls_cert_file=" + certs("server.pem")})
                   .ok());  // no key
  EXPECT_FALSE(ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                    {"--listen=127.0.0.1:0", "--metrics_listen=",
                                     "--tls_cert_file=" + certs("san.ext"),
                                     "--tls_key_file=" + certs("server.key")})
                   .ok());  // not PEM
}

class RouterKeysTest : public ::testing::Test {
 protected:
  void WriteKeys(const std::string& text) {
    const std::string tmp = keys_ + ".tmp";
    std::ofstream(tmp) << text;
    ASSERT_EQ(std::rename(tmp.c_str(), keys_.c_str()), 0);
  }
  // GetModelInfo with `key`: UNAUTHENTICATED when refused; UNAVAILABLE (no
  // worker runs) once accepted.
  grpc::StatusCode Call(const std::string& address, const std::string& key,
                        std::shared_ptr<grpc::ChannelCredentials> creds =
                            grpc::InsecureChannelCredentials()) {
    auto stub = psa::v1::Generation::NewStub(grpc::CreateChannel(address, creds));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
    psa::v1::ModelInfo info;
    return stub->GetModelInfo(&ctx, psa::v1::GetModelInfoRequest(), &info).error_code();
  }

  const std::string keys_ = absl::StrCat(::testing::TempDir(), "/api_keys.txt");
};

TEST_F(RouterKeysTest, CallsNeedAValidKeyAndTheFileIsReloaded) {
  WriteKeys("# keys\nsk-test-aaaaaaaaaaaaaaaa team-a\nsk-test-bbbbbbbbbbbbbbbb\n");
  auto r = ServerProcess::Start(PSA_ROUTER_BIN,
                                {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                 "--http_listen=127.0.0.1:0", "--workers=127.0.0.1:1",
                                 "--api_keys_file=" + keys_});
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string address = (*r)->address();
  EXPECT_EQ(Call(address, ""), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(address, "sk-test-cccccccccccccccc"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Call(address, "sk-test-aaaaaaaaaaaaaaaa"), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(address, "sk-test-bbbbbbbbbbbbbbbb"), grpc::StatusCode::UNAVAILABLE);
  // The health service stays open for probes.
  EXPECT_TRUE(Health(address, grpc::InsecureChannelCredentials()).ok());

  // HTTP: 401 in OpenAI's error shape without a key; a key gets past it.
  const std::string models = absl::StrCat("http://127.0.0.1:", (*r)->port("http_port"),
                                           "/v1/models");
  auto curl = [&](const std::string& args) { return HttpStatus(args, models); };
  EXPECT_EQ(curl(""), "401");
  EXPECT_EQ(curl("-H 'Authorization: Bearer sk-test-cccccccccccccccc'"), "401");
  EXPECT_EQ(curl("-H 'Authorization: Bearer sk-test-aaaaaaaaaaaaaaaa'"), "503");  // no worker

  // Revoke a, add c: seen within about a second, without a restart.
  WriteKeys("sk-test-bbbbbbbbbbbbbbbb\nsk-test-cccccccccccccccc team-c\n");
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (Call(address, "sk-test-cccccccccccccccc") != grpc::StatusCode::UNAVAILABLE &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(Call(address, "sk-test-cccccccccccccccc"), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(Call(address, "sk-test-aaaaaaaaaaaaaaaa"), grpc::StatusCode::UNAUTHENTICATED);
  // A broken file keeps the last good keys.
  WriteKeys("too short\n");
  absl::SleepFor(absl::Milliseconds(1500));
  EXPECT_EQ(Call(address, "sk-test-cccccccccccccccc"), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(RouterKeysTest, TheRouterServesGrpcAndHttpOverTls) {
  Certificates certs;
  ASSERT_TRUE(certs.ok());
  auto r = ServerProcess::Start(
      PSA_ROUTER_BIN,
      {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", "--http_listen=127.0.0.1:0",
       "--workers=127.0.0.1:1", "--tls_cert_file=" + certs("server.pem"),
       "--tls_key_file=" + certs("server.key")});
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string address = (*r)->address();
  EXPECT_EQ(Call(address, "", Creds({certs("ca.pem"), "", "", "--tls_"})),
            grpc::StatusCode::UNAVAILABLE);  // past TLS: no worker
  EXPECT_TRUE(Health(address, Creds({certs("ca.pem"), "", "", "--tls_"})).ok());
  EXPECT_FALSE(Health(address, grpc::InsecureChannelCredentials()).ok());
  EXPECT_FALSE(Health(address, Creds({certs("other_ca.pem"), "", "", "--tls_"})).ok());
  const std::string https =
      absl::StrCat("https://127.0.0.1:", (*r)->port("http_port"), "/health");
  auto curl = [&](const std::string& ca) { return HttpStatus("--cacert " + ca, https); };
  EXPECT_EQ(curl(certs("ca.pem")), "503");        // HTTPS works; no healthy worker
  EXPECT_EQ(curl(certs("other_ca.pem")), "000");  // handshake refused
}

// Through the router, a key's tenant scopes prefix reuse: tenant B sending
// the prompt tenant A stored finds nothing (and so can load nothing A
// wrote), A finds its own; a client's cache_salt cannot name A's scope.
TEST_F(RouterKeysTest, TenantsShareNoPrefix) {
  WriteKeys("sk-test-aaaaaaaaaaaaaaaa team-a\nsk-test-bbbbbbbbbbbbbbbb team-b\n");
  psa::testing::TinyModelSpec spec;
  spec.n_ctx = 1024;
  const std::string model =
      psa::testing::WriteTempFile(psa::testing::BuildTinyLlamaGguf(spec), "tenants.gguf");
  auto kv = ServerProcess::Start(PSA_KV_SERVICE_BIN,
                                 {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
  ASSERT_TRUE(kv.ok()) << kv.status();
  auto worker = ServerProcess::Start(
      PSA_WORKER_BIN, {"--model=" + model, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                       "--threads=1", "--kv_shards=" + (*kv)->address(),
                       "--prefix_checkpoint_blocks=4"});
  ASSERT_TRUE(worker.ok()) << worker.status();
  auto router = ServerProcess::Start(
      PSA_ROUTER_BIN, {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                       "--http_listen=", "--workers=" + (*worker)->address(),
                       "--api_keys_file=" + keys_});
  ASSERT_TRUE(router.ok()) << router.status();
  auto metric = [&](const std::string& series) {
    auto body = HttpGet((*worker)->port("metrics_port"), "/metrics");
    return body.ok() ? MetricValue(*body, series) : -2;
  };
  auto generate = [&](const std::string& key, const std::string& salt) {
    auto stub = psa::v1::Generation::NewStub(
        grpc::CreateChannel((*router)->address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    ctx.AddMetadata("authorization", "Bearer " + key);
    psa::v1::GenerateRequest r;
    for (int i = 0; i < 200; ++i) r.mutable_token_ids()->add_ids(3 + (i * 7) % 200);
    r.set_max_tokens(4);
    r.set_ignore_eos(true);
    r.set_cache_salt(salt);
    r.mutable_attention()->set_kind(psa::v1::AttentionPolicy::KIND_DENSE);
    auto reader = stub->Generate(&ctx, r);
    psa::v1::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    return reader->Finish();
  };
  const std::string hits = "psa_worker_prefix_cache_hits_total";
  ASSERT_TRUE(generate("sk-test-aaaaaaaaaaaaaaaa", "").ok());
  // A's prompt is published once A itself finds it.
  const absl::Time until = absl::Now() + absl::Seconds(20);
  double a_hits = 0;
  while ((a_hits = metric(hits)) <= 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(100));
    ASSERT_TRUE(generate("sk-test-aaaaaaaaaaaaaaaa", "").ok());
    a_hits = metric(hits);
    if (a_hits > 0) break;
  }
  ASSERT_GT(a_hits, 0) << "tenant A never found its own prefix; worker metrics:\n"
                       << HttpGet((*worker)->port("metrics_port"), "/metrics").value_or("");
  ASSERT_TRUE(generate("sk-test-bbbbbbbbbbbbbbbb", "").ok());
  EXPECT_EQ(metric(hits), a_hits);  // B: nothing of A's
  // B naming A's scope as its own salt reaches only "tenant/team-b/tenant/team-a/".
  ASSERT_TRUE(generate("sk-test-bbbbbbbbbbbbbbbb", "tenant/team-a/").ok());
  EXPECT_EQ(metric(hits), a_hits);
  ASSERT_TRUE(generate("sk-test-aaaaaaaaaaaaaaaa", "").ok());
  EXPECT_GT(metric(hits), a_hits);  // A again: its own blocks
}

}  // namespace
}  // namespace psa

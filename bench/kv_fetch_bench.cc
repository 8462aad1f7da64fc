// KV fetch throughput and latency: the KV service's pipelined gRPC fetch
// stream against the same bytes moved over a plain TCP loopback socket, in
// one run.
//
// Both servers run in this process on 127.0.0.1 and serve the same blocks
// (the default model's shape: 3 KV heads x 64 dims x 16 tokens, fp16, so
// 12 KiB per block). For each group size (blocks per request) and number of
// requests kept outstanding, a client streams requests for random groups
// for --seconds and reports GB/s and request latency p50/p99; the ratio
// column is gRPC throughput over raw TCP throughput.
//
// With --tls, a second in-process KV service speaking mutual TLS (as
// components/tls deploys it; certificates made by the openssl CLI) is
// measured in the same runs: the cost of TLS on the fetch path.
//
//   build/bench/psa_kv_fetch_bench [--groups=4,16,64] [--outstanding=1,4,16,64] [--tls]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "common/flags_main.h"
#include "common/grpc_server_main.h"
#include "common/tls.h"
#include "kv_service/block_store.h"
#include "kv_service/kv_client.h"
#include "kv_service/kv_service_impl.h"
#include "tests/support/kv_blocks.h"

ABSL_FLAG(std::string, groups, "4,16,64", "Blocks per fetch request (comma-separated)");
ABSL_FLAG(std::string, outstanding, "1,4,16,64",
          "Requests kept outstanding on the stream (comma-separated)");
ABSL_FLAG(double, seconds, 1.0, "Measuring time per run");
ABSL_FLAG(int, reps, 3,
          "Runs per configuration and transport, alternating; the best run of each is "
          "reported (this machine's loopback throughput varies by ~30% run to run)");
ABSL_FLAG(int, blocks, 512, "Blocks stored (the working set fetched from)");
ABSL_FLAG(std::string, csv, "", "Also write the results here as CSV");
ABSL_FLAG(std::string, kv_address, "",
          "Fetch from this running psa-kv-service instead of one started in-process");
ABSL_FLAG(int, connections, 2, "KvClient fetch connections per shard");
ABSL_FLAG(bool, tcp, true, "Run the raw TCP baseline (off: gRPC only, e.g. for profiling)");
ABSL_FLAG(bool, tls, false,
          "Also fetch from a KV service speaking mutual TLS (certificates made with openssl)");

namespace {

constexpr uint64_t kMaxMessage = 64ull << 20;

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      std::fprintf(stderr, "bad list entry \"%s\"\n", std::string(part).c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

struct Result {
  double gbps = 0;
  double p50_ms = 0, p99_ms = 0;
  uint64_t requests = 0;
};

Result Summarise(std::vector<double>& latencies_ms, uint64_t bytes, absl::Duration elapsed) {
  Result r;
  r.requests = latencies_ms.size();
  r.gbps = bytes / absl::ToDoubleSeconds(elapsed) / 1e9;
  if (!latencies_ms.empty()) {
    std::sort(latencies_ms.begin(), latencies_ms.end());
    r.p50_ms = latencies_ms[latencies_ms.size() / 2];
    r.p99_ms = latencies_ms[std::min(latencies_ms.size() - 1, latencies_ms.size() * 99 / 100)];
  }
  return r;
}

// Random groups of distinct-ish block indices, fixed in advance.
std::vector<std::vector<uint32_t>> MakeGroups(int group, int blocks, int count) {
  std::mt19937 rng(7);
  std::vector<std::vector<uint32_t>> groups(count);
  for (auto& g : groups) {
    for (int k = 0; k < group; ++k) g.push_back(rng() % blocks);
  }
  return groups;
}

// Keeps `outstanding` requests in flight for --seconds. `issue(i, done)`
// starts request i and must call done() exactly once when it completes.
template <typename Issue>
Result Drive(int outstanding, uint64_t bytes_per_request, Issue issue) {
  absl::Mutex mu;
  int in_flight = 0;
  std::vector<double> latencies;
  auto room = [&] { return in_flight < outstanding; };
  auto idle = [&] { return in_flight == 0; };
  const absl::Time start = absl::Now();
  const absl::Time stop = start + absl::Seconds(absl::GetFlag(FLAGS_seconds));
  for (uint64_t i = 0; absl::Now() < stop; ++i) {
    {
      absl::MutexLock lock(&mu);
      mu.Await(absl::Condition(&room));
      ++in_flight;
    }
    const absl::Time t0 = absl::Now();
    issue(i, [&mu, &in_flight, &latencies, t0] {
      const double ms = absl::ToDoubleMilliseconds(absl::Now() - t0);
      absl::MutexLock lock(&mu);
      --in_flight;
      latencies.push_back(ms);
    });
  }
  absl::MutexLock lock(&mu);
  mu.Await(absl::Condition(&idle));
  return Summarise(latencies, latencies.size() * bytes_per_request, absl::Now() - start);
}

// The baseline: a TCP server that answers 8-byte requests (group id, block
// count) with the blocks' bytes straight from memory (writev), and a client
// that pipelines requests on one connection.
class RawTcp {
 public:
  explicit RawTcp(const std::vector<std::string>* blocks) : blocks_(blocks) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    listen(listen_fd_, 4);
    socklen_t len = sizeof(addr);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
  }
  ~RawTcp() { close(listen_fd_); }

  Result Run(const std::vector<std::vector<uint32_t>>& groups, int outstanding) {
    const size_t block_bytes = (*blocks_)[0].size();
    const size_t group = groups[0].size();
    std::thread server([&] { Serve(groups); });
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port_);
    connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    absl::Mutex mu;
    std::deque<std::function<void()>> waiting;  // answers come back in order
    std::atomic<bool> sending_done{false};
    // Reads whatever has arrived (up to 4 MiB per call, the cheapest way to
    // drain a socket) and completes requests as their bytes are complete.
    std::thread receiver([&] {
      const size_t response_bytes = group * block_bytes;
      std::string buf(4 << 20, '\0');
      size_t partial = 0;  // bytes of the current response received
      while (true) {
        {
          absl::MutexLock lock(&mu);
          auto ready = [&] { return !waiting.empty() || sending_done.load(); };
          mu.Await(absl::Condition(&ready));
          if (waiting.empty()) return;
        }
        const ssize_t n = recv(fd, buf.data(), buf.size(), 0);
        if (n <= 0) return;
        partial += n;
        while (partial >= response_bytes) {
          partial -= response_bytes;
          std::function<void()> done;
          {
            absl::MutexLock lock(&mu);
            done = std::move(waiting.front());
            waiting.pop_front();
          }
          done();
        }
      }
    });
    Result r = Drive(outstanding, group * block_bytes, [&](uint64_t i, auto done) {
      {
        absl::MutexLock lock(&mu);
        waiting.push_back(std::move(done));
      }
      const uint32_t request[2] = {static_cast<uint32_t>(i % groups.size()),
                                   static_cast<uint32_t>(group)};
      send(fd, request, sizeof(request), MSG_NOSIGNAL);
    });
    sending_done = true;
    {
      absl::MutexLock lock(&mu);  // wake the receiver
    }
    receiver.join();
    shutdown(fd, SHUT_WR);
    close(fd);
    server.join();
    return r;
  }

 private:
  void Serve(const std::vector<std::vector<uint32_t>>& groups) {
    const int fd = accept(listen_fd_, nullptr, nullptr);
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    uint32_t request[2];
    std::vector<iovec> iov;
    while (recv(fd, request, sizeof(request), MSG_WAITALL) == sizeof(request)) {
      iov.clear();
      for (uint32_t index : groups[request[0]]) {
        const std::string& b = (*blocks_)[index];
        iov.push_back(iovec{const_cast<char*>(b.data()), b.size()});
      }
      size_t total = 0;
      for (const iovec& v : iov) total += v.iov_len;
      size_t sent = 0;
      size_t first = 0;
      while (sent < total) {
        ssize_t n = writev(fd, iov.data() + first, iov.size() - first);
        if (n <= 0) return;
        sent += n;
        while (first < iov.size() && static_cast<size_t>(n) >= iov[first].iov_len) {
          n -= iov[first].iov_len;
          ++first;
        }
        if (first < iov.size()) {
          iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + n;
          iov[first].iov_len -= n;
        }
      }
    }
    close(fd);
  }

  const std::vector<std::string>* blocks_;
  int listen_fd_;
  int port_;
};

}  // namespace

int main(int argc, char** argv) {
  psa::TuneMallocForLargeMessages();  // as psa-kv-service does; the server runs here
  psa::ParseFlags(
      argc, argv,
      "KV fetch over the KV service's gRPC stream vs raw loopback TCP, same bytes.\n"
      "Usage: psa_kv_fetch_bench [--groups=4,16,64] [--outstanding=1,4,16,64]");
  const std::vector<int> group_sizes = ParseList(absl::GetFlag(FLAGS_groups));
  const std::vector<int> outstandings = ParseList(absl::GetFlag(FLAGS_outstanding));
  const int num_blocks = absl::GetFlag(FLAGS_blocks);
  const psa::v1::KvLayout layout = psa::testing::ModelShapedLayout("bench", /*layers=*/1);

  // The gRPC side: a real KV service on loopback, filled through the client.
  psa::metrics::Registry registry;
  psa::BlockStore store(psa::BlockStore::Options{4ull << 30});
  psa::KvServiceImpl service(&store, &registry, kMaxMessage);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxMessage);
  builder.SetMaxSendMessageSize(kMaxMessage);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  psa::KvClientOptions options;
  options.shards = {absl::GetFlag(FLAGS_kv_address).empty()
                        ? "127.0.0.1:" + std::to_string(port)
                        : absl::GetFlag(FLAGS_kv_address)};
  options.max_outstanding_fetches = 1024;
  options.fetch_connections = absl::GetFlag(FLAGS_connections);
  options.max_message_bytes = kMaxMessage;
  auto client = psa::KvClient::Connect(options);
  std::vector<psa::v1::KvBlock> blocks;
  std::vector<std::string> raw_blocks;
  for (int i = 0; i < num_blocks; ++i) {
    blocks.push_back(psa::testing::MakeBlock(layout, 0, i, 1));
    raw_blocks.push_back(blocks.back().data());
  }
  (void)(*client)->Release("bench");  // a reused external server may hold it
  if (!client.ok() || !(*client)->Open("bench", layout).ok() ||
      !(*client)->Write("bench", blocks).ok()) {
    std::fprintf(stderr, "could not fill the KV service\n");
    return 1;
  }
  const size_t block_bytes = raw_blocks[0].size();
  RawTcp raw(&raw_blocks);

  // The TLS side: the same store behind a mutual-TLS port, its own client.
  std::unique_ptr<grpc::Server> tls_server;
  std::unique_ptr<psa::KvClient> tls_client;
  if (absl::GetFlag(FLAGS_tls)) {
    const std::string dir = absl::StrCat("/tmp/psa-kv-bench-tls-", getpid());
    const std::string script = absl::StrCat(
        "set -e; rm -rf ", dir, "; mkdir -p ", dir, "; cd ", dir, "\n",
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=ca -keyout ca.key "
        "-out ca.pem 2>/dev/null\n",
        "for who in server client; do openssl req -newkey rsa:2048 -nodes -subj /CN=$who "
        "-keyout $who.key -out $who.csr 2>/dev/null; printf 'subjectAltName=IP:127.0.0.1\\n' "
        "> san.ext; openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
        "-days 1 -extfile san.ext -out $who.pem 2>/dev/null; done\n");
    if (std::system(script.c_str()) != 0) {
      std::fprintf(stderr, "--tls: openssl could not make certificates in %s\n", dir.c_str());
      return 1;
    }
    auto server_creds = psa::ServerCredentials(
        {dir + "/ca.pem", dir + "/server.pem", dir + "/server.key", "--tls_"});
    auto client_creds = psa::ChannelCredentials(
        {dir + "/ca.pem", dir + "/client.pem", dir + "/client.key", "--kv_tls_"});
    if (!server_creds.ok() || !client_creds.ok()) {
      std::fprintf(stderr, "--tls: %s %s\n", server_creds.status().ToString().c_str(),
                   client_creds.status().ToString().c_str());
      return 1;
    }
    grpc::ServerBuilder tls_builder;
    int tls_port = 0;
    tls_builder.AddListeningPort("127.0.0.1:0", *server_creds, &tls_port);
    tls_builder.SetMaxReceiveMessageSize(kMaxMessage);
    tls_builder.SetMaxSendMessageSize(kMaxMessage);
    tls_builder.RegisterService(&service);
    tls_server = tls_builder.BuildAndStart();
    psa::KvClientOptions tls_options = options;
    tls_options.shards = {"127.0.0.1:" + std::to_string(tls_port)};
    tls_options.credentials = *client_creds;
    auto c = psa::KvClient::Connect(tls_options);
    if (!c.ok()) {
      std::fprintf(stderr, "--tls: %s\n", c.status().ToString().c_str());
      return 1;
    }
    tls_client = std::move(*c);
  }

  std::printf("KV fetch, %zu-byte blocks, best of %d runs of %.1f s (gRPC = KV service "
              "stream, %d connections; TCP = one raw socket)\n",
              block_bytes, absl::GetFlag(FLAGS_reps), absl::GetFlag(FLAGS_seconds),
              options.fetch_connections);
  std::printf("%6s %5s | %9s %8s %8s | %9s %8s %8s | %6s", "group", "outst", "gRPC GB/s",
              "p50 ms", "p99 ms", "TCP GB/s", "p50 ms", "p99 ms", "ratio");
  if (tls_client) std::printf(" | %9s %8s %8s | %6s", "TLS GB/s", "p50 ms", "p99 ms", "TLS/gRPC");
  std::printf("\n");
  FILE* csv = nullptr;
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    csv = std::fopen(absl::GetFlag(FLAGS_csv).c_str(), "w");
    std::fprintf(csv, "group_blocks,outstanding,grpc_gbps,grpc_p50_ms,grpc_p99_ms,"
                      "tcp_gbps,tcp_p50_ms,tcp_p99_ms,ratio%s\n",
                 tls_client ? ",tls_gbps,tls_p50_ms,tls_p99_ms,tls_over_grpc" : "");
  }
  for (int group : group_sizes) {
    const auto groups = MakeGroups(group, num_blocks, 256);
    for (int outstanding : outstandings) {
      std::atomic<int> errors{0};
      auto run_grpc = [&](psa::KvClient* kv) {
        return Drive(outstanding, group * block_bytes, [&, kv](uint64_t i, auto done) {
        absl::Status s = kv->FetchAsync(
            "bench", 0, groups[i % groups.size()], absl::InfiniteFuture(),
            [&errors, done](absl::Status status, psa::FetchedBlocks) {
              if (!status.ok()) ++errors;
              done();
            });
        if (!s.ok()) {
          ++errors;
          done();
        }
        });
      };
      Result g, t, s;
      for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
        Result r = run_grpc(client->get());
        if (r.gbps > g.gbps) g = r;
        if (tls_client) {
          r = run_grpc(tls_client.get());
          if (r.gbps > s.gbps) s = r;
        }
        if (absl::GetFlag(FLAGS_tcp)) {
          r = raw.Run(groups, outstanding);
          if (r.gbps > t.gbps) t = r;
        }
      }
      if (errors > 0) std::fprintf(stderr, "%d gRPC fetches failed\n", errors.load());
      const double ratio = t.gbps > 0 ? g.gbps / t.gbps : 0;
      std::printf("%6d %5d | %9.2f %8.3f %8.3f | %9.2f %8.3f %8.3f | %6.2f", group,
                  outstanding, g.gbps, g.p50_ms, g.p99_ms, t.gbps, t.p50_ms, t.p99_ms, ratio);
      if (tls_client) {
        std::printf(" | %9.2f %8.3f %8.3f | %6.2f", s.gbps, s.p50_ms, s.p99_ms,
                    g.gbps > 0 ? s.gbps / g.gbps : 0);
      }
      std::printf("\n");
      std::fflush(stdout);
      if (csv) {
        std::fprintf(csv, "%d,%d,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f", group, outstanding,
                     g.gbps, g.p50_ms, g.p99_ms, t.gbps, t.p50_ms, t.p99_ms, ratio);
        if (tls_client) {
          std::fprintf(csv, ",%.4f,%.4f,%.4f,%.4f", s.gbps, s.p50_ms, s.p99_ms,
                       g.gbps > 0 ? s.gbps / g.gbps : 0);
        }
        std::fprintf(csv, "\n");
      }
    }
  }
  if (csv) std::fclose(csv);
  client->reset();
  tls_client.reset();
  server->Shutdown();
  if (tls_server) tls_server->Shutdown();
  return 0;
}

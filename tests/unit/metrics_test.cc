#include "common/metrics.h"

#include "common/byte_size.h"
#include "common/metrics_http_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/http_get.h"

namespace psa::metrics {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, TextExposition) {
  Registry registry;
  auto& requests = registry.AddCounter("psa_test_requests_total", "Requests by code");
  requests.Add({{"code", "OK"}, {"method", "Get"}}).Increment(3);
  requests.Add({{"code", "OK"}, {"method", "Get"}}).Increment();
  requests.Add({{"code", "OK"}, {"method", "Get"}}).Increment(-5);  // ignored
  auto& bytes = registry.AddGauge("psa_test_bytes", "Bytes held").Add();
  bytes.Set(1073741824);
  bytes.Add(-24);
  registry.AddGauge("psa_test_label", "Escaping").Add({{"v", "a\"b\\c\nd"}}).Set(0.25);
  auto& latency =
      registry.AddHistogram("psa_test_seconds", "Latency", {0.1, 1.0}).Add({{"m", "x"}});
  latency.Observe(0.05);
  latency.Observe(0.1);  // bounds are inclusive ("le")
  latency.Observe(0.5);
  latency.Observe(7);
  int collected = 0;
  registry.AddCollector([&] { ++collected; });

  const std::string text = registry.Serialize();
  EXPECT_EQ(collected, 1);
  EXPECT_THAT(text, HasSubstr("# HELP psa_test_requests_total Requests by code\n"
                              "# TYPE psa_test_requests_total counter\n"
                              "psa_test_requests_total{code=\"OK\",method=\"Get\"} 4\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE psa_test_bytes gauge\npsa_test_bytes 1073741800\n"));
  EXPECT_THAT(text, HasSubstr("psa_test_label{v=\"a\\\"b\\\\c\\nd\"} 0.25\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE psa_test_seconds histogram\n"
                              "psa_test_seconds_bucket{m=\"x\",le=\"0.1\"} 2\n"
                              "psa_test_seconds_bucket{m=\"x\",le=\"1\"} 3\n"
                              "psa_test_seconds_bucket{m=\"x\",le=\"+Inf\"} 4\n"
                              "psa_test_seconds_sum{m=\"x\"} 7.65\n"
                              "psa_test_seconds_count{m=\"x\"} 4\n"));
}

TEST(MetricsTest, HttpServerServesMetricsAndHealth) {
  Registry registry;
  registry.AddCounter("psa_test_scrapes_total", "x").Add().Increment(2);
  auto server = MetricsHttpServer::Start(&registry, "127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  auto body = psa::HttpGet((*server)->port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(psa::MetricValue(*body, "psa_test_scrapes_total"), 2);
  EXPECT_EQ(*psa::HttpGet((*server)->port(), "/healthz"), "ok\n");
  // /readyz: 503 until marked ready, and again once draining.
  EXPECT_FALSE(psa::HttpGet((*server)->port(), "/readyz").ok());
  (*server)->SetReady(true);
  EXPECT_EQ(*psa::HttpGet((*server)->port(), "/readyz"), "ready\n");
  (*server)->SetReady(false);
  EXPECT_FALSE(psa::HttpGet((*server)->port(), "/readyz").ok());
  EXPECT_FALSE(psa::HttpGet((*server)->port(), "/nope").ok());
  EXPECT_EQ(MetricsHttpServer::Start(&registry, "not-an-ip", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The port is taken now.
  EXPECT_EQ(MetricsHttpServer::Start(&registry, "127.0.0.1", (*server)->port()).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(MetricsTest, RemoveDeletesOneSeriesFromTheExposition) {
  Registry registry;
  auto& healthy = registry.AddGauge("psa_test_worker_healthy", "Per worker");
  healthy.Add({{"worker", "10.0.0.1:7200"}}).Set(1);
  healthy.Add({{"worker", "10.0.0.2:7200"}}).Set(0);
  auto& latency = registry.AddHistogram("psa_test_worker_seconds", "Per worker", {1.0});
  latency.Add({{"worker", "10.0.0.2:7200"}}).Observe(0.5);
  auto server = MetricsHttpServer::Start(&registry, "127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string gone = "psa_test_worker_healthy{worker=\"10.0.0.2:7200\"}";
  EXPECT_EQ(psa::MetricValue(*psa::HttpGet((*server)->port(), "/metrics"), gone), 0);

  EXPECT_TRUE(healthy.Remove({{"worker", "10.0.0.2:7200"}}));
  EXPECT_FALSE(healthy.Remove({{"worker", "10.0.0.2:7200"}}));  // already gone
  EXPECT_FALSE(healthy.Remove({{"worker", "10.0.0.9:7200"}}));  // never there
  EXPECT_TRUE(latency.Remove({{"worker", "10.0.0.2:7200"}}));
  EXPECT_EQ(healthy.size(), 1u);
  EXPECT_EQ(latency.size(), 0u);
  const std::string text = *psa::HttpGet((*server)->port(), "/metrics");
  EXPECT_THAT(text, ::testing::Not(HasSubstr("10.0.0.2")));
  EXPECT_EQ(psa::MetricValue(text, gone), -1);  // absent, not 0
  EXPECT_EQ(psa::MetricValue(text, "psa_test_worker_healthy{worker=\"10.0.0.1:7200\"}"), 1);
  EXPECT_THAT(text, HasSubstr("# TYPE psa_test_worker_seconds histogram\n"));

  // Adding the labels again starts a new series from zero.
  EXPECT_EQ(healthy.Add({{"worker", "10.0.0.2:7200"}}).Value(), 0);
  std::vector<uint64_t> cumulative;
  double sum = -1;
  uint64_t count = 1;
  latency.Add({{"worker", "10.0.0.2:7200"}}).Snapshot(&cumulative, &sum, &count);
  EXPECT_EQ(count, 0u);
  EXPECT_EQ(sum, 0);
}

TEST(ByteSizeTest, ParsesUnitsAndRejectsGarbage) {
  EXPECT_EQ(*ParseByteSize("1234"), 1234u);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseByteSize(" 8 GiB "), 8ull << 30);
  EXPECT_EQ(*ParseByteSize("2gb"), 2000000000u);
  EXPECT_EQ(*ParseByteSize("64k"), 64000u);
  EXPECT_FALSE(ParseByteSize("").ok());
  EXPECT_FALSE(ParseByteSize("GiB").ok());
  EXPECT_FALSE(ParseByteSize("-5").ok());
  EXPECT_FALSE(ParseByteSize("1.5GiB").ok());
  EXPECT_FALSE(ParseByteSize("99999999999TiB").ok());
  EXPECT_EQ(FormatByteSize(1536ull << 20), "1.5 GiB");
  EXPECT_EQ(FormatByteSize(100), "100 B");
}

}  // namespace
}  // namespace psa::metrics

// GenerateStreamWriter: the server side of a psa.v1.Generation stream, for
// the worker and the router alike. Producers push messages from any thread
// and never wait: what arrives while a write is in flight is merged into the
// next message (token ids appended, text concatenated, finish and usage
// kept). Close() finishes the call once everything pushed is written.
//
// Lifetime: one reference for gRPC (dropped at OnDone) plus `producers`
// references, each dropped with Unref(); the last one deletes the writer.
#ifndef PSA_API_GENERATE_STREAM_WRITER_H_
#define PSA_API_GENERATE_STREAM_WRITER_H_

#include "absl/synchronization/mutex.h"
#include "proto/psa/v1/generation.pb.h"
#include "grpcpp/support/server_callback.h"

namespace psa {

class GenerateStreamWriter : public grpc::ServerWriteReactor<psa::v1::GenerateResponse> {
 protected:
  explicit GenerateStreamWriter(int producers) : refs_(producers + 1) {}
  virtual ~GenerateStreamWriter() = default;

  void Push(const psa::v1::GenerateResponse& message);
  void Close(const grpc::Status& status);
  void Unref();
  // The client cancelled or stopped reading: stop producing. Runs without
  // the writer's lock held; may run more than once.
  virtual void OnClientGone() {}

 private:
  void OnWriteDone(bool ok) final;
  void OnCancel() final { OnClientGone(); }
  void OnDone() final { Unref(); }
  // Starts the next write, or finishes once everything is sent.
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  int refs_ ABSL_GUARDED_BY(mu_);
  psa::v1::GenerateResponse pending_ ABSL_GUARDED_BY(mu_);
  psa::v1::GenerateResponse in_flight_ ABSL_GUARDED_BY(mu_);
  bool has_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace psa

#endif  // PSA_API_GENERATE_STREAM_WRITER_H_

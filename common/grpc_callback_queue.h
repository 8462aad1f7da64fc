// PinGrpcCallbackQueue: keeps gRPC's process-wide callback completion queue
// alive until the process exits.
//
// gRPC (1.51 here, with the iomgr-backed engine) serves the callback API
// from one global completion queue, reference counted by the channels that
// used it: when the last such channel is destroyed, gRPC shuts the queue
// down and deletes it while its own polling threads may still touch it, and
// the process aborts (`ref_counted.h: assertion failed: prior > 0`). A
// process that destroys its last callback-API channel and later makes
// another (tests between cases; a router whose workers all went away)
// runs that teardown repeatedly. Holding one channel that used the queue
// for the process's lifetime keeps the count above zero.
//
// Call once, early (repeat calls do nothing). Blocks for at most ~1 s.
#ifndef PSA_COMMON_GRPC_CALLBACK_QUEUE_H_
#define PSA_COMMON_GRPC_CALLBACK_QUEUE_H_

namespace psa {

void PinGrpcCallbackQueue();

}  // namespace psa

#endif  // PSA_COMMON_GRPC_CALLBACK_QUEUE_H_

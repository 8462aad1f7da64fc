"""Typed errors carrying the server's status code and message."""
import grpc


class PsaError(Exception):
    """A failed call. `code` is the grpc.StatusCode, str() the server's message."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code


class InvalidArgument(PsaError):
    """The request is malformed; the message says what to fix."""


class ResourceExhausted(PsaError):
    """The server is at capacity; retry after `retry_after` seconds."""

    def __init__(self, message: str, code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                 retry_after: float = 1.0):
        super().__init__(message, code)
        self.retry_after = retry_after


class Unavailable(PsaError):
    """No server answered (down, unreachable, or shutting down)."""


class DeadlineExceeded(PsaError):
    """The call's timeout passed."""


class Cancelled(PsaError):
    """The call was cancelled."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(e: grpc.RpcError, target: str) -> PsaError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    cls = _BY_CODE.get(code, PsaError)
    message = f"{code.name}: {details} (server {target})"
    if cls is ResourceExhausted:
        retry_after = 1.0
        for key, value in (e.trailing_metadata() or ()):
            if key == "retry-after-ms":
                retry_after = int(value) / 1000.0
        return ResourceExhausted(message, code, retry_after)
    return cls(message, code)

"""Python client for PSA-Serve.

    from psa_serve import Client

    with Client("localhost:7000") as client:
        for chunk in client.generate("Why is the sky blue?", max_tokens=64):
            print(chunk.text, end="", flush=True)
        print(client.complete(chat=[("user", "Hi!")]).text)

Errors raise psa_serve.PsaError subclasses (InvalidArgument, ResourceExhausted,
Unavailable, DeadlineExceeded, Cancelled, ...) carrying the server's message.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_gen"))
from psa.v1 import generation_pb2 as pb  # noqa: E402
from psa.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

from psa_serve.errors import (  # noqa: E402,F401
    Cancelled, DeadlineExceeded, InvalidArgument, PsaError, ResourceExhausted, Unavailable,
    from_rpc_error)

__all__ = ["Client", "Chunk", "Completion", "Usage", "PsaError", "InvalidArgument",
           "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Cancelled"]

_ATTENTION = {None: pb.AttentionPolicy.KIND_DEFAULT, "dense": pb.AttentionPolicy.KIND_DENSE,
              "topk": pb.AttentionPolicy.KIND_TOPK, "psa": pb.AttentionPolicy.KIND_PSA}

# Retried by gRPC on UNAVAILABLE until the first message arrives, so a retry
# never duplicates tokens.
_SERVICE_CONFIG = """{"methodConfig": [{"name": [{"service": "psa.v1.Generation"}],
  "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    kv_blocks_touched: int = 0
    kv_blocks_total: int = 0
    attention: str = ""

    @property
    def kv_fraction(self) -> float:
        """KV blocks attention read over what dense attention would read."""
        return self.kv_blocks_touched / self.kv_blocks_total if self.kv_blocks_total else 1.0


@dataclass
class Chunk:
    text: str
    token_ids: List[int]
    finish_reason: Optional[str] = None  # set on the last chunk
    usage: Optional[Usage] = None        # set on the last chunk


@dataclass
class Completion:
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: Usage = field(default_factory=Usage)


def _usage(u) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.time_to_first_token_seconds,
                 u.total_seconds, u.kv_blocks_touched, u.kv_blocks_total, u.attention)


class Client:
    """A connection to a PSA-Serve router (or worker). Thread-safe."""

    def __init__(self, target: str = "localhost:7000", *, timeout: float = 300.0,
                 tls: bool = False, root_certificates: Optional[bytes] = None,
                 api_key: Optional[str] = None):
        """api_key: for a router started with --api_keys_file, sent as
        "authorization: Bearer KEY" on every call."""
        if not target:
            raise InvalidArgument("no target given (host:port)")
        options = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.target = target

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: Optional[str] = None, *,
                 chat: Optional[Sequence[Tuple[str, str]]] = None,
                 token_ids: Optional[Iterable[int]] = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: Sequence[str] = (), ignore_eos: bool = False,
                 attention: Optional[str] = None, epsilon: float = 0.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0,
                 timeout: Optional[float] = None) -> Iterator[Chunk]:
        """Streams a generation. Give exactly one of prompt (raw text), chat
        ((role, content) pairs, formatted with the model's template) or
        token_ids. Closing the iterator early cancels the generation.

        Penalties against repeating (all off by default, as in OpenAI and
        vLLM): repetition_penalty (vLLM's, > 0; 1: off; 1.1-1.2 curbs loops)
        divides the positive logits and multiplies the negative ones of every
        prompt or generated token; frequency_penalty and presence_penalty
        (OpenAI's, in [-2, 2]; 0: off) lower a generated token's logit per
        occurrence and once, respectively."""
        request = self._request(prompt, chat, token_ids, max_tokens, temperature, top_k, top_p,
                                seed, stop, ignore_eos, attention, epsilon, repetition_penalty,
                                frequency_penalty, presence_penalty)
        call = self._stub.Generate(request, timeout=timeout or self._timeout,
                                   metadata=self._metadata)
        try:
            for message in call:
                yield Chunk(message.text, list(message.token_ids),
                            message.finish_reason or None,
                            _usage(message.usage) if message.finish_reason else None)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from None
        finally:
            call.cancel()  # no-op once finished; stops the server otherwise

    def complete(self, prompt: Optional[str] = None, **kwargs) -> Completion:
        """generate() run to its end."""
        done = Completion()
        for chunk in self.generate(prompt, **kwargs):
            done.text += chunk.text
            done.token_ids += chunk.token_ids
            if chunk.finish_reason:
                done.finish_reason = chunk.finish_reason
                done.usage = chunk.usage
        return done

    def tokenize(self, text: str) -> List[int]:
        try:
            return list(self._stub.Tokenize(pb.TokenizeRequest(text=text), timeout=self._timeout,
                                            metadata=self._metadata).token_ids)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from None

    def model_info(self) -> "pb.ModelInfo":
        try:
            return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from None

    @staticmethod
    def _request(prompt, chat, token_ids, max_tokens, temperature, top_k, top_p, seed, stop,
                 ignore_eos, attention, epsilon, repetition_penalty=1.0, frequency_penalty=0.0,
                 presence_penalty=0.0) -> "pb.GenerateRequest":
        given = sum(x is not None for x in (prompt, chat, token_ids))
        if given != 1:
            raise InvalidArgument("give exactly one of prompt, chat or token_ids")
        if attention not in _ATTENTION:
            raise InvalidArgument(f"attention must be dense, topk or psa, not {attention!r}")
        r = pb.GenerateRequest(max_tokens=max_tokens, ignore_eos=ignore_eos, stop=list(stop))
        if prompt is not None:
            r.text = prompt
        elif chat is not None:
            for role, content in chat:
                r.chat.messages.add(role=role, content=content)
        else:
            r.token_ids.ids.extend(token_ids)
        r.sampling.temperature = temperature
        r.sampling.top_k = top_k
        r.sampling.top_p = top_p
        r.sampling.seed = seed
        r.sampling.repetition_penalty = repetition_penalty  # checked by the server
        r.sampling.frequency_penalty = frequency_penalty
        r.sampling.presence_penalty = presence_penalty
        r.attention.kind = _ATTENTION[attention]
        r.attention.epsilon = epsilon
        return r

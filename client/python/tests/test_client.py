"""The Python SDK against a live cluster (PSA_TARGET=host:port, started by
scripts/test_python_sdk.sh) and, for error paths, against nothing."""
import os

import pytest

import psa_serve
from psa_serve import Client

TARGET = os.environ.get("PSA_TARGET")
live = pytest.mark.skipif(not TARGET, reason="set PSA_TARGET to a running router")


@live
def test_streaming_matches_completion_and_usage():
    with Client(TARGET) as client:
        chunks = list(client.generate(chat=[("user", "Name a colour.")], max_tokens=12,
                                      attention="dense"))
        assert chunks[-1].finish_reason in ("eos", "length")
        streamed_ids = [t for c in chunks for t in c.token_ids]
        done = client.complete(chat=[("user", "Name a colour.")], max_tokens=12,
                               attention="dense")
        assert done.token_ids == streamed_ids  # greedy: the same both times
        assert done.text == "".join(c.text for c in chunks)
        assert done.usage.completion_tokens == len(done.token_ids)
        assert done.usage.attention == "dense"
        assert done.usage.kv_fraction == pytest.approx(1.0)


@live
def test_psa_reads_less_kv_on_a_long_prompt():
    document = " ".join(f"Item {i} is stored in box {i * 7 % 31}." for i in range(110))
    with Client(TARGET) as client:
        done = client.complete(document + "\nWhere is item 120?", max_tokens=8,
                               attention="psa", epsilon=0.8)
        assert done.usage.prompt_tokens > 800
        assert done.usage.kv_fraction < 1.0


@live
def test_tokenize_model_info_and_errors():
    with Client(TARGET) as client:
        ids = client.tokenize("hello world")
        assert ids and all(isinstance(i, int) for i in ids)
        info = client.model_info()
        assert info.num_layers > 0 and info.max_context > 0
        with pytest.raises(psa_serve.InvalidArgument, match="context limit"):
            client.complete("hi", max_tokens=10**6)
        with pytest.raises(psa_serve.InvalidArgument, match="exactly one"):
            client.complete("hi", chat=[("user", "hi")])
        # Closing the stream early cancels the generation.
        stream = client.generate("Count to one hundred:", max_tokens=200, ignore_eos=True)
        first = next(stream)
        stream.close()
        assert first.finish_reason is None


@live
def test_penalties_change_greedy_output_and_are_validated():
    poem = [("user", "Write a poem about the sea.")]
    with Client(TARGET) as client:
        plain = client.complete(chat=poem, max_tokens=40, attention="dense")
        penalized = client.complete(chat=poem, max_tokens=40, attention="dense",
                                    repetition_penalty=1.3, frequency_penalty=0.5,
                                    presence_penalty=0.2)
        assert penalized.token_ids != plain.token_ids
        neutral = client.complete(chat=poem, max_tokens=40, attention="dense",
                                  repetition_penalty=1.0, frequency_penalty=0.0)
        assert neutral.token_ids == plain.token_ids
        for field, value in (("repetition_penalty", -1.0), ("frequency_penalty", 2.5),
                             ("presence_penalty", float("nan"))):
            with pytest.raises(psa_serve.InvalidArgument, match=field):
                client.complete("hi", max_tokens=4, **{field: value})


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(psa_serve.Unavailable, match="127.0.0.1:1"):
            client.model_info()

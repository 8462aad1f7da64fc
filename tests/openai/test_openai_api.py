"""The router's OpenAI-compatible HTTP API, driven by the official `openai`
package (and curl for the SSE framing) against a live local cluster started
by scripts/test_openai_api.sh: PSA_HTTP=http://host:port, PSA_TARGET (the
router's gRPC address, for the same requests through the Python SDK) and
PSA_ROUTER_METRICS (its /metrics URL)."""
import json
import os
import re
import subprocess
import time
import urllib.request

import openai
import pytest

import psa_serve

HTTP = os.environ["PSA_HTTP"]
TARGET = os.environ["PSA_TARGET"]
METRICS = os.environ["PSA_ROUTER_METRICS"]


@pytest.fixture(scope="module")
def client():
    with openai.OpenAI(base_url=HTTP + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def metric(name):
    body = urllib.request.urlopen(METRICS, timeout=5).read().decode()
    m = re.search("^" + re.escape(name) + r" (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def test_models_lists_the_served_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert model == psa_serve.Client(TARGET).model_info().served_name
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_equals_the_grpc_answer(client, model):
    prompt = "The three primary colours are"
    done = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"attention": "dense"})
    with psa_serve.Client(TARGET) as sdk:
        want = sdk.complete(prompt, max_tokens=10, attention="dense")
    choice = done.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == "length"
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.usage.completion_tokens == 10
    assert done.usage.prompt_tokens == want.usage.prompt_tokens
    assert done.usage.total_tokens == done.usage.prompt_tokens + 10


def test_completions_default_to_16_tokens(client, model):
    done = client.completions.create(model=model, prompt="Once upon a time", temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 16


def test_chat_and_its_stream_agree(client, model):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a fruit."}]
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                          temperature=0)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    text = done.choices[0].message.content
    assert text
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == done.choices[0].finish_reason and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_content_parts_and_developer_role(client, model):
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]
    a = client.chat.completions.create(
        model=model, max_tokens=6, temperature=0,
        messages=[{"role": "developer", "content": "You are terse."},
                  {"role": "user", "content": parts}])
    b = client.chat.completions.create(
        model=model, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a fruit."}])
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_strings_end_the_text_before_them(client, model):
    prompt = "Count: one, two, three, four, five,"
    free = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    words = [w for w in re.findall(r"[a-z]+", free.choices[0].text) if len(w) > 2]
    assert words, free.choices[0].text
    stop = words[1] if len(words) > 1 else words[0]
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                    stop=[stop, "zzzz"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.index(stop)]


def test_a_seed_repeats_a_sampled_answer(client, model):
    kw = dict(model=model, prompt="My favourite animal is", max_tokens=8, temperature=1.0)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b


def test_psa_attention_as_extra_fields(client, model):
    document = " ".join(f"Item {i} is stored in box {i * 7 % 31}." for i in range(110))
    done = client.completions.create(model=model, prompt=document + "\nWhere is item 12?",
                                     max_tokens=4, temperature=0,
                                     extra_body={"attention": "psa", "psa_epsilon": 0.8})
    extra = done.model_extra["psa_attention"]
    assert extra["policy"].startswith("psa(eps=0.8")
    assert 0 < extra["kv_blocks_touched"] < extra["kv_blocks_total"]


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"attention": "sparse"}, "attention"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_fields_are_400_naming_the_field(client, model, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and param in e.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_a_prompt_over_the_context_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 9000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "context limit" in e.value.body["message"]


def test_malformed_bodies_get_openai_errors():
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"x" * (5 << 20), 413)]:
        req = urllib.request.Request(HTTP + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == status
        assert "message" in json.load(e.value)["error"]


def test_curl_sees_server_sent_events_framing(model):
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 5, "temperature": 0,
                       "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "-D", "-", HTTP + "/v1/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    head, _, events = out.replace("\r\n", "\n").partition("\n\n")
    assert re.search(r"^content-type: text/event-stream", head, re.I | re.M), head
    assert re.search(r"^transfer-encoding: chunked", head, re.I | re.M), head
    frames = [f for f in events.split("\n\n") if f and not f.startswith(":")]
    assert frames[-1] == "data: [DONE]" and events.endswith("\n\n")
    assert all(f.startswith("data: ") for f in frames)
    chunks = [json.loads(f[len("data: "):]) for f in frames[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    whole = json.loads(subprocess.run(
        ["curl", "-sS", HTTP + "/v1/completions", "-d", body.replace('"stream": true', '"stream": false')],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_a_client_disconnect_cancels_the_generation(client, model):
    cancelled = 'psa_router_requests_total{code="CANCELLED"}'
    before = metric(cancelled)
    stream = client.completions.create(model=model, prompt="Tell a long story.", max_tokens=4000,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 10
    while metric(cancelled) < before + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(cancelled) == before + 1
    assert metric("psa_router_requests_active") == 0


def test_a_client_that_gives_up_on_a_non_streamed_answer_cancels_it(client, model):
    cancelled = 'psa_router_requests_total{code="CANCELLED"}'
    before = metric(cancelled)
    # httpx keeps a timed-out connection open; closing the client closes it.
    with openai.OpenAI(base_url=HTTP + "/v1", api_key="unused", max_retries=0,
                       timeout=2.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=model, prompt="Tell a long story.",
                                         max_tokens=4000, temperature=0,
                                         extra_body={"ignore_eos": True})
    deadline = time.time() + 10
    while metric(cancelled) < before + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(cancelled) == before + 1
    assert metric("psa_router_requests_active") == 0


def test_health():
    assert urllib.request.urlopen(HTTP + "/health", timeout=5).status == 200

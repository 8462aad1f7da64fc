"""The OpenAI API and the gRPC SDK against a local cluster started with
PSA_SECURE=1 (TLS on every hop, HTTPS, an API key), by
scripts/test_openai_api.sh: PSA_HTTPS (https://host:port), PSA_TARGET (the
router's gRPC address), PSA_CA (the CA certificate) and PSA_API_KEY."""
import os
import ssl

import openai
import pytest

import psa_serve

HTTPS = os.environ["PSA_HTTPS"]
TARGET = os.environ["PSA_TARGET"]
CA = os.environ["PSA_CA"]
KEY = os.environ["PSA_API_KEY"]


def client(key=KEY, cafile=CA):
    verify = ssl.create_default_context(cafile=cafile)  # cafile None: the system's roots
    return openai.OpenAI(base_url=HTTPS + "/v1", api_key=key, max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(verify=verify))


def test_a_valid_key_over_https_works():
    with client() as c:
        model = c.models.list().data[0].id
        done = c.chat.completions.create(model=model, max_tokens=6, temperature=0,
                                         messages=[{"role": "user", "content": "Name a fruit."}])
        assert done.choices[0].message.content
        assert done.usage.completion_tokens > 0


def test_a_wrong_or_missing_key_is_401():
    with client(key="sk-wrong-0123456789abcdef") as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401
        assert e.value.body["type"] == "authentication_error"


def test_a_client_not_trusting_the_ca_fails_the_handshake():
    with client(cafile=None) as c:  # the system's roots only
        with pytest.raises(openai.APIConnectionError):
            c.models.list()


def test_the_grpc_sdk_needs_tls_and_the_key():
    ca = open(CA, "rb").read()
    with psa_serve.Client(TARGET, tls=True, root_certificates=ca, api_key=KEY) as sdk:
        assert sdk.complete("Hello", max_tokens=3).usage.completion_tokens == 3
    with psa_serve.Client(TARGET, tls=True, root_certificates=ca) as sdk:
        with pytest.raises(psa_serve.PsaError) as e:
            sdk.complete("Hello", max_tokens=3)
        assert "API key" in str(e.value)
    with psa_serve.Client(TARGET, api_key=KEY, timeout=5) as sdk:  # plaintext
        with pytest.raises(psa_serve.PsaError):
            sdk.complete("Hello", max_tokens=3)

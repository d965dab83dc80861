"""End-to-end: OpenAI's official Python SDK against a real `nself claw serve`.

The session fixture starts `fake-upstream ollama` and `nself claw serve` as
subprocesses (see conftest.py), each on a free port with a temporary data dir,
and creates a key with the CLI.

    cargo build -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python
"""

import json
import time

import openai
import pytest
from openai import OpenAI

from conftest import Stack, require_binaries

REPLY = "Hello from the fake Ollama, via the SDK test."


@pytest.fixture(scope="session")
def gw(tmp_path_factory):
    require_binaries()
    stack = Stack(tmp_path_factory.mktemp("claw"))
    try:
        ollama = stack.fake("ollama", "--reply", REPLY)
        yield stack.gateway("gateway", {"OLLAMA_BASE_URL": ollama.url}, "sdk")
    finally:
        stack.close()


def test_chat_completion(gw):
    # The README's example, as a user writes it.
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key)
    r = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hello"}]
    )
    gw.served += 1
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(gw):
    stream = gw.client().chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    gw.served += 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_embeddings_base64_default(gw):
    client = gw.client()
    # The SDK asks for base64 unless told otherwise, and decodes it to floats.
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"]
    )
    gw.served += 1
    wire = raw.http_response.json()
    assert all(isinstance(d["embedding"], str) for d in wire["data"]), "expected base64 on the wire"
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1]
    for d in r.data:
        assert len(d.embedding) > 0
        assert all(isinstance(x, float) for x in d.embedding)
        assert abs(sum(x * x for x in d.embedding) - 1.0) < 1e-3  # Ollama's are L2-normalised
    assert r.usage.prompt_tokens > 0

    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
    )
    gw.served += 1
    for b64, flt in zip(r.data, floats.data):
        assert b64.embedding == pytest.approx(flt.embedding, rel=1e-6, abs=1e-7)


def test_models_list(gw):
    ids = {m.id for m in gw.client().models.list()}
    assert {"auto", "local", "gpt-4o", "gemini-1.5-flash", "claude-3-5-sonnet"} <= ids


def test_bad_key_is_authentication_error(gw):
    client = OpenAI(base_url=f"{gw.url}/v1", api_key="sk-nself-" + "x" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_unknown_model_is_not_found(gw):
    with pytest.raises(openai.NotFoundError) as err:
        gw.client(max_retries=0).chat.completions.create(
            model="no-such-model-xyz", messages=[{"role": "user", "content": "Hi"}]
        )
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"


def test_raw_response_headers(gw):
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hello"}]
    )
    gw.served += 1
    assert raw.headers["x-nself-tier"] == "local"
    assert raw.headers["x-nself-provider"] == "ollama"
    assert raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content == REPLY

    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi")
    gw.served += 1
    assert raw.headers["x-nself-tier"] == "local"
    assert raw.headers["x-nself-provider"] == "ollama"
    assert raw.headers["x-request-id"]


def test_usage_counts_the_calls(gw):
    """Runs last (pytest keeps file order): the CLI's usage shows this key's calls."""
    gw.client().chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}])
    gw.served += 1
    deadline = time.monotonic() + 15
    while True:
        usage = json.loads(gw.cli("usage", "--key", gw.key_id, "--json"))
        mine = [k for k in usage["keys"] if k["key_id"] == gw.key_id]
        requests = mine[0]["requests"] if mine else 0
        if requests >= gw.served or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert requests >= gw.served, usage
    key = mine[0]
    assert key["name"] == "sdk"
    assert key["by_tier"]["local"]["requests"] >= gw.served
    assert key["total_tokens"] > 0

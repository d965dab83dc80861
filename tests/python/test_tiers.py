"""End-to-end: every tier, through OpenAI's official Python SDK, against a real
`nself claw serve` whose upstreams are all `fake-upstream` processes.

Two gateways share the fake OpenAI and Anthropic:
- `gw`: Ollama answers 500, so `auto` falls through to the Gemini accounts;
- `gw_paid`: Ollama and Gemini answer 500, so `auto` falls through to OpenAI.

    cargo build -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python
"""

import json
from types import SimpleNamespace

import pytest

from conftest import Stack, poll, require_binaries

OLLAMA_REPLY = "Hello from the failing fake Ollama."
GEMINI_REPLY = "Hello from the fake Gemini, via the tier test."
OPENAI_REPLY = "Hello from the fake OpenAI, via the tier test."
ANTHROPIC_REPLY = "Hello from the fake Anthropic, via the tier test."
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    require_binaries()
    stack = Stack(tmp_path_factory.mktemp("tiers"))
    try:
        ollama = stack.fake("ollama", "--reply", OLLAMA_REPLY, "--fail-status", "500")
        gemini = stack.fake("gemini", "--reply", GEMINI_REPLY)
        gemini_down = stack.fake("gemini", "--reply", GEMINI_REPLY, "--fail-status", "500")
        openai_fake = stack.fake("openai", "--reply", OPENAI_REPLY)
        anthropic = stack.fake("anthropic", "--reply", ANTHROPIC_REPLY)
        env = {
            "OLLAMA_BASE_URL": ollama.url,
            "GEMINI_API_KEYS": "k1,k2",
            "GEMINI_BASE_URL": gemini.url,
            "OPENAI_API_KEY": openai_fake.api_key,
            "OPENAI_BASE_URL": openai_fake.url,
            "ANTHROPIC_API_KEY": anthropic.api_key,
            "ANTHROPIC_BASE_URL": anthropic.url,
        }
        assert openai_fake.url.endswith("/v1")
        gw = stack.gateway("gateway", env, "tiers")
        gw_paid = stack.gateway("gateway-paid", {**env, "GEMINI_BASE_URL": gemini_down.url},
                                "tiers-paid")
        # Request ids of the `auto` calls that fell through, on `gw` and on `gw_paid`.
        yield SimpleNamespace(gw=gw, gw_paid=gw_paid, fell_through=[], fell_through_paid=[],
                              paid_served=0)
    finally:
        stack.close()


def routed(raw, tier: str, provider: str) -> None:
    assert raw.headers["x-nself-tier"] == tier, dict(raw.headers)
    assert raw.headers["x-nself-provider"] == provider, dict(raw.headers)
    assert raw.headers["x-request-id"]


def whole(client, model: str, tier: str, provider: str, reply: str):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO)
    routed(raw, tier, provider)
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reply
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    return raw


def streamed(client, model: str, tier: str, provider: str, reply: str):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=HELLO, stream=True, stream_options={"include_usage": True},
    )
    routed(raw, tier, provider)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    return raw


def test_auto_falls_through_to_gemini(tiers):
    raw = whole(tiers.gw.client(), "auto", "free_gemini", "gemini", GEMINI_REPLY)
    tiers.fell_through.append(raw.headers["x-request-id"])


def test_auto_stream_falls_through_to_gemini(tiers):
    raw = streamed(tiers.gw.client(), "auto", "free_gemini", "gemini", GEMINI_REPLY)
    tiers.fell_through.append(raw.headers["x-request-id"])


def test_gemini_model_goes_to_gemini(tiers):
    whole(tiers.gw.client(), "gemini-1.5-flash", "free_gemini", "gemini", GEMINI_REPLY)
    streamed(tiers.gw.client(), "gemini-1.5-flash", "free_gemini", "gemini", GEMINI_REPLY)


def test_gpt_4o_goes_to_openai(tiers):
    whole(tiers.gw.client(), "gpt-4o", "api_key", "openai", OPENAI_REPLY)
    streamed(tiers.gw.client(), "gpt-4o", "api_key", "openai", OPENAI_REPLY)
    tiers.paid_served += 2


def test_claude_goes_to_anthropic(tiers):
    whole(tiers.gw.client(), "claude-3-5-sonnet", "api_key", "anthropic", ANTHROPIC_REPLY)
    streamed(tiers.gw.client(), "claude-3-5-sonnet", "api_key", "anthropic", ANTHROPIC_REPLY)
    tiers.paid_served += 2


def test_embeddings_fall_through_to_openai(tiers):
    raw = tiers.gw.client().embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"]
    )
    routed(raw, "api_key", "openai")
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) > 0 for d in r.data)
    tiers.paid_served += 1


def test_auto_falls_through_to_openai_when_gemini_fails_too(tiers):
    client = tiers.gw_paid.client()
    for call in (whole, streamed):
        raw = call(client, "auto", "api_key", "openai", OPENAI_REPLY)
        tiers.fell_through_paid.append(raw.headers["x-request-id"])


def test_usage_shows_paid_tier_and_cost(tiers):
    """Runs after the calls above (pytest keeps file order)."""
    gw = tiers.gw

    def paid_usage():
        usage = json.loads(gw.cli("usage", "--key", gw.key_id, "--json"))
        mine = [k for k in usage["keys"] if k["key_id"] == gw.key_id]
        if mine and mine[0]["by_tier"]["api_key"]["requests"] >= tiers.paid_served:
            return mine[0]
        return None

    key = poll(paid_usage, f"{tiers.paid_served} api_key requests in `usage --json`")
    assert key["name"] == "tiers"
    assert key["by_tier"]["api_key"]["requests"] >= 2
    assert key["by_tier"]["free_gemini"]["requests"] >= 4
    assert key["cost_usd"] > 0
    assert key["total_tokens"] > 0


def fallbacks(gw, request_ids: list[str], per_request: int) -> list[dict]:
    """The `TierFallback` events of `request_ids`, in ledger order, once all are there."""
    def found():
        lines = gw.cli("events", "--json").splitlines()
        events = [json.loads(line)["event"] for line in lines if line.strip()]
        mine = [e for e in events if e["event_type"] == "TierFallback"
                and e["data"]["request_id"] in request_ids]
        return mine if len(mine) >= per_request * len(request_ids) else None

    return poll(found, f"TierFallback events for {request_ids}")


def test_events_record_the_fall_through(tiers):
    gw = tiers.gw
    assert len(tiers.fell_through) == 2, "run the whole module"
    events = fallbacks(gw, tiers.fell_through, 1)
    assert sorted(e["data"]["request_id"] for e in events) == sorted(tiers.fell_through)
    for e in events:
        assert e["data"]["from_tier"] == "local"
        assert e["data"]["from_provider"] == "ollama"
        assert e["data"]["to_tier"] == "free_gemini"
        assert e["data"]["reason"] == "upstream_error"
        assert e["key_id"] == gw.key_id


def test_events_record_the_whole_fall_through_chain(tiers):
    gw = tiers.gw_paid
    assert len(tiers.fell_through_paid) == 2, "run the whole module"
    events = fallbacks(gw, tiers.fell_through_paid, 2)
    for request_id in tiers.fell_through_paid:
        chain = [(e["data"]["from_tier"], e["data"]["from_provider"], e["data"]["to_tier"])
                 for e in events if e["data"]["request_id"] == request_id]
        assert chain == [("local", "ollama", "free_gemini"),
                         ("free_gemini", "gemini", "api_key")], chain

"""End-to-end: real agent clients run whole tool loops through a real `nself claw serve`, once
against each provider (Ollama, Gemini, OpenAI, Anthropic), each played by `fake-upstream`.

What it proves, for every provider (chosen by model name, see conftest.PROVIDER_MODELS, and
checked on every response's `x-nself-provider`):
- OpenAI's official Python SDK, by hand as its docs show: the model asks for `get_weather`
  (and, offered two tools, for both at once), the client runs it and sends back the
  assistant's `tool_calls` and `role: tool` results, and the model answers with them;
  `finish_reason` is `tool_calls`, then `stop`. Whole and streamed: streamed calls are
  accumulated by `index`, each call's id and name arrive in its first delta, and the
  argument fragments join into the JSON the model sent.
- The same SDK's structured output, `chat.completions.parse` and `.stream` with a pydantic
  `response_format`, parses into the model.
- LangChain (`langchain-openai`'s `ChatOpenAI.bind_tools` with a `@tool`), whole and
  streamed: invoke → `tool_calls` → `ToolMessage` → invoke.

The fakes answer a chat that offers tools with the calls scripted by `--tool-call`, and a chat
ending in tool results with `Tool results: <r1>; <r2>`. The tools return JSON objects, so that
every provider relays them alike (Gemini's function responses must be objects).

    cargo build -p nself -p claw-tests --bins
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python/test_agents.py
"""

import json
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from conftest import PROVIDER_MODELS, PROVIDERS, Routes, Stack, require_binaries, upstream_env

# What the fakes' model asks for (the fakes call only the tools a request offers)...
WEATHER_ARGS = {"city": "Zürich"}
TIME_ARGS = {"timezone": "Europe/Zurich"}
# ...and what the tools answer.
WEATHER = {"temperature_c": 22}
TIME = {"time": "12:00"}
QUESTION = "What is the weather in Zürich?"


class Weather(BaseModel):
    city: str
    temperature_c: int


# The fakes answer a JSON schema with its minimal instance: every string "text", every
# integer 7. Anthropic has no response format, so the gateway forces a tool named after the
# schema and relays its input, which the fake fills with the same instance.
WEATHER_INSTANCE = Weather(city="text", temperature_c=7)

TOOLS = {
    "get_weather": {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name."}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    "get_time": {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        },
    },
}


def run_tool(name: str, arguments: dict) -> str:
    """The client side of a call: the tools' answers, as JSON object strings."""
    if name == "get_weather":
        assert arguments == WEATHER_ARGS
        return json.dumps(WEATHER, separators=(",", ":"))
    if name == "get_time":
        assert arguments == TIME_ARGS
        return json.dumps(TIME, separators=(",", ":"))
    raise AssertionError(f"unknown tool {name}")


def results_text(names: list[str]) -> str:
    """What the fakes answer after the results of `names`' calls, in order."""
    answers = {"get_weather": WEATHER, "get_time": TIME}
    return "Tool results: " + "; ".join(
        json.dumps(answers[n], separators=(",", ":")) for n in names)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """One gateway with all four providers configured, each pointed at its fake; a request's
    model name picks the provider."""
    require_binaries()
    stack = Stack(tmp_path_factory.mktemp("agents"))
    try:
        fakes = stack.fakes(
            "--tool-call", "get_weather=" + json.dumps(WEATHER_ARGS),
            "--tool-call", "get_time=" + json.dumps(TIME_ARGS),
        )
        yield stack.gateway("gateway", upstream_env(fakes), "agents")
    finally:
        stack.close()


@pytest.fixture(params=PROVIDERS)
def via(request, gw):
    """The provider under test: its model name, and an OpenAI client whose responses are
    checked, after the test, to have all come from that provider."""
    provider = request.param
    routes = Routes()
    client = gw.client(http_client=routes.client(), max_retries=0)
    yield SimpleNamespace(provider=provider, model=PROVIDER_MODELS[provider], client=client,
                          routes=routes, gw=gw)
    assert routes.providers, "no response seen"
    assert routes.providers == [provider] * len(routes.providers), routes.providers


ONE = ["get_weather"]
BOTH = ["get_weather", "get_time"]


@pytest.mark.parametrize("offered", [ONE, BOTH], ids=["one_tool", "parallel"])
def test_openai_sdk_tool_loop(via, offered):
    tools = [TOOLS[n] for n in offered]
    messages = [{"role": "user", "content": QUESTION}]

    first = via.client.chat.completions.create(model=via.model, messages=messages, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant"
    assert not choice.message.content
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == offered
    assert all(c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == len(calls) and all(c.id for c in calls)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    # As the SDK's docs do: the assistant message as returned, then one result per call.
    messages.append(choice.message)
    for call in calls:
        result = run_tool(call.function.name, json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

    second = via.client.chat.completions.create(model=via.model, messages=messages, tools=tools)
    choice = second.choices[0]
    assert choice.message.content == results_text(offered)
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls


def accumulate(stream):
    """Text, tool calls (by index, as the SDK's docs accumulate them), finish reasons and the
    usage chunk of a streamed chat; checks each call's id and name come in its first delta
    and only there."""
    text, calls, finishes, usage = "", {}, [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            fn = delta.function
            if delta.index not in calls:
                assert delta.id, f"the first delta of call {delta.index} has no id: {delta}"
                assert fn and fn.name, f"the first delta of call {delta.index} has no name: {delta}"
                calls[delta.index] = {"id": delta.id, "name": fn.name,
                                      "arguments": fn.arguments or ""}
            else:
                assert not delta.id, f"call {delta.index}'s id repeated: {delta}"
                assert not (fn and fn.name), f"call {delta.index}'s name repeated: {delta}"
                calls[delta.index]["arguments"] += (fn.arguments or "") if fn else ""
    return text, [calls[i] for i in sorted(calls)], finishes, usage


@pytest.mark.parametrize("offered", [ONE, BOTH], ids=["one_tool", "parallel"])
def test_openai_sdk_streamed_tool_loop(via, offered):
    tools = [TOOLS[n] for n in offered]
    messages = [{"role": "user", "content": QUESTION}]

    text, calls, finishes, usage = accumulate(via.client.chat.completions.create(
        model=via.model, messages=messages, tools=tools, stream=True,
        stream_options={"include_usage": True}))
    assert text == ""
    assert finishes == ["tool_calls"]
    assert [c["name"] for c in calls] == offered
    assert len({c["id"] for c in calls}) == len(calls)
    assert usage is not None and usage.total_tokens > 0

    messages.append({
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": c["id"], "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]}}
                       for c in calls],
    })
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c["id"],
                         "content": run_tool(c["name"], json.loads(c["arguments"]))})

    text, calls, finishes, usage = accumulate(via.client.chat.completions.create(
        model=via.model, messages=messages, tools=tools, stream=True,
        stream_options={"include_usage": True}))
    assert text == results_text(offered)
    assert calls == []
    assert finishes == ["stop"]
    assert usage is not None and usage.total_tokens > 0


def test_openai_sdk_structured_output(via):
    r = via.client.chat.completions.parse(
        model=via.model, messages=[{"role": "user", "content": QUESTION}],
        response_format=Weather)
    message = r.choices[0].message
    assert message.refusal is None
    assert message.parsed == WEATHER_INSTANCE, message.content
    assert r.choices[0].finish_reason == "stop"


def test_openai_sdk_streamed_structured_output(via):
    with via.client.chat.completions.stream(
        model=via.model, messages=[{"role": "user", "content": QUESTION}],
        response_format=Weather,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == WEATHER_INSTANCE, final.choices[0].message.content
    assert final.choices[0].finish_reason == "stop"


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return run_tool("get_weather", {"city": city})


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
def test_langchain_tool_loop(via, streamed):
    llm = ChatOpenAI(base_url=f"{via.gw.url}/v1", api_key=via.gw.key, model=via.model,
                     http_client=via.routes.client(), max_retries=0, timeout=15)
    agent = llm.bind_tools([get_weather])

    def turn(messages) -> AIMessage:
        if not streamed:
            return agent.invoke(messages)
        chunks = list(agent.stream(messages))
        assert len(chunks) > 1
        whole = chunks[0]
        for chunk in chunks[1:]:
            whole += chunk  # merges tool_call_chunks by index
        return whole

    messages = [HumanMessage(QUESTION)]
    ai = turn(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", WEATHER_ARGS)]
    assert ai.tool_calls[0]["id"]
    assert not ai.invalid_tool_calls
    assert ai.response_metadata["finish_reason"] == "tool_calls"

    messages.append(ai)
    for call in ai.tool_calls:
        result = get_weather.invoke(call)  # a ToolCall in, a ToolMessage out
        assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
        messages.append(result)

    final = turn(messages)
    assert final.content == results_text(["get_weather"])
    assert not final.tool_calls
    assert final.response_metadata["finish_reason"] == "stop"

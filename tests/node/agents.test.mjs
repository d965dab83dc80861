// End-to-end: real agent clients run whole tool loops through a real `nself claw serve`, once
// against each provider (Ollama, Gemini, OpenAI, Anthropic), each played by `fake-upstream`.
//
// What it proves, for every provider (chosen by model name, see harness.mjs PROVIDER_MODELS,
// and checked on every response's `x-nself-provider`):
// - OpenAI's official Node SDK: its `chat.completions.runTools` helper runs `get_weather` and
//   gets the model's final answer, whole and streamed; and a streamed loop by hand, offered
//   two tools: calls accumulated by `index`, each call's id and name in its first delta, the
//   argument fragments joining into the model's JSON, `finish_reason` `tool_calls` then `stop`.
// - The Vercel AI SDK (`ai` with `@ai-sdk/openai-compatible`): `generateText` and `streamText`
//   with a zod-typed `tool` and multi-step (`stopWhen: stepCountIs(3)`) call the tool and
//   answer with its result.
//
// The fakes answer a chat that offers tools with the calls scripted by `--tool-call`, and a
// chat ending in tool results with `Tool results: <r1>; <r2>`. The tools return JSON objects,
// so that every provider relays them alike (Gemini's function responses must be objects).
//
//   cargo build -p nself -p claw-tests --bins
//   scripts/node-env.sh && (cd tests/node && node --test agents.test.mjs)

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";

import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, stepCountIs, streamText, tool } from "ai";
import OpenAI from "openai";
import { z } from "zod";

import { PROVIDERS, PROVIDER_MODELS, Stack, requireBinaries, upstreamEnv } from "./harness.mjs";

// What the fakes' model asks for (the fakes call only the tools a request offers)...
const WEATHER_ARGS = { city: "Zürich" };
const TIME_ARGS = { timezone: "Europe/Zurich" };
// ...and what the tools answer.
const WEATHER = { temperature_c: 22 };
const TIME = { time: "12:00" };
const QUESTION = "What is the weather in Zürich?";
const ANSWERS = { get_weather: WEATHER, get_time: TIME };

/** What the fakes answer after the results of `names`' calls, in order. */
const resultsText = (names) =>
  `Tool results: ${names.map((n) => JSON.stringify(ANSWERS[n])).join("; ")}`;

const PARAMETERS = {
  get_weather: {
    type: "object",
    properties: { city: { type: "string", description: "The city's name." } },
    required: ["city"],
    additionalProperties: false,
  },
  get_time: {
    type: "object",
    properties: { timezone: { type: "string" } },
    required: ["timezone"],
  },
};
const DESCRIPTIONS = {
  get_weather: "The current weather in a city.",
  get_time: "The current time in a time zone.",
};

/** The client side of a call: the tool's answer as a JSON object string. */
function runTool(name, args) {
  if (name === "get_weather") assert.deepEqual(args, WEATHER_ARGS);
  else if (name === "get_time") assert.deepEqual(args, TIME_ARGS);
  else assert.fail(`unknown tool ${name}`);
  return JSON.stringify(ANSWERS[name]);
}

let stack;
let gw; // { url, key, ... }

before(async () => {
  requireBinaries();
  stack = new Stack("claw-node-agents-");
  const fakes = await stack.fakes([
    "--tool-call", `get_weather=${JSON.stringify(WEATHER_ARGS)}`,
    "--tool-call", `get_time=${JSON.stringify(TIME_ARGS)}`,
  ]);
  gw = await stack.gateway(upstreamEnv(fakes), "agents");
});

after(async () => {
  if (stack) await stack.close();
});

/** A `fetch` that records each response's `x-nself-provider`; `check()` asserts they all
 * came from `provider`. */
function routes(provider) {
  const seen = [];
  return {
    fetch: async (input, init) => {
      const response = await fetch(input, init);
      seen.push(response.headers.get("x-nself-provider"));
      return response;
    },
    check(atLeast) {
      assert.ok(seen.length >= atLeast, `${seen.length} responses, expected ${atLeast}+`);
      assert.deepEqual(seen, seen.map(() => provider));
    },
  };
}

/** Text, tool calls (accumulated by index), finish reasons and usage of a streamed chat;
 * checks each call's id and name come in its first delta and only there. */
async function accumulate(stream) {
  let text = "";
  let usage = null;
  const calls = new Map();
  const finishes = [];
  for await (const chunk of stream) {
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices[0];
    if (!choice) continue;
    text += choice.delta?.content ?? "";
    if (choice.finish_reason) finishes.push(choice.finish_reason);
    for (const delta of choice.delta?.tool_calls ?? []) {
      const call = calls.get(delta.index);
      if (!call) {
        assert.ok(delta.id, `the first delta of call ${delta.index} has no id: ${JSON.stringify(delta)}`);
        assert.ok(delta.function?.name, `the first delta of call ${delta.index} has no name: ${JSON.stringify(delta)}`);
        calls.set(delta.index, {
          id: delta.id, name: delta.function.name, arguments: delta.function.arguments ?? "",
        });
      } else {
        assert.ok(!delta.id, `call ${delta.index}'s id repeated: ${JSON.stringify(delta)}`);
        assert.ok(!delta.function?.name, `call ${delta.index}'s name repeated: ${JSON.stringify(delta)}`);
        call.arguments += delta.function?.arguments ?? "";
      }
    }
  }
  const ordered = [...calls.keys()].sort((a, b) => a - b).map((i) => calls.get(i));
  return { text, calls: ordered, finishes, usage };
}

for (const provider of PROVIDERS) {
  const model = PROVIDER_MODELS[provider];

  describe(provider, () => {
    const openai = (r) => new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: gw.key, maxRetries: 0, fetch: r.fetch });

    for (const stream of [false, true]) {
      test(`openai runTools${stream ? " (streamed)" : ""} runs get_weather and answers`, async () => {
        const r = routes(provider);
        const asked = [];
        const runner = openai(r).chat.completions.runTools({
          model,
          messages: [{ role: "user", content: QUESTION }],
          stream,
          tools: [{
            type: "function",
            function: {
              name: "get_weather",
              description: DESCRIPTIONS.get_weather,
              parameters: PARAMETERS.get_weather,
              parse: JSON.parse,
              function: (args) => {
                asked.push(args);
                return WEATHER; // the runner sends JSON.stringify of it
              },
            },
          }],
        });
        assert.equal(await runner.finalContent(), resultsText(["get_weather"]));
        assert.deepEqual(asked, [WEATHER_ARGS]);
        assert.deepEqual(runner.messages.map((m) => m.role), ["user", "assistant", "tool", "assistant"]);
        const completions = runner.allChatCompletions();
        assert.deepEqual(completions.map((c) => c.choices[0].finish_reason), ["tool_calls", "stop"]);
        r.check(2);
      });
    }

    test("openai streamed tool loop by hand, two tools in parallel", async () => {
      const r = routes(provider);
      const client = openai(r);
      const names = ["get_weather", "get_time"];
      const tools = names.map((name) => ({
        type: "function",
        function: { name, description: DESCRIPTIONS[name], parameters: PARAMETERS[name] },
      }));
      const messages = [{ role: "user", content: QUESTION }];

      const first = await accumulate(await client.chat.completions.create({
        model, messages, tools, stream: true, stream_options: { include_usage: true },
      }));
      assert.equal(first.text, "");
      assert.deepEqual(first.finishes, ["tool_calls"]);
      assert.deepEqual(first.calls.map((c) => c.name), names);
      assert.equal(new Set(first.calls.map((c) => c.id)).size, names.length);
      assert.ok(first.usage?.total_tokens > 0);

      messages.push({
        role: "assistant",
        content: null,
        tool_calls: first.calls.map((c) => ({
          id: c.id, type: "function", function: { name: c.name, arguments: c.arguments },
        })),
      });
      for (const c of first.calls) {
        messages.push({ role: "tool", tool_call_id: c.id, content: runTool(c.name, JSON.parse(c.arguments)) });
      }

      const second = await accumulate(await client.chat.completions.create({
        model, messages, tools, stream: true, stream_options: { include_usage: true },
      }));
      assert.equal(second.text, resultsText(names));
      assert.deepEqual(second.calls, []);
      assert.deepEqual(second.finishes, ["stop"]);
      assert.ok(second.usage?.total_tokens > 0);
      r.check(2);
    });

    const aiSdk = (r) => createOpenAICompatible({
      name: "claw", baseURL: `${gw.url}/v1`, apiKey: gw.key, includeUsage: true, fetch: r.fetch,
    });
    const weatherTool = (asked) => tool({
      description: DESCRIPTIONS.get_weather,
      inputSchema: z.object({ city: z.string().describe("The city's name.") }),
      execute: async (input) => {
        asked.push(input);
        return WEATHER;
      },
    });

    /** Two steps: the call of get_weather with its result, then the answer. */
    function checkSteps(steps, asked) {
      assert.equal(steps.length, 2);
      assert.equal(steps[0].finishReason, "tool-calls");
      assert.deepEqual(steps[0].toolCalls.map((c) => [c.toolName, c.input]), [["get_weather", WEATHER_ARGS]]);
      assert.ok(steps[0].toolCalls[0].toolCallId);
      assert.deepEqual(steps[0].toolResults.map((t) => t.output), [WEATHER]);
      assert.equal(steps[1].finishReason, "stop");
      assert.deepEqual(steps[1].toolCalls, []);
      assert.deepEqual(asked, [WEATHER_ARGS]);
    }

    test("ai generateText: multi-step tool call, then the answer", async () => {
      const r = routes(provider);
      const asked = [];
      const result = await generateText({
        model: aiSdk(r)(model),
        tools: { get_weather: weatherTool(asked) },
        stopWhen: stepCountIs(3),
        maxRetries: 0,
        prompt: QUESTION,
      });
      assert.equal(result.text, resultsText(["get_weather"]));
      assert.equal(result.finishReason, "stop");
      checkSteps(result.steps, asked);
      assert.ok(result.totalUsage.totalTokens > 0);
      r.check(2);
    });

    test("ai streamText: multi-step tool call, then the answer", async () => {
      const r = routes(provider);
      const asked = [];
      const errors = [];
      const result = streamText({
        model: aiSdk(r)(model),
        tools: { get_weather: weatherTool(asked) },
        stopWhen: stepCountIs(3),
        maxRetries: 0,
        prompt: QUESTION,
        onError: ({ error }) => errors.push(error),
      });
      const parts = [];
      for await (const part of result.fullStream) parts.push(part.type);
      assert.deepEqual(errors, []);
      assert.equal(await result.text, resultsText(["get_weather"]));
      assert.equal(await result.finishReason, "stop");
      checkSteps(await result.steps, asked);
      assert.equal(parts.filter((t) => t === "tool-call").length, 1);
      assert.equal(parts.filter((t) => t === "tool-result").length, 1);
      assert.ok((await result.totalUsage).totalTokens > 0);
      r.check(2);
    });
  });
}

// End-to-end: OpenAI's official Node SDK against a real `nself claw serve`.
//
// `before()` starts `fake-upstream ollama`, `fake-upstream openai` and `nself claw serve` as
// child processes (binaries from $CLAW_BIN_DIR, default <repo>/target/debug; see harness.mjs),
// each on a free port with a temporary data dir, and creates a key with the CLI. `after()`
// stops them all.
//
//   cargo build -p nself -p claw-tests
//   scripts/node-env.sh && (cd tests/node && node --test)

import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import OpenAI from "openai";

import { Stack, requireBinaries, upstreamEnv } from "./harness.mjs";

const OLLAMA_REPLY = "Hello from the fake Ollama, via the Node SDK test.";
const OPENAI_REPLY = "Hello from the fake OpenAI, via the Node SDK test.";

let stack;
let url; // the gateway, e.g. http://127.0.0.1:PORT
let key; // a gateway key made with the CLI
let cli; // `nself claw api --url URL ...args`, resolving to its stdout

before(async () => {
  requireBinaries();
  stack = new Stack("claw-node-");
  const ollama = await stack.fake("ollama", ["--reply", OLLAMA_REPLY]);
  const openai = await stack.fake("openai", ["--reply", OPENAI_REPLY]);
  const gw = await stack.gateway(upstreamEnv({ ollama, openai }), "node");
  ({ url, key, cli } = gw);
});

after(async () => {
  if (stack) await stack.close();
});

test("the seed's example: chat completion with model auto", async () => {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: key });
  const r = await client.chat.completions.create({
    model: "auto",
    messages: [{ role: "user", content: "Hello" }],
  });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices[0].message.role, "assistant");
  assert.equal(r.choices[0].message.content, OLLAMA_REPLY);
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.ok(r.usage.total_tokens > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
});

test("streaming concatenates to the reply and ends with usage", async () => {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: key });
  const stream = await client.chat.completions.create({
    model: "auto",
    messages: [{ role: "user", content: "Hello" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  let text = "";
  for await (const chunk of stream) {
    chunks.push(chunk);
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.equal(text, OLLAMA_REPLY);
  assert.ok(chunks.every((c) => c.object === "chat.completion.chunk"));
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
  const withChoices = chunks.filter((c) => c.choices.length > 0);
  assert.equal(withChoices.at(-1).choices[0].finish_reason, "stop");
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.ok(last.usage && last.usage.total_tokens > 0);
  assert.ok(chunks.slice(0, -1).every((c) => c.usage == null));
});

test("an OpenAI-routed model (gpt-4o) is answered by OpenAI", async () => {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: key });
  const { data, response } = await client.chat.completions
    .create({ model: "gpt-4o", messages: [{ role: "user", content: "Hello" }] })
    .withResponse();
  assert.equal(response.headers.get("x-nself-tier"), "api_key");
  assert.equal(response.headers.get("x-nself-provider"), "openai");
  assert.ok(response.headers.get("x-request-id"));
  assert.equal(data.choices[0].message.content, OPENAI_REPLY);

  const stream = await client.chat.completions.create({
    model: "gpt-4o",
    messages: [{ role: "user", content: "Hello" }],
    stream: true,
  });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  assert.equal(text, OPENAI_REPLY);
});

test("a bad key throws OpenAI.AuthenticationError", async () => {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: `sk-nself-${"x".repeat(40)}`, maxRetries: 0 });
  await assert.rejects(
    client.chat.completions.create({ model: "auto", messages: [{ role: "user", content: "Hi" }] }),
    (err) => {
      assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err}`);
      assert.equal(err.status, 401);
      assert.equal(err.code, "invalid_api_key");
      return true;
    },
  );
});

test("an unknown model throws OpenAI.NotFoundError", async () => {
  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: key, maxRetries: 0 });
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model-xyz", messages: [{ role: "user", content: "Hi" }] }),
    (err) => {
      assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err}`);
      assert.equal(err.status, 404);
      assert.equal(err.code, "model_not_found");
      return true;
    },
  );
});

test("embeddings: the SDK's default base64 decodes to floats", async () => {
  const sent = [];
  const client = new OpenAI({
    baseURL: `${url}/v1`,
    apiKey: key,
    fetch: (input, init) => {
      sent.push(JSON.parse(init.body));
      return fetch(input, init);
    },
  });
  const r = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
  assert.equal(sent[0].encoding_format, "base64", "the SDK asks for base64 unless told otherwise");
  assert.deepEqual(r.data.map((d) => d.index), [0, 1]);
  for (const d of r.data) {
    assert.ok(Array.isArray(d.embedding) && d.embedding.length > 0);
    assert.ok(d.embedding.every((x) => typeof x === "number" && Number.isFinite(x)));
    const norm = d.embedding.reduce((s, x) => s + x * x, 0);
    assert.ok(Math.abs(norm - 1) < 1e-3, `not L2-normalised: ${norm}`);
  }
  assert.ok(r.usage.prompt_tokens > 0);

  const floats = await client.embeddings.create({
    model: "text-embedding-3-small", input: ["a", "b"], encoding_format: "float",
  });
  for (const [i, d] of floats.data.entries()) {
    d.embedding.forEach((x, j) => assert.ok(Math.abs(x - r.data[i].embedding[j]) < 1e-6));
  }
});

test("the CLI's usage counts this key's calls", async () => {
  const deadline = Date.now() + 15_000;
  let mine;
  for (;;) {
    const usage = JSON.parse(await cli("usage", "--json"));
    mine = usage.keys.find((k) => k.name === "node");
    // 2 local chats + 2 OpenAI chats + 2 embeddings, all served.
    if ((mine?.requests ?? 0) >= 6 || Date.now() > deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.ok(mine && mine.requests >= 6, JSON.stringify(mine));
  assert.ok(mine.by_tier.api_key.requests >= 2);
  assert.ok(mine.by_tier.local.requests >= 4);
});

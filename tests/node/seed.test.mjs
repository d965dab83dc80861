// End-to-end: OpenAI's official Node SDK against a real `nself claw serve`.
//
// `before()` starts `fake-upstream ollama`, `fake-upstream openai` and `nself claw serve` as
// child processes (binaries from $CLAW_BIN_DIR, default <repo>/target/debug), each on a free
// port with a temporary data dir, and creates a key with the CLI. `after()` stops them all.
//
//   cargo build -p nself -p claw-tests
//   scripts/node-env.sh && (cd tests/node && node --test)

import { spawn, execFile } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, mkdirSync, openSync, closeSync, readFileSync, rmSync, existsSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import OpenAI from "openai";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN_DIR = path.resolve(process.env.CLAW_BIN_DIR ?? path.join(REPO, "target", "debug"));
const SECRET = "node-sdk-test-secret";
const OLLAMA_REPLY = "Hello from the fake Ollama, via the Node SDK test.";
const OPENAI_REPLY = "Hello from the fake OpenAI, via the Node SDK test.";
const STARTUP_DEADLINE_MS = 30_000;
// Provider settings the gateway must not pick up from the caller's shell.
const HERMETIC_UNSET = [
  "GEMINI_API_KEYS", "GEMINI_BASE_URL", "GEMINI_MODEL",
  "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_EMBED_MODEL",
  "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
  "OLLAMA_MODEL", "OLLAMA_EMBED_MODEL", "OLLAMA_MAX_INFLIGHT",
  "CLAW_KAFKA_BROKERS", "CLAW_DATABASE_URL", "NSELF_CLAW_URL",
];

const children = [];
let tmp;
let url; // the gateway, e.g. http://127.0.0.1:PORT
let key; // a gateway key made with the CLI

// Last resort if the runner exits without `after()` (e.g. a crash): no orphans.
process.on("exit", () => {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
});

function withDeadline(promise, deadline, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: deadline passed`)),
      Math.max(0, deadline - Date.now()),
    );
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A free TCP port on 127.0.0.1. */
async function freePort() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

/** Starts `fake-upstream PROVIDER --listen 127.0.0.1:0 ARGS…`; resolves to its URL and key. */
async function startFake(provider, args, deadline) {
  const child = spawn(path.join(BIN_DIR, "fake-upstream"),
    [provider, "--listen", "127.0.0.1:0", ...args],
    { stdio: ["ignore", "pipe", "inherit"] });
  children.push(child);
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const nextLine = async () => {
    const { value, done } = await withDeadline(lines.next(), deadline, `fake-upstream ${provider}`);
    assert.ok(!done, `fake-upstream ${provider} exited (code ${child.exitCode})`);
    return value;
  };
  const first = await nextLine();
  assert.match(first, /^listening on /);
  const fake = { url: first.slice("listening on ".length).trim() };
  if (provider === "openai" || provider === "anthropic") {
    const second = await nextLine();
    assert.match(second, /^api-key /);
    fake.apiKey = second.slice("api-key ".length).trim();
  }
  return fake;
}

async function waitReady(gateway, child, logPath, deadline) {
  const log = () => readFileSync(logPath, "utf8").slice(-4000);
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      assert.fail(`gateway exited (${child.exitCode ?? child.signalCode}):\n${log()}`);
    }
    try {
      const r = await fetch(`${gateway}/readyz`, { signal: AbortSignal.timeout(2000) });
      if (r.status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.fail(`${gateway}/readyz not 200 within ${STARTUP_DEADLINE_MS} ms:\n${log()}`);
}

/** `nself claw api --url URL ARGS…`; resolves to its stdout. */
async function cli(...args) {
  const { stdout } = await promisify(execFile)(
    path.join(BIN_DIR, "nself"), ["claw", "api", "--url", url, ...args],
    { env: { ...process.env, PLUGIN_INTERNAL_SECRET: SECRET }, timeout: 30_000 },
  );
  return stdout;
}

async function stop(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGINT");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

before(async () => {
  for (const exe of ["nself", "fake-upstream"]) {
    assert.ok(existsSync(path.join(BIN_DIR, exe)),
      `${path.join(BIN_DIR, exe)} missing: run \`cargo build -p nself -p claw-tests\``);
  }
  const deadline = Date.now() + STARTUP_DEADLINE_MS;
  tmp = mkdtempSync(path.join(os.tmpdir(), "claw-node-"));
  const ollama = await startFake("ollama", ["--reply", OLLAMA_REPLY], deadline);
  const openai = await startFake("openai", ["--reply", OPENAI_REPLY], deadline);

  const listen = `127.0.0.1:${await freePort()}`;
  url = `http://${listen}`;
  const env = { ...process.env };
  for (const name of HERMETIC_UNSET) delete env[name];
  Object.assign(env, {
    CLAW_LISTEN: listen,
    CLAW_DATA_DIR: path.join(tmp, "data"),
    PLUGIN_INTERNAL_SECRET: SECRET,
    OLLAMA_BASE_URL: ollama.url,
    OPENAI_API_KEY: openai.apiKey,
    OPENAI_BASE_URL: openai.url,
    NO_COLOR: "1",
  });
  const cwd = path.join(tmp, "cwd"); // no `.env` here
  mkdirSync(cwd);
  const logPath = path.join(tmp, "gateway.log");
  const logFd = openSync(logPath, "w");
  const gateway = spawn(path.join(BIN_DIR, "nself"), ["claw", "serve"],
    { env, cwd, stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  children.push(gateway);
  await waitReady(url, gateway, logPath, deadline);

  const created = JSON.parse(await cli("keys", "create", "--name", "node", "--json"));
  assert.match(created.key, /^sk-nself-/);
  key = created.key;
});

after(async () => {
  await Promise.all(children.map(stop));
  if (tmp) rmSync(tmp, { recursive: true, force: true });
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

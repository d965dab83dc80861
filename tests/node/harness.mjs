// Shared by the Node end-to-end tests: starts `fake-upstream` and `nself claw serve` as child
// processes (binaries from $CLAW_BIN_DIR, default <repo>/target/debug), each on a free port
// with a temporary data dir, creates a gateway key with the CLI, and stops them all.
//
//   const stack = new Stack("claw-node-");
//   const ollama = await stack.fake("ollama", ["--reply", "Hi"]);
//   const gw = await stack.gateway(upstreamEnv({ ollama }), "node");  // { url, key, cli() }
//   ...
//   await stack.close();

import { spawn, execFile } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, mkdirSync, openSync, closeSync, readFileSync, rmSync, existsSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const BIN_DIR = path.resolve(process.env.CLAW_BIN_DIR ?? path.join(REPO, "target", "debug"));
export const SECRET = "node-sdk-test-secret";
export const STARTUP_DEADLINE_MS = 30_000;
// Provider settings the gateway must not pick up from the caller's shell.
const HERMETIC_UNSET = [
  "GEMINI_API_KEYS", "GEMINI_BASE_URL", "GEMINI_MODEL",
  "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_EMBED_MODEL",
  "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
  "OLLAMA_MODEL", "OLLAMA_EMBED_MODEL", "OLLAMA_MAX_INFLIGHT",
  "CLAW_KAFKA_BROKERS", "CLAW_DATABASE_URL", "NSELF_CLAW_URL",
];

// For each provider, a model name the router sends to that provider alone (no fall-through;
// gateway/src/router.rs): `local` is Ollama's default model, the others the providers' own.
export const PROVIDER_MODELS = {
  ollama: "local",
  gemini: "gemini-1.5-flash",
  openai: "gpt-4o",
  anthropic: "claude-3-5-sonnet",
};
export const PROVIDERS = Object.keys(PROVIDER_MODELS);

// Every child of every stack. Last resort if the runner exits without `close()` (e.g. a
// crash): no orphans.
const allChildren = new Set();
process.on("exit", () => {
  for (const child of allChildren) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
});

export function withDeadline(promise, deadline, what) {
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
export async function freePort() {
  const server = net.createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

export function requireBinaries() {
  for (const exe of ["nself", "fake-upstream"]) {
    assert.ok(existsSync(path.join(BIN_DIR, exe)),
      `${path.join(BIN_DIR, exe)} missing: run \`cargo build -p nself -p claw-tests --bins\``);
  }
}

/** The gateway's environment pointing each provider in `fakes` (by name) at its fake. */
export function upstreamEnv(fakes) {
  const env = {};
  if (fakes.ollama) env.OLLAMA_BASE_URL = fakes.ollama.url;
  if (fakes.gemini) Object.assign(env, { GEMINI_API_KEYS: "k1", GEMINI_BASE_URL: fakes.gemini.url });
  if (fakes.openai) {
    Object.assign(env, { OPENAI_API_KEY: fakes.openai.apiKey, OPENAI_BASE_URL: fakes.openai.url });
  }
  if (fakes.anthropic) {
    Object.assign(env, {
      ANTHROPIC_API_KEY: fakes.anthropic.apiKey, ANTHROPIC_BASE_URL: fakes.anthropic.url,
    });
  }
  return env;
}

/** `nself claw api --url URL ARGS…`; resolves to its stdout. */
export async function cli(url, ...args) {
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

async function waitReady(url, child, logPath, deadline) {
  const log = () => readFileSync(logPath, "utf8").slice(-4000);
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      assert.fail(`gateway exited (${child.exitCode ?? child.signalCode}):\n${log()}`);
    }
    try {
      const r = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
      if (r.status === 200) return;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.fail(`${url}/readyz not 200 within ${STARTUP_DEADLINE_MS} ms:\n${log()}`);
}

/** The child processes of one test file, in a temporary directory; `close()` stops them. */
export class Stack {
  constructor(prefix = "claw-node-") {
    this.children = [];
    this.tmp = mkdtempSync(path.join(os.tmpdir(), prefix));
    this.deadline = Date.now() + STARTUP_DEADLINE_MS;
  }

  #spawn(exe, args, options) {
    const child = spawn(path.join(BIN_DIR, exe), args, options);
    this.children.push(child);
    allChildren.add(child);
    return child;
  }

  /** Starts `fake-upstream PROVIDER --listen 127.0.0.1:0 ARGS…` (its stderr inherited);
   * resolves to `{ url, apiKey }` (`apiKey` for openai and anthropic). */
  async fake(provider, args = []) {
    const child = this.#spawn("fake-upstream", [provider, "--listen", "127.0.0.1:0", ...args],
      { stdio: ["ignore", "pipe", "inherit"] });
    const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    const nextLine = async () => {
      const { value, done } = await withDeadline(lines.next(), this.deadline, `fake-upstream ${provider}`);
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

  /** Starts one fake of each provider, all with `args`; resolves to them by provider name. */
  async fakes(args = []) {
    const fakes = {};
    for (const provider of PROVIDERS) fakes[provider] = await this.fake(provider, args);
    return fakes;
  }

  /** Starts `nself claw serve` with `env` on top of a hermetic environment (its log in
   * `<tmp>/<name>.log`), waits for `/readyz`, and creates a key named `keyName`. Resolves to
   * `{ url, key, keyId, logPath, cli(...args) }`. */
  async gateway(env, keyName, name = "gateway") {
    const listen = `127.0.0.1:${await freePort()}`;
    const url = `http://${listen}`;
    const full = { ...process.env };
    for (const variable of HERMETIC_UNSET) delete full[variable];
    Object.assign(full, {
      CLAW_LISTEN: listen,
      CLAW_DATA_DIR: path.join(this.tmp, `${name}-data`),
      PLUGIN_INTERNAL_SECRET: SECRET,
      NO_COLOR: "1",
      ...env,
    });
    const cwd = path.join(this.tmp, name); // no `.env` here
    mkdirSync(cwd);
    const logPath = path.join(this.tmp, `${name}.log`);
    const logFd = openSync(logPath, "w");
    const child = this.#spawn("nself", ["claw", "serve"],
      { env: full, cwd, stdio: ["ignore", logFd, logFd] });
    closeSync(logFd);
    await waitReady(url, child, logPath, this.deadline);

    const created = JSON.parse(await cli(url, "keys", "create", "--name", keyName, "--json"));
    assert.match(created.key, /^sk-nself-/);
    return {
      url, key: created.key, keyId: created.id, logPath,
      cli: (...args) => cli(url, ...args),
    };
  }

  async close() {
    await Promise.all(this.children.map(stop));
    rmSync(this.tmp, { recursive: true, force: true });
  }
}

"""Shared helpers for the end-to-end tests: start `fake-upstream` and `nself claw serve` as
subprocesses (binaries from $CLAW_BIN_DIR, default <repo>/target/debug), each on a free port
with a temporary data dir, and drive the CLI.

    cargo build -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python

Browser tests use the `browser` fixture (Debian's chromium driven by Playwright) and
`screenshot(page, name)`.
"""

import json
import os
import selectors
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from openai import OpenAI

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("CLAW_BIN_DIR", REPO / "target" / "debug")).resolve()
SECRET = "python-sdk-test-secret"
STARTUP_DEADLINE_S = 30.0
# Debian's chromium (scripts/debian-deps.sh test), never a browser Playwright downloads.
CHROMIUM = Path(os.environ.get("CLAW_CHROMIUM", "/usr/bin/chromium"))
# As root on a closed network: no sandbox, no GPU, and none of Chromium's own connections
# to Google's hosts (refused here, many at a time).
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
SCREENSHOTS = Path(os.environ.get("CLAW_SCREENSHOTS", REPO / "target" / "screenshots"))
# Provider settings the gateway must not pick up from the caller's shell or a `.env`.
HERMETIC_UNSET = (
    "GEMINI_API_KEYS", "GEMINI_BASE_URL", "GEMINI_MODEL",
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_EMBED_MODEL",
    "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
    "OLLAMA_MODEL", "OLLAMA_EMBED_MODEL", "OLLAMA_MAX_INFLIGHT",
    "CLAW_KAFKA_BROKERS", "CLAW_DATABASE_URL", "NSELF_CLAW_URL",
)


# For each provider, a model name the router sends to that provider alone (no fall-through;
# gateway/src/router.rs): `local` is Ollama's default model, the others the providers' own.
PROVIDER_MODELS = {
    "ollama": "local",
    "gemini": "gemini-1.5-flash",
    "openai": "gpt-4o",
    "anthropic": "claude-3-5-sonnet",
}
PROVIDERS = tuple(PROVIDER_MODELS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    """One line of `proc`'s stdout (an unbuffered binary pipe), or fail at `deadline`.

    Reads byte by byte straight from the descriptor so that nothing is left in a Python
    buffer where the selector cannot see it (the fakes print two lines at once)."""
    fd = proc.stdout.fileno()
    line = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                byte = os.read(fd, 1)
                if not byte:
                    break  # EOF: the process exited
                if byte == b"\n":
                    return line.decode()
                line += byte
            elif proc.poll() is not None:
                break
    pytest.fail(f"{proc.args[0]} printed no full line (got {bytes(line)!r}, exit code {proc.poll()})")


def wait_ready(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    pytest.fail(f"{url}/readyz not 200 within {STARTUP_DEADLINE_S}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def require_binaries() -> None:
    for exe in ("nself", "fake-upstream"):
        if not (BIN_DIR / exe).exists():
            pytest.fail(f"{BIN_DIR / exe} missing: run `cargo build -p nself -p claw-tests`")


class Gateway:
    """A running gateway plus the key the tests use and a count of served calls."""

    def __init__(self, url: str, key: str, key_id: str) -> None:
        self.url = url
        self.key = key
        self.key_id = key_id
        self.served = 0  # successful requests made with `key`

    def cli(self, *args: str) -> str:
        env = {**os.environ, "PLUGIN_INTERNAL_SECRET": SECRET}
        out = subprocess.run(
            [BIN_DIR / "nself", "claw", "api", "--url", self.url, *args],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )
        assert out.returncode == 0, f"nself claw api {' '.join(args)}: {out.stderr}"
        return out.stdout

    def client(self, **kw) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, timeout=15, **kw)


class Fake:
    """A running `fake-upstream`: its base URL and, for openai/anthropic, the key it accepts."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key


def upstream_env(fakes: dict[str, "Fake"]) -> dict[str, str]:
    """The gateway's environment pointing each provider in `fakes` (by name) at its fake."""
    env: dict[str, str] = {}
    if "ollama" in fakes:
        env["OLLAMA_BASE_URL"] = fakes["ollama"].url
    if "gemini" in fakes:
        env.update({"GEMINI_API_KEYS": "k1", "GEMINI_BASE_URL": fakes["gemini"].url})
    if "openai" in fakes:
        env.update({"OPENAI_API_KEY": fakes["openai"].api_key,
                    "OPENAI_BASE_URL": fakes["openai"].url})
    if "anthropic" in fakes:
        env.update({"ANTHROPIC_API_KEY": fakes["anthropic"].api_key,
                    "ANTHROPIC_BASE_URL": fakes["anthropic"].url})
    return env


class Routes:
    """Records which provider answered each response (`x-nself-provider`) of the httpx clients
    it makes, for clients that hide the HTTP response (`http_client=routes.client()`)."""

    def __init__(self) -> None:
        self.providers: list[str | None] = []

    def _record(self, response: httpx.Response) -> None:
        self.providers.append(response.headers.get("x-nself-provider"))

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=15, event_hooks={"response": [self._record]})


class Stack:
    """The subprocesses of one test module; `close()` stops them in reverse order."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.deadline = time.monotonic() + STARTUP_DEADLINE_S

    def fake(self, provider: str, *args: str) -> Fake:
        """Starts `fake-upstream PROVIDER --listen 127.0.0.1:0 ARGS…`."""
        proc = subprocess.Popen(
            [BIN_DIR / "fake-upstream", provider, "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, bufsize=0,
        )
        self.procs.append(proc)
        line = read_line(proc, self.deadline)
        assert line.startswith("listening on "), line
        url = line.removeprefix("listening on ").strip()
        api_key = None
        if provider in ("openai", "anthropic"):
            line = read_line(proc, self.deadline)
            assert line.startswith("api-key "), line
            api_key = line.removeprefix("api-key ").strip()
        return Fake(url, api_key)

    def fakes(self, *args: str) -> dict[str, Fake]:
        """Starts one `fake-upstream` of each provider, all with `args`; by provider name."""
        return {provider: self.fake(provider, *args) for provider in PROVIDERS}

    def gateway(self, name: str, env: dict[str, str], key_name: str) -> Gateway:
        """Starts `nself claw serve` with `env` on top of a hermetic environment, waits for
        `/readyz`, and creates a key named `key_name`."""
        url = f"http://127.0.0.1:{free_port()}"
        log = self.tmp / f"{name}.log"
        full_env = {**os.environ}
        for var in HERMETIC_UNSET:
            full_env.pop(var, None)
        full_env.update({
            "CLAW_LISTEN": url.removeprefix("http://"),
            "CLAW_DATA_DIR": str(self.tmp / f"{name}-data"),
            "PLUGIN_INTERNAL_SECRET": SECRET,
            "NO_COLOR": "1",
            **env,
        })
        cwd = self.tmp / name
        cwd.mkdir()  # no `.env` here
        with log.open("w") as log_file:
            server = subprocess.Popen(
                [BIN_DIR / "nself", "claw", "serve"], env=full_env, cwd=cwd,
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        self.procs.append(server)
        wait_ready(url, server, log, self.deadline)
        probe = Gateway(url, "", "")
        created = json.loads(probe.cli("keys", "create", "--name", key_name, "--json"))
        assert created["key"].startswith("sk-nself-")
        return Gateway(url, created["key"], created["id"])

    def projector(self, name: str, env: dict[str, str]) -> None:
        """Starts `nself claw projector` (distributed mode: folds the Kafka ledger into
        PostgreSQL) with `env` (CLAW_KAFKA_BROKERS, CLAW_KAFKA_TOPIC, CLAW_DATABASE_URL…) on
        top of a hermetic environment, its log in `<tmp>/<name>.log`, and waits until it says
        it is folding (it has no HTTP port). Start it before `gateway()`, whose key creation
        waits for the projection."""
        log = self.tmp / f"{name}.log"
        full_env = {**os.environ}
        for var in HERMETIC_UNSET:
            full_env.pop(var, None)
        # Its readiness line is logged at `info`.
        full_env.update({"NO_COLOR": "1", "RUST_LOG": "info", **env})
        cwd = self.tmp / name
        cwd.mkdir()  # no `.env` here
        with log.open("w") as log_file:
            proc = subprocess.Popen(
                [BIN_DIR / "nself", "claw", "projector"], env=full_env, cwd=cwd,
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        while "projector folding" not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"projector exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > self.deadline:
                pytest.fail(f"projector not folding within {STARTUP_DEADLINE_S}s:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium under Playwright's sync API, shared by the session's tests
    (each test makes its own `browser.new_page()` or context and closes it)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run `scripts/debian-deps.sh test` "
                    "(or point CLAW_CHROMIUM at a Chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS),
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    """Saves a full-page PNG of `page` as `<CLAW_SCREENSHOTS>/<name>.png` (default
    <repo>/target/screenshots) and returns its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def services() -> tuple[str, str]:
    """CLAW_KAFKA_BROKERS and CLAW_DATABASE_URL, or fail (never skip) saying how to get them."""
    missing = [v for v in ("CLAW_KAFKA_BROKERS", "CLAW_DATABASE_URL") if not os.environ.get(v)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not set: distributed mode needs the real Kafka and "
            "PostgreSQL; start them with `scripts/services.sh up` and "
            "`eval \"$(scripts/services.sh env)\"`",
            pytrace=False,
        )
    return os.environ["CLAW_KAFKA_BROKERS"], os.environ["CLAW_DATABASE_URL"]


def distributed_env() -> dict[str, str]:
    """Distributed mode's settings on a fresh topic `claw.test.<hex>` and a fresh database
    `claw_test_<hex>` (made with psql on the server of CLAW_DATABASE_URL)."""
    brokers, admin_url = services()
    hex_id = uuid.uuid4().hex
    name = f"claw_test_{hex_id}"
    out = subprocess.run(
        ["psql", admin_url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {name}"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 0, f"psql: CREATE DATABASE {name}: {out.stderr}"
    return {
        "CLAW_KAFKA_BROKERS": brokers,
        "CLAW_KAFKA_TOPIC": f"claw.test.{hex_id}",
        "CLAW_DATABASE_URL": urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}")),
    }


def poll(check, what: str, timeout_s: float = 15.0):
    """Calls `check()` until it returns a truthy value (returned) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout_s}s")
        time.sleep(0.1)

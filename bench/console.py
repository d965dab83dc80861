#!/usr/bin/env python3
"""Page loads of the web console (/claw/) in a real browser: the time, in the page's own clock,
from the start of its navigation until its data is on the page.

Starts a fake Ollama and `nself claw serve` (embedded, temporary data dir, free port), creates
`--keys` keys and sends `--requests` requests (model `local`) over them, so that the pages have
data (all of it today's). Debian's chromium, under Playwright, signs in through the form and
loads each page (usage, keys, a key's page, ledger, health) once cold (a fresh context: empty
cache), then `--loads` times warm, each in a new tab of that context (pages are `no-store`;
the script and stylesheet stay cached). "Data shown" is a DOM condition, checked by a
MutationObserver installed before the page's scripts (the time of the change, not of a poll):

    usage   #card-requests has data-value       key     a tr[data-testid=request-row]
    keys    a tr[data-testid=key-row]           health  #health-version neither empty nor "…"
    ledger  a tr[data-testid=ledger-row], and #ledger-conn[data-state=open]

Prints per page the bytes before the data on the cold load (document + console.css +
console.js, transferSize: headers included), the cold time to data, the warm times to data
(p50, p95, max) and to DOMContentLoaded (p50); then the gateway's CPU time (utime + stime,
/proc/PID/stat) over the loads per page load, a yardstick that depends less on the host than
the times, also net of its idle CPU (measured for `--idle` seconds before).

    cargo build --release -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) bench/console.py [--requests 300] [--loads 20] [--json]

Binaries from $CLAW_BIN_DIR (default <repo>/target/release); the browser is $CLAW_CHROMIUM
(default /usr/bin/chromium: scripts/debian-deps.sh test), never one Playwright downloads.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
# The end-to-end tests' helpers (they fail by raising pytest's `Failed`).
from conftest import (CHROMIUM_ARGS, HERMETIC_UNSET, free_port, read_line,  # noqa: E402
                      stop, wait_ready)

SECRET = "bench-console-secret"
TIMEOUT_MS = 30_000
# name → (path, JavaScript expression true once the page shows its data)
PAGES = {
    "usage": ("/claw/usage", "document.querySelector('#card-requests[data-value]')"),
    "keys": ("/claw/keys", "document.querySelector('tr[data-testid=key-row]')"),
    "key": ("/claw/keys/{key_id}", "document.querySelector('tr[data-testid=request-row]')"),
    "ledger": ("/claw/ledger", "document.querySelector('tr[data-testid=ledger-row]')"
               " && document.querySelector('#ledger-conn[data-state=open]')"),
    "health": ("/claw/health", "!['', '…'].includes("
               "document.querySelector('#health-version')?.textContent.trim() ?? '')"),
}
# Runs before the page's own scripts: stamps <html data-bench-shown> with performance.now()
# (milliseconds since the navigation started) at the first DOM change that makes SHOWN true.
WATCH = """new MutationObserver((_, observer) => {
  if (!(SHOWN)) return;
  observer.disconnect();
  document.documentElement.dataset.benchShown = performance.now();
}).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});"""
TIMING = """() => {
  const [nav] = performance.getEntriesByType('navigation');
  const assets = performance.getEntriesByType('resource')
    .filter(r => new URL(r.name).pathname.startsWith('/claw/assets/'));
  const entries = [nav, ...assets].map(e => ({name: new URL(e.name).pathname,
    transfer: e.transferSize, encoded: e.encodedBodySize}));
  return {dcl: nav.domContentLoadedEventEnd, doc: nav.responseEnd, entries};
}"""


def start_stack(bin_dir: Path, tmp: Path, procs: list[subprocess.Popen]) -> str:
    """Starts a fake Ollama and a gateway in front of it (into `procs`); the gateway's URL."""
    deadline = time.monotonic() + 30
    fake = subprocess.Popen([bin_dir / "fake-upstream", "ollama", "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, bufsize=0)
    procs.append(fake)
    line = read_line(fake, deadline)
    assert line.startswith("listening on "), line
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in HERMETIC_UNSET}
    env.update({"CLAW_LISTEN": url.removeprefix("http://"), "CLAW_DATA_DIR": str(tmp / "data"),
                "PLUGIN_INTERNAL_SECRET": SECRET, "NO_COLOR": "1",
                "OLLAMA_BASE_URL": line.removeprefix("listening on ").strip()})
    log = tmp / "gateway.log"
    with log.open("w") as out:  # cwd: the temporary dir, where no `.env` is
        procs.append(subprocess.Popen([bin_dir / "nself", "claw", "serve"], env=env, cwd=tmp,
                                      stdout=out, stderr=subprocess.STDOUT))
    wait_ready(url, procs[-1], log, deadline)
    return url


def seed(url: str, keys: int, requests: int) -> list[str]:
    """Creates `keys` keys and sends `requests` chat requests over them; the keys' ids."""
    with httpx.Client(base_url=url, headers={"x-internal-token": SECRET}, timeout=30) as admin:
        created = [admin.post("/claw/v1/api-keys", json={"name": f"bench-{i + 1}",
                                                         "rpm_limit": 1_000_000})
                   .raise_for_status().json() for i in range(keys)]
        body = {"model": "local", "messages": [{"role": "user", "content": "Hello"}]}
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.post(
                "/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {created[i % keys]['key']}"},
            ).raise_for_status(), range(requests)))
        deadline = time.monotonic() + 30  # until the read models have folded every request
        while admin.get("/claw/v1/usage").json()["totals"]["requests"] < requests:
            if time.monotonic() > deadline:
                raise RuntimeError("the usage document lacks requests after 30 s")
            time.sleep(0.1)
    return [k["id"] for k in created]


def cpu_ms(pid: int) -> float:
    """utime + stime of a process, in milliseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def sign_in(browser, url: str) -> dict:
    """Signs in through the form; the session cookie, as a context's storage state."""
    context = browser.new_context(base_url=url)
    try:
        page = context.new_page()
        page.goto("/claw/sign-in")
        page.locator("#secret").fill(SECRET)
        page.locator("#sign-in-submit").click()
        page.wait_for_url(f"{url}/claw/usage")
        return context.storage_state()
    finally:
        context.close()


def load(context, url: str, shown: str, errors: list[str]) -> dict:
    """One load of `url` in a new tab: ms to data, the navigation's timing, the transfers."""
    tab = context.new_page()
    tab.on("pageerror", lambda e: errors.append(f"{url}: {e}"))
    tab.on("console", lambda m: errors.append(f"{url}: {m.text}") if m.type == "error" else None)
    try:
        tab.add_init_script(WATCH.replace("SHOWN", shown))
        tab.goto(url, wait_until="commit")
        # A function, not an expression: the page's CSP forbids eval.
        data_ms = tab.wait_for_function("() => document.documentElement.dataset.benchShown")
        tab.wait_for_load_state("domcontentloaded")
        return {"data_ms": round(float(data_ms.json_value()), 1), **tab.evaluate(TIMING)}
    finally:
        tab.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def measure(browser, url: str, state: dict, key_id: str, loads: int, errors: list) -> dict:
    """Every page: one cold load in a fresh context, then `loads` warm ones in new tabs."""
    results = {}
    for name, (path, shown) in PAGES.items():
        context = browser.new_context(base_url=url, storage_state=state)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            cold = load(context, path.format(key_id=key_id), shown, errors)
            warm = [load(context, path.format(key_id=key_id), shown, errors)
                    for _ in range(loads)]
        finally:
            context.close()
        times = [w["data_ms"] for w in warm]
        results[name] = {
            "cold_bytes": sum(e["transfer"] for e in cold["entries"]), "cold": cold,
            "warm_data_ms": {"p50": percentile(times, 50), "p95": percentile(times, 95),
                             "max": max(times), "all": times},
            "warm_dcl_p50_ms": percentile([w["dcl"] for w in warm], 50),
            "warm_document_p50_ms": percentile([w["doc"] for w in warm], 50),  # responseEnd
            # Assets transferred again by warm loads (0 when the cache works).
            "warm_asset_bytes": sum(e["transfer"] for w in warm for e in w["entries"][1:]),
        }
    return results


def run(args, bin_dir: Path, chromium: Path) -> dict:
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="claw-bench-console-") as tmp:
        try:
            url = start_stack(bin_dir, Path(tmp), procs)
            key_ids = seed(url, args.keys, args.requests)
            gateway = procs[1].pid
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=list(CHROMIUM_ARGS))
                try:
                    state = sign_in(browser, url)
                    before = cpu_ms(gateway)
                    time.sleep(args.idle)
                    idle_ms = cpu_ms(gateway) - before
                    errors: list[str] = []
                    before, wall = cpu_ms(gateway), time.monotonic()
                    pages = measure(browser, url, state, key_ids[0], args.loads, errors)
                    used, wall = cpu_ms(gateway) - before, time.monotonic() - wall
                    version = browser.version
                finally:
                    browser.close()
        finally:
            for proc in reversed(procs):
                stop(proc)
    loads = len(PAGES) * (args.loads + 1)
    return {"requests": args.requests, "keys": args.keys, "loads": args.loads,
            "bin_dir": str(bin_dir), "chromium": version, "pages": pages, "errors": errors,
            "gateway_cpu": {"page_loads": loads, "ms": used, "wall_s": wall,
                            "per_load_ms": used / loads, "idle_ms": idle_ms,
                            "idle_s": args.idle, "per_load_beyond_idle_ms":
                            (used - idle_ms / args.idle * wall) / loads}}


def print_table(doc: dict) -> None:
    print(f"{doc['requests']} requests over {doc['keys']} keys; chromium {doc['chromium']}; "
          f"{doc['loads']} warm loads per page after a cold one; binaries in {doc['bin_dir']}")
    head = ("page", "HTML+CSS+JS B", "cold ms", "warm p50", "p95", "max", "DCL p50")
    print(f"{head[0]:<8}" + "".join(f"{h:>14}" for h in head[1:]))
    for name, r in doc["pages"].items():
        w = r["warm_data_ms"]
        cells = (r["cold"]["data_ms"], w["p50"], w["p95"], w["max"], r["warm_dcl_p50_ms"])
        print(f"{name:<8}{r['cold_bytes']:>14}" + "".join(f"{c:>14.1f}" for c in cells))
    cpu = doc["gateway_cpu"]
    print(f"gateway CPU: {cpu['per_load_ms']:.2f} ms per page load ({cpu['ms']:.0f} ms over "
          f"{cpu['page_loads']} loads in {cpu['wall_s']:.1f} s); idle before: "
          f"{cpu['idle_ms']:.0f} ms in {cpu['idle_s']:.0f} s, so "
          f"{cpu['per_load_beyond_idle_ms']:.2f} ms per load beyond idle")
    for name, r in doc["pages"].items():
        if r["warm_asset_bytes"]:
            print(f"note: {name}: warm loads fetched {r['warm_asset_bytes']} B of assets again")
    for error in doc["errors"]:
        print(f"browser error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="chat requests to seed")
    parser.add_argument("--keys", type=int, default=5, help="keys the requests are spread over")
    parser.add_argument("--loads", type=int, default=20, help="warm loads per page")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the gateway's "
                        "idle CPU to measure first (counted in clock ticks, usually 10 ms)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    bin_dir = Path(os.environ.get("CLAW_BIN_DIR", REPO / "target" / "release")).resolve()
    chromium = Path(os.environ.get("CLAW_CHROMIUM", "/usr/bin/chromium"))
    for exe in (bin_dir / "nself", bin_dir / "fake-upstream", chromium):
        if not exe.exists():
            sys.exit(f"{exe} missing: `cargo build --release -p nself -p claw-tests`, "
                     "`scripts/debian-deps.sh test`, or set CLAW_BIN_DIR / CLAW_CHROMIUM")
    doc = run(args, bin_dir, chromium)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)


if __name__ == "__main__":
    main()

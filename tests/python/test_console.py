"""End-to-end: the web console under /claw/, in a real browser (Debian's chromium driven by
Playwright), in embedded mode (SQLite) and in distributed mode (Kafka + PostgreSQL, with
`nself claw projector`).

Each mode's gateway sits in front of a fake Ollama (so `local` requests succeed) and a fake
OpenAI (so `gpt-4o` requests are paid and the "Saved" card, priced as gpt-4o, is non-zero).
In the browser the module signs in with the admin credential, creates a key and reads its
secret once, uses that secret with OpenAI's official SDK, and finds the requests on the usage
page (cards, the chart's bar for today), on the key's page (a row per `x-request-id`, the
facts) and in the live ledger (a row arriving while the page is open, filters, pause/resume,
the event's JSON); the health page shows the version and a row per tier. It revokes the key
through the confirmation dialog (the SDK is then refused with 401), checks CSRF (a change
without the page's token, or with a wrong one, is refused with 403), the session cookie's
flags, that no secret reaches web storage or a URL, a phone-width layout and keyboard use,
signing out (the old cookie is refused afterwards), and last the wrong credential and the
limit on failed sign-ins (429).

Tests of a mode share one gateway and one signed-in browser context and run in file order
(each builds on the ones before: run the whole module). Screenshots of every page, per mode,
go to target/screenshots (`<mode>-usage.png`, …).

The distributed mode needs the services (`CLAW_KAFKA_BROKERS`, `CLAW_DATABASE_URL`); it fails
without them:

    scripts/services.sh up
    eval "$(scripts/services.sh env)"
    cargo build -p nself -p claw-tests
    $(scripts/python-env.sh | tail -1) -m pytest -q tests/python/test_console.py
"""

import json
import re
import tomllib
from datetime import datetime, timezone
from types import SimpleNamespace
from urllib.parse import quote

import openai
import pytest
from playwright.sync_api import expect

from conftest import (REPO, SECRET, Gateway, Stack, distributed_env, poll, require_binaries,
                      screenshot, upstream_env)

LOCAL_REPLY = "Hello from the fake Ollama, via the console test."
PAID_REPLY = "Hello from the fake OpenAI, via the console test."
HELLO = [{"role": "user", "content": "Hello"}]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
TIMEOUT_MS = 15_000
KEY_NAME = "console-test"

expect.set_options(timeout=TIMEOUT_MS)


# ---------------------------------------------------------------------------------------------
# the stack, one per mode


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def console(request, tmp_path_factory, browser):
    """One mode's stack and a browser context signed in through the sign-in form, at a
    desktop viewport; `key` (the key created in the console) and `calls` (every SDK call
    made) fill in as the tests run."""
    mode = request.param
    require_binaries()
    extra = distributed_env() if mode == "distributed" else {}
    stack = Stack(tmp_path_factory.mktemp(f"console-{mode}"))
    context = None
    try:
        fakes = {"ollama": stack.fake("ollama", "--reply", LOCAL_REPLY),
                 "openai": stack.fake("openai", "--reply", PAID_REPLY)}
        if extra:
            stack.projector("projector", extra)  # first: key creation waits for the projection
        gw = stack.gateway("gateway", {**extra, **upstream_env(fakes)}, "console-cli")
        context = browser.new_context(base_url=gw.url, viewport=DESKTOP)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto("/claw/usage")
        expect(page).to_have_url(re.compile(r"/claw/sign-in\?next=%2Fclaw%2Fusage$"))
        submit_sign_in(page, SECRET)
        expect(page).to_have_url(f"{gw.url}/claw/usage")
        page.close()
        yield SimpleNamespace(mode=mode, gw=gw, context=context, key=None, calls=[])
    finally:
        if context is not None:
            context.close()
        stack.close()


@pytest.fixture
def page(console):
    """A fresh tab of the signed-in context; fails the test on a script error or a console
    error (a CSP violation, a failed load) in it."""
    tab = console.context.new_page()
    errors = []
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    yield tab
    tab.close()
    assert not errors, errors


# ---------------------------------------------------------------------------------------------
# helpers


def submit_sign_in(page, credential: str):
    """Fills the sign-in form and submits it; returns the POST's response."""
    page.locator("#secret").fill(credential)
    with page.expect_response(lambda r: r.request.method == "POST"
                              and r.url.endswith("/claw/sign-in")) as response:
        page.locator("#sign-in-submit").click()
    return response.value


def chat(url: str, key: str, model: str) -> SimpleNamespace:
    """One chat completion through OpenAI's SDK; what the client saw of it."""
    client = Gateway(url, key, "").client(max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO)
    r = raw.parse()
    assert r.choices[0].message.content == (LOCAL_REPLY if model == "local" else PAID_REPLY)
    request_id = raw.headers.get("x-request-id")
    assert request_id, dict(raw.headers)
    return SimpleNamespace(request_id=request_id, tier=raw.headers["x-nself-tier"], key=key,
                           total_tokens=r.usage.total_tokens, day=today())


def use(console, key: str, model: str) -> SimpleNamespace:
    """`chat()`, remembered in `console.calls`."""
    call = chat(console.gw.url, key, model)
    console.calls.append(call)
    return call


def web_storage_and_url(page) -> str:
    """Everything the page keeps in localStorage and sessionStorage, and its URL."""
    return page.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage}, "
                         "location.href, document.cookie])")


def api_json(page, path: str):
    """GET on the admin API with the page's session cookie."""
    r = page.request.get(path)
    assert r.ok, (path, r.status, r.text())
    return r.json()


def csrf_token(page) -> str:
    return page.locator('meta[name="claw-csrf"]').get_attribute("content")


def today() -> str:
    """The usage documents' day: the UTC date of `occurred_at`."""
    return datetime.now(timezone.utc).date().isoformat()


def the_key(console) -> SimpleNamespace:
    assert console.key, "test_create_key_shows_its_secret_once makes it: run the whole module"
    return console.key


def sent(console, *, key: str | None = None, tier: str | None = None,
         day: str | None = None) -> list:
    """The calls made so far, of one key, tier or day."""
    return [c for c in console.calls if (key is None or c.key == key)
            and (tier is None or c.tier == tier) and (day is None or c.day == day)]


def no_horizontal_scroll(page) -> None:
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"{page.url}: scrollWidth {width} at {PHONE['width']} px"


# ---------------------------------------------------------------------------------------------
# the tests, in order


def test_sign_in_sets_a_strict_http_only_cookie(console, browser, page):
    gw = console.gw
    # A fresh browser: a page sends it to sign in, and back to that page afterwards.
    ctx = browser.new_context(base_url=gw.url, viewport=DESKTOP)
    try:
        fresh = ctx.new_page()
        fresh.goto("/claw/ledger")
        expect(fresh).to_have_url(f"{gw.url}/claw/sign-in?next=%2Fclaw%2Fledger")
        expect(fresh.locator("#secret")).to_be_focused()
        expect(fresh.locator("label[for=secret]")).to_contain_text("PLUGIN_INTERNAL_SECRET")
        screenshot(fresh, f"{console.mode}-sign-in")
        response = submit_sign_in(fresh, SECRET)
        assert response.status == 303, response.status
        expect(fresh).to_have_url(f"{gw.url}/claw/ledger")
        expect(fresh.locator('nav a[aria-current="page"]')).to_have_text("Ledger")
        assert SECRET not in web_storage_and_url(fresh)
    finally:
        ctx.close()

    cookies = [c for c in console.context.cookies() if c["name"] == "claw_session"]
    assert len(cookies) == 1, console.context.cookies()
    cookie = cookies[0]
    assert cookie["httpOnly"] is True, cookie
    assert cookie["sameSite"] == "Strict", cookie
    assert cookie["path"] == "/claw", cookie
    assert cookie["expires"] > datetime.now(timezone.utc).timestamp() + 3600, cookie
    assert SECRET not in cookie["value"], cookie

    response = page.goto("/claw/usage")
    assert "script-src 'self'" in response.headers["content-security-policy"], response.headers
    expect(page.locator("body")).to_have_attribute("data-page", "usage")
    expect(page.locator('nav a[aria-current="page"]')).to_have_text("Usage")
    assert SECRET not in web_storage_and_url(page)
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script sees it


def test_create_key_shows_its_secret_once(console, page):
    page.goto("/claw/keys")
    expect(page.locator("#new-key-rpm")).to_have_value("60")
    page.locator("#new-key-name").fill(KEY_NAME)
    page.locator("#create-key-submit").click()

    panel = page.locator("#secret-panel")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("Copy this key now. It will not be shown again.")
    expect(page.locator("#secret-name")).to_contain_text(KEY_NAME)
    expect(page.locator("#secret-value")).to_have_value(re.compile(r"^sk-nself-\S+$"))
    secret = page.locator("#secret-value").input_value()
    console.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.locator("#secret-copy").click()
    expect(page.locator("#secret-copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == secret
    row = page.locator(f'#keys-table tr[data-testid=key-row]:has(a:text-is("{KEY_NAME}"))')
    expect(row).to_have_attribute("data-status", "active")
    key_id = row.get_attribute("data-key-id")
    console.key = SimpleNamespace(id=key_id, name=KEY_NAME, secret=secret)
    expect(row.locator("code")).to_have_text(f"{secret[:12]}…")
    screenshot(page, f"{console.mode}-keys")
    assert secret not in web_storage_and_url(page)

    page.locator("#secret-done").click()
    expect(panel).to_be_hidden()
    expect(page.locator("#secret-value")).to_have_value("")
    assert secret not in page.content()
    page.reload()
    expect(page.locator(f'#keys-table tr[data-key-id="{key_id}"]')).to_be_visible()
    expect(panel).to_be_hidden()
    assert secret not in page.content()
    assert secret not in web_storage_and_url(page)
    # Nor does the API ever give it again.
    assert secret not in page.request.get("/claw/v1/api-keys").text()
    assert secret not in page.request.get(f"/claw/v1/api-keys/{key_id}").text()


def test_the_secret_works_with_the_openai_sdk(console):
    """Some traffic in two tiers, so that the usage chart has something to show: local
    requests and paid gpt-4o ones with the console's key, local ones with the CLI's key."""
    key = the_key(console)
    for model in ("local", "local", "local", "gpt-4o", "local", "gpt-4o"):
        call = use(console, key.secret, model)
        assert call.tier == ("local" if model == "local" else "api_key"), call
    for _ in range(2):
        use(console, console.gw.key, "local")


def test_ledger_shows_requests_live(console, page):
    key = the_key(console)
    page.goto(f"/claw/ledger?type=RequestServed&key={key.id}")
    expect(page.locator("#ledger-conn")).to_have_attribute("data-state", "open")
    expect(page.locator("#ledger-type")).to_have_value("RequestServed")
    expect(page.locator("#ledger-key")).to_have_value(key.id)
    rows = page.locator("#ledger-table tr[data-testid=ledger-row]")
    before = len(sent(console, key=key.secret))
    expect(rows).to_have_count(before)  # the replayed tail, filtered

    # A request while the page is open: its row arrives, on top.
    call = use(console, key.secret, "local")
    expect(rows).to_have_count(before + 1)
    top = rows.first
    expect(top).to_have_attribute("data-event-type", "RequestServed")
    expect(top).to_have_attribute("data-key-id", key.id)
    top.click()
    expect(top).to_have_attribute("aria-current", "true")
    expect(page.locator("#ledger-json")).to_be_visible()
    event = json.loads(page.locator("#ledger-json").text_content())
    assert event["event_type"] == "RequestServed", event
    assert event["key_id"] == key.id, event
    assert event["event_id"] == top.get_attribute("data-event-id"), event
    assert event["data"]["request_id"] == call.request_id, event
    assert event["data"]["tier"] == "local" and event["data"]["status"] == 200, event
    # Every event so far is in (the CLI key's too), so the next one alone is held below.
    expect(page.locator("#ledger-count")).to_contain_text(f" of {2 + len(console.calls)} events")

    # Paused: the event is held, not drawn; resumed: drawn.
    pause = page.locator("#ledger-pause")
    pause.click()
    expect(pause).to_have_attribute("aria-pressed", "true")
    expect(pause).to_have_text("Resume")
    held = use(console, key.secret, "local")
    expect(page.locator("#ledger-held")).to_have_attribute("data-value", "1")
    expect(page.locator("#ledger-held")).to_be_visible()
    expect(rows).to_have_count(before + 1)
    pause.click()
    expect(pause).to_have_attribute("aria-pressed", "false")
    expect(rows).to_have_count(before + 2)
    expect(page.locator("#ledger-held")).to_be_hidden()

    # Enter on a focused row shows that event (the newest: the held one).
    rows.first.focus()
    page.keyboard.press("Enter")
    expect(rows.first).to_have_attribute("aria-current", "true")
    expect(page.locator("#ledger-json")).to_contain_text(held.request_id)

    # The type filter, and the key filter by the key's name or id; both in the URL.
    page.locator("#ledger-type").select_option("KeyCreated")
    expect(page).to_have_url(re.compile(r"type=KeyCreated"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-key-id", key.id)
    page.locator("#ledger-key").fill(console.gw.key_id)
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-key-id", console.gw.key_id)
    page.locator("#ledger-type").select_option("")
    page.locator("#ledger-key").fill("")
    expect(page).to_have_url(f"{console.gw.url}/claw/ledger")
    # KeyCreated ×2, and a RequestServed per call.
    expect(rows).to_have_count(2 + len(console.calls))
    expect(page.locator(f'#ledger-table tr[data-key-id="{console.gw.key_id}"]'
                        '[data-event-type="RequestServed"]')).to_have_count(
        len(sent(console, key=console.gw.key)))
    expect(page.locator("#ledger-count")).to_contain_text(f"{len(console.calls) + 2} of")

    page.locator('#ledger-table tr[data-event-type="RequestServed"]').first.click()
    expect(page.locator("#ledger-json")).to_contain_text(held.request_id)
    screenshot(page, f"{console.mode}-ledger")


def test_usage_page_shows_the_requests(console, page):
    key = the_key(console)
    calls = console.calls
    assert len(sent(console, tier="local")) >= 8, "run the whole module"
    day = calls[-1].day  # today's bar (the day of the last call, should the test span midnight)
    local, paid = sent(console, tier="local", day=day), sent(console, tier="api_key", day=day)

    def caught_up():
        usage = api_json(page, "/claw/v1/usage")
        return usage if usage["totals"]["requests"] == len(calls) else None

    usage = poll(caught_up, f"{len(calls)} requests in /claw/v1/usage")

    page.goto("/claw/usage")
    expect(page.locator("#card-requests")).to_have_attribute("data-value", str(len(calls)))
    expect(page.locator("#card-requests")).to_have_text(str(len(calls)))
    expect(page.locator("#card-tokens")).to_have_attribute(
        "data-value", str(sum(c.total_tokens for c in calls)))
    assert usage["totals"]["total_tokens"] == sum(c.total_tokens for c in calls), usage
    assert float(page.locator("#card-cost").get_attribute("data-value")) > 0
    assert float(page.locator("#card-saved").get_attribute("data-value")) > 0
    expect(page.locator("#card-saved-sub")).to_have_text("priced as gpt-4o")

    chart = page.locator("#usage-chart")
    expect(chart.locator("svg[data-testid=chart-svg]")).to_have_attribute("data-metric", "requests")

    def bar(tier):  # today's segment of a tier
        return chart.locator(f'rect[data-testid=chart-bar][data-day="{day}"][data-tier="{tier}"]')

    expect(bar("local")).to_have_attribute("data-value", str(len(local)))
    expect(bar("api_key")).to_have_attribute("data-value", str(len(paid)))
    expect(bar("local").locator("title")).to_contain_text(f"Local: {len(local)} requests")
    expect(chart.locator("[data-testid=chart-legend] li[data-tier=local]")).to_contain_text(
        str(len(local)))
    expect(page.locator("#by-model-table tr[data-testid=by-model-row]")).not_to_have_count(0)
    for key_id in (key.id, console.gw.key_id):
        expect(page.locator(f'#by-key-table tr[data-key-id="{key_id}"]')).to_be_visible()
    screenshot(page, f"{console.mode}-usage")

    # Tokens instead of requests.
    chart.locator("button[data-metric=tokens]").click()
    expect(chart.locator("svg[data-testid=chart-svg]")).to_have_attribute("data-metric", "tokens")
    expect(bar("local")).to_have_attribute("data-value", str(sum(c.total_tokens for c in local)))

    # One key's usage: the filter goes into the URL.
    page.locator("#f-key").select_option(key.id)
    expect(page).to_have_url(re.compile(rf"key_id={key.id}"))
    expect(page.locator("#card-requests")).to_have_attribute(
        "data-value", str(len(sent(console, key=key.secret))))
    expect(page.locator("#csv-link")).to_have_attribute("href", re.compile(rf"key_id={key.id}"))


def test_key_page_shows_its_requests_and_facts(console, page):
    key = the_key(console)
    mine = sent(console, key=key.secret)
    poll(lambda: len(api_json(page, f"/claw/v1/api-keys/{key.id}/requests?limit=50")["requests"])
         == len(mine), f"{len(mine)} requests of the key in /requests")

    page.goto("/claw/keys")
    page.locator(f'#keys-table tr[data-key-id="{key.id}"] a[data-testid=key-link]').click()
    expect(page).to_have_url(f"{console.gw.url}/claw/keys/{key.id}")
    expect(page.locator("#key-name")).to_have_text(key.name)
    expect(page.locator("#key-badge")).to_have_text("active")
    expect(page.locator("#fact-id")).to_have_text(key.id)
    expect(page.locator("#fact-prefix")).to_have_text(f"{key.secret[:12]}…")
    expect(page.locator("#fact-status")).to_have_text("active")
    expect(page.locator("#fact-rpm")).to_have_text("60 requests per minute")
    expect(page.locator("#fact-admin")).to_have_text("not allowed")
    expect(page.locator("#fact-last-used time")).to_be_visible()
    expect(page.locator("#card-requests")).to_have_attribute("data-value", str(len(mine)))

    rows = page.locator("#requests-table tr[data-testid=request-row]")
    expect(rows).to_have_count(len(mine))
    for call in mine:
        row = page.locator(f'#requests-table tr[data-request-id="{call.request_id}"]')
        expect(row).to_contain_text("ollama" if call.tier == "local" else "openai")
        expect(row).to_contain_text("200")
    # Newest first.
    expect(rows.first).to_have_attribute("data-request-id", mine[-1].request_id)
    expect(page.locator("#usage-chart rect[data-testid=chart-bar]")).not_to_have_count(0)
    expect(page.locator("#key-revoke")).to_be_visible()
    screenshot(page, f"{console.mode}-key")
    assert key.secret not in page.content()


def test_health_page_shows_version_and_tiers(console, page):
    status = api_json(page, "/claw/v1/status")
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert status["version"] == version, status
    page.goto("/claw/health")
    expect(page.locator("#health-version")).to_have_text(version)
    expect(page.locator("#health-mode")).to_have_text(console.mode)
    expect(page.locator("#health-ledger-backend")).to_have_text(
        "kafka" if console.mode == "distributed" else "sqlite")
    rows = page.locator("#tiers-table tr[data-testid=tier-row]")
    expect(rows).to_have_count(len(status["tiers"]))
    providers = {(t["tier"], t["provider"]) for t in status["tiers"]}
    assert {("local", "ollama"), ("api_key", "openai")} <= providers, status["tiers"]
    for tier, provider in providers:
        expect(page.locator(f'#tiers-table tr[data-tier="{tier}"][data-provider="{provider}"]')) \
            .to_have_count(1)
    # The two configured upstreams answer; Gemini and Anthropic are not configured.
    for provider in ("ollama", "openai"):
        expect(page.locator(f'#tiers-table tr[data-provider="{provider}"]')).not_to_have_attribute(
            "data-state", re.compile("unconfigured|down|unreachable"))
    expect(page.locator('#tiers-table tr[data-provider="gemini"]')).to_have_attribute(
        "data-state", "unconfigured")
    expect(page.locator("#health-uptime")).to_have_attribute("data-value", re.compile(r"^\d+$"))
    expect(page.locator("#health-updated")).to_contain_text("Updated")
    screenshot(page, f"{console.mode}-health")


def test_revoke_through_the_dialog_refuses_the_sdk(console, page):
    key = the_key(console)
    page.goto("/claw/keys")
    row = page.locator(f'#keys-table tr[data-key-id="{key.id}"]')
    expect(row).to_have_attribute("data-status", "active")
    dialog = page.locator("#revoke-dialog")

    # Esc cancels, and the key stays.
    row.locator("button[data-testid=revoke-key]").click()
    expect(dialog).to_be_visible()
    expect(page.locator("#revoke-name")).to_have_text(key.name)
    expect(page.locator("#revoke-cancel")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(row).to_have_attribute("data-status", "active")

    row.locator("button[data-testid=revoke-key]").click()
    expect(dialog).to_be_visible()
    page.locator("#revoke-reason").fill("console test")
    page.locator("#revoke-confirm").click()
    expect(dialog).to_be_hidden()
    expect(row).to_have_attribute("data-status", "revoked")
    expect(row.locator("button[data-testid=revoke-key]")).to_have_count(0)

    with pytest.raises(openai.AuthenticationError) as refused:
        chat(console.gw.url, key.secret, "local")
    assert refused.value.status_code == 401

    page.goto(f"/claw/keys/{key.id}")
    expect(page.locator("#fact-status")).to_have_text("revoked")
    expect(page.locator("#key-badge")).to_have_text("revoked")
    expect(page.locator("#fact-revoked time")).to_be_visible()
    expect(page.locator("#key-revoke")).to_be_hidden()


def test_changes_need_the_csrf_token(console, page):
    page.goto("/claw/keys")
    token = csrf_token(page)
    assert re.fullmatch(r"[0-9a-f]{32,}", token), token
    body = {"name": "csrf-refused", "admin_allowed": False, "rpm_limit": 60}
    # The browser's cookies, without the token, and with a wrong one.
    for headers in ({}, {"x-csrf-token": "0" * len(token)}):
        r = page.request.post("/claw/v1/api-keys", data=body, headers=headers)
        assert r.status == 403, (headers, r.status, r.text())
        assert r.json()["error"]["message"], r.text()
        r = page.request.delete(f"/claw/v1/api-keys/{console.gw.key_id}", headers=headers)
        assert r.status == 403, (headers, r.status, r.text())
    r = page.request.post("/claw/sign-out", form={"csrf": "0" * len(token)}, max_redirects=0)
    assert r.status == 403, r.status
    keys = api_json(page, "/claw/v1/api-keys")["keys"]
    assert not [k for k in keys if k["name"] == "csrf-refused"], keys
    assert [k["is_active"] for k in keys if k["id"] == console.gw.key_id] == [True], keys
    # With the page's token, the same change is made: the session is still good.
    r = page.request.post("/claw/v1/api-keys", data={**body, "name": "csrf-ok"},
                          headers={"x-csrf-token": token})
    assert r.status == 201, (r.status, r.text())


def test_pages_fit_a_phone(console, browser):
    key = the_key(console)
    pages = {
        "/claw/usage": "#card-requests[data-value]",
        "/claw/keys": "#keys-table tr[data-testid=key-row]",
        f"/claw/keys/{key.id}": "#requests-table tr[data-testid=request-row]",
        "/claw/ledger": "#ledger-table tr[data-testid=ledger-row]",
        "/claw/health": "#tiers-table tr[data-testid=tier-row]",
    }
    ctx = browser.new_context(base_url=console.gw.url, viewport=PHONE)
    try:
        tab = ctx.new_page()
        tab.goto("/claw/sign-in")
        expect(tab.locator("#sign-in-submit")).to_be_visible()
        no_horizontal_scroll(tab)
        ctx.add_cookies(console.context.cookies())
        for path, loaded in pages.items():
            tab.goto(path)
            expect(tab.locator(loaded).first).to_be_visible()
            no_horizontal_scroll(tab)
        # Also with the secret panel open.
        tab.goto("/claw/keys")
        tab.locator("#new-key-name").fill("phone")
        tab.locator("#create-key-submit").click()
        expect(tab.locator("#secret-panel")).to_be_visible()
        no_horizontal_scroll(tab)
        tab.locator("#secret-done").click()
    finally:
        ctx.close()


def test_keyboard_creates_a_key(console, page):
    page.goto("/claw/keys")
    expect(page.locator("#keys-table tr[data-testid=key-row]").first).to_be_visible()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "new-key-name":
            break
    expect(page.locator("#new-key-name")).to_be_focused()
    # The focus shows.
    assert page.evaluate("() => document.activeElement.matches(':focus-visible') && "
                         "getComputedStyle(document.activeElement).outlineStyle !== 'none'")
    page.keyboard.type("keyboard")
    page.keyboard.press("Enter")
    panel = page.locator("#secret-panel")
    expect(panel).to_be_visible()
    expect(panel).to_be_focused()
    expect(page.locator("#secret-name")).to_contain_text("keyboard")
    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "secret-done":
            break
    expect(page.locator("#secret-done")).to_be_focused()
    page.keyboard.press("Enter")
    expect(panel).to_be_hidden()
    expect(page.locator("#new-key-name")).to_be_focused()
    expect(page.locator('#keys-table tr[data-testid=key-row]:has(a:text-is("keyboard"))')) \
        .to_have_attribute("data-status", "active")


def test_signed_out_pages_send_to_sign_in(console, browser, page):
    gw = console.gw
    page.goto("/claw/usage")
    old = console.context.cookies()
    assert [c["name"] for c in old] == ["claw_session"], old
    page.locator("#sign-out").click()
    expect(page).to_have_url(f"{gw.url}/claw/sign-in")
    assert not console.context.cookies(), console.context.cookies()
    page.goto("/claw/keys")
    expect(page).to_have_url(f"{gw.url}/claw/sign-in?next=%2Fclaw%2Fkeys")

    # The old cookie, put back in another browser, is refused too.
    ctx = browser.new_context(base_url=gw.url, viewport=DESKTOP)
    try:
        ctx.add_cookies(old)
        tab = ctx.new_page()
        tab.goto(f"/claw/keys/{the_key(console).id}")
        expect(tab).to_have_url(
            f"{gw.url}/claw/sign-in?next={quote(f'/claw/keys/{the_key(console).id}', safe='')}")
        assert ctx.request.get("/claw/v1/api-keys").status == 401
    finally:
        ctx.close()


def test_wrong_credential_is_refused_then_limited(console, browser):
    """Last: while the address is limited even the right credential is refused."""
    ctx = browser.new_context(base_url=console.gw.url, viewport=DESKTOP)
    try:
        tab = ctx.new_page()
        tab.goto("/claw/sign-in?next=/claw/health")
        for _ in range(5):
            response = submit_sign_in(tab, "not-the-credential")
            assert response.status == 401, response.status
            expect(tab.locator("#sign-in-error")).to_have_text("That is not the admin credential.")
            expect(tab.locator("#secret")).to_have_value("")
        assert "not-the-credential" not in tab.content() + web_storage_and_url(tab)
        response = submit_sign_in(tab, "not-the-credential")
        assert response.status == 429, response.status
        assert int(response.headers["retry-after"]) >= 1, response.headers
        expect(tab.locator("#sign-in-error")).to_contain_text("Too many failed sign-ins")
        # Limited: the right credential is refused as well.
        response = submit_sign_in(tab, SECRET)
        assert response.status == 429, response.status
        expect(tab.locator("#sign-in-error")).to_contain_text("Too many failed sign-ins")
        assert not ctx.cookies(), ctx.cookies()
        assert SECRET not in web_storage_and_url(tab)
    finally:
        ctx.close()

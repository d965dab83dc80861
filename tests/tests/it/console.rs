//! The web console's server side: sign-in (cookie, rate limit), sign-out, CSRF on the admin
//! API's changes, the page shells and their weight, the endpoints the pages read (a key, its
//! recent requests, the ledger as server-sent events, the status) and the admin API's OpenAPI
//! document, whose schemas every answer here is validated against. The pages themselves run
//! in a real browser in `tests/python/test_console.py`.

use std::time::Duration;

use claw_gateway::console::{session_of, Sessions};
use claw_tests::gateway::TestGateway;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A browser-like client of the console: keeps no cookie jar (tests pass the cookie
/// explicitly) and does not follow redirects, so each one can be checked.
struct Browser<'a> {
    gw: &'a TestGateway,
    http: reqwest::Client,
}

impl<'a> Browser<'a> {
    fn new(gw: &'a TestGateway) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self { gw, http }
    }

    fn request(&self, method: Method, path: &str, cookie: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.gw.url));
        match cookie {
            Some(c) => request.header("cookie", format!("claw_session={c}")),
            None => request,
        }
    }

    async fn sign_in(&self, secret: &str) -> reqwest::Response {
        self.request(Method::POST, "/claw/sign-in", None)
            .form(&[("secret", secret), ("next", "/claw/keys")])
            .send()
            .await
            .unwrap()
    }

    /// Signs in with the admin credential; returns the session cookie's value.
    async fn session(&self) -> String {
        let response = self.sign_in(&self.gw.admin_token).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        session_cookie(response.headers()).expect("a session cookie")
    }

    /// A page's HTML and the CSRF token it carries.
    async fn page(&self, path: &str, cookie: &str) -> (String, String) {
        let response = self
            .request(Method::GET, path, Some(cookie))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let html = response.text().await.unwrap();
        let csrf = html
            .split("name=\"claw-csrf\" content=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the page carries its CSRF token")
            .to_owned();
        (html, csrf)
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("claw_session="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

/// Validates `instance` against the schema `name` of the gateway's own OpenAPI document.
async fn conforms(gw: &TestGateway, name: &str, instance: &Value) {
    let doc: Value = gw
        .http
        .get(format!("{}/claw/v1/openapi.json", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&schema).expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{name} does not match its schema: {errors:?}\n{instance:#}"
    );
}

#[tokio::test]
async fn pages_need_a_session_and_signing_in_sets_a_strict_expiring_cookie() {
    let gw = TestGateway::start().await;
    let browser = Browser::new(&gw);
    for path in [
        "/claw/usage",
        "/claw/keys",
        "/claw/keys/k1",
        "/claw/ledger",
        "/claw/health",
    ] {
        let response = browser
            .request(Method::GET, path, None)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
        let to = response.headers()[LOCATION].to_str().unwrap().to_owned();
        let next: String = url_param(&to, "next");
        assert!(to.starts_with("/claw/sign-in?"), "{to}");
        assert_eq!(next, path, "sent back to {path} after signing in");
    }
    // The console's address answers with the sign-in form, and once signed in with usage.
    let root = browser
        .request(Method::GET, "/claw/", None)
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), 200);
    let form = root.text().await.unwrap();
    assert!(form.contains("action=\"/claw/sign-in\"") && form.contains("value=\"/claw/usage\""));
    let cookie = browser.session().await;
    let (home, _) = browser.page("/claw/", &cookie).await;
    assert!(home.contains("data-page=\"usage\""));

    // A malformed query string does not break the form (the first `next` counts).
    let lenient = browser
        .request(
            Method::GET,
            "/claw/sign-in?next=/claw/keys&next=/claw/ledger&junk",
            None,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(lenient.status(), 200);
    assert!(lenient
        .text()
        .await
        .unwrap()
        .contains("value=\"/claw/keys\""));
    let form = browser
        .request(Method::GET, "/claw/sign-in", None)
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    assert!(form.text().await.unwrap().contains("name=\"secret\""));

    let wrong = browser.sign_in("not-the-secret").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(session_cookie(wrong.headers()).is_none());
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("That is not the admin credential."));

    let right = browser.sign_in(&gw.admin_token).await;
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    assert_eq!(right.headers()[LOCATION], "/claw/keys");
    let set_cookie = right.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/claw", "Max-Age=43200"] {
        assert!(
            set_cookie.contains(attribute),
            "{set_cookie} lacks {attribute}"
        );
    }
    assert!(
        !set_cookie.contains(&gw.admin_token),
        "the credential is not in the cookie"
    );
    assert!(!set_cookie.contains("Secure"), "plain HTTP: no Secure flag");
    // Behind a proxy that terminates HTTPS, the cookie is Secure.
    let https = browser
        .request(Method::POST, "/claw/sign-in", None)
        .header("x-forwarded-proto", "https")
        .form(&[("secret", gw.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    assert!(https.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Secure"));
    // A sign-in never sends anyone off the console.
    let away = browser
        .request(Method::POST, "/claw/sign-in", None)
        .form(&[
            ("secret", gw.admin_token.as_str()),
            ("next", "//evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(away.headers()[LOCATION], "/claw/usage");
}

#[tokio::test]
async fn pages_are_light_self_contained_and_escape_what_they_show() {
    let gw = TestGateway::start().await;
    let browser = Browser::new(&gw);
    let cookie = browser.session().await;
    let mut weight = 0;
    for page in ["/claw/usage", "/claw/keys", "/claw/ledger", "/claw/health"] {
        let response = browser
            .request(Method::GET, page, Some(&cookie))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{page}");
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(response.headers()["cache-control"], "no-store");
        let html = response.text().await.unwrap();
        assert!(
            !html.contains(&gw.admin_token),
            "{page} shows the credential"
        );
        assert!(!html.contains("<script>"), "{page} has an inline script");
        weight = weight.max(html.len());
    }
    for asset in ["/claw/assets/console.js", "/claw/assets/console.css"] {
        let response = browser
            .request(Method::GET, asset, None)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        weight += response.bytes().await.unwrap().len();
    }
    assert!(
        weight < 100 * 1024,
        "a page with its assets weighs {weight} bytes"
    );
    // Asked for gzip (browsers do), the assets come compressed.
    let gzipped = browser
        .request(Method::GET, "/claw/assets/console.js", None)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");
    let compressed = gzipped.bytes().await.unwrap().len();
    assert!(
        compressed < weight / 3,
        "console.js gzipped is {compressed} bytes"
    );

    // What a URL puts in a page is escaped.
    let (html, _) = browser
        .page("/claw/keys/%3Cscript%3Ealert(1)%3C%2Fscript%3E", &cookie)
        .await;
    assert!(!html.contains("<script>alert(1)"), "the key id is escaped");
}

fn url_param(location: &str, name: &str) -> String {
    let query = location.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .find_map(|(k, v)| (k == name).then(|| v.into_owned()))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_session_reads_the_admin_api_and_its_changes_need_its_csrf_token() {
    let gw = TestGateway::start().await;
    let browser = Browser::new(&gw);
    let cookie = browser.session().await;
    let other = browser.session().await;
    let (_, csrf) = browser.page("/claw/keys", &cookie).await;
    let (_, other_csrf) = browser.page("/claw/keys", &other).await;
    assert_ne!(csrf, other_csrf, "each session has its own token");

    let list = browser
        .request(Method::GET, "/claw/v1/api-keys", Some(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200, "a session reads without a token");

    let create = |token: Option<&str>| {
        let mut request = browser
            .request(Method::POST, "/claw/v1/api-keys", Some(&cookie))
            .json(&json!({"name": "from the console"}));
        if let Some(token) = token {
            request = request.header("x-csrf-token", token);
        }
        request.send()
    };
    for token in [None, Some(""), Some(other_csrf.as_str())] {
        let refused = create(token).await.unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{token:?}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "permission_denied");
    }
    assert_eq!(
        gw.state.appender.appended().borrow().total(),
        0,
        "nothing was created"
    );

    let created = create(Some(&csrf)).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    conforms(&gw, "CreatedKey", &created).await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/claw/v1/api-keys/{id}");

    let revoke = browser
        .request(Method::DELETE, &path, Some(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), StatusCode::FORBIDDEN);
    let revoke = browser
        .request(Method::DELETE, &path, Some(&cookie))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let revoked: Value = revoke.json().await.unwrap();
    assert_eq!(revoked["is_active"], false);
    conforms(&gw, "KeyRecord", &revoked).await;

    // A forged or tampered cookie is no session.
    let mut tampered = cookie.clone();
    tampered.replace_range(0..1, if cookie.starts_with('0') { "1" } else { "0" });
    for bad in [tampered.as_str(), "nonsense"] {
        let response = browser
            .request(Method::GET, "/claw/v1/api-keys", Some(bad))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bad}");
    }
}

#[tokio::test]
async fn signing_out_ends_the_session() {
    let gw = TestGateway::start().await;
    let browser = Browser::new(&gw);
    let cookie = browser.session().await;
    let (_, csrf) = browser.page("/claw/usage", &cookie).await;

    let forged = browser
        .request(Method::POST, "/claw/sign-out", Some(&cookie))
        .form(&[("csrf", "0000")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        forged.status(),
        StatusCode::FORBIDDEN,
        "a sign-out needs the token too"
    );

    let out = browser
        .request(Method::POST, "/claw/sign-out", Some(&cookie))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/claw/sign-in");
    let cleared = out.headers()[SET_COOKIE].to_str().unwrap();
    assert!(
        cleared.starts_with("claw_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    let page = browser
        .request(Method::GET, "/claw/usage", Some(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.status(),
        StatusCode::SEE_OTHER,
        "the old cookie no longer opens pages"
    );
    let api = browser
        .request(Method::GET, "/claw/v1/usage", Some(&cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED, "nor the API");

    // Another gateway sharing the credential and the read models (it never saw this session
    // nor its sign-out) refuses it too, and accepts a live one.
    let other_gateway = Sessions::new(&gw.admin_token);
    let headers = |c: &str| {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("cookie", format!("claw_session={c}").parse().unwrap());
        headers
    };
    let signed_out = session_of(&headers(&cookie), &other_gateway, &gw.state.store).await;
    assert!(signed_out.is_none(), "the sign-out is shared");
    let live = browser.session().await;
    assert!(session_of(&headers(&live), &other_gateway, &gw.state.store)
        .await
        .is_some());
}

#[tokio::test]
async fn failed_sign_ins_are_rate_limited() {
    let gw = TestGateway::start().await;
    let browser = Browser::new(&gw);
    for attempt in 1..=5 {
        let response = browser.sign_in(&format!("guess-{attempt}")).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let limited = browser.sign_in("guess-6").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=12).contains(&wait), "Retry-After {wait}");
    assert!(limited
        .text()
        .await
        .unwrap()
        .contains("Too many failed sign-ins"));
    // While limited, even the right credential is refused: guessing on learns nothing.
    let right = browser.sign_in(&gw.admin_token).await;
    assert_eq!(right.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(session_cookie(right.headers()).is_none());
}

#[tokio::test]
async fn behind_a_proxy_failed_sign_ins_are_limited_per_client() {
    let gw = TestGateway::start_with(&["--client-ip-header", "x-real-ip"]).await;
    let browser = Browser::new(&gw);
    let attempt = |client: &'static str, secret: String| {
        browser
            .request(Method::POST, "/claw/sign-in", None)
            .header("x-real-ip", client)
            .form(&[("secret", secret)])
            .send()
    };
    for n in 0..6 {
        let response = attempt("203.0.113.7", format!("guess-{n}")).await.unwrap();
        let expected = if n < 5 { 401 } else { 429 };
        assert_eq!(response.status(), expected, "attempt {n}");
    }
    // The admin, behind the same proxy but from another address, still signs in.
    let admin = attempt("198.51.100.2", gw.admin_token.clone())
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::SEE_OTHER);
    assert!(session_cookie(admin.headers()).is_some());
}

#[tokio::test]
async fn a_keys_page_reads_the_key_and_its_recent_requests() {
    let gw = TestGateway::start().await;
    let (id, key) = gw.create_key("console", 600, false).await;
    for n in 0..3 {
        let response = gw
            .chat(&key, &json!({"model": "local", "messages": [{"role": "user", "content": format!("hi {n}")}]}))
            .await;
        assert_eq!(response.status(), 200);
    }
    let served = gw.wait_for_served(3).await;

    let page = gw
        .admin_get(&format!("/claw/v1/api-keys/{id}/requests"))
        .await;
    conforms(&gw, "RequestList", &page).await;
    let rows = page["requests"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let times: Vec<&str> = rows
        .iter()
        .map(|r| r["occurred_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    for row in rows {
        let fact = served
            .iter()
            .find(|s| s.request_id == row["request_id"].as_str().unwrap())
            .expect("every row is a served request");
        assert_eq!(row["status"], fact.status);
        assert_eq!(row["total_tokens"], fact.total_tokens);
        assert_eq!(row["latency_ms"], fact.latency_ms);
        assert_eq!(row["tier"], "local");
        assert_eq!(row["provider"], "ollama");
        assert_eq!(row["model"], fact.model_served);
    }
    let two = gw
        .admin_get(&format!("/claw/v1/api-keys/{id}/requests?limit=2"))
        .await;
    assert_eq!(two["requests"].as_array().unwrap().len(), 2);

    for (path, status) in [
        (format!("/claw/v1/api-keys/{id}/requests?limit=0"), 400),
        (format!("/claw/v1/api-keys/{id}/requests?limit=501"), 400),
        (format!("/claw/v1/api-keys/{id}/requests?limit=-1"), 400),
        ("/claw/v1/usage?since=1h&since=2h".to_owned(), 400),
        ("/claw/v1/api-keys/no-such-key/requests".to_owned(), 404),
        ("/claw/v1/api-keys/no-such-key".to_owned(), 404),
    ] {
        let response = gw.admin(Method::GET, &path).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        conforms(&gw, "ErrorResponse", &body).await;
    }
}

#[tokio::test]
async fn the_ledger_streams_to_the_console_as_server_sent_events() {
    let gw = TestGateway::start().await;
    let (first, _) = gw.create_key("first", 60, false).await;
    let (_, key) = gw.create_key("second", 60, false).await;
    let response = gw
        .admin(Method::GET, "/claw/v1/events?tail=1&follow=true")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut events = response.bytes_stream().eventsource();
    let mut next = async || {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event within 20 s")
            .expect("the stream stays open")
            .expect("a well-formed event");
        let record: Value = serde_json::from_str(&event.data).unwrap();
        // The id is the frontier just past the event.
        let past: Value = serde_json::from_str(&event.id).unwrap();
        let next_offset = record["offset"].as_u64().unwrap() + 1;
        assert_eq!(
            past[record["partition"].to_string()],
            next_offset,
            "{}",
            event.id
        );
        (record, event.id)
    };
    // `tail=1`: the last event of each partition so far. Embedded, that is the second key's
    // creation; distributed, the two keys may sit in two partitions, each showing its own.
    loop {
        let (tail, _) = next().await;
        assert_eq!(tail["event"]["event_type"], "KeyCreated");
        if tail["event"]["data"]["name"] == "second" {
            break;
        }
        assert_eq!(tail["event"]["key_id"], first.as_str());
    }
    // Followed: a request served now arrives.
    let answer = gw
        .chat(
            &key,
            &json!({"model": "local", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    let request_id = answer.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (served, after_served) = loop {
        let (record, id) = next().await;
        if record["event"]["event_type"] != "KeyCreated" {
            break (record, id);
        }
        // The first key's partition may come after the second's.
        assert_eq!(record["event"]["key_id"], first.as_str());
    };
    assert_eq!(served["event"]["event_type"], "RequestServed");
    assert_eq!(served["event"]["data"]["request_id"], request_id);

    // A client that reconnects with the last id it saw resumes just after it: the next event
    // is the one appended since, not a repeat.
    drop(events);
    let again = gw
        .chat(
            &key,
            &json!({"model": "local", "messages": [{"role": "user", "content": "again"}]}),
        )
        .await;
    let again_id = again.headers()["x-request-id"].to_str().unwrap().to_owned();
    let resumed = gw
        .admin(Method::GET, "/claw/v1/events?follow=true")
        .header("accept", "text/event-stream")
        .header("last-event-id", &after_served)
        .send()
        .await
        .unwrap();
    let mut events = resumed.bytes_stream().eventsource();
    let first = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("an event within 20 s")
        .expect("the stream stays open")
        .expect("a well-formed event");
    let record: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(record["event"]["data"]["request_id"], again_id.as_str());
}

#[tokio::test]
async fn the_status_and_the_openapi_document_describe_the_gateway() {
    let gw = TestGateway::start().await;
    let status = gw.admin_get("/claw/v1/status").await;
    conforms(&gw, "Status", &status).await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_s"].as_u64().is_some());
    let local = &status["tiers"][0];
    assert_eq!(local["provider"], "ollama");
    assert!(local["load"]["capacity"].as_u64().unwrap() > 0);

    let response = gw
        .http
        .get(format!("{}/claw/v1/openapi.json", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the document needs no credential");
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/claw/v1/api-keys", "get"),
        ("/claw/v1/api-keys", "post"),
        ("/claw/v1/api-keys/{id}", "get"),
        ("/claw/v1/api-keys/{id}", "delete"),
        ("/claw/v1/api-keys/{id}/requests", "get"),
        ("/claw/v1/usage", "get"),
        ("/claw/v1/usage.csv", "get"),
        ("/claw/v1/events", "get"),
        ("/claw/v1/audit", "post"),
        ("/claw/v1/status", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} is documented"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["internal_token"]["name"], "x-internal-token");
    assert_eq!(schemes["console_session"]["in"], "cookie");

    let keys = gw.admin_get("/claw/v1/api-keys").await;
    conforms(&gw, "KeyList", &keys).await;
    let usage = gw.admin_get("/claw/v1/usage").await;
    conforms(&gw, "UsageDocument", &usage).await;
}

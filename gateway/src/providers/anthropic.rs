//! The paid Anthropic tier: the Messages API (`POST /v1/messages` streamed as Server-Sent
//! Events, `GET /v1/models`), translated to and from the gateway's provider-neutral types.
//!
//! Every call carries `x-api-key` (marked sensitive, never logged or put in an error) and
//! `anthropic-version: 2023-06-01`. Where OpenAI and Anthropic differ, the translation is:
//!
//! - **System prompt.** Anthropic has no `system` role: every system message goes, in order,
//!   into the top-level `system` string, joined with blank lines (omitted when there is none).
//! - **Roles.** Only `user` and `assistant` exist. Tool results become user turns, and
//!   consecutive turns of one role are merged (their content blocks concatenated) so the roles
//!   alternate. Nothing is invented: when the first non-system message is the assistant's, it
//!   is sent as the first turn unchanged — Anthropic's own API accepts that (Amazon Bedrock's
//!   copy does not, and answers 400, which is relayed as such).
//! - **Content.** Text alone is sent as a string; with images, as blocks (images first, as
//!   Anthropic recommends, then the text) with the media type the client's `data:` URL named.
//!   Anthropic refuses empty or whitespace-only text blocks, so those are left out, and
//!   refuses a final assistant turn ending in whitespace (a "prefill"), so that is trimmed.
//! - **Sampling.** See [`chat_body`]: `temperature` is clamped to Anthropic's 0–1, `top_p` is
//!   sent only without `temperature`, whitespace-only stop sequences are dropped, and `seed`,
//!   `presence_penalty` and `frequency_penalty` have no equivalent and are dropped.
//! - **JSON mode.** There is no `response_format`: the system prompt gains an instruction to
//!   answer with JSON only (and the schema, when there is one).
//! - **Embeddings.** Anthropic has none; see [`NO_EMBEDDINGS`].

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use serde_json::{json, Value};

use super::http::{listed, Upstream};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, Message,
    OutputFormat, ProviderError, Role, Usage,
};
use crate::config::Timeouts;

/// Where Anthropic's API lives unless `ANTHROPIC_BASE_URL` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The `anthropic-version` header every request carries.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` when the request sets none (Anthropic requires it; OpenAI does not).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Anthropic's highest `temperature`; OpenAI allows up to 2.
pub const MAX_TEMPERATURE: f64 = 1.0;

/// What [`Anthropic::embed`] answers: Anthropic has no embeddings API, so the call fails
/// without reaching the network, with the 404 Anthropic itself gives for a path it does not
/// have. A 4xx (unlike 501) does not fall through to another tier: asking again elsewhere is
/// the router's decision, not something a missing API should trigger.
pub const NO_EMBEDDINGS: &str = "Anthropic has no embeddings API";

/// Longest model list followed through `GET /v1/models` pages (1,000 ids each).
const MAX_MODEL_PAGES: usize = 10;

/// Anthropic's Messages API at `base_url` with one API key.
pub struct Anthropic {
    http: Upstream,
    base_url: String,
    /// The key as a sensitive header value; `None` when it cannot be a header value at all
    /// (every call then fails as Anthropic would answer a bad key: 401).
    api_key: Option<HeaderValue>,
}

impl Anthropic {
    pub fn new(base_url: &str, api_key: &str, timeouts: Timeouts) -> Result<Self, reqwest::Error> {
        let api_key = HeaderValue::from_str(api_key.trim()).ok().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Ok(Self {
            http: Upstream::new("anthropic", timeouts)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// `call` with the key and version headers.
    fn authorized(
        &self,
        call: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let key = self.api_key.clone().ok_or_else(|| ProviderError::Status {
            provider: self.http.name,
            status: 401,
            message: "the configured Anthropic API key is not a valid HTTP header value".into(),
        })?;
        Ok(call
            .header("x-api-key", key)
            .header("anthropic-version", API_VERSION))
    }

    /// One page of `GET /v1/models`: the ids, and the cursor for the next page if any.
    async fn models_page(
        &self,
        after_id: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), ProviderError> {
        let mut url = reqwest::Url::parse(&self.url("/v1/models"))
            .map_err(|e| self.http.protocol(format!("bad ANTHROPIC_BASE_URL: {e}")))?;
        url.query_pairs_mut().append_pair("limit", "1000");
        if let Some(after) = after_id {
            url.query_pairs_mut().append_pair("after_id", after);
        }
        let call = self.authorized(self.http.client.get(url))?;
        let response = self.http.send(call).await?;
        let body = self.http.json(response).await?;
        let ids = listed(&body, "data", "id");
        let next = (body.get("has_more").and_then(Value::as_bool) == Some(true))
            .then(|| {
                body.get("last_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .flatten();
        Ok((ids, next))
    }
}

/// Which side of the conversation a turn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaker {
    User,
    Assistant,
}

impl Speaker {
    fn of(role: Role) -> Option<Self> {
        match role {
            Role::System => None,
            Role::User | Role::Tool => Some(Speaker::User),
            Role::Assistant => Some(Speaker::Assistant),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Speaker::User => "user",
            Speaker::Assistant => "assistant",
        }
    }
}

/// One entry of Anthropic's `messages`: a speaker and its content blocks.
struct Turn {
    speaker: Speaker,
    blocks: Vec<Value>,
}

impl Turn {
    /// The wire form: content as a plain string when it is one text block.
    fn to_json(&self) -> Value {
        let content = match self.blocks.as_slice() {
            [only] if only["type"] == "text" => only["text"].clone(),
            blocks => json!(blocks),
        };
        json!({"role": self.speaker.as_str(), "content": content})
    }
}

/// A message's content blocks: its images, then its text unless that is blank.
fn content_blocks(message: &Message) -> Vec<Value> {
    let mut blocks: Vec<Value> = message
        .images
        .iter()
        .map(|image| {
            json!({"type": "image", "source": {"type": "base64",
                "media_type": image.media_type, "data": image.data}})
        })
        .collect();
    if !message.content.trim().is_empty() {
        blocks.push(json!({"type": "text", "text": message.content}));
    }
    blocks
}

/// The non-system messages as alternating turns (see the module notes).
fn turns(messages: &[Message]) -> Vec<Turn> {
    let mut turns: Vec<Turn> = Vec::new();
    for message in messages {
        let Some(speaker) = Speaker::of(message.role) else {
            continue;
        };
        let blocks = content_blocks(message);
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.speaker == speaker => last.blocks.extend(blocks),
            _ => turns.push(Turn { speaker, blocks }),
        }
    }
    if let Some(last) = turns.last_mut() {
        if last.speaker == Speaker::Assistant {
            if let Some(Value::String(text)) =
                last.blocks.last_mut().and_then(|b| b.get_mut("text"))
            {
                text.truncate(text.trim_end().len());
            }
        }
    }
    turns
}

/// The system prompt: every system message, then the JSON-mode instruction if any.
fn system_prompt(request: &ChatRequest) -> Option<String> {
    let mut parts: Vec<String> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System && !m.content.is_empty())
        .map(|m| m.content.clone())
        .collect();
    match &request.params.format {
        Some(OutputFormat::Json) => parts.push(JSON_ONLY.to_owned()),
        Some(OutputFormat::JsonSchema(schema)) => {
            parts.push(format!(
                "{JSON_ONLY} The JSON must conform to this JSON Schema:\n{schema}"
            ));
        }
        None => {}
    }
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// The instruction that stands in for OpenAI's JSON mode.
const JSON_ONLY: &str = "Respond with a single valid JSON value and nothing else: no text \
    before or after it and no Markdown code fences.";

/// The `/v1/messages` body for `request`.
///
/// - `max_tokens` is the request's, else [`DEFAULT_MAX_TOKENS`] (Anthropic requires one).
/// - `temperature` is clamped to Anthropic's range 0–1: OpenAI's values above 1 (up to 2)
///   become 1.0, the most random Anthropic allows.
/// - `top_p` is sent only when `temperature` is not: Anthropic advises altering one of them,
///   and its newer models refuse a request that sets both.
/// - `stop` becomes `stop_sequences`, without whitespace-only entries (Anthropic refuses them).
pub fn chat_body(request: &ChatRequest) -> Value {
    let p = &request.params;
    let messages: Vec<Value> = turns(&request.messages).iter().map(Turn::to_json).collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
        "stream": true,
    });
    if let Some(system) = system_prompt(request) {
        body["system"] = json!(system);
    }
    if let Some(t) = p.temperature {
        body["temperature"] = json!(t.clamp(0.0, MAX_TEMPERATURE));
    } else if let Some(top_p) = p.top_p {
        body["top_p"] = json!(top_p);
    }
    let stops: Vec<&String> = p.stop.iter().filter(|s| !s.trim().is_empty()).collect();
    if !stops.is_empty() {
        body["stop_sequences"] = json!(stops);
    }
    body
}

/// The finish reason for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> FinishReason {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "refusal" => FinishReason::ContentFilter,
        // end_turn, stop_sequence, tool_use, pause_turn, and anything newer.
        _ => FinishReason::Stop,
    }
}

/// All input tokens in a `usage` object: Anthropic counts cache writes and reads apart from
/// `input_tokens`, and the three together are what the prompt cost.
fn prompt_tokens(usage: &Value) -> Option<u64> {
    let input = usage.get("input_tokens")?.as_u64()?;
    let cached = ["cache_creation_input_tokens", "cache_read_input_tokens"]
        .iter()
        .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
        .sum::<u64>();
    Some(input + cached)
}

/// Turns the Messages event stream into [`ChatEvent`]s, one event at a time.
struct EventReader {
    http: Upstream,
    /// `message_stop` arrived: the answer is complete.
    stopped: bool,
    /// A `Finish` was produced (from `message_delta`).
    finished: bool,
}

impl EventReader {
    fn new(http: Upstream) -> Self {
        Self {
            http,
            stopped: false,
            finished: false,
        }
    }

    /// The events one SSE event (`event:` name and `data:`) carries.
    fn read(&mut self, name: &str, data: &str) -> Result<Vec<ChatEvent>, ProviderError> {
        let data: Value = serde_json::from_str(data).map_err(|e| {
            self.http
                .protocol(format!("bad JSON in `{name}` event: {e}"))
        })?;
        // Unnamed events arrive as "message" (the SSE default); Anthropic names every event,
        // and its data repeats the name as `type`.
        let kind = if name.is_empty() || name == "message" {
            data.get("type").and_then(Value::as_str).unwrap_or_default()
        } else {
            name
        };
        let mut events = Vec::new();
        match kind {
            "message_start" => {
                if let Some(prompt) = data.pointer("/message/usage").and_then(prompt_tokens) {
                    events.push(ChatEvent::Usage(Usage {
                        prompt_tokens: Some(prompt),
                        completion_tokens: None,
                    }));
                }
            }
            "content_block_delta" => {
                let delta = &data["delta"];
                if delta["type"] == "text_delta" {
                    match delta["text"].as_str() {
                        Some("") => {}
                        Some(text) => events.push(ChatEvent::Delta(text.to_owned())),
                        None => return Err(self.http.protocol("text_delta without text")),
                    }
                }
            }
            "message_delta" => {
                let usage = &data["usage"];
                let completion = usage.get("output_tokens").and_then(Value::as_u64);
                let prompt = prompt_tokens(usage);
                if completion.is_some() || prompt.is_some() {
                    events.push(ChatEvent::Usage(Usage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                    }));
                }
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    events.push(ChatEvent::Finish(finish_reason(reason)));
                    self.finished = true;
                }
            }
            "message_stop" => {
                self.stopped = true;
                if !self.finished {
                    events.push(ChatEvent::Finish(FinishReason::Stop));
                    self.finished = true;
                }
            }
            "error" => {
                let err = &data["error"];
                let kind = err["type"].as_str().unwrap_or("error");
                let message = err["message"].as_str().unwrap_or("error in the stream");
                return Err(self.http.protocol(format!("{kind}: {message}")));
            }
            // ping, content_block_start/stop, other block deltas (tool input, thinking), and
            // event types Anthropic may add later.
            _ => {}
        }
        Ok(events)
    }
}

/// The chat events of a Messages event stream; it fails if the stream ends before
/// `message_stop`, and ends at the first error.
fn chat_events<S>(http: Upstream, sse: S) -> ChatStream
where
    S: Stream<Item = Result<(String, String), ProviderError>> + Send + 'static,
{
    let start = Some((Box::pin(sse), EventReader::new(http)));
    let batches = futures::stream::unfold(start, |state| async move {
        let (mut sse, mut reader) = state?;
        loop {
            let failure = match sse.next().await {
                None => reader
                    .http
                    .protocol("the event stream ended before message_stop"),
                Some(Err(e)) => e,
                Some(Ok((name, data))) => match reader.read(&name, &data) {
                    Ok(events) if events.is_empty() && !reader.stopped => continue,
                    Ok(events) => {
                        let rest = (!reader.stopped).then_some((sse, reader));
                        return Some((events.into_iter().map(Ok).collect::<Vec<_>>(), rest));
                    }
                    Err(e) => e,
                },
            };
            return Some((vec![Err(failure)], None));
        }
    });
    Box::pin(batches.flat_map(futures::stream::iter))
}

#[async_trait]
impl ChatProvider for Anthropic {
    fn provider(&self) -> Provider {
        Provider::Anthropic
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let call = self
            .authorized(self.http.client.post(self.url("/v1/messages")))?
            .json(&chat_body(request));
        let response = self
            .http
            .send(call)
            .await
            .map_err(|e| e.for_model(&request.model))?;
        Ok(chat_events(self.http.clone(), self.http.sse(response)))
    }

    /// Always fails with [`NO_EMBEDDINGS`] (status 404).
    async fn embed(&self, _model: &str, _inputs: &[String]) -> Result<Embeddings, ProviderError> {
        Err(ProviderError::Status {
            provider: self.http.name,
            status: 404,
            message: NO_EMBEDDINGS.to_owned(),
        })
    }

    async fn models(&self) -> Result<Vec<String>, ProviderError> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_MODEL_PAGES {
            let (page, next) = self.models_page(after.as_deref()).await?;
            ids.extend(page);
            match next {
                Some(cursor) => after = Some(cursor),
                None => break,
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::providers::test_support::{self, chat_request, msg};
    use crate::providers::{ChatParams, Image};
    use proptest::prelude::*;

    fn request(messages: Vec<Message>, params: ChatParams) -> ChatRequest {
        chat_request("claude-3-5-sonnet-latest", messages, params)
    }

    fn http() -> Upstream {
        test_support::http("anthropic")
    }

    /// Runs `events` (name, data) through the stream reader and collects what comes out.
    async fn run(events: &[(&str, Value)]) -> Vec<Result<ChatEvent, ProviderError>> {
        let items: Vec<Result<(String, String), ProviderError>> = events
            .iter()
            .map(|(name, data)| Ok(((*name).to_owned(), data.to_string())))
            .collect();
        chat_events(http(), futures::stream::iter(items))
            .collect()
            .await
    }

    fn message_start(input: u64) -> (&'static str, Value) {
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                "role": "assistant", "content": [], "model": "claude-3-5-sonnet-20241022",
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
        )
    }

    fn text_delta(text: &str) -> (&'static str, Value) {
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}),
        )
    }

    fn message_delta(stop_reason: &str, output: u64) -> (&'static str, Value) {
        (
            "message_delta",
            json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": output}}),
        )
    }

    fn message_stop() -> (&'static str, Value) {
        ("message_stop", json!({"type": "message_stop"}))
    }

    #[test]
    fn system_messages_go_to_system_and_roles_alternate() {
        let req = request(
            vec![
                msg(Role::System, "be brief"),
                msg(Role::User, "hi"),
                msg(Role::System, "be kind"),
                msg(Role::User, "there"),
                msg(Role::Assistant, "hello"),
                msg(Role::Tool, "42"),
                msg(Role::User, "thanks"),
            ],
            ChatParams::default(),
        );
        let body = chat_body(&req);
        assert_eq!(body["system"], "be brief\n\nbe kind");
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "42"},
                                             {"type": "text", "text": "thanks"}]},
            ])
        );
        assert_eq!(body["model"], "claude-3-5-sonnet-latest");
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        for absent in ["temperature", "top_p", "stop_sequences"] {
            assert!(body.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn no_system_message_means_no_system_field_and_a_leading_assistant_turn_is_kept() {
        let req = request(
            vec![
                msg(Role::Assistant, "How can I help?"),
                msg(Role::User, "hi"),
            ],
            ChatParams::default(),
        );
        let body = chat_body(&req);
        assert!(body.get("system").is_none());
        assert_eq!(
            body["messages"],
            json!([{"role": "assistant", "content": "How can I help?"},
                   {"role": "user", "content": "hi"}])
        );
    }

    #[test]
    fn blank_text_is_left_out_and_a_final_assistant_prefill_is_trimmed() {
        let req = request(
            vec![
                msg(Role::User, "hi"),
                msg(Role::Assistant, "  "),
                msg(Role::User, ""),
                msg(Role::User, "go on"),
                msg(Role::Assistant, "The answer is "),
            ],
            ChatParams::default(),
        );
        assert_eq!(
            chat_body(&req)["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "text", "text": "go on"}]},
                {"role": "assistant", "content": "The answer is"},
            ])
        );
    }

    #[test]
    fn sampling_settings_are_translated() {
        let params = ChatParams {
            temperature: Some(1.7),
            top_p: Some(0.5),
            max_tokens: Some(64),
            stop: vec!["\n".into(), "END".into(), " ".into()],
            seed: Some(7),
            presence_penalty: Some(0.1),
            frequency_penalty: Some(0.2),
            format: None,
        };
        let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["temperature"], 1.0);
        assert!(
            body.get("top_p").is_none(),
            "top_p only without temperature"
        );
        assert_eq!(body["stop_sequences"], json!(["END"]));
        for dropped in ["seed", "presence_penalty", "frequency_penalty", "stop"] {
            assert!(body.get(dropped).is_none(), "{dropped}");
        }

        let params = ChatParams {
            temperature: Some(0.3),
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(body["temperature"], 0.3);
        let params = ChatParams {
            top_p: Some(0.9),
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(body["top_p"], 0.9);
        assert!(body.get("temperature").is_none());
    }

    #[test]
    fn images_become_base64_blocks_before_the_text() {
        let (png, jpeg, gif) = (
            "iVBORw0K".to_owned(),
            "/9j/4AAQ".to_owned(),
            "R0lGODlh".to_owned(),
        );
        let mut user = msg(Role::User, "what is this?");
        user.images = vec![
            Image {
                media_type: "image/jpeg".into(),
                data: jpeg.clone(),
            },
            Image {
                media_type: "image/gif".into(),
                data: gif.clone(),
            },
        ];
        let body = chat_body(&request(vec![user], ChatParams::default()));
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": gif}},
                {"type": "text", "text": "what is this?"},
            ]}])
        );

        let mut only_image = msg(Role::User, "");
        only_image.images = vec![Image::png(png.clone())];
        let body = chat_body(&request(vec![only_image], ChatParams::default()));
        assert_eq!(
            body["messages"][0]["content"],
            json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}])
        );
    }

    #[test]
    fn json_mode_asks_for_json_in_the_system_prompt() {
        let json_mode = ChatParams {
            format: Some(OutputFormat::Json),
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "list")], json_mode));
        assert_eq!(body["system"], JSON_ONLY);

        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        let schema_mode = ChatParams {
            format: Some(OutputFormat::JsonSchema(schema.clone())),
            ..ChatParams::default()
        };
        let body = chat_body(&request(
            vec![msg(Role::System, "be brief"), msg(Role::User, "count")],
            schema_mode,
        ));
        let system = body["system"].as_str().unwrap();
        assert!(system.starts_with("be brief\n\nRespond with a single valid JSON value"));
        assert!(system.ends_with(&schema.to_string()), "{system}");
        assert!(body.get("response_format").is_none());
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        assert_eq!(finish_reason("end_turn"), FinishReason::Stop);
        assert_eq!(finish_reason("stop_sequence"), FinishReason::Stop);
        assert_eq!(finish_reason("tool_use"), FinishReason::Stop);
        assert_eq!(finish_reason("pause_turn"), FinishReason::Stop);
        assert_eq!(finish_reason("max_tokens"), FinishReason::Length);
        assert_eq!(
            finish_reason("model_context_window_exceeded"),
            FinishReason::Length
        );
        assert_eq!(finish_reason("refusal"), FinishReason::ContentFilter);
        assert_eq!(finish_reason("something_new"), FinishReason::Stop);
    }

    #[tokio::test]
    async fn the_documented_event_sequence_yields_text_usage_and_finish() {
        let events = run(&[
            message_start(25),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            text_delta("Hello"),
            text_delta("!"),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            message_delta("end_turn", 15),
            message_stop(),
        ])
        .await;
        let events: Vec<ChatEvent> = events.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events,
            vec![
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(25),
                    completion_tokens: None
                }),
                ChatEvent::Delta("Hello".into()),
                ChatEvent::Delta("!".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: None,
                    completion_tokens: Some(15)
                }),
                ChatEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[tokio::test]
    async fn cached_input_counts_as_prompt_and_max_tokens_is_length() {
        let (name, mut start) = message_start(5);
        start["message"]["usage"]["cache_creation_input_tokens"] = json!(100);
        start["message"]["usage"]["cache_read_input_tokens"] = json!(20);
        let events = run(&[
            (name, start),
            message_delta("max_tokens", 3),
            message_stop(),
        ])
        .await;
        let events: Vec<ChatEvent> = events.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events[0],
            ChatEvent::Usage(Usage {
                prompt_tokens: Some(125),
                completion_tokens: None
            })
        );
        assert_eq!(
            events.last(),
            Some(&ChatEvent::Finish(FinishReason::Length))
        );
    }

    #[tokio::test]
    async fn unnamed_events_are_read_by_their_type_and_other_deltas_are_ignored() {
        let events = run(&[
            ("", message_start(3).1),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            ),
            ("message", text_delta("ok").1),
            ("some_future_event", json!({"type": "some_future_event"})),
            ("", message_stop().1),
        ])
        .await;
        let events: Vec<ChatEvent> = events.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events[1..],
            [
                ChatEvent::Delta("ok".into()),
                ChatEvent::Finish(FinishReason::Stop)
            ]
        );
    }

    #[tokio::test]
    async fn an_error_event_ends_the_stream_with_its_message() {
        let events = run(&[
            message_start(3),
            text_delta("Hel"),
            (
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
            text_delta("never"),
        ])
        .await;
        assert_eq!(events.len(), 3);
        assert_eq!(events[1], Ok(ChatEvent::Delta("Hel".into())));
        match &events[2] {
            Err(ProviderError::Protocol { provider, message }) => {
                assert_eq!(*provider, "anthropic");
                assert_eq!(message, "overloaded_error: Overloaded");
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_cut_before_message_stop_is_an_error_and_bad_json_too() {
        let events = run(&[message_start(3), text_delta("partial")]).await;
        assert!(matches!(
            events.last(),
            Some(Err(ProviderError::Protocol { .. }))
        ));
        let events = run(&[("content_block_delta", json!("not an object"))]).await;
        assert!(matches!(
            events.as_slice(),
            [Err(ProviderError::Protocol { .. })]
        ));
        let events = run(&[message_start(1), message_stop(), text_delta("after")]).await;
        assert_eq!(events.len(), 2, "nothing is read after message_stop");
    }

    #[tokio::test]
    async fn embeddings_fail_without_falling_through_and_a_bad_key_is_401() {
        let anthropic =
            Anthropic::new(DEFAULT_BASE_URL, "sk-ant-test", Settings::test_timeouts()).unwrap();
        assert_eq!(anthropic.provider(), Provider::Anthropic);
        let err = anthropic.embed("any", &["x".into()]).await.unwrap_err();
        assert!(!err.falls_through());
        assert!(err.to_string().contains(NO_EMBEDDINGS));

        let bad = Anthropic::new(
            "http://127.0.0.1:9/",
            "sk-ant-\nsecret",
            Settings::test_timeouts(),
        )
        .unwrap();
        let req = request(vec![msg(Role::User, "hi")], ChatParams::default());
        let Err(err) = bad.chat(&req).await else {
            panic!("a key that is no header value cannot be sent");
        };
        assert!(matches!(err, ProviderError::Status { status: 401, .. }));
        assert!(!err.to_string().contains("secret"));
    }

    /// Every text block of the translated `messages`, with its role, in order.
    fn texts(body: &Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for turn in body["messages"].as_array().unwrap() {
            let role = turn["role"].as_str().unwrap().to_owned();
            match &turn["content"] {
                Value::String(text) => out.push((role, text.clone())),
                Value::Array(blocks) => out.extend(
                    blocks
                        .iter()
                        .filter(|b| b["type"] == "text")
                        .map(|b| (role.clone(), b["text"].as_str().unwrap().to_owned())),
                ),
                other => panic!("unexpected content {other}"),
            }
        }
        out
    }

    fn any_role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::System),
            Just(Role::User),
            Just(Role::Assistant),
            Just(Role::Tool)
        ]
    }

    proptest! {
        #[test]
        fn translation_loses_no_text_and_no_role(
            raw in prop::collection::vec((any_role(), "[a-z \n]{0,8}"), 0..12)
        ) {
            let messages: Vec<Message> =
                raw.iter().map(|(role, text)| msg(*role, text)).collect();
            let body = chat_body(&request(messages, ChatParams::default()));

            let system: Vec<&str> = raw
                .iter()
                .filter(|(r, t)| *r == Role::System && !t.is_empty())
                .map(|(_, t)| t.as_str())
                .collect();
            if system.is_empty() {
                prop_assert!(body.get("system").is_none());
            } else {
                prop_assert_eq!(body["system"].as_str().unwrap(), system.join("\n\n"));
            }

            let mut expected: Vec<(String, String)> = raw
                .iter()
                .filter(|(r, t)| *r != Role::System && !t.trim().is_empty())
                .map(|(r, t)| {
                    let role = if *r == Role::Assistant { "assistant" } else { "user" };
                    (role.to_owned(), t.clone())
                })
                .collect();
            if let Some((role, text)) = expected.last_mut() {
                if role == "assistant" {
                    *text = text.trim_end().to_owned();
                }
            }
            prop_assert_eq!(texts(&body), expected);

            let roles: Vec<&str> = body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["role"].as_str().unwrap())
                .collect();
            prop_assert!(roles.windows(2).all(|w| w[0] != w[1]), "roles alternate: {:?}", roles);
        }
    }
}

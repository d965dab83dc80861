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
//! - **Tools.** `tools` get `input_schema`, `tool_choice` maps to `auto`/`any`/`tool`/`none`
//!   with `disable_parallel_tool_use`; an assistant turn's calls become `tool_use` blocks
//!   (arguments as an object) and tool results `tool_result` blocks at the head of the user
//!   turn. Ids from other providers are rewritten to Anthropic's pattern ([`tool_id`]). In the
//!   stream, each `tool_use` block is one call: its start carries the id and name, its
//!   `input_json_delta`s the arguments.
//! - **JSON mode.** There is no `response_format`: a tool whose input schema is the wanted
//!   schema is forced, and its input is relayed as the answer's text. When the client has
//!   tools of its own, the system prompt asks for JSON instead.
//! - **Embeddings.** Anthropic has none; see [`NO_EMBEDDINGS`].

use std::borrow::Cow;
use std::collections::HashMap;

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http::{listed, Upstream};
use super::tools::{arguments_object, parameters_or_empty, split_signature};
use super::turns::{alternating, system_text_with, Side};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, Image, Message,
    OutputFormat, ProviderError, ToolCallDelta, ToolChoice, Usage,
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

/// The `/v1/messages` body (see the module notes and [`chat_body`]).
#[derive(Debug, Serialize)]
pub struct ChatBody<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<WireTurn>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'a>>,
}

/// One entry of `messages`: text alone as a string, anything else as blocks.
#[derive(Debug, Serialize)]
struct WireTurn {
    role: &'static str,
    content: WireContent,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Map<String, Value>,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(skip_serializing_if = "String::is_empty")]
        content: String,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Serialize)]
struct WireTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
}

#[derive(Debug, Serialize)]
struct WireToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
}

/// A tool id as Anthropic accepts it (`^[a-zA-Z0-9_-]+$`). Ids from other providers may
/// hold other characters: those become `_`, and a hash of the original keeps two rewritten
/// ids apart. The rewrite depends only on the id, so a call and its result always agree.
pub fn tool_id(id: &str) -> String {
    let id = split_signature(id).0;
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(valid) {
        return id.to_owned();
    }
    let cleaned: String = id.chars().map(|c| if valid(c) { c } else { '_' }).collect();
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for byte in id.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{cleaned}_{hash:016x}")
}

/// A message's content blocks: a tool result; or images, then text unless it is blank, then
/// tool calls.
fn blocks(message: &Message) -> Vec<Block> {
    if let Some(id) = &message.tool_call_id {
        return vec![Block::ToolResult {
            tool_use_id: tool_id(id),
            content: message.content.clone(),
        }];
    }
    let mut blocks: Vec<Block> = message
        .images
        .iter()
        .map(|image| Block::Image {
            source: match image {
                Image::Base64 { media_type, data } => ImageSource::Base64 {
                    media_type: media_type.clone(),
                    data: data.clone(),
                },
                Image::Url(url) => ImageSource::Url { url: url.clone() },
            },
        })
        .collect();
    if !message.content.trim().is_empty() {
        blocks.push(Block::Text {
            text: message.content.clone(),
        });
    }
    blocks.extend(message.tool_calls.iter().map(|call| Block::ToolUse {
        id: tool_id(&call.id),
        name: call.name.clone(),
        input: arguments_object(&call.arguments),
    }));
    blocks
}

/// The non-system messages as alternating turns (see the module notes): tool results lead
/// their user turn, as Anthropic requires, and a final assistant text is trimmed at the end.
fn turns(messages: &[Message]) -> Vec<WireTurn> {
    let mut turns = alternating(messages, blocks);
    for turn in &mut turns {
        if turn.side == Side::User {
            // A stable sort: results first, in order, then the rest in order.
            turn.blocks
                .sort_by_key(|b| !matches!(b, Block::ToolResult { .. }));
        }
    }
    if let Some(last) = turns.last_mut().filter(|t| t.side == Side::Model) {
        if let Some(Block::Text { text }) = last.blocks.last_mut() {
            text.truncate(text.trim_end().len());
        }
    }
    turns
        .into_iter()
        .map(|turn| {
            let role = match turn.side {
                Side::User => "user",
                Side::Model => "assistant",
            };
            let content = match turn.blocks.as_slice() {
                [Block::Text { text }] => WireContent::Text(text.clone()),
                _ => WireContent::Blocks(turn.blocks),
            };
            WireTurn { role, content }
        })
        .collect()
}

/// The tool through which a structured answer is asked for, when one is (see
/// [`answer_tool`]).
struct AnswerTool<'a> {
    name: &'a str,
    description: Option<&'a str>,
    schema: Value,
}

/// Anthropic has no response format. Without client tools, a JSON answer is asked for by
/// forcing a tool whose input schema is the wanted schema (any object for `json_object`):
/// the tool's input is the answer, and the stream reader turns it back into text. With
/// client tools, forcing one would forbid theirs, so the system prompt asks instead.
fn answer_tool(request: &ChatRequest) -> Option<AnswerTool<'_>> {
    if !request.params.tools.is_empty() {
        return None;
    }
    match request.params.format.as_ref()? {
        OutputFormat::Json => Some(AnswerTool {
            name: JSON_TOOL,
            description: None,
            schema: json!({"type": "object"}),
        }),
        OutputFormat::JsonSchema(s) => Some(AnswerTool {
            name: &s.name,
            description: s.description.as_deref(),
            schema: s.schema.clone(),
        }),
    }
}

/// The forced tool's name for `json_object`.
const JSON_TOOL: &str = "json_answer";

/// Anthropic's `tool_choice` for the request's.
fn tool_choice<'a>(
    request: &'a ChatRequest,
    forced: Option<&AnswerTool<'a>>,
) -> Option<WireToolChoice<'a>> {
    let p = &request.params;
    let disable_parallel = (p.parallel_tool_calls == Some(false)).then_some(true);
    let (kind, name) = match (forced, &p.tool_choice) {
        (Some(tool), _) => ("tool", Some(tool.name)),
        (None, _) if p.tools.is_empty() => return None,
        (None, Some(ToolChoice::None)) => ("none", None),
        (None, Some(ToolChoice::Required)) => ("any", None),
        (None, Some(ToolChoice::Function(name))) => ("tool", Some(name.as_str())),
        (None, Some(ToolChoice::Auto)) => ("auto", None),
        (None, None) if disable_parallel.is_some() => ("auto", None),
        (None, None) => return None,
    };
    Some(WireToolChoice {
        kind,
        name,
        disable_parallel_tool_use: if kind == "none" {
            None
        } else {
            disable_parallel
        },
    })
}

/// The `/v1/messages` body for `request`.
///
/// - `max_tokens` is the request's, else [`DEFAULT_MAX_TOKENS`] (Anthropic requires one).
/// - `temperature` is clamped to Anthropic's range 0–1: OpenAI's values above 1 (up to 2)
///   become 1.0, the most random Anthropic allows.
/// - `top_p` is sent only when `temperature` is not: Anthropic advises altering one of them,
///   and its newer models refuse a request that sets both.
/// - `stop` becomes `stop_sequences`, without whitespace-only entries (Anthropic refuses them).
/// - tools get `input_schema` (an empty object schema when the client gave none);
///   `tool_choice` `auto`/`required`/named/`none` become `auto`/`any`/`tool`/`none`, and
///   `parallel_tool_calls: false` becomes `disable_parallel_tool_use`.
/// - `user` becomes `metadata.user_id`.
pub fn chat_body(request: &ChatRequest) -> ChatBody<'_> {
    let p = &request.params;
    let forced = answer_tool(request);
    let mut tools: Vec<WireTool<'_>> = p
        .tools
        .iter()
        .map(|t| WireTool {
            name: &t.name,
            description: t.description.as_deref(),
            input_schema: parameters_or_empty(t),
        })
        .collect();
    let choice = tool_choice(request, forced.as_ref());
    // When JSON is asked for alongside client tools, the system prompt asks for it.
    let in_words = request.params.format.as_ref().filter(|_| forced.is_none());
    let system = system_text_with(&request.messages, in_words);
    if let Some(tool) = forced {
        tools.push(WireTool {
            name: tool.name,
            description: tool.description,
            input_schema: Cow::Owned(tool.schema),
        });
    }
    ChatBody {
        model: &request.model,
        max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        messages: turns(&request.messages),
        stream: true,
        system,
        temperature: p.temperature.map(|t| t.clamp(0.0, MAX_TEMPERATURE)),
        top_p: p.top_p.filter(|_| p.temperature.is_none()),
        stop_sequences: p
            .stop
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(String::as_str)
            .collect(),
        tools,
        tool_choice: choice,
        metadata: p.user.as_deref().map(|user_id| Metadata { user_id }),
    }
}

/// The finish reason for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> FinishReason {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "refusal" => FinishReason::ContentFilter,
        "tool_use" => FinishReason::ToolCalls,
        // end_turn, stop_sequence, pause_turn, and anything newer.
        _ => FinishReason::Stop,
    }
}

/// A Messages stream event, the parts the gateway reads.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: WireError,
    },
    /// ping, content_block_stop, and event types Anthropic may add later.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking, signatures, citations.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[expect(clippy::struct_field_names, reason = "Anthropic's own field names")]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

impl WireUsage {
    /// All input tokens: Anthropic counts cache writes and reads apart from `input_tokens`,
    /// and the three together are what the prompt cost.
    fn prompt_tokens(&self) -> Option<u64> {
        let cached = self.cache_creation_input_tokens.unwrap_or(0)
            + self.cache_read_input_tokens.unwrap_or(0);
        self.input_tokens.map(|input| input + cached)
    }
}

/// What a content block of the answer is.
#[derive(Debug, Clone, Copy)]
enum BlockRole {
    /// A function call, at this index among the answer's calls.
    Call(usize),
    /// The forced tool's input: the structured answer itself.
    Answer,
}

/// Turns the Messages event stream into [`ChatEvent`]s, one event at a time.
struct EventReader {
    http: Upstream,
    /// The forced tool whose input is the answer (structured output), if any.
    answer_tool: Option<String>,
    /// The answer's tool-use blocks, by block index.
    blocks: HashMap<usize, BlockRole>,
    /// Function calls so far.
    calls: usize,
    /// `message_stop` arrived: the answer is complete.
    stopped: bool,
    /// A `Finish` was produced (from `message_delta`).
    finished: bool,
}

impl EventReader {
    fn new(http: Upstream, answer_tool: Option<String>) -> Self {
        Self {
            http,
            answer_tool,
            blocks: HashMap::new(),
            calls: 0,
            stopped: false,
            finished: false,
        }
    }

    /// The events one SSE event (`event:` name and `data:`) carries.
    fn read(&mut self, name: &str, data: &str) -> Result<Vec<ChatEvent>, ProviderError> {
        let bad = |e: serde_json::Error| {
            self.http
                .protocol(format!("bad JSON in `{name}` event: {e}"))
        };
        let mut raw: Value = serde_json::from_str(data).map_err(bad)?;
        // Anthropic's data repeats the event's name as `type`; an event named only by its
        // `event:` line is read by that name.
        if let Some(object) = raw.as_object_mut() {
            if !object.contains_key("type") && !name.is_empty() && name != "message" {
                object.insert("type".into(), json!(name));
            }
        }
        let event: StreamEvent = serde_json::from_value(raw).map_err(bad)?;
        let mut events = Vec::new();
        match event {
            StreamEvent::MessageStart { message } => {
                if let Some(prompt) = message.usage.as_ref().and_then(WireUsage::prompt_tokens) {
                    events.push(ChatEvent::Usage(Usage {
                        prompt_tokens: Some(prompt),
                        completion_tokens: None,
                    }));
                }
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block: StartBlock::ToolUse { id, name },
            } => {
                if self.answer_tool.as_deref() == Some(name.as_str()) {
                    self.blocks.insert(index, BlockRole::Answer);
                } else {
                    self.blocks.insert(index, BlockRole::Call(self.calls));
                    events.push(ChatEvent::ToolCall(ToolCallDelta {
                        index: self.calls,
                        id: Some(id),
                        name: Some(name),
                        arguments: String::new(),
                    }));
                    self.calls += 1;
                }
            }
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if !text.is_empty() => {
                    events.push(ChatEvent::Delta(text));
                }
                BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    match self.blocks.get(&index) {
                        Some(BlockRole::Answer) => events.push(ChatEvent::Delta(partial_json)),
                        Some(BlockRole::Call(call)) => {
                            events.push(ChatEvent::ToolCall(ToolCallDelta {
                                index: *call,
                                id: None,
                                name: None,
                                arguments: partial_json,
                            }));
                        }
                        // Input of a block that is no client tool call (Anthropic's own server
                        // tools): not part of the answer.
                        None => {}
                    }
                }
                _ => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    let (prompt, completion) = (usage.prompt_tokens(), usage.output_tokens);
                    if completion.is_some() || prompt.is_some() {
                        events.push(ChatEvent::Usage(Usage {
                            prompt_tokens: prompt,
                            completion_tokens: completion,
                        }));
                    }
                }
                if let Some(reason) = delta.stop_reason {
                    let answered = self.answer_tool.is_some() && self.calls == 0;
                    events.push(ChatEvent::Finish(match finish_reason(&reason) {
                        FinishReason::ToolCalls if answered => FinishReason::Stop,
                        reason => reason,
                    }));
                    self.finished = true;
                }
            }
            StreamEvent::MessageStop => {
                self.stopped = true;
                if !self.finished {
                    events.push(ChatEvent::Finish(FinishReason::Stop));
                    self.finished = true;
                }
            }
            StreamEvent::Error { error } => {
                let kind = error.kind.as_deref().unwrap_or("error");
                let message = error.message.as_deref().unwrap_or("error in the stream");
                return Err(self.http.protocol(format!("{kind}: {message}")));
            }
            StreamEvent::ContentBlockStart { .. } | StreamEvent::Other => {}
        }
        Ok(events)
    }
}

/// The chat events of a Messages event stream; it fails if the stream ends before
/// `message_stop`, and ends at the first error.
fn chat_events<S>(reader: EventReader, sse: S) -> ChatStream
where
    S: Stream<Item = Result<(String, String), ProviderError>> + Send + 'static,
{
    let start = Some((Box::pin(sse), reader));
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

    fn takes_image_urls(&self) -> bool {
        true
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
        let answer_tool = answer_tool(request).map(|t| t.name.to_owned());
        let reader = EventReader::new(self.http.clone(), answer_tool);
        Ok(chat_events(reader, self.http.sse(response)))
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
    use crate::providers::test_support::{self, arb_role, chat_request, msg};
    use crate::providers::{ChatParams, Image, Role};
    use proptest::prelude::*;

    fn request(messages: Vec<Message>, params: ChatParams) -> ChatRequest {
        chat_request("claude-3-5-sonnet-latest", messages, params)
    }

    fn http() -> Upstream {
        test_support::http("anthropic")
    }

    /// Runs `events` (name, data) through the stream reader and collects what comes out.
    async fn run(events: &[(&str, Value)]) -> Vec<Result<ChatEvent, ProviderError>> {
        run_with(None, events).await
    }

    /// As [`run`], for a request that forced `answer_tool` for a structured answer.
    async fn run_with(
        answer_tool: Option<&str>,
        events: &[(&str, Value)],
    ) -> Vec<Result<ChatEvent, ProviderError>> {
        let items: Vec<Result<(String, String), ProviderError>> = events
            .iter()
            .map(|(name, data)| Ok(((*name).to_owned(), data.to_string())))
            .collect();
        let reader = EventReader::new(http(), answer_tool.map(str::to_owned));
        chat_events(reader, futures::stream::iter(items))
            .collect()
            .await
    }

    fn chat_body(request: &ChatRequest) -> Value {
        serde_json::to_value(super::chat_body(request)).unwrap()
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
            ..ChatParams::default()
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
            Image::base64("image/jpeg", jpeg.clone()),
            Image::base64("image/gif", gif.clone()),
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

    fn weather_tool() -> crate::providers::Tool {
        crate::providers::Tool {
            name: "weather".into(),
            description: Some("Weather in a city".into()),
            parameters: Some(json!({"type": "object", "properties": {"city": {"type": "string"}}})),
            strict: None,
        }
    }

    #[test]
    fn json_mode_forces_an_answer_tool_or_asks_in_the_system_prompt() {
        let json_mode = ChatParams {
            format: Some(OutputFormat::Json),
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "list")], json_mode));
        assert!(body.get("system").is_none());
        assert_eq!(
            body["tools"],
            json!([{"name": JSON_TOOL, "input_schema": {"type": "object"}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": JSON_TOOL})
        );

        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        let format = OutputFormat::JsonSchema(crate::providers::JsonSchema {
            name: "count".into(),
            description: Some("a count".into()),
            schema: schema.clone(),
            strict: Some(true),
        });
        let schema_mode = ChatParams {
            format: Some(format.clone()),
            ..ChatParams::default()
        };
        let body = chat_body(&request(
            vec![msg(Role::System, "be brief"), msg(Role::User, "count")],
            schema_mode,
        ));
        assert_eq!(body["system"], "be brief");
        assert_eq!(
            body["tools"],
            json!([{"name": "count", "description": "a count", "input_schema": schema}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "count"})
        );

        // With the client's own tools, forcing one would forbid theirs: the prompt asks.
        let with_tools = ChatParams {
            format: Some(format),
            tools: vec![weather_tool()],
            ..ChatParams::default()
        };
        let body = chat_body(&request(vec![msg(Role::User, "count")], with_tools));
        let system = body["system"].as_str().unwrap();
        assert!(
            system.starts_with("Respond with a single valid JSON value"),
            "{system}"
        );
        assert!(system.ends_with(&schema.to_string()), "{system}");
        assert_eq!(body["tools"].as_array().unwrap().len(), 1);
        assert!(body.get("tool_choice").is_none());
        assert!(body.get("response_format").is_none());
    }

    #[test]
    fn tools_choices_calls_and_results_are_translated() {
        let mut call = msg(Role::Assistant, "Let me look.");
        call.tool_calls = vec![
            crate::providers::ToolCall {
                id: "call_abc".into(),
                name: "weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            crate::providers::ToolCall {
                id: "fc.7/x".into(),
                name: "weather".into(),
                arguments: "not json".into(),
            },
        ];
        let mut first = msg(Role::Tool, "22 C");
        first.tool_call_id = Some("call_abc".into());
        let mut second = msg(Role::Tool, "");
        second.tool_call_id = Some("fc.7/x".into());
        let params = ChatParams {
            tools: vec![weather_tool()],
            tool_choice: Some(crate::providers::ToolChoice::Required),
            parallel_tool_calls: Some(false),
            user: Some("u-1".into()),
            ..ChatParams::default()
        };
        let body = chat_body(&request(
            vec![
                msg(Role::User, "weather?"),
                call,
                first,
                second,
                msg(Role::User, "thanks"),
            ],
            params,
        ));
        let rewritten = tool_id("fc.7/x");
        assert!(rewritten.starts_with("fc_7_x_"), "{rewritten}");
        assert_eq!(tool_id("call_abc"), "call_abc");
        assert_ne!(tool_id("a.b"), tool_id("a_b"), "rewritten ids stay apart");
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "call_abc", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": rewritten, "name": "weather", "input": {"arguments": "not json"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_abc", "content": "22 C"},
                    {"type": "tool_result", "tool_use_id": rewritten},
                    {"type": "text", "text": "thanks"},
                ]},
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"name": "weather", "description": "Weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(body["metadata"], json!({"user_id": "u-1"}));
        for (choice, wire) in [
            (crate::providers::ToolChoice::Auto, json!({"type": "auto"})),
            (crate::providers::ToolChoice::None, json!({"type": "none"})),
            (
                crate::providers::ToolChoice::Function("weather".into()),
                json!({"type": "tool", "name": "weather"}),
            ),
        ] {
            let params = ChatParams {
                tools: vec![weather_tool()],
                tool_choice: Some(choice),
                ..ChatParams::default()
            };
            let body = chat_body(&request(vec![msg(Role::User, "hi")], params));
            assert_eq!(body["tool_choice"], wire);
        }
    }

    #[tokio::test]
    async fn tool_use_blocks_stream_as_call_deltas() {
        let block_start = |index: u64, id: &str| {
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": id, "name": "weather", "input": {}}}),
            )
        };
        let json_delta = |index: u64, part: &str| {
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
            )
        };
        let events = run(&[
            message_start(10),
            text_delta("Checking."),
            block_start(1, "toolu_01"),
            json_delta(1, ""),
            json_delta(1, "{\"city\": "),
            json_delta(1, "\"Paris\"}"),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            block_start(2, "toolu_02"),
            json_delta(2, "{}"),
            message_delta("tool_use", 30),
            message_stop(),
        ])
        .await;
        let events: Vec<ChatEvent> = events.into_iter().map(Result::unwrap).collect();
        let call = |index, id: Option<&str>, name: Option<&str>, arguments: &str| {
            ChatEvent::ToolCall(ToolCallDelta {
                index,
                id: id.map(str::to_owned),
                name: name.map(str::to_owned),
                arguments: arguments.to_owned(),
            })
        };
        assert_eq!(
            events[1..7],
            [
                ChatEvent::Delta("Checking.".into()),
                call(0, Some("toolu_01"), Some("weather"), ""),
                call(0, None, None, "{\"city\": "),
                call(0, None, None, "\"Paris\"}"),
                call(1, Some("toolu_02"), Some("weather"), ""),
                call(1, None, None, "{}"),
            ]
        );
        assert_eq!(
            events.last(),
            Some(&ChatEvent::Finish(FinishReason::ToolCalls))
        );
    }

    #[tokio::test]
    async fn a_forced_answer_tool_streams_as_text() {
        let events = run_with(
            Some("count"),
            &[
                message_start(10),
                (
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "tool_use", "id": "toolu_9", "name": "count", "input": {}}}),
                ),
                (
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": "{\"n\": 3}"}}),
                ),
                message_delta("tool_use", 5),
                message_stop(),
            ],
        )
        .await;
        let events: Vec<ChatEvent> = events.into_iter().map(Result::unwrap).collect();
        assert_eq!(events[1], ChatEvent::Delta("{\"n\": 3}".into()));
        assert_eq!(events.last(), Some(&ChatEvent::Finish(FinishReason::Stop)));
        assert!(!events.iter().any(|e| matches!(e, ChatEvent::ToolCall(_))));
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        assert_eq!(finish_reason("end_turn"), FinishReason::Stop);
        assert_eq!(finish_reason("stop_sequence"), FinishReason::Stop);
        assert_eq!(finish_reason("tool_use"), FinishReason::ToolCalls);
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

    proptest! {
        #[test]
        fn translation_loses_no_text_and_no_role(
            raw in prop::collection::vec((arb_role(), "[a-z \n]{0,8}"), 0..12)
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

    proptest! {
        #[test]
        fn tool_conversations_survive_translation(
            messages in crate::providers::test_support::arb_tool_conversation(),
            cuts in prop::collection::vec(0usize..64, 0..6),
        ) {
            let body = chat_body(&request(messages.clone(), ChatParams::default()));
            // Every call becomes a tool_use with a valid id, answered by a tool_result with
            // the same id at the head of the next user turn, in order.
            let valid = |id: &str| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            let turns = body["messages"].as_array().unwrap();
            let mut uses = Vec::new();
            let mut results = Vec::new();
            for (t, turn) in turns.iter().enumerate() {
                let blocks = turn["content"].as_array().cloned().unwrap_or_default();
                let ids_used: Vec<&str> = blocks.iter().filter(|b| b["type"] == "tool_use").map(|b| b["id"].as_str().unwrap()).collect();
                for b in blocks.iter().filter(|b| b["type"] == "tool_use") {
                    uses.push((b["id"].as_str().unwrap().to_owned(), b["name"].as_str().unwrap().to_owned(), b["input"].clone()));
                }
                if !ids_used.is_empty() {
                    let next = turns[t + 1]["content"].as_array().unwrap();
                    let answered: Vec<&str> = next.iter().take_while(|b| b["type"] == "tool_result").map(|b| b["tool_use_id"].as_str().unwrap()).collect();
                    prop_assert_eq!(answered, ids_used);
                }
                for b in blocks.iter().filter(|b| b["type"] == "tool_result") {
                    results.push((b["tool_use_id"].as_str().unwrap().to_owned(), b["content"].as_str().unwrap_or_default().to_owned()));
                }
            }
            let calls: Vec<&crate::providers::ToolCall> = messages.iter().flat_map(|m| &m.tool_calls).collect();
            prop_assert_eq!(uses.len(), calls.len());
            for ((id, name, input), call) in uses.iter().zip(&calls) {
                prop_assert!(valid(id), "{}", id);
                prop_assert_eq!(id, &tool_id(&call.id));
                prop_assert_eq!(name, &call.name);
                prop_assert_eq!(input, &serde_json::from_str::<Value>(&call.arguments).unwrap());
            }
            let distinct: std::collections::HashSet<&String> = uses.iter().map(|u| &u.0).collect();
            prop_assert_eq!(distinct.len(), uses.len());
            let answers: Vec<(String, String)> = messages.iter().filter_map(|m| m.tool_call_id.as_ref().map(|id| (tool_id(id), m.content.clone()))).collect();
            prop_assert_eq!(results, answers);

            // And back: the last round's calls as Anthropic streams them, input cut anywhere.
            let last = &messages.iter().rev().find(|m| !m.tool_calls.is_empty()).unwrap().tool_calls;
            let mut events = vec![message_start(5)];
            for (i, call) in last.iter().enumerate() {
                let id = format!("toolu_{i}");
                events.push(("content_block_start", json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "tool_use", "id": id, "name": call.name, "input": {}}})));
                for piece in crate::providers::test_support::fragments(&call.arguments, &cuts) {
                    events.push(("content_block_delta", json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": piece}})));
                }
            }
            events.push(message_delta("tool_use", 9));
            events.push(message_stop());
            let read: Vec<ChatEvent> = futures::executor::block_on(run(&events)).into_iter().map(Result::unwrap).collect();
            let assembled = crate::providers::test_support::assemble(&read);
            prop_assert_eq!(assembled.len(), last.len());
            for (i, (got, sent)) in assembled.iter().zip(last).enumerate() {
                prop_assert_eq!(&got.id, &format!("toolu_{i}"));
                prop_assert_eq!(&got.name, &sent.name);
                prop_assert_eq!(&got.arguments, &sent.arguments);
            }
            prop_assert_eq!(read.last(), Some(&ChatEvent::Finish(FinishReason::ToolCalls)));
        }
    }
}

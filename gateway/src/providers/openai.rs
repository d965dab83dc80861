//! The paid OpenAI tier: OpenAI's own API (`POST /chat/completions` as Server-Sent Events,
//! `POST /embeddings`, `GET /models`), paths relative to `OPENAI_BASE_URL`
//! (`https://api.openai.com/v1` by default, so any OpenAI-compatible server works too).
//!
//! Every chat is streamed upstream with `stream_options.include_usage`, so each request is
//! accounted in tokens whatever the client asked for; the gateway's own encoder decides what
//! the client sees. The length limit is sent as `max_completion_tokens` (OpenAI deprecated
//! `max_tokens`, and o-series models refuse it).
//!
//! The API key travels only in the `Authorization` header (marked sensitive); error messages
//! that come back are scrubbed of it and of anything that looks like an OpenAI key.

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http::{error_message, listed, Upstream};
use super::tools::{split_signature, FunctionTool};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, Image, Message,
    OutputFormat, ProviderError, ToolCallDelta, ToolChoice, Usage,
};
use crate::config::Timeouts;

/// Where OpenAI's API lives when `OPENAI_BASE_URL` is unset.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// OpenAI (or a compatible server) at `base_url`.
pub struct OpenAi {
    http: Upstream,
    /// Ends without a slash; endpoint paths are appended to it.
    base_url: String,
    /// Sent as `Authorization: Bearer …`; never logged or put in an error.
    api_key: String,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("base_url", &self.base_url)
            .field("api_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    /// `base_url` is OpenAI's API root including its version (`https://api.openai.com/v1`);
    /// an empty one means [`DEFAULT_BASE_URL`].
    pub fn new(base_url: &str, api_key: &str, timeouts: Timeouts) -> Result<Self, reqwest::Error> {
        let base_url = base_url.trim().trim_end_matches('/');
        Ok(Self {
            http: Upstream::new("openai", timeouts)?,
            base_url: if base_url.is_empty() {
                DEFAULT_BASE_URL.to_owned()
            } else {
                base_url.to_owned()
            },
            api_key: api_key.trim().to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn post(&self, path: &str, body: &impl Serialize) -> reqwest::RequestBuilder {
        self.http
            .client
            .post(self.url(path))
            .bearer_auth(&self.api_key)
            .json(body)
    }

    /// Sends `call`, turning a 404 into "no such model" when `model` is known and scrubbing
    /// the key from whatever upstream said.
    async fn send(
        &self,
        call: reqwest::RequestBuilder,
        model: Option<&str>,
    ) -> Result<reqwest::Response, ProviderError> {
        self.http.send(call).await.map_err(|err| {
            let err = redact_error(err, &self.api_key);
            match model {
                Some(model) => err.for_model(model),
                None => err,
            }
        })
    }
}

/// The `/chat/completions` body: always streamed, always with usage. Everything the client
/// asked for goes through as OpenAI defines it (tools, tool choice, response format, the
/// OpenAI-only fields); the length limit goes as `max_completion_tokens`.
#[derive(Debug, Serialize)]
pub struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<FunctionTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten)]
    openai_only: &'a Map<String, Value>,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One message on OpenAI's wire.
#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// Text, content parts (with images), or null (an assistant turn that only calls tools).
    content: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireCall<'a>,
}

#[derive(Debug, Serialize)]
struct WireCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

/// The body for `request` (see [`ChatBody`]).
pub fn chat_body(request: &ChatRequest) -> ChatBody<'_> {
    let p = &request.params;
    ChatBody {
        model: &request.model,
        messages: request.messages.iter().map(wire_message).collect(),
        stream: true,
        stream_options: StreamOptions {
            include_usage: true,
        },
        temperature: p.temperature,
        top_p: p.top_p,
        max_completion_tokens: p.max_tokens,
        stop: &p.stop,
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        response_format: p.format.as_ref().map(|format| match format {
            OutputFormat::Json => json!({"type": "json_object"}),
            OutputFormat::JsonSchema(s) => {
                let mut spec = json!({"name": s.name, "schema": s.schema});
                if let Some(description) = &s.description {
                    spec["description"] = json!(description);
                }
                if let Some(strict) = s.strict {
                    spec["strict"] = json!(strict);
                }
                json!({"type": "json_schema", "json_schema": spec})
            }
        }),
        tools: p.tools.iter().map(FunctionTool::as_defined).collect(),
        tool_choice: p.tool_choice.as_ref().map(|choice| match choice {
            ToolChoice::None => json!("none"),
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
        }),
        parallel_tool_calls: p.parallel_tool_calls,
        user: p.user.as_deref(),
        openai_only: &p.openai_only,
    }
}

/// One message on OpenAI's wire: plain `content`, content parts when it carries images, null
/// for an assistant turn that only calls tools.
fn wire_message(m: &Message) -> WireMessage<'_> {
    let content = if !m.images.is_empty() {
        let mut parts = Vec::with_capacity(m.images.len() + 1);
        if !m.content.is_empty() {
            parts.push(json!({"type": "text", "text": m.content}));
        }
        parts.extend(m.images.iter().map(|image| {
            let url = match image {
                Image::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
                Image::Url(url) => url.clone(),
            };
            json!({"type": "image_url", "image_url": {"url": url}})
        }));
        Value::Array(parts)
    } else if m.content.is_empty() && !m.tool_calls.is_empty() {
        Value::Null
    } else {
        json!(m.content)
    };
    WireMessage {
        role: m.role.as_str(),
        content,
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| WireToolCall {
                id: split_signature(&c.id).0,
                kind: "function",
                function: WireCall {
                    name: &c.name,
                    arguments: &c.arguments,
                },
            })
            .collect(),
        tool_call_id: m.tool_call_id.as_deref().map(|id| split_signature(id).0),
    }
}

/// What one `data:` payload of the chat stream means.
#[derive(Debug, PartialEq)]
enum Frame {
    /// A `chat.completion.chunk` and the events it carries.
    Events(Vec<ChatEvent>),
    /// `[DONE]`: the stream is over.
    Done,
}

/// A `chat.completion.chunk`, the parts the gateway reads.
#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Debug, Deserialize)]
struct DeltaToolCall {
    /// Some compatible servers leave it out when there is one call.
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<DeltaFunction>,
}

#[derive(Debug, Deserialize)]
struct DeltaFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Reads one `data:` payload of the chat stream.
fn read_frame(http: &Upstream, data: &str) -> Result<Frame, ProviderError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Frame::Done);
    }
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|e| http.protocol(format!("bad chunk in event stream: {e}")))?;
    chunk_events(http, chunk).map(Frame::Events)
}

/// The events one chunk carries: text, tool-call deltas, then usage, then the finish
/// reason. Usage is read from every chunk, not only the final `choices: []` one, because some
/// compatible servers put it on the chunk that carries `finish_reason`.
fn chunk_events(http: &Upstream, chunk: Chunk) -> Result<Vec<ChatEvent>, ProviderError> {
    if let Some(err) = chunk.error.filter(|e| !e.is_null()) {
        return Err(http.protocol(format!(
            "error in stream: {}",
            error_message(&json!({ "error": err }).to_string())
        )));
    }
    let mut events = Vec::with_capacity(2);
    let choice = chunk.choices.into_iter().next();
    let (delta, finish) = choice.map_or((None, None), |c| (c.delta, c.finish_reason));
    if let Some(delta) = delta {
        // A refusal is the only text the model gives in that case; relay it as the answer.
        for text in [delta.content, delta.refusal].into_iter().flatten() {
            if !text.is_empty() {
                events.push(ChatEvent::Delta(text));
            }
        }
        for (position, call) in delta.tool_calls.into_iter().flatten().enumerate() {
            let (name, arguments) = call
                .function
                .map_or((None, None), |f| (f.name, f.arguments));
            events.push(ChatEvent::ToolCall(ToolCallDelta {
                index: call.index.unwrap_or(position),
                id: call.id,
                name,
                arguments: arguments.unwrap_or_default(),
            }));
        }
    }
    if let Some(usage) = chunk.usage {
        events.push(ChatEvent::Usage(Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }));
    }
    if let Some(reason) = finish {
        events.push(ChatEvent::Finish(match reason.as_str() {
            "length" => FinishReason::Length,
            "content_filter" => FinishReason::ContentFilter,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            _ => FinishReason::Stop,
        }));
    }
    Ok(events)
}

/// `err` without the API key or anything that looks like an OpenAI key (OpenAI's 401 message
/// quotes a masked key).
fn redact_error(err: ProviderError, api_key: &str) -> ProviderError {
    let clean = |message: String| redact(&message, api_key);
    match err {
        ProviderError::Connect(m) => ProviderError::Connect(clean(m)),
        ProviderError::Timeout(m) => ProviderError::Timeout(clean(m)),
        ProviderError::RateLimited {
            provider,
            message,
            retry_after_secs,
        } => ProviderError::RateLimited {
            provider,
            message: clean(message),
            retry_after_secs,
        },
        ProviderError::ModelNotFound { provider, model } => {
            ProviderError::ModelNotFound { provider, model }
        }
        ProviderError::Status {
            provider,
            status,
            message,
        } => ProviderError::Status {
            provider,
            status,
            message: clean(message),
        },
        ProviderError::Protocol { provider, message } => ProviderError::Protocol {
            provider,
            message: clean(message),
        },
    }
}

/// `message` with `api_key` and every `sk-…` word replaced.
fn redact(message: &str, api_key: &str) -> String {
    let message = if api_key.is_empty() {
        message.to_owned()
    } else {
        message.replace(api_key, "[redacted]")
    };
    message
        .split(' ')
        .map(|word| {
            if word.starts_with("sk-") {
                let tail = word.trim_end_matches(['.', ',', ';', ':', ')', '"', '\'']);
                format!("sk-[redacted]{}", &word[tail.len()..])
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[async_trait]
impl ChatProvider for OpenAi {
    fn provider(&self) -> Provider {
        Provider::Openai
    }

    fn takes_image_urls(&self) -> bool {
        true
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let call = self.post("/chat/completions", &chat_body(request));
        let response = self.send(call, Some(&request.model)).await?;
        let http = self.http.clone();
        let api_key = self.api_key.clone();
        let frames = self
            .http
            .sse(response)
            .map(move |event| {
                event.and_then(|(name, data)| {
                    if name == "error" {
                        Err(http.protocol(format!("error in stream: {}", error_message(&data))))
                    } else {
                        read_frame(&http, &data)
                    }
                })
            })
            .take_while(|frame| futures::future::ready(!matches!(frame, Ok(Frame::Done))));
        let events = frames.flat_map(move |frame| {
            let out: Vec<Result<ChatEvent, ProviderError>> = match frame {
                Ok(Frame::Events(events)) => events.into_iter().map(Ok).collect(),
                Ok(Frame::Done) => Vec::new(),
                Err(e) => vec![Err(redact_error(e, &api_key))],
            };
            futures::stream::iter(out)
        });
        Ok(Box::pin(events))
    }

    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, ProviderError> {
        self.embeddings(model, json!(inputs), inputs.len()).await
    }

    async fn embed_tokens(
        &self,
        model: &str,
        tokens: &[Vec<u32>],
    ) -> Result<Embeddings, ProviderError> {
        self.embeddings(model, json!(tokens), tokens.len()).await
    }

    async fn models(&self) -> Result<Vec<String>, ProviderError> {
        let call = self
            .http
            .client
            .get(self.url("/models"))
            .bearer_auth(&self.api_key);
        let body = self.http.json(self.send(call, None).await?).await?;
        Ok(listed(&body, "data", "id"))
    }
}

impl OpenAi {
    /// `POST /embeddings` for `count` inputs (texts or token arrays, as JSON).
    async fn embeddings(
        &self,
        model: &str,
        input: Value,
        count: usize,
    ) -> Result<Embeddings, ProviderError> {
        let body = json!({"model": model, "input": input, "encoding_format": "float"});
        let response = self
            .send(self.post("/embeddings", &body), Some(model))
            .await?;
        let body = self.http.json(response).await?;
        let embeddings = parse_embeddings(body)
            .map_err(|message| self.http.protocol(format!("bad embeddings: {message}")))?;
        if embeddings.vectors.len() != count {
            return Err(self.http.protocol(format!(
                "{} embeddings for {count} inputs",
                embeddings.vectors.len(),
            )));
        }
        Ok(embeddings)
    }
}

/// An embeddings response, the parts the gateway reads.
#[derive(Debug, Deserialize)]
struct EmbeddingList {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
}

#[derive(Debug, Deserialize)]
struct EmbeddingItem {
    /// Some compatible servers leave it out; their order is the inputs'.
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// The vectors of an embeddings response, in input order (sorted by `index`), and its
/// `usage.prompt_tokens`.
fn parse_embeddings(body: Value) -> Result<Embeddings, String> {
    let list: EmbeddingList = serde_json::from_value(body).map_err(|e| e.to_string())?;
    let mut indexed: Vec<(usize, Vec<f32>)> = list
        .data
        .into_iter()
        .enumerate()
        .map(|(position, item)| (item.index.unwrap_or(position), item.embedding))
        .collect();
    indexed.sort_by_key(|(index, _)| *index);
    Ok(Embeddings {
        vectors: indexed.into_iter().map(|(_, v)| v).collect(),
        prompt_tokens: list.usage.and_then(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{arb_role, arb_tool_conversation, assemble, fragments};
    use crate::providers::Image;
    use crate::providers::ToolCall;
    use crate::providers::{ChatParams, Role};
    use proptest::prelude::*;

    fn http() -> Upstream {
        crate::providers::test_support::http("openai")
    }

    fn message(role: Role, content: &str, images: &[&str]) -> Message {
        Message {
            images: images.iter().map(|s| Image::png(*s)).collect(),
            ..Message::text(role, content)
        }
    }

    fn events(chunk: &Value) -> Vec<ChatEvent> {
        chunk_events(&http(), serde_json::from_value(chunk.clone()).unwrap()).unwrap()
    }

    fn body(request: &ChatRequest) -> Value {
        serde_json::to_value(chat_body(request)).unwrap()
    }

    #[test]
    fn chat_body_always_streams_with_usage_and_maps_settings() {
        let req = ChatRequest {
            model: "o3-mini".into(),
            messages: vec![
                message(Role::System, "be brief", &[]),
                Message {
                    images: vec![
                        Image::png("iVBORw0KGgoAAA"),
                        Image::base64("image/jpeg", "/9j/4AAQ"),
                    ],
                    ..message(Role::User, "what is this?", &[])
                },
                message(Role::Assistant, "", &[]),
            ],
            params: ChatParams {
                temperature: Some(0.2),
                top_p: Some(0.9),
                max_tokens: Some(5),
                stop: vec!["\n".into()],
                seed: Some(-7),
                presence_penalty: Some(0.5),
                frequency_penalty: Some(-0.5),
                format: Some(OutputFormat::JsonSchema(crate::providers::JsonSchema {
                    name: "answer".into(),
                    description: None,
                    schema: json!({"type": "object"}),
                    strict: Some(true),
                })),
                ..ChatParams::default()
            },
        };
        let body = body(&req);
        assert_eq!(body["model"], "o3-mini");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(
            body["messages"],
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAA"}},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                ]},
                {"role": "assistant", "content": ""},
            ])
        );
        assert_eq!(body["max_completion_tokens"], 5);
        assert!(
            body.get("max_tokens").is_none(),
            "o-series models refuse max_tokens"
        );
        for (key, value) in [
            ("temperature", json!(0.2)),
            ("top_p", json!(0.9)),
            ("stop", json!(["\n"])),
            ("seed", json!(-7)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(-0.5)),
        ] {
            assert_eq!(body[key], value, "{key}");
        }
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
        );
    }

    #[test]
    fn gemini_signatures_stay_out_of_the_ids_openai_gets() {
        let mut call = message(Role::Assistant, "", &[]);
        call.tool_calls = vec![ToolCall {
            id: "call_1.sig.c2lnbmVk".into(),
            name: "f".into(),
            arguments: "{}".into(),
        }];
        let result = Message {
            tool_call_id: Some("call_1.sig.c2lnbmVk".into()),
            ..message(Role::Tool, "ok", &[])
        };
        let req = ChatRequest {
            model: "gpt-4o".into(),
            messages: vec![message(Role::User, "go", &[]), call, result],
            params: ChatParams::default(),
        };
        let body = body(&req);
        assert_eq!(body["messages"][1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(body["messages"][2]["tool_call_id"], "call_1");
    }

    #[test]
    fn chat_body_leaves_unset_settings_out() {
        let req = ChatRequest {
            model: "gpt-4o".into(),
            messages: vec![message(Role::User, "hi", &[])],
            params: ChatParams {
                format: Some(OutputFormat::Json),
                ..ChatParams::default()
            },
        };
        let body = body(&req);
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "messages",
                "model",
                "response_format",
                "stream",
                "stream_options"
            ]
        );
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
    }

    #[test]
    fn chunks_yield_text_usage_and_finish() {
        let role = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}],
            "usage": null, "obfuscation": "xyz"});
        assert_eq!(events(&role), vec![]);
        let text = json!({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}], "usage": null});
        assert_eq!(events(&text), vec![ChatEvent::Delta("Hel".into())]);
        let finish = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": null});
        assert_eq!(
            events(&finish),
            vec![ChatEvent::Finish(FinishReason::Length)]
        );
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 0}}});
        assert_eq!(
            events(&usage),
            vec![ChatEvent::Usage(Usage {
                prompt_tokens: Some(9),
                completion_tokens: Some(4)
            })]
        );
        for (wire, reason) in [
            ("stop", FinishReason::Stop),
            ("content_filter", FinishReason::ContentFilter),
            ("tool_calls", FinishReason::ToolCalls),
            ("function_call", FinishReason::ToolCalls),
        ] {
            let chunk = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": wire}]});
            assert_eq!(events(&chunk), vec![ChatEvent::Finish(reason)], "{wire}");
        }
        let refusal = json!({"choices": [{"index": 0, "delta": {"refusal": "I can't"}, "finish_reason": null}]});
        assert_eq!(events(&refusal), vec![ChatEvent::Delta("I can't".into())]);
    }

    #[test]
    fn usage_is_read_even_on_a_chunk_with_choices() {
        let last = json!({"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        assert_eq!(
            events(&last),
            vec![
                ChatEvent::Delta("!".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(3),
                    completion_tokens: Some(2)
                }),
                ChatEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn done_ends_and_errors_in_the_stream_fail() {
        let http = http();
        assert_eq!(read_frame(&http, "[DONE]").unwrap(), Frame::Done);
        assert_eq!(read_frame(&http, " [DONE] ").unwrap(), Frame::Done);
        let err = read_frame(
            &http,
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ProviderError::Protocol { message, .. } if message.contains("The server had an error")),
            "{err:?}"
        );
        assert!(matches!(
            read_frame(&http, "{not json"),
            Err(ProviderError::Protocol { .. })
        ));
        let ok = read_frame(&http, r#"{"choices":[],"usage":null,"error":null}"#).unwrap();
        assert_eq!(ok, Frame::Events(vec![]));
        let ok = read_frame(
            &http,
            r#"{"choices":[{"index":0,"delta":{"content":null,"tool_calls":null},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(ok, Frame::Events(vec![]));
    }

    #[test]
    fn embeddings_are_sorted_by_index() {
        let body = json!({"object": "list", "model": "text-embedding-3-small",
            "data": [
                {"object": "embedding", "index": 1, "embedding": [0.5, 0.25]},
                {"object": "embedding", "index": 0, "embedding": [1.0, -1.0]},
            ],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}});
        let e = parse_embeddings(body).unwrap();
        assert_eq!(e.vectors, vec![vec![1.0, -1.0], vec![0.5, 0.25]]);
        assert_eq!(e.prompt_tokens, Some(6));
        assert!(parse_embeddings(json!({"data": [{"index": 0, "embedding": "AAAA"}]})).is_err());
        assert!(parse_embeddings(json!({"object": "list"})).is_err());
    }

    #[test]
    fn errors_never_carry_the_key() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
        let err = ProviderError::Status {
            provider: "openai",
            status: 401,
            message: format!("Incorrect API key provided: sk-proj-****6789. Also {key}."),
        };
        let shown = redact_error(err, key).to_string();
        assert!(!shown.contains("6789") && !shown.contains(key), "{shown}");
        assert!(shown.contains("Incorrect API key provided: sk-[redacted]."));
        let openai = OpenAi::new("", key, crate::config::Settings::test_timeouts()).unwrap();
        assert_eq!(openai.base_url, DEFAULT_BASE_URL);
        assert!(!format!("{openai:?}").contains(key));
        let custom = OpenAi::new(
            "http://127.0.0.1:9/v1/",
            key,
            crate::config::Settings::test_timeouts(),
        )
        .unwrap();
        assert_eq!(custom.url("/models"), "http://127.0.0.1:9/v1/models");
    }

    fn any_message() -> impl Strategy<Value = Message> {
        (
            arb_role(),
            any::<String>(),
            prop::collection::vec("[A-Za-z0-9+/]{0,12}={0,2}", 0..3),
        )
            .prop_map(|(role, content, images)| Message {
                images: images.into_iter().map(Image::png).collect(),
                ..Message::text(role, content)
            })
    }

    /// The text and base64 images a wire message carries.
    fn read_back(wire: &Value) -> (String, Vec<Image>) {
        match &wire["content"] {
            Value::String(text) => (text.clone(), vec![]),
            Value::Array(parts) => {
                let text = parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<String>();
                let images = parts
                    .iter()
                    .filter_map(|p| p["image_url"]["url"].as_str())
                    .map(|url| {
                        let (head, data) = url.split_once(";base64,").unwrap();
                        Image::base64(head.trim_start_matches("data:"), data)
                    })
                    .collect();
                (text, images)
            }
            other => panic!("content is {other}"),
        }
    }

    proptest! {
        #[test]
        fn messages_survive_translation(
            model in "[a-z0-9.-]{1,20}",
            messages in prop::collection::vec(any_message(), 1..8),
        ) {
            let req = ChatRequest { model: model.clone(), messages: messages.clone(), params: ChatParams::default() };
            let body = body(&req);
            prop_assert_eq!(&body["model"], &json!(model));
            prop_assert_eq!(&body["stream"], &json!(true));
            prop_assert_eq!(&body["stream_options"]["include_usage"], &json!(true));
            let wire = body["messages"].as_array().unwrap();
            prop_assert_eq!(wire.len(), messages.len());
            for (sent, original) in wire.iter().zip(&messages) {
                prop_assert_eq!(sent["role"].as_str(), Some(original.role.as_str()));
                let (text, images) = read_back(sent);
                prop_assert_eq!(&text, &original.content);
                prop_assert_eq!(&images, &original.images);
            }
            // The body is plain JSON text that round-trips.
            let text = body.to_string();
            prop_assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), body);
        }
    }

    proptest! {
        #[test]
        fn tool_conversations_survive_translation(
            messages in arb_tool_conversation(),
            cuts in prop::collection::vec(0usize..64, 0..6),
        ) {
            let req = ChatRequest { model: "gpt-4o".into(), messages: messages.clone(), params: ChatParams::default() };
            let body = body(&req);
            let wire = body["messages"].as_array().unwrap();
            prop_assert_eq!(wire.len(), messages.len());
            for (sent, original) in wire.iter().zip(&messages) {
                prop_assert_eq!(sent["role"].as_str(), Some(original.role.as_str()));
                prop_assert_eq!(sent["tool_call_id"].as_str(), original.tool_call_id.as_deref());
                let calls: Vec<ToolCall> = sent["tool_calls"].as_array().into_iter().flatten().map(|c| ToolCall {
                    id: c["id"].as_str().unwrap().to_owned(),
                    name: c["function"]["name"].as_str().unwrap().to_owned(),
                    arguments: c["function"]["arguments"].as_str().unwrap().to_owned(),
                }).collect();
                prop_assert_eq!(&calls, &original.tool_calls);
            }
            // And back: the last round's calls as OpenAI streams them, arguments cut anywhere.
            let calls = &messages.iter().rev().find(|m| !m.tool_calls.is_empty()).unwrap().tool_calls;
            let mut read = Vec::new();
            for (i, c) in calls.iter().enumerate() {
                read.extend(events(&json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}]}}]})));
                for piece in fragments(&c.arguments, &cuts) {
                    read.extend(events(&json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                        {"index": i, "function": {"arguments": piece}}]}}]})));
                }
            }
            prop_assert_eq!(&assemble(&read), calls);
        }
    }
}

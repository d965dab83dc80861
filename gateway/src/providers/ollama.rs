//! The local tier: Ollama's native API (`/api/chat` streamed as NDJSON, `/api/embed`,
//! `/api/tags`). Tool calls come whole (arguments as a JSON object, no id in older
//! versions), so each becomes one delta with an id the gateway makes when Ollama gave none.

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http::{listed, Upstream};
use super::tools::{arguments_object, names_by_call_id, new_call_id, FunctionTool};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, OutputFormat,
    ProviderError, ToolCall, ToolCallDelta, ToolChoice, Usage,
};
use crate::config::Timeouts;

/// Ollama at `base_url`.
pub struct Ollama {
    http: Upstream,
    base_url: String,
}

impl Ollama {
    pub fn new(base_url: &str, timeouts: Timeouts) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: Upstream::new("ollama", timeouts)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

/// The `/api/chat` body: OpenAI's sampling settings become `options`; tools go as Ollama's
/// native `tools` (only the named one when the client forces a function; none when it asks
/// for `none`; Ollama cannot be made to call one, so `required` is best effort); a response
/// format becomes `format` (`"json"`, or the schema itself).
#[derive(Debug, Serialize)]
pub struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<FunctionTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Value>,
}

#[derive(Debug, Default, PartialEq, Serialize)]
struct Options<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
}

impl Options<'_> {
    /// Nothing set: the field is left out of the body.
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    /// The function a tool result answers (Ollama pairs results by name).
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct WireToolCall<'a> {
    function: WireCall<'a>,
}

#[derive(Debug, Serialize)]
struct WireCall<'a> {
    name: &'a str,
    arguments: Map<String, Value>,
}

/// The body for `request` (see [`ChatBody`]).
pub fn chat_body(request: &ChatRequest) -> ChatBody<'_> {
    let p = &request.params;
    let names = names_by_call_id(&request.messages);
    let messages = request
        .messages
        .iter()
        .map(|m| WireMessage {
            role: m.role.as_str(),
            content: &m.content,
            images: m
                .images
                .iter()
                .filter_map(|i| i.inline())
                .map(|(_, data)| data)
                .collect(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| WireToolCall {
                    function: WireCall {
                        name: &c.name,
                        arguments: arguments_object(&c.arguments),
                    },
                })
                .collect(),
            tool_name: m
                .tool_call_id
                .as_deref()
                .and_then(|id| names.get(id).copied()),
        })
        .collect();
    let tools = p
        .tools
        .iter()
        .filter(|t| match &p.tool_choice {
            Some(ToolChoice::None) => false,
            Some(ToolChoice::Function(name)) => t.name == *name,
            _ => true,
        })
        .map(FunctionTool::with_schema)
        .collect();
    ChatBody {
        model: &request.model,
        messages,
        stream: true,
        options: Options {
            temperature: p.temperature,
            top_p: p.top_p,
            num_predict: p.max_tokens,
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            stop: &p.stop,
        },
        tools,
        format: p.format.as_ref().map(|format| match format {
            OutputFormat::Json => json!("json"),
            OutputFormat::JsonSchema(s) => s.schema.clone(),
        }),
    }
}

/// One NDJSON line of `/api/chat`, the parts the gateway reads.
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    message: Option<LineMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LineMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<LineToolCall>,
}

#[derive(Debug, Deserialize)]
struct LineToolCall {
    /// Newer Ollama versions name their calls; older ones do not.
    #[serde(default)]
    id: Option<String>,
    function: LineCall,
}

#[derive(Debug, Deserialize)]
struct LineCall {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// An `/api/embed` response.
#[derive(Debug, Deserialize)]
struct EmbedResponse {
    embeddings: Vec<Vec<f32>>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
}

/// Reads a chat stream's lines; calls are numbered across the whole stream, since Ollama
/// sends each whole, possibly on separate lines.
#[derive(Default)]
struct LineReader {
    calls: usize,
}

impl LineReader {
    /// The events one NDJSON line carries.
    fn read(&mut self, http: &Upstream, line: Value) -> Result<Vec<ChatEvent>, ProviderError> {
        let line: Line = serde_json::from_value(line)
            .map_err(|e| http.protocol(format!("bad line in the chat stream: {e}")))?;
        if let Some(err) = line.error {
            return Err(http.protocol(err));
        }
        let mut events = Vec::with_capacity(1);
        if let Some(message) = line.message {
            if !message.content.is_empty() {
                events.push(ChatEvent::Delta(message.content));
            }
            for call in message.tool_calls {
                let arguments = match call.function.arguments {
                    Value::Null => "{}".to_owned(),
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                events.push(ChatEvent::ToolCall(ToolCallDelta::whole(
                    self.calls,
                    ToolCall {
                        id: call.id.unwrap_or_else(new_call_id),
                        name: call.function.name,
                        arguments,
                    },
                )));
                self.calls += 1;
            }
        }
        if line.done {
            events.push(ChatEvent::Usage(Usage {
                prompt_tokens: line.prompt_eval_count,
                completion_tokens: line.eval_count,
            }));
            let reason = match line.done_reason.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            };
            events.push(ChatEvent::Finish(reason));
        }
        Ok(events)
    }
}

#[async_trait]
impl ChatProvider for Ollama {
    fn provider(&self) -> Provider {
        Provider::Ollama
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let call = self
            .http
            .client
            .post(self.url("/api/chat"))
            .json(&chat_body(request));
        let response = self
            .http
            .send(call)
            .await
            .map_err(|e| e.for_model(&request.model))?;
        let http = self.http.clone();
        let mut reader = LineReader::default();
        let events = self.http.ndjson(response).flat_map(move |line| {
            let out: Vec<Result<ChatEvent, ProviderError>> =
                match line.and_then(|l| reader.read(&http, l)) {
                    Ok(events) => events.into_iter().map(Ok).collect(),
                    Err(e) => vec![Err(e)],
                };
            futures::stream::iter(out)
        });
        Ok(Box::pin(events))
    }

    async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, ProviderError> {
        let call = self
            .http
            .client
            .post(self.url("/api/embed"))
            .json(&json!({"model": model, "input": inputs}));
        let response = self.http.send(call).await.map_err(|e| e.for_model(model))?;
        let body: EmbedResponse = serde_json::from_value(self.http.json(response).await?)
            .map_err(|e| self.http.protocol(format!("bad embeddings: {e}")))?;
        let vectors = body.embeddings;
        if vectors.len() != inputs.len() {
            return Err(self.http.protocol(format!(
                "{} embeddings for {} inputs",
                vectors.len(),
                inputs.len()
            )));
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: body.prompt_eval_count,
        })
    }

    async fn models(&self) -> Result<Vec<String>, ProviderError> {
        let response = self
            .http
            .send(self.http.client.get(self.url("/api/tags")))
            .await?;
        let body = self.http.json(response).await?;
        Ok(listed(&body, "models", "name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{arb_tool_conversation, assemble};
    use crate::providers::{ChatParams, Message, Role};
    use proptest::prelude::*;

    #[test]
    fn chat_body_maps_openai_settings_to_ollama_options() {
        let req = ChatRequest {
            model: "llama3.2".into(),
            messages: vec![Message::text(Role::System, "be brief")],
            params: ChatParams {
                temperature: Some(0.2),
                max_tokens: Some(5),
                stop: vec!["\n".into()],
                format: Some(OutputFormat::Json),
                ..ChatParams::default()
            },
        };
        let body = serde_json::to_value(chat_body(&req)).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(
            body["options"],
            json!({"temperature": 0.2, "num_predict": 5, "stop": ["\n"]})
        );
        assert_eq!(body["format"], "json");
    }

    #[test]
    fn the_final_line_yields_usage_then_finish() {
        let http = Upstream::new("ollama", crate::config::Settings::test_timeouts()).unwrap();
        let line_events =
            |http: &Upstream, line: &Value| LineReader::default().read(http, line.clone());
        let done = json!({"message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "length", "prompt_eval_count": 7, "eval_count": 3});
        assert_eq!(
            line_events(&http, &done).unwrap(),
            vec![
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(7),
                    completion_tokens: Some(3)
                }),
                ChatEvent::Finish(FinishReason::Length)
            ]
        );
        let cached =
            json!({"message": {"role": "assistant", "content": ""}, "done": true, "eval_count": 3});
        assert_eq!(
            line_events(&http, &cached).unwrap()[0],
            ChatEvent::Usage(Usage {
                prompt_tokens: None,
                completion_tokens: Some(3)
            })
        );
        assert!(line_events(&http, &json!({"error": "model crashed"})).is_err());
    }

    proptest! {
        #[test]
        fn tool_conversations_survive_translation(messages in arb_tool_conversation()) {
            let req = ChatRequest { model: "llama3.2".into(), messages: messages.clone(), params: ChatParams::default() };
            let body = serde_json::to_value(chat_body(&req)).unwrap();
            let wire = body["messages"].as_array().unwrap();
            prop_assert_eq!(wire.len(), messages.len());
            let names: std::collections::HashMap<&str, &str> = messages.iter().flat_map(|m| &m.tool_calls)
                .map(|c| (c.id.as_str(), c.name.as_str())).collect();
            for (sent, original) in wire.iter().zip(&messages) {
                let calls: Vec<(String, Value)> = sent["tool_calls"].as_array().into_iter().flatten()
                    .map(|c| (c["function"]["name"].as_str().unwrap().to_owned(), c["function"]["arguments"].clone())).collect();
                let expected: Vec<(String, Value)> = original.tool_calls.iter()
                    .map(|c| (c.name.clone(), serde_json::from_str(&c.arguments).unwrap())).collect();
                prop_assert_eq!(calls, expected);
                let tool_name = original.tool_call_id.as_deref().map(|id| names[id]);
                prop_assert_eq!(sent["tool_name"].as_str(), tool_name);
            }
            // And back: Ollama sends each call whole, arguments as an object.
            let calls = &messages.iter().rev().find(|m| !m.tool_calls.is_empty()).unwrap().tool_calls;
            let line = json!({"message": {"role": "assistant", "content": "", "tool_calls": calls.iter().map(|c|
                json!({"function": {"name": c.name, "arguments": serde_json::from_str::<Value>(&c.arguments).unwrap()}})).collect::<Vec<_>>()},
                "done": false});
            let http = crate::providers::test_support::http("ollama");
            let read = assemble(&LineReader::default().read(&http, line).unwrap());
            prop_assert_eq!(read.len(), calls.len());
            for (got, sent) in read.iter().zip(calls) {
                prop_assert_eq!(&got.name, &sent.name);
                prop_assert_eq!(serde_json::from_str::<Value>(&got.arguments).unwrap(), serde_json::from_str::<Value>(&sent.arguments).unwrap());
                prop_assert!(got.id.starts_with("call_"));
            }
        }
    }
}

//! The local tier: Ollama's native API (`/api/chat` streamed as NDJSON, `/api/embed`,
//! `/api/tags`).

use async_trait::async_trait;
use claw_ledger::Provider;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::http::{listed, Upstream};
use super::{
    ChatEvent, ChatProvider, ChatRequest, ChatStream, Embeddings, FinishReason, OutputFormat,
    ProviderError, Usage,
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

/// The `/api/chat` body for `request`.
pub fn chat_body(request: &ChatRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| {
            let mut msg = json!({"role": m.role.as_str(), "content": m.content});
            if !m.images.is_empty() {
                let images: Vec<&str> = m.images.iter().map(|i| i.data.as_str()).collect();
                msg["images"] = json!(images);
            }
            msg
        })
        .collect();
    let p = &request.params;
    let mut options = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            options.insert(k.to_owned(), v);
        }
    };
    put("temperature", p.temperature.map(Value::from));
    put("top_p", p.top_p.map(Value::from));
    put("num_predict", p.max_tokens.map(Value::from));
    put("seed", p.seed.map(Value::from));
    put("presence_penalty", p.presence_penalty.map(Value::from));
    put("frequency_penalty", p.frequency_penalty.map(Value::from));
    put("stop", (!p.stop.is_empty()).then(|| json!(p.stop)));
    let mut body = json!({"model": request.model, "messages": messages, "stream": true});
    if !options.is_empty() {
        body["options"] = Value::Object(options);
    }
    match &p.format {
        Some(OutputFormat::Json) => body["format"] = json!("json"),
        Some(OutputFormat::JsonSchema(schema)) => body["format"] = schema.clone(),
        None => {}
    }
    body
}

/// The events one NDJSON line of `/api/chat` carries.
fn line_events(http: &Upstream, line: &Value) -> Result<Vec<ChatEvent>, ProviderError> {
    if let Some(err) = line.get("error") {
        return Err(http.protocol(err.as_str().unwrap_or("error in stream").to_owned()));
    }
    let mut events = Vec::with_capacity(1);
    if let Some(text) = line.pointer("/message/content").and_then(Value::as_str) {
        if !text.is_empty() {
            events.push(ChatEvent::Delta(text.to_owned()));
        }
    }
    if line.get("done").and_then(Value::as_bool) == Some(true) {
        events.push(ChatEvent::Usage(Usage {
            prompt_tokens: line.get("prompt_eval_count").and_then(Value::as_u64),
            completion_tokens: line.get("eval_count").and_then(Value::as_u64),
        }));
        let reason = match line.get("done_reason").and_then(Value::as_str) {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Stop,
        };
        events.push(ChatEvent::Finish(reason));
    }
    Ok(events)
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
        let events = self.http.ndjson(response).flat_map(move |line| {
            let out: Vec<Result<ChatEvent, ProviderError>> =
                match line.and_then(|l| line_events(&http, &l)) {
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
        let body = self.http.json(response).await?;
        let vectors: Vec<Vec<f32>> =
            serde_json::from_value(body.get("embeddings").cloned().unwrap_or(Value::Null))
                .map_err(|e| self.http.protocol(format!("bad embeddings: {e}")))?;
        if vectors.len() != inputs.len() {
            return Err(self.http.protocol(format!(
                "{} embeddings for {} inputs",
                vectors.len(),
                inputs.len()
            )));
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens: body.get("prompt_eval_count").and_then(Value::as_u64),
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
    use crate::providers::{ChatParams, Message, Role};

    #[test]
    fn chat_body_maps_openai_settings_to_ollama_options() {
        let req = ChatRequest {
            model: "llama3.2".into(),
            messages: vec![Message {
                role: Role::System,
                content: "be brief".into(),
                images: vec![],
            }],
            params: ChatParams {
                temperature: Some(0.2),
                max_tokens: Some(5),
                stop: vec!["\n".into()],
                format: Some(OutputFormat::Json),
                ..ChatParams::default()
            },
        };
        let body = chat_body(&req);
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
}

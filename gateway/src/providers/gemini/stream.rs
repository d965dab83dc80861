//! Reading `:streamGenerateContent?alt=sse`: each `data:` payload is a whole
//! `GenerateContentResponse` carrying answer text, function calls (whole, without ids: the
//! gateway makes them, and numbers calls across chunks), token counts and the finish reason.

use serde::Deserialize;
use serde_json::Value;

use super::NAME;
use crate::providers::http::{error_message, Upstream};
use crate::providers::tools::{new_call_id, with_signature};
use crate::providers::{ChatEvent, FinishReason, ProviderError, ToolCall, ToolCallDelta, Usage};

/// The finish reason for Gemini's `finishReason`.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

/// A `GenerateContentResponse`, the parts the gateway reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    error: Option<ChunkError>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<ResponsePart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponsePart {
    #[serde(default)]
    text: Option<String>,
    /// A thought summary, not answer text.
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<FunctionCall>,
    /// A thinking model's signature of the call (see [`crate::providers::tools`]).
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FunctionCall {
    /// Newer API versions may name the call; the gateway makes an id otherwise.
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(clippy::struct_field_names, reason = "Google's own field names")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkError {
    #[serde(default)]
    code: Option<u16>,
}

/// Reads a stream's chunks; function calls are numbered across the whole stream (Gemini
/// may send parallel calls in one chunk or in several).
#[derive(Default)]
pub struct ChunkReader {
    calls: usize,
}

impl ChunkReader {
    /// The events one chunk (one SSE `data:` payload) carries: the answer's text parts
    /// (thoughts left out), its function calls, its token counts, and the finish reason (or
    /// a prompt Google blocked outright).
    pub fn read(&mut self, http: &Upstream, data: &str) -> Result<Vec<ChatEvent>, ProviderError> {
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| http.protocol(format!("bad chunk in event stream: {e}")))?;
        if let Some(err) = chunk.error {
            return Err(ProviderError::Status {
                provider: NAME,
                status: err.code.unwrap_or(500),
                message: error_message(data),
            });
        }
        let mut events = Vec::new();
        let candidate = chunk.candidates.into_iter().next();
        let (content, finish) = candidate.as_ref().map_or((None, None), |c| {
            (c.content.as_ref(), c.finish_reason.as_deref())
        });
        for part in content.into_iter().flat_map(|c| &c.parts) {
            if part.thought {
                continue;
            }
            if let Some(text) = part.text.as_ref().filter(|t| !t.is_empty()) {
                events.push(ChatEvent::Delta(text.clone()));
            }
            if let Some(call) = &part.function_call {
                let arguments = call
                    .args
                    .as_ref()
                    .map_or_else(|| "{}".to_owned(), Value::to_string);
                events.push(ChatEvent::ToolCall(ToolCallDelta::whole(
                    self.calls,
                    ToolCall {
                        id: with_signature(
                            call.id.clone().unwrap_or_else(new_call_id),
                            part.thought_signature.as_deref(),
                        ),
                        name: call.name.clone(),
                        arguments,
                    },
                )));
                self.calls += 1;
            }
        }
        if let Some(usage) = chunk.usage_metadata {
            let completion = match (usage.candidates_token_count, usage.thoughts_token_count) {
                (Some(c), Some(t)) => Some(c + t),
                (c, t) => c.or(t),
            };
            events.push(ChatEvent::Usage(Usage {
                prompt_tokens: usage.prompt_token_count,
                completion_tokens: completion,
            }));
        }
        if let Some(reason) = finish.filter(|r| *r != "FINISH_REASON_UNSPECIFIED") {
            events.push(ChatEvent::Finish(finish_reason(reason)));
        } else if candidate.is_none()
            && chunk
                .prompt_feedback
                .is_some_and(|f| f.block_reason.is_some())
        {
            events.push(ChatEvent::Finish(FinishReason::ContentFilter));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support;
    use serde_json::json;

    fn http() -> Upstream {
        test_support::http(NAME)
    }

    fn response_events(http: &Upstream, data: &str) -> Result<Vec<ChatEvent>, ProviderError> {
        ChunkReader::default().read(http, data)
    }

    #[test]
    fn stream_chunks_yield_text_usage_and_finish() {
        let http = http();
        let first = r#"{"candidates":[{"content":{"parts":[{"text":"Hel"},{"text":"lo"}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4}}"#;
        assert_eq!(
            response_events(&http, first).unwrap(),
            vec![
                ChatEvent::Delta("Hel".into()),
                ChatEvent::Delta("lo".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(4),
                    completion_tokens: None
                }),
            ]
        );
        let last = r#"{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":3,"totalTokenCount":7},"modelVersion":"gemini-1.5-flash-002"}"#;
        assert_eq!(
            response_events(&http, last).unwrap(),
            vec![
                ChatEvent::Delta("!".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(4),
                    completion_tokens: Some(3)
                }),
                ChatEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn thoughts_are_not_answer_text_but_count_as_completion() {
        let chunk = r#"{"candidates":[{"content":{"parts":[{"text":"hmm","thought":true},{"text":"4"}]}}],"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":1,"thoughtsTokenCount":10}}"#;
        assert_eq!(
            response_events(&http(), chunk).unwrap(),
            vec![
                ChatEvent::Delta("4".into()),
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(2),
                    completion_tokens: Some(11)
                }),
            ]
        );
    }

    #[test]
    fn finish_reasons_map_to_openais() {
        for (gemini, ours) in [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            ("OTHER", FinishReason::Stop),
            ("LANGUAGE", FinishReason::Stop),
            ("MALFORMED_FUNCTION_CALL", FinishReason::Stop),
        ] {
            let chunk = json!({"candidates": [{"finishReason": gemini, "index": 0}]});
            assert_eq!(
                response_events(&http(), &chunk.to_string()).unwrap(),
                vec![ChatEvent::Finish(ours)],
                "{gemini}"
            );
        }
        let unspecified = json!({"candidates": [{"finishReason": "FINISH_REASON_UNSPECIFIED"}]});
        assert!(response_events(&http(), &unspecified.to_string())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_finish() {
        let chunk = r#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9}}"#;
        assert_eq!(
            response_events(&http(), chunk).unwrap(),
            vec![
                ChatEvent::Usage(Usage {
                    prompt_tokens: Some(9),
                    completion_tokens: None
                }),
                ChatEvent::Finish(FinishReason::ContentFilter),
            ]
        );
    }

    #[test]
    fn errors_and_garbage_in_the_stream_are_errors() {
        let err =
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#;
        assert_eq!(
            response_events(&http(), err).unwrap_err(),
            ProviderError::Status {
                provider: NAME,
                status: 503,
                message: "The model is overloaded.".into()
            }
        );
        assert!(matches!(
            response_events(&http(), "{not json"),
            Err(ProviderError::Protocol { .. })
        ));
    }
    #[test]
    fn function_calls_get_ids_and_indexes_across_chunks() {
        let mut reader = ChunkReader::default();
        let first = json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "time", "args": {}}}]}}]});
        let events = reader.read(&http(), &first.to_string()).unwrap();
        let calls: Vec<&ToolCallDelta> = events
            .iter()
            .filter_map(|e| match e {
                ChatEvent::ToolCall(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].index, calls[1].index), (0, 1));
        assert_eq!(calls[0].name.as_deref(), Some("weather"));
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert!(calls[0]
            .id
            .as_deref()
            .is_some_and(|id| id.starts_with("call_")));
        assert_ne!(calls[0].id, calls[1].id);
        let next = json!({"candidates": [{"content": {"parts": [
            {"functionCall": {"name": "news"}}]}, "finishReason": "STOP"}]});
        let events = reader.read(&http(), &next.to_string()).unwrap();
        match &events[0] {
            ChatEvent::ToolCall(d) => {
                assert_eq!(d.index, 2);
                assert_eq!(d.arguments, "{}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events[1], ChatEvent::Finish(FinishReason::Stop));
    }
}

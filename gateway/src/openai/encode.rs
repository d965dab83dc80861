//! Writing OpenAI's response shapes: a whole chat completion, stream chunks, embeddings lists
//! and the models list.

use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use crate::providers::{FinishReason, ToolCall, ToolCallDelta};

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Identity shared by a completion and all of its chunks.
#[derive(Debug, Clone)]
pub struct CompletionIds {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that served the request.
    pub model: String,
}

/// `chat.completion`: the whole answer. With tool calls and no text, `content` is null, as
/// OpenAI sends it.
pub fn completion(
    ids: &CompletionIds,
    content: &str,
    tool_calls: &[ToolCall],
    finish: FinishReason,
    usage: TokenUsage,
) -> Value {
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        if content.is_empty() {
            message["content"] = Value::Null;
        }
        let calls: Vec<Value> = tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        message["tool_calls"] = json!(calls);
    }
    json!({
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish.as_str(),
        }],
        "usage": usage,
    })
}

/// A streamed tool call's delta: the call's first carries its id, type and name (and empty
/// arguments when none came with them), the rest only argument fragments.
fn tool_call_delta(delta: &ToolCallDelta) -> Value {
    let mut function = json!({"arguments": delta.arguments});
    let mut call = json!({"index": delta.index});
    if let Some(id) = &delta.id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    if let Some(name) = &delta.name {
        function["name"] = json!(name);
    }
    call["function"] = function;
    json!({"tool_calls": [call]})
}

/// What a stream chunk carries.
pub enum ChunkBody<'a> {
    /// The first chunk: the assistant role, empty content.
    Role,
    /// Answer text.
    Text(&'a str),
    /// Part of a function call.
    ToolCall(&'a ToolCallDelta),
    /// The end of the choice.
    Finish(FinishReason),
    /// The final usage chunk (empty `choices`).
    Usage(TokenUsage),
}

/// One `chat.completion.chunk` as JSON text. With `include_usage`, every chunk carries
/// `"usage": null` except the final usage chunk, as OpenAI does.
pub fn chunk(ids: &CompletionIds, body: &ChunkBody<'_>, include_usage: bool) -> String {
    let choice = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let (choices, usage) = match body {
        ChunkBody::Role => (
            choice(json!({"role": "assistant", "content": ""}), None),
            Value::Null,
        ),
        ChunkBody::Text(text) => (choice(json!({"content": text}), None), Value::Null),
        ChunkBody::ToolCall(delta) => (choice(tool_call_delta(delta), None), Value::Null),
        ChunkBody::Finish(reason) => (choice(json!({}), Some(reason.as_str())), Value::Null),
        ChunkBody::Usage(usage) => (json!([]), json!(usage)),
    };
    let mut chunk = json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": choices,
    });
    if include_usage {
        chunk["usage"] = usage;
    }
    chunk.to_string()
}

/// `list` of `embedding`s, as floats or base64 little-endian `f32`s.
pub fn embeddings(model: &str, vectors: &[Vec<f32>], base64: bool, prompt_tokens: u64) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

/// `list` of `model`s.
pub fn models(ids: &[(String, &str)], created: i64) -> Value {
    let data: Vec<Value> = ids
        .iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": created, "owned_by": owner}))
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_embeddings_are_little_endian_f32() {
        let doc = embeddings("m", &[vec![1.0, -2.5]], true, 3);
        let text = doc["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, vec![1.0, -2.5]);
        assert_eq!(doc["usage"]["total_tokens"], 3);
    }

    #[test]
    fn chunks_carry_usage_null_only_when_asked() {
        let ids = CompletionIds {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
        };
        let plain: Value =
            serde_json::from_str(&chunk(&ids, &ChunkBody::Text("hi"), false)).unwrap();
        assert!(plain.get("usage").is_none());
        let with: Value = serde_json::from_str(&chunk(&ids, &ChunkBody::Text("hi"), true)).unwrap();
        assert!(with["usage"].is_null());
        let last: Value = serde_json::from_str(&chunk(
            &ids,
            &ChunkBody::Usage(TokenUsage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            }),
            true,
        ))
        .unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 3);
    }
}

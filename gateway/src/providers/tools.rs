//! What the adapters share about function calling: ids for providers that give calls none,
//! the function name behind a tool result (providers that pair results by name), arguments as
//! JSON text versus JSON objects, and Gemini's thought signatures carried inside call ids.
//!
//! Gemini (2.5 and later) signs the function calls of a thinking model, and Gemini 3 refuses a
//! later turn whose calls come back without their signature. OpenAI's wire has no place for
//! it, so the gateway keeps it in the call's id, which every client echoes back:
//! `call_…` + [`SIGNATURE_MARK`] + the signature. It stays stateless (any gateway can read
//! it); only Gemini is sent the signature, and the other providers get the plain id.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{Message, Tool};

/// A tool in the shape OpenAI and Ollama share: `{"type": "function", "function": {…}}`.
#[derive(Debug, Serialize)]
pub struct FunctionTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionSpec<'a>,
}

#[derive(Debug, Serialize)]
struct FunctionSpec<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Cow<'a, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

impl<'a> FunctionTool<'a> {
    /// The tool as the client defined it (OpenAI).
    pub fn as_defined(tool: &'a Tool) -> Self {
        Self::new(
            tool,
            tool.parameters.as_ref().map(Cow::Borrowed),
            tool.strict,
        )
    }

    /// The tool with an empty object schema when the client gave none, and without OpenAI's
    /// `strict` (Ollama).
    pub fn with_schema(tool: &'a Tool) -> Self {
        Self::new(tool, Some(parameters_or_empty(tool)), None)
    }

    fn new(tool: &'a Tool, parameters: Option<Cow<'a, Value>>, strict: Option<bool>) -> Self {
        Self {
            kind: "function",
            function: FunctionSpec {
                name: &tool.name,
                description: tool.description.as_deref(),
                parameters,
                strict,
            },
        }
    }
}

/// A tool's argument schema, or an object schema without properties when it takes none (for
/// providers that require one).
pub fn parameters_or_empty(tool: &Tool) -> Cow<'_, Value> {
    tool.parameters.as_ref().map_or_else(
        || Cow::Owned(json!({"type": "object", "properties": {}})),
        Cow::Borrowed,
    )
}

/// A fresh call id in OpenAI's style (`call_` and 32 hex digits), for providers whose calls
/// have none (Gemini, Ollama).
pub fn new_call_id() -> String {
    format!("call_{}", Uuid::new_v4().simple())
}

/// Between a call id and the Gemini thought signature carried in it (base64 has no `.`).
pub const SIGNATURE_MARK: &str = ".sig.";

/// `id` carrying `signature`, when there is one.
pub fn with_signature(id: String, signature: Option<&str>) -> String {
    match signature.filter(|s| !s.is_empty()) {
        Some(signature) => format!("{id}{SIGNATURE_MARK}{signature}"),
        None => id,
    }
}

/// A call id's plain part and the Gemini thought signature it carries, if any.
pub fn split_signature(id: &str) -> (&str, Option<&str>) {
    match id.split_once(SIGNATURE_MARK) {
        Some((plain, signature)) if !signature.is_empty() => (plain, Some(signature)),
        _ => (id, None),
    }
}

/// The function each earlier call id named, from the assistant turns' `tool_calls`.
pub fn names_by_call_id(messages: &[Message]) -> HashMap<&str, &str> {
    messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .map(|c| (c.id.as_str(), c.name.as_str()))
        .collect()
}

/// A call's arguments as the JSON object providers that take objects want. OpenAI's
/// arguments are JSON text that models sometimes get wrong; text that is not an object is
/// kept, under `"arguments"`, rather than lost.
pub fn arguments_object(arguments: &str) -> Map<String, Value> {
    if arguments.trim().is_empty() {
        return Map::new();
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(object)) => object,
        Ok(other) => Map::from_iter([("arguments".to_owned(), other)]),
        Err(_) => Map::from_iter([("arguments".to_owned(), Value::String(arguments.to_owned()))]),
    }
}

/// A tool result's text as the JSON object providers that take objects want (Gemini's
/// `functionResponse.response`): a JSON object as it is, anything else under `"content"`.
pub fn result_object(content: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(object)) => object,
        _ => Map::from_iter([("content".to_owned(), Value::String(content.to_owned()))]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Role, ToolCall};
    use serde_json::json;

    #[test]
    fn ids_are_unique_and_openai_shaped() {
        let (a, b) = (new_call_id(), new_call_id());
        assert_ne!(a, b);
        assert!(a.starts_with("call_") && a.len() == 37, "{a}");
    }

    #[test]
    fn arguments_and_results_become_objects_without_losing_anything() {
        assert_eq!(
            arguments_object(r#"{"city":"Paris"}"#),
            json!({"city": "Paris"}).as_object().unwrap().clone()
        );
        assert!(arguments_object("  ").is_empty());
        assert_eq!(
            Value::Object(arguments_object("[1]")),
            json!({"arguments": [1]})
        );
        assert_eq!(
            Value::Object(arguments_object("{broken")),
            json!({"arguments": "{broken"})
        );
        assert_eq!(
            Value::Object(result_object(r#"{"t":22}"#)),
            json!({"t": 22})
        );
        assert_eq!(
            Value::Object(result_object("22 C")),
            json!({"content": "22 C"})
        );
    }

    #[test]
    fn signatures_ride_in_ids_and_come_out_again() {
        let id = with_signature("call_1".into(), Some("c2lnbmVk+/="));
        assert_eq!(id, "call_1.sig.c2lnbmVk+/=");
        assert_eq!(split_signature(&id), ("call_1", Some("c2lnbmVk+/=")));
        assert_eq!(with_signature("call_2".into(), None), "call_2");
        assert_eq!(split_signature("call_2"), ("call_2", None));
        assert_eq!(split_signature("toolu_01.sig."), ("toolu_01.sig.", None));
    }

    #[test]
    fn names_are_found_by_call_id() {
        let mut call = Message::text(Role::Assistant, "");
        call.tool_calls = vec![ToolCall {
            id: "c1".into(),
            name: "weather".into(),
            arguments: "{}".into(),
        }];
        let messages = [Message::text(Role::User, "hi"), call];
        assert_eq!(names_by_call_id(&messages).get("c1"), Some(&"weather"));
    }
}

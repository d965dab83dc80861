//! What the adapters share about function calling: ids for providers that give calls none,
//! the function name behind a tool result (providers that pair results by name), and
//! arguments as JSON text versus JSON objects.

use std::collections::HashMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::Message;

/// A fresh call id in OpenAI's style (`call_` and 32 hex digits), for providers whose calls
/// have none (Gemini, Ollama).
pub fn new_call_id() -> String {
    format!("call_{}", Uuid::new_v4().simple())
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

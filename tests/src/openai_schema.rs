//! Validates gateway output against OpenAI's published OpenAPI schemas
//! (`tests/openai/openapi-subset.json`). OpenAPI 3.0's `nullable: true` is rewritten into JSON
//! Schema (`anyOf [..., null]`) first, the standard conversion.

use std::sync::OnceLock;

use serde_json::{json, Map, Value};

fn components() -> &'static Value {
    static COMPONENTS: OnceLock<Value> = OnceLock::new();
    COMPONENTS.get_or_init(|| {
        let text = include_str!("../openai/openapi-subset.json");
        let mut doc: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let mut components = doc["components"].take();
        rewrite_nullable(&mut components);
        components
    })
}

fn rewrite_nullable(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(rewrite_nullable);
            if map.remove("nullable") == Some(Value::Bool(true)) {
                let rest = Value::Object(std::mem::take(map));
                let mut wrapped = Map::new();
                wrapped.insert("anyOf".into(), json!([rest, {"type": "null"}]));
                *map = wrapped;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_nullable),
        _ => {}
    }
}

/// Checks `instance` against the component schema `name` (e.g. `CreateChatCompletionResponse`).
pub fn validate(name: &str, instance: &Value) -> Result<(), String> {
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": components(),
    });
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("schema {name} does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{name} rejects {instance}: {}", errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validator_accepts_openais_shapes_and_rejects_others() {
        let ok = json!({"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": "x"}});
        assert!(validate("ErrorResponse", &ok).is_ok());
        let bad = json!({"error": {"message": "m"}});
        assert!(validate("ErrorResponse", &bad).is_err());
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": null, "finish_reason": null}]});
        assert!(
            validate("CreateChatCompletionStreamResponse", &chunk).is_ok(),
            "{:?}",
            validate("CreateChatCompletionStreamResponse", &chunk)
        );
        let wrong = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "bogus"}]});
        assert!(validate("CreateChatCompletionStreamResponse", &wrong).is_err());
    }
}

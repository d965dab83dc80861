//! JSON Schema as Gemini's `Schema` (a subset of OpenAPI 3.0), for `responseSchema` and
//! function declarations' `parameters`: what Gemini cannot express is converted or left out,
//! never refused.

use serde_json::{json, Map, Value};

/// Schema keywords Gemini's `Schema` (a subset of OpenAPI 3.0) takes over unchanged.
const SCHEMA_KEYWORDS: [&str; 17] = [
    "format",
    "title",
    "description",
    "nullable",
    "maxItems",
    "minItems",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "propertyOrdering",
    "default",
    "minimum",
    "maximum",
];
/// How many `$ref`s deep a schema is inlined (recursive schemas stop there).
const MAX_REF_DEPTH: usize = 8;

/// An OpenAI `json_schema` as Gemini's `responseSchema`: local `$ref`s inlined, `["T", "null"]`
/// types as `nullable`, `const` as a one-value `enum`, `oneOf` as `anyOf`, type names in
/// Gemini's upper case, and keywords Gemini refuses (`additionalProperties`, `$schema`,
/// `strict`, …) left out.
pub fn gemini_schema(schema: &Value) -> Value {
    schema_node(schema, schema, 0)
}

fn schema_node(node: &Value, root: &Value, depth: usize) -> Value {
    let Some(obj) = node.as_object() else {
        return json!({});
    };
    if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
        let resolved = target
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer));
        return match resolved {
            Some(t) if depth < MAX_REF_DEPTH => schema_node(t, root, depth + 1),
            _ => json!({"type": "OBJECT"}),
        };
    }
    let mut out = Map::new();
    for key in SCHEMA_KEYWORDS {
        if let Some(v) = obj.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    let mut alternatives: Vec<Value> = Vec::new();
    match obj.get("type") {
        Some(Value::String(t)) => {
            out.insert("type".into(), json!(t.to_ascii_uppercase()));
        }
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            if names.contains(&"null") {
                out.insert("nullable".into(), json!(true));
            }
            let concrete: Vec<&str> = names.into_iter().filter(|t| *t != "null").collect();
            if let [one] = concrete.as_slice() {
                out.insert("type".into(), json!(one.to_ascii_uppercase()));
            } else {
                alternatives.extend(
                    concrete
                        .iter()
                        .map(|t| json!({"type": t.to_ascii_uppercase()})),
                );
            }
        }
        _ => {}
    }
    let strings = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
    let choices = match (obj.get("enum").filter(|v| strings(v)), obj.get("const")) {
        (Some(values), _) => Some(values.clone()),
        (None, Some(Value::String(c))) => Some(json!([c])),
        _ => None,
    };
    if let Some(choices) = choices {
        out.insert("enum".into(), choices);
        out.entry("type").or_insert_with(|| json!("STRING"));
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        let props: Map<String, Value> = props
            .iter()
            .map(|(k, v)| (k.clone(), schema_node(v, root, depth)))
            .collect();
        out.insert("properties".into(), Value::Object(props));
    }
    if let Some(items) = obj.get("items").filter(|i| i.is_object()) {
        out.insert("items".into(), schema_node(items, root, depth));
    }
    for key in ["anyOf", "oneOf"] {
        for member in obj.get(key).and_then(Value::as_array).into_iter().flatten() {
            if member.get("type").and_then(Value::as_str) == Some("null") {
                out.insert("nullable".into(), json!(true));
            } else {
                alternatives.push(schema_node(member, root, depth));
            }
        }
    }
    match alternatives.len() {
        0 => {}
        1 if !out.contains_key("type") => {
            if let Some(Value::Object(only)) = alternatives.pop() {
                for (k, v) in only {
                    out.entry(k).or_insert(v);
                }
            }
        }
        _ => {
            out.insert("anyOf".into(), Value::Array(alternatives));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_schema_becomes_gemini_response_schema() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": ["integer", "null"]},
                "kind": {"const": "person"},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
                "pet": {"anyOf": [{"$ref": "#/$defs/tag"}, {"type": "null"}]}
            },
            "required": ["name", "age"],
            "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}}
        });
        assert_eq!(
            gemini_schema(&schema),
            json!({
                "type": "OBJECT",
                "required": ["name", "age"],
                "properties": {
                    "name": {"type": "STRING", "description": "who"},
                    "age": {"type": "INTEGER", "nullable": true},
                    "kind": {"type": "STRING", "enum": ["person"]},
                    "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["a", "b"]}},
                    "pet": {"nullable": true, "type": "STRING", "enum": ["a", "b"]}
                }
            })
        );
    }

    #[test]
    fn a_recursive_schema_stops_inlining() {
        let schema = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
            "properties": {"next": {"$ref": "#/$defs/node"}}}}});
        let out = gemini_schema(&schema);
        let mut depth = 0;
        let mut node = &out;
        while let Some(next) = node.pointer("/properties/next") {
            node = next;
            depth += 1;
        }
        assert_eq!(depth, MAX_REF_DEPTH);
        assert_eq!(node, &json!({"type": "OBJECT"}));
    }
}

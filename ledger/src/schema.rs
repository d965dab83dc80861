//! JSON Schemas of the ledger, generated from the Rust types. The checked-in copies under
//! `schemas/ledger/v1/` are what billing consumers read; a test regenerates them and fails on
//! any difference (`UPDATE_SCHEMAS=1` rewrites them).

use schemars::{generate::SchemaSettings, JsonSchema, Schema};
use serde_json::Value;

use crate::event::{Envelope, KeyCreated, KeyRevoked, RequestServed, TierFallback};

/// Every schema file: (file name, schema document).
pub fn ledger_schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("envelope.json", generate::<Envelope>()),
        ("KeyCreated.json", generate::<KeyCreated>()),
        ("KeyRevoked.json", generate::<KeyRevoked>()),
        ("RequestServed.json", generate::<RequestServed>()),
        ("TierFallback.json", generate::<TierFallback>()),
    ]
}

fn generate<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let schema: Schema = generator.into_root_schema_for::<T>();
    let mut value = schema.to_value();
    require_every_property(&mut value);
    value
}

/// Fields added to version 1 after it was published: written only when they say something,
/// and optional, so that the events written before them still validate.
const ADDED_IN_V1: &[&str] = &["admin_mode"];

/// The ledger always writes every field (nullable ones as `null`), so every property of every
/// object is required, except [`ADDED_IN_V1`]; schemars leaves `Option` fields optional by
/// default.
fn require_every_property(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                let names: Vec<Value> = props
                    .keys()
                    .filter(|name| !ADDED_IN_V1.contains(&name.as_str()))
                    .cloned()
                    .map(Value::String)
                    .collect();
                map.insert("required".into(), Value::Array(names));
            }
            map.values_mut().for_each(require_every_property);
        }
        Value::Array(items) => items.iter_mut().for_each(require_every_property),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn schema_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/ledger/v1")
    }

    /// The checked-in schemas are exactly what the code generates.
    #[test]
    fn checked_in_schemas_match_the_code() {
        let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in ledger_schemas() {
            let path = schema_dir().join(name);
            let want = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                if update {
                    std::fs::create_dir_all(schema_dir()).unwrap();
                    std::fs::write(&path, want).unwrap();
                } else {
                    stale.push(name);
                }
            }
        }
        assert!(
            stale.is_empty(),
            "schemas/ledger/v1 drifted from the code for {stale:?}; run UPDATE_SCHEMAS=1 cargo test -p claw-ledger"
        );
    }
}

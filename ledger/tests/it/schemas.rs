//! Every event the code produces validates against the checked-in JSON Schemas.

use std::path::PathBuf;

use serde_json::Value;

fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/ledger/v1")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn sample_events_validate_against_envelope_and_data_schemas() {
    let envelope = jsonschema::validator_for(&load("envelope.json")).unwrap();
    for event in crate::sample_events("key-1") {
        let json = serde_json::to_value(&event).unwrap();
        let errors: Vec<String> = envelope.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{json}: {errors:?}");
        let data =
            jsonschema::validator_for(&load(&format!("{}.json", event.event_type()))).unwrap();
        let errors: Vec<String> = data
            .iter_errors(&json["data"])
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{json}: {errors:?}");
    }
}

#[test]
fn schemas_reject_what_the_contract_forbids() {
    let served = jsonschema::validator_for(&load("RequestServed.json")).unwrap();
    let mut json = serde_json::to_value(&crate::sample_events("k")[1]).unwrap()["data"].clone();
    assert!(served.is_valid(&json));
    json["cost_usd"] = serde_json::json!(0.5);
    assert!(!served.is_valid(&json), "cost_usd must be a decimal string");
    json["cost_usd"] = serde_json::json!("0.5");
    json.as_object_mut().unwrap().remove("ttft_ms");
    assert!(
        !served.is_valid(&json),
        "nullable fields are still required"
    );
    let created = jsonschema::validator_for(&load("KeyCreated.json")).unwrap();
    let mut json = serde_json::to_value(&crate::sample_events("k")[0]).unwrap()["data"].clone();
    json["key_hash"] = serde_json::json!("deadbeef");
    assert!(!created.is_valid(&json), "key_hash must be sha256:<hex>");
}

#[test]
fn envelope_wire_shape_is_the_contracts() {
    let json = serde_json::to_value(&crate::sample_events("key-9")[1]).unwrap();
    let obj = json.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "data",
            "event_id",
            "event_type",
            "key_id",
            "occurred_at",
            "producer",
            "schema_version"
        ]
    );
    assert_eq!(json["event_type"], "RequestServed");
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["data"]["cost_usd"], "0.000125");
    let at = json["occurred_at"].as_str().unwrap();
    assert!(
        at.ends_with('Z') && at.len() == "2026-11-24T10:00:00.123Z".len(),
        "{at}"
    );
    let back: claw_ledger::Envelope = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(serde_json::to_value(&back).unwrap(), json);
}

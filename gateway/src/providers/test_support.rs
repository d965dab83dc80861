//! What the adapters' unit tests share: messages, requests and an upstream client with short
//! timeouts.

use std::collections::HashMap;

use super::http::Upstream;
use super::{ChatParams, ChatRequest, Message, Role};

/// A text-only message.
pub fn msg(role: Role, content: &str) -> Message {
    Message::text(role, content)
}

/// A chat request for `model`.
pub fn chat_request(model: &str, messages: Vec<Message>, params: ChatParams) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages,
        params,
    }
}

/// The shared HTTP upstream, named `name`, with the test timeouts; built once per name
/// (building an HTTP client loads the TLS roots, which property tests cannot afford per case).
pub fn http(name: &'static str) -> Upstream {
    static BUILT: std::sync::OnceLock<std::sync::Mutex<HashMap<&'static str, Upstream>>> =
        std::sync::OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    built
        .entry(name)
        .or_insert_with(|| Upstream::new(name, crate::config::Settings::test_timeouts()).unwrap())
        .clone()
}

/// Any role.
pub fn arb_role() -> impl proptest::strategy::Strategy<Value = Role> {
    use proptest::prelude::*;
    prop_oneof![
        Just(Role::System),
        Just(Role::User),
        Just(Role::Assistant),
        Just(Role::Tool)
    ]
}

/// Arbitrary function-call arguments: a JSON object of a few scalar fields.
pub fn arb_arguments() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    let scalar = prop_oneof![
        any::<i32>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        "[ -~]{0,10}".prop_map(serde_json::Value::from),
    ];
    prop::collection::btree_map("[a-z_]{1,8}", scalar, 0..4)
        .prop_map(|fields| serde_json::Value::Object(fields.into_iter().collect()))
}

/// Arbitrary conversations with tool use: a question, then rounds of an assistant turn that
/// calls one to three functions (ids in any provider's style, some with characters
/// Anthropic refuses) answered by one tool message per call, in order, then a last question.
pub fn arb_tool_conversation() -> impl proptest::strategy::Strategy<Value = Vec<Message>> {
    use proptest::prelude::*;
    let call = (
        "[a-zA-Z0-9_:/-]{1,20}",
        "[a-zA-Z_][a-zA-Z0-9_]{0,12}",
        arb_arguments(),
    );
    let round = (
        "[a-z ]{0,12}",
        prop::collection::vec(call, 1..4),
        prop::collection::vec("[ -~]{0,16}", 3),
    );
    prop::collection::vec(round, 1..4).prop_map(|rounds| {
        let mut messages = vec![Message::text(Role::User, "question")];
        for (r, (text, calls, results)) in rounds.into_iter().enumerate() {
            let mut assistant = Message::text(Role::Assistant, text);
            assistant.tool_calls = calls
                .iter()
                .enumerate()
                .map(|(i, (id, name, args))| super::ToolCall {
                    // Unique within the conversation, whatever the generator drew.
                    id: format!("{id}{r}x{i}"),
                    name: name.clone(),
                    arguments: args.to_string(),
                })
                .collect();
            let answers: Vec<Message> = assistant
                .tool_calls
                .iter()
                .zip(results.iter().cycle())
                .map(|(call, result)| Message {
                    tool_call_id: Some(call.id.clone()),
                    ..Message::text(Role::Tool, result.clone())
                })
                .collect();
            messages.push(assistant);
            messages.extend(answers);
        }
        messages.push(Message::text(Role::User, "and so?"));
        messages
    })
}

/// The calls a stream of events assembles to, by index (as the exchange assembles them).
pub fn assemble(events: &[super::ChatEvent]) -> Vec<super::ToolCall> {
    let mut calls = Vec::new();
    for event in events {
        if let super::ChatEvent::ToolCall(delta) = event {
            delta.apply_to(&mut calls);
        }
    }
    calls
}

/// `text` cut into pieces at the given (sorted, deduplicated) character positions.
pub fn fragments(text: &str, cuts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain([chars.len()]) {
        if p > start {
            out.push(chars[start..p].iter().collect());
            start = p;
        }
    }
    out
}

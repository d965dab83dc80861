//! What the adapters' unit tests share: messages, requests and an upstream client with short
//! timeouts.

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

/// The shared HTTP upstream, named `name`, with the test timeouts.
pub fn http(name: &'static str) -> Upstream {
    Upstream::new(name, crate::config::Settings::test_timeouts()).unwrap()
}

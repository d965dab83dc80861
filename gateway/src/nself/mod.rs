//! The nSelf extensions a request switches on with headers: the nSelf expert system prompt
//! (`x-nself-app: true`), admin mode (`x-nself-admin: true`: an operator's prompt with the
//! gateway's live state, for keys that allow it), sessions ([`sessions`]) and the knowledge
//! base (`x-nself-knowledge: true`, [`knowledge`]). The prompts and passages are put in front
//! of the conversation, as system messages every provider understands.

pub mod admin;
pub mod knowledge;
pub mod prompts;
pub mod sessions;

use std::fmt::Write as _;

use axum::http::HeaderMap;

use crate::error::ApiError;
use crate::providers::{Message, Role};
use crate::state::AppState;
pub use prompts::Prompts;

/// The extensions a request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `x-nself-app: true`.
    pub app: bool,
    /// `x-nself-admin: true` (only for keys with `admin_allowed`).
    pub admin: bool,
    /// `x-nself-knowledge: true`.
    pub knowledge: bool,
}

/// Whether a feature header is `true` (any case).
fn switched_on(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

impl Features {
    /// The features `headers` ask for; admin mode is refused (403) for a key without
    /// `admin_allowed`.
    pub fn requested(headers: &HeaderMap, admin_allowed: bool) -> Result<Self, ApiError> {
        let features = Self {
            app: switched_on(headers, "x-nself-app"),
            admin: switched_on(headers, "x-nself-admin"),
            knowledge: switched_on(headers, "x-nself-knowledge"),
        };
        if features.admin && !admin_allowed {
            metrics::counter!("claw_requests_refused_total", "reason" => "permission_denied")
                .increment(1);
            return Err(ApiError::permission_denied(
                "This key is not allowed to use admin mode (x-nself-admin).",
            ));
        }
        Ok(features)
    }

    /// `messages` with what the features add in front: the nSelf prompt, the admin prompt
    /// with the live state, then the knowledge passages that answer the last user message.
    pub async fn apply(&self, state: &AppState, messages: Vec<Message>) -> Vec<Message> {
        let mut added = Vec::new();
        if self.app {
            added.push(system(state.prompts.app.clone()));
        }
        if self.admin {
            let live = admin::LiveState::gather(state).await;
            added.push(system(format!(
                "{}\n\n{}",
                state.prompts.admin.trim_end(),
                live.render()
            )));
        }
        if self.knowledge {
            let question = messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or("", |m| m.content.as_str());
            let (found, ranking) = state.knowledge.find(question, knowledge::PASSAGES).await;
            metrics::counter!("claw_knowledge_searches_total", "ranking" => ranking.as_str())
                .increment(1);
            if !found.is_empty() {
                added.push(system(knowledge_message(&found)));
            }
        }
        if added.is_empty() {
            return messages;
        }
        added.extend(messages);
        added
    }
}

/// The system message that carries knowledge passages.
fn knowledge_message(passages: &[knowledge::Passage]) -> String {
    let mut text = String::from(
        "Passages from the nSelf knowledge base, most relevant first. Rely on them where they \
         answer the question, and name the passage you use.",
    );
    for p in passages {
        let _ = write!(text, "\n\n### {}\n{}", p.title, p.text);
    }
    text
}

fn system(content: String) -> Message {
    Message::text(Role::System, content)
}

//! Sessions (`x-nself-session-id: <uuid>`): the gateway keeps the conversation, so a client
//! sends only its new messages. A session's earlier messages go before the request's (trimmed,
//! oldest first, to a budget, so the history never outgrows the model's context); once the
//! answer is complete, the request's messages and the answer are appended. A session belongs
//! to the key that started it: another key is told it does not exist.

use axum::http::HeaderMap;
use claw_projector::sessions::{AppendError, SessionMessage};
use claw_projector::ReadModels;
use uuid::Uuid;

use crate::error::ApiError;
use crate::providers::{Message, Role};

/// The header naming a session.
pub const HEADER: &str = "x-nself-session-id";

/// The session a request names, if any: a malformed id is a 400.
pub fn requested(headers: &HeaderMap) -> Result<Option<Uuid>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid_request(
                format!("{HEADER} must be a UUID (e.g. {}).", Uuid::nil()),
                Some(HEADER.to_owned()),
            )
        })
}

fn unavailable(err: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "session store failed");
    ApiError::no_tier_available(
        "The session store is unavailable; retry shortly or send the request without x-nself-session-id.",
        1,
    )
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("No session {id} for this key."))
}

/// A session's history, as loaded for one request.
pub struct Session {
    store: ReadModels,
    id: Uuid,
    key_id: String,
    /// The earlier messages that fit the budget, oldest first.
    history: Vec<Message>,
}

/// What a completed answer appends to its session.
pub struct Turn {
    store: ReadModels,
    id: Uuid,
    key_id: String,
    asked: Vec<SessionMessage>,
}

impl Session {
    /// Loads session `id` for `key_id` (a new id starts an empty session), keeping the most
    /// recent messages within `budget_chars`.
    pub async fn load(
        store: &ReadModels,
        id: Uuid,
        key_id: &str,
        budget_chars: usize,
    ) -> Result<Self, ApiError> {
        let stored = store.session(&id.to_string()).await.map_err(unavailable)?;
        let messages = match stored {
            Some(s) if s.key_id != key_id => return Err(not_found(id)),
            Some(s) => s.messages,
            None => Vec::new(),
        };
        Ok(Self {
            store: store.clone(),
            id,
            key_id: key_id.to_owned(),
            history: within_budget(messages, budget_chars),
        })
    }

    /// The history followed by the request's messages `asked`, and the turn that records
    /// them with the answer. Sessions keep text turns: tool calls and their results stay in
    /// the requests that carry them, so a stored history never holds a call without its
    /// result.
    pub fn around(self, asked: Vec<Message>) -> (Vec<Message>, Turn) {
        let turn = Turn {
            store: self.store,
            id: self.id,
            key_id: self.key_id,
            asked: asked
                .iter()
                .filter(|m| m.role != Role::Tool && m.tool_calls.is_empty())
                .map(|m| SessionMessage {
                    role: m.role.as_str().to_owned(),
                    content: m.content.clone(),
                })
                .collect(),
        };
        let mut messages = self.history;
        messages.extend(asked);
        (messages, turn)
    }
}

impl Turn {
    /// Appends the request's messages and `answer` (unless it has no text: an answer that
    /// only calls tools) to the session.
    pub async fn record(self, answer: &str) -> Result<(), ApiError> {
        let mut messages = self.asked;
        if !answer.is_empty() {
            messages.push(SessionMessage {
                role: Role::Assistant.as_str().to_owned(),
                content: answer.to_owned(),
            });
        }
        self.store
            .append_to_session(&self.id.to_string(), &self.key_id, &messages)
            .await
            .map_err(|err| match err {
                AppendError::NotOwner => not_found(self.id),
                AppendError::Store(err) => unavailable(err),
            })
    }
}

fn role(name: &str) -> Role {
    match name {
        "system" => Role::System,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        _ => Role::User,
    }
}

/// The most recent `stored` messages whose text fits `budget_chars`, oldest first; the
/// history never starts with an answer whose question was trimmed away.
fn within_budget(stored: Vec<SessionMessage>, budget_chars: usize) -> Vec<Message> {
    let mut used = 0;
    let mut kept: Vec<Message> = stored
        .into_iter()
        .rev()
        .take_while(|m| {
            used += m.content.chars().count();
            used <= budget_chars
        })
        .map(|m| Message::text(role(&m.role), m.content))
        .collect();
    kept.reverse();
    let orphans = kept
        .iter()
        .take_while(|m| m.role == Role::Assistant)
        .count();
    kept.drain(..orphans);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(role: &str, content: &str) -> SessionMessage {
        SessionMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn the_budget_keeps_the_latest_messages_and_no_leading_answer() {
        let all = vec![
            stored("user", "aaaa"),
            stored("assistant", "bbbb"),
            stored("user", "cc"),
            stored("assistant", "dd"),
        ];
        let kept = |budget| -> Vec<String> {
            within_budget(all.clone(), budget)
                .into_iter()
                .map(|m| m.content)
                .collect()
        };
        assert_eq!(kept(100), ["aaaa", "bbbb", "cc", "dd"]);
        assert_eq!(kept(8), ["cc", "dd"], "bbbb fits but its question does not");
        assert_eq!(kept(4), ["cc", "dd"]);
        assert!(kept(1).is_empty());
    }

    #[test]
    fn only_a_uuid_names_a_session() {
        let mut headers = HeaderMap::new();
        assert_eq!(requested(&headers).unwrap(), None);
        let id = Uuid::now_v7();
        headers.insert(HEADER, id.to_string().parse().unwrap());
        assert_eq!(requested(&headers).unwrap(), Some(id));
        headers.insert(HEADER, "not-a-uuid".parse().unwrap());
        let err = requested(&headers).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
    }
}

//! Conversation shapes for providers that take the system prompt apart and want the roles to
//! alternate (Anthropic, Gemini): system messages joined into one text, and the other
//! messages as turns of two sides, neighbours of one side merged.

use super::{Message, OutputFormat, Role};

/// The system-prompt instruction that stands in for a response format where the provider's
/// own cannot be used (alongside tools): JSON only, conforming to the schema if there is one.
pub fn json_instruction(format: &OutputFormat) -> String {
    const JSON_ONLY: &str = "Respond with a single valid JSON value and nothing else: no text \
        before or after it and no Markdown code fences.";
    match format {
        OutputFormat::Json => JSON_ONLY.to_owned(),
        OutputFormat::JsonSchema(s) => format!(
            "{JSON_ONLY} The JSON must conform to this JSON Schema:\n{}",
            s.schema
        ),
    }
}

/// The system text with the JSON instruction after it when `format` must be asked for in
/// words; `None` when there is neither.
pub fn system_text_with(messages: &[Message], format: Option<&OutputFormat>) -> Option<String> {
    let mut parts: Vec<String> = system_text(messages).into_iter().collect();
    parts.extend(format.map(json_instruction));
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// The two sides of a conversation, as these providers see them: tool results are the
/// user's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    User,
    Model,
}

impl Side {
    /// The side of a non-system message.
    pub fn of(role: Role) -> Option<Self> {
        match role {
            Role::System => None,
            Role::User | Role::Tool => Some(Side::User),
            Role::Assistant => Some(Side::Model),
        }
    }
}

/// One turn: a side and its content blocks, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn<B> {
    pub side: Side,
    pub blocks: Vec<B>,
}

/// Every non-empty system message's text, in order, joined by blank lines; `None` when there
/// is none.
pub fn system_text(messages: &[Message]) -> Option<String> {
    let texts: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System && !m.content.is_empty())
        .map(|m| m.content.as_str())
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n\n"))
}

/// The non-system messages as alternating turns: `blocks` gives each message's blocks (a
/// message without any is left out, since these providers refuse empty turns), and
/// consecutive messages of one side share a turn.
pub fn alternating<B>(
    messages: &[Message],
    mut blocks: impl FnMut(&Message) -> Vec<B>,
) -> Vec<Turn<B>> {
    let mut turns: Vec<Turn<B>> = Vec::new();
    for message in messages {
        let Some(side) = Side::of(message.role) else {
            continue;
        };
        let made = blocks(message);
        if made.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.side == side => last.blocks.extend(made),
            _ => turns.push(Turn { side, blocks: made }),
        }
    }
    turns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systems_join_and_sides_alternate() {
        let messages = [
            Message::text(Role::System, "a"),
            Message::text(Role::User, "1"),
            Message::text(Role::System, ""),
            Message::text(Role::Tool, "2"),
            Message::text(Role::Assistant, ""),
            Message::text(Role::System, "b"),
            Message::text(Role::Assistant, "3"),
        ];
        assert_eq!(system_text(&messages).as_deref(), Some("a\n\nb"));
        let turns = alternating(&messages, |m| {
            if m.content.is_empty() {
                vec![]
            } else {
                vec![m.content.clone()]
            }
        });
        assert_eq!(
            turns,
            vec![
                Turn {
                    side: Side::User,
                    blocks: vec!["1".to_owned(), "2".to_owned()]
                },
                Turn {
                    side: Side::Model,
                    blocks: vec!["3".to_owned()]
                },
            ]
        );
        assert_eq!(system_text(&messages[1..2]), None);
    }
}

//! The `:streamGenerateContent` body: system messages become `systemInstruction`, assistant
//! turns role `model`, tool results role `user` (as `functionResponse` parts named after the
//! call they answer); consecutive turns of one role share a content (Gemini wants the roles to
//! alternate), each message's parts staying in order. Tools become `functionDeclarations`
//! (their schemas converted to what Gemini accepts) and `tool_choice` the
//! `functionCallingConfig`; OpenAI's settings go in `generationConfig`.

use serde::Serialize;
use serde_json::{Map, Value};

use super::schema::gemini_schema;
use crate::providers::tools::{arguments_object, names_by_call_id, result_object, split_signature};
use crate::providers::turns::{alternating, system_text_with, Side};
use crate::providers::{ChatRequest, Message, OutputFormat, ToolChoice};

/// The request body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatBody {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemInstruction>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolSet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig>,
}

#[derive(Debug, Serialize)]
struct Content {
    role: &'static str,
    parts: Vec<Part>,
}

#[derive(Debug, Serialize)]
struct SystemInstruction {
    parts: [Part; 1],
}

/// One part: its data, and the thought signature a function call carries back.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(flatten)]
    data: PartData,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<String>,
}

impl From<PartData> for Part {
    fn from(data: PartData) -> Self {
        Self {
            data,
            thought_signature: None,
        }
    }
}

/// What Gemini's thinking models accept in place of a signature they did not make (a call
/// another provider made, or history from before the gateway kept signatures), so that
/// Gemini 3 takes the turn instead of refusing it.
pub const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// A part's data: Gemini's parts are objects with one key naming their kind.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum PartData {
    Text(String),
    InlineData {
        #[serde(rename = "mimeType")]
        mime_type: String,
        data: String,
    },
    FunctionCall {
        name: String,
        args: Map<String, Value>,
    },
    FunctionResponse {
        name: String,
        response: Map<String, Value>,
    },
}

#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_schema: Option<Value>,
}

impl GenerationConfig {
    /// Nothing set: the field is left out of the body.
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolSet {
    function_declarations: Vec<FunctionDeclaration>,
}

#[derive(Debug, Serialize)]
struct FunctionDeclaration {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    function_calling_config: FunctionCallingConfig,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<String>,
}

/// The body for `request` (see the module notes).
pub fn chat_body(request: &ChatRequest) -> ChatBody {
    let p = &request.params;
    let tools = if p.tools.is_empty() {
        Vec::new()
    } else {
        vec![ToolSet {
            function_declarations: p
                .tools
                .iter()
                .map(|t| FunctionDeclaration {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    parameters: t.parameters.as_ref().map(gemini_schema),
                })
                .collect(),
        }]
    };
    let tool_config = p
        .tool_choice
        .as_ref()
        .filter(|_| !tools.is_empty())
        .map(|choice| {
            let (mode, allowed) = match choice {
                ToolChoice::None => ("NONE", Vec::new()),
                ToolChoice::Auto => ("AUTO", Vec::new()),
                ToolChoice::Required => ("ANY", Vec::new()),
                ToolChoice::Function(name) => ("ANY", vec![name.clone()]),
            };
            ToolConfig {
                function_calling_config: FunctionCallingConfig {
                    mode,
                    allowed_function_names: allowed,
                },
            }
        });
    // Gemini refuses a JSON response type alongside function declarations: with tools, the
    // system instruction asks for JSON instead.
    let in_words = p.format.as_ref().filter(|_| !tools.is_empty());
    let (response_mime_type, response_schema) = match &p.format {
        None => (None, None),
        Some(_) if in_words.is_some() => (None, None),
        Some(OutputFormat::Json) => (Some("application/json"), None),
        Some(OutputFormat::JsonSchema(s)) => {
            (Some("application/json"), Some(gemini_schema(&s.schema)))
        }
    };
    ChatBody {
        contents: contents(&request.messages),
        system_instruction: system_text_with(&request.messages, in_words).map(|text| {
            SystemInstruction {
                parts: [PartData::Text(text).into()],
            }
        }),
        generation_config: GenerationConfig {
            temperature: p.temperature,
            top_p: p.top_p,
            max_output_tokens: p.max_tokens,
            stop_sequences: p.stop.clone(),
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            response_mime_type,
            response_schema,
        },
        tools,
        tool_config,
    }
}

/// The non-system messages as `contents`, same-role neighbours merged.
fn contents(messages: &[Message]) -> Vec<Content> {
    let names = names_by_call_id(messages);
    let parts = |m: &Message| -> Vec<Part> {
        if let Some(id) = &m.tool_call_id {
            // The earlier call names the function; a result for an unknown call keeps its id
            // as the name rather than being lost.
            let name = names.get(id.as_str()).copied().unwrap_or(id);
            let response = PartData::FunctionResponse {
                name: name.to_owned(),
                response: result_object(&m.content),
            };
            return vec![response.into()];
        }
        let mut parts: Vec<Part> = Vec::with_capacity(1 + m.images.len() + m.tool_calls.len());
        // Gemini refuses an empty text part (and a content without parts).
        if !m.content.is_empty() {
            parts.push(PartData::Text(m.content.clone()).into());
        }
        let images = m.images.iter().filter_map(|i| i.inline());
        parts.extend(images.map(|(mime, data)| {
            Part::from(PartData::InlineData {
                mime_type: mime.to_owned(),
                data: data.to_owned(),
            })
        }));
        // A turn's first call carries its signature (Gemini signs only the first of parallel
        // calls); one without gets the documented stand-in.
        parts.extend(m.tool_calls.iter().enumerate().map(|(i, c)| {
            Part {
                data: PartData::FunctionCall {
                    name: c.name.clone(),
                    args: arguments_object(&c.arguments),
                },
                thought_signature: split_signature(&c.id)
                    .1
                    .map(str::to_owned)
                    .or_else(|| (i == 0).then(|| SKIP_SIGNATURE.to_owned())),
            }
        }));
        parts
    };
    alternating(messages, parts)
        .into_iter()
        .map(|turn| Content {
            role: match turn.side {
                Side::User => "user",
                Side::Model => "model",
            },
            parts: turn.blocks,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::test_support::{arb_role, chat_request, msg};
    use crate::providers::{ChatParams, Image, Role};
    use proptest::prelude::*;
    use serde_json::json;

    fn request(messages: Vec<Message>, params: ChatParams) -> ChatRequest {
        chat_request("gemini-1.5-flash", messages, params)
    }

    fn body_of(request: &ChatRequest) -> Value {
        serde_json::to_value(super::chat_body(request)).unwrap()
    }

    fn gemini_role(role: Role) -> &'static str {
        match Side::of(role) {
            Some(Side::Model) => "model",
            _ => "user",
        }
    }

    #[test]
    fn roles_map_to_gemini_and_system_messages_become_the_system_instruction() {
        let body = body_of(&request(
            vec![
                msg(Role::System, "be brief"),
                msg(Role::User, "hi"),
                msg(Role::Assistant, "hello"),
                msg(Role::Tool, "{\"temp\": 21}"),
                msg(Role::System, "answer in French"),
                msg(Role::User, "and now?"),
            ],
            ChatParams::default(),
        ));
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "be brief\n\nanswer in French"}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"text": "hello"}]},
                {"role": "user", "parts": [{"text": "{\"temp\": 21}"}, {"text": "and now?"}]},
            ])
        );
        assert!(body.get("generationConfig").is_none());
    }

    #[test]
    fn images_become_inline_data_with_their_mime_type() {
        let mut m = msg(Role::User, "what is this?");
        m.images = vec![
            Image::png("iVBORw0KGgoAAAA"),
            Image::base64("image/jpeg", "/9j/4AAQ"),
            Image::base64("image/jpeg", "QUJD"),
        ];
        let body = body_of(&request(vec![m], ChatParams::default()));
        assert_eq!(
            body["contents"][0]["parts"],
            json!([
                {"text": "what is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgoAAAA"}},
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                {"inlineData": {"mimeType": "image/jpeg", "data": "QUJD"}},
            ])
        );
        let mut image_only = msg(Role::User, "");
        image_only.images = vec![Image::base64("image/gif", "R0lGODlh")];
        let body = body_of(&request(vec![image_only], ChatParams::default()));
        assert_eq!(
            body["contents"][0]["parts"],
            json!([{"inlineData": {"mimeType": "image/gif", "data": "R0lGODlh"}}])
        );
    }

    #[test]
    fn params_become_generation_config() {
        let params = ChatParams {
            temperature: Some(0.2),
            top_p: Some(0.9),
            max_tokens: Some(64),
            stop: vec!["END".into()],
            seed: Some(7),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            format: Some(OutputFormat::Json),
            ..ChatParams::default()
        };
        let body = body_of(&request(vec![msg(Role::User, "hi")], params));
        assert_eq!(
            body["generationConfig"],
            json!({"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 64,
                "stopSequences": ["END"], "seed": 7, "presencePenalty": 0.5,
                "frequencyPenalty": -0.5, "responseMimeType": "application/json"})
        );
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            arb_role(),
            prop_oneof![Just(String::new()), ".{0,40}"],
            prop::collection::vec("[A-Za-z0-9+/]{4,12}", 0..2),
        )
            .prop_map(|(role, content, images)| Message {
                images: images.into_iter().map(Image::png).collect(),
                ..Message::text(role, content)
            })
    }

    proptest! {
        #[test]
        fn translation_keeps_every_text_and_role(messages in prop::collection::vec(arb_message(), 0..12)) {
            let body = body_of(&request(messages.clone(), ChatParams::default()));

            let system: Vec<&str> = messages.iter()
                .filter(|m| m.role == Role::System && !m.content.is_empty())
                .map(|m| m.content.as_str()).collect();
            let instruction = body.pointer("/systemInstruction/parts/0/text").and_then(Value::as_str);
            let joined = (!system.is_empty()).then(|| system.join("\n\n"));
            prop_assert_eq!(instruction, joined.as_deref());

            let expected: Vec<(&str, &str)> = messages.iter()
                .filter(|m| m.role != Role::System && !m.content.is_empty())
                .map(|m| (gemini_role(m.role), m.content.as_str())).collect();
            let contents = body["contents"].as_array().unwrap();
            let mut texts = Vec::new();
            let mut images = 0;
            for (i, content) in contents.iter().enumerate() {
                let role = content["role"].as_str().unwrap();
                prop_assert!(role == "user" || role == "model");
                if i > 0 {
                    prop_assert_ne!(role, contents[i - 1]["role"].as_str().unwrap());
                }
                let parts = content["parts"].as_array().unwrap();
                prop_assert!(!parts.is_empty());
                for part in parts {
                    if let Some(text) = part.get("text") {
                        texts.push((role, text.as_str().unwrap()));
                    } else {
                        images += 1;
                    }
                }
            }
            prop_assert_eq!(texts, expected);
            let expected_images: usize = messages.iter()
                .filter(|m| m.role != Role::System).map(|m| m.images.len()).sum();
            prop_assert_eq!(images, expected_images);
        }
    }

    proptest! {
        #[test]
        fn tool_conversations_survive_translation(messages in crate::providers::test_support::arb_tool_conversation()) {
            let body = body_of(&request(messages.clone(), ChatParams::default()));
            let mut calls = Vec::new();
            let mut responses = Vec::new();
            for content in body["contents"].as_array().unwrap() {
                for part in content["parts"].as_array().unwrap() {
                    if let Some(call) = part.get("functionCall") {
                        prop_assert_eq!(content["role"].as_str(), Some("model"));
                        calls.push((call["name"].as_str().unwrap().to_owned(), call["args"].clone()));
                    }
                    if let Some(response) = part.get("functionResponse") {
                        prop_assert_eq!(content["role"].as_str(), Some("user"));
                        responses.push((response["name"].as_str().unwrap().to_owned(), response["response"].clone()));
                    }
                }
            }
            let sent: Vec<(String, Value)> = messages.iter().flat_map(|m| &m.tool_calls)
                .map(|c| (c.name.clone(), serde_json::from_str(&c.arguments).unwrap())).collect();
            prop_assert_eq!(calls, sent);
            // Each result is named after the call it answers (Gemini pairs them by name).
            let names = names_by_call_id(&messages);
            let answered: Vec<(String, Value)> = messages.iter().filter_map(|m| m.tool_call_id.as_ref().map(|id|
                (names[id.as_str()].to_owned(), Value::Object(result_object(&m.content))))).collect();
            prop_assert_eq!(responses, answered);
        }
    }

    #[test]
    fn a_turns_first_call_carries_its_thought_signature_or_the_stand_in() {
        let call = |id: &str, name: &str| crate::providers::ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: "{}".into(),
        };
        let mut signed = msg(Role::Assistant, "");
        signed.tool_calls = vec![call("call_a.sig.c2lnbmVk", "f"), call("call_b", "g")];
        let mut unsigned = msg(Role::Assistant, "");
        unsigned.tool_calls = vec![call("toolu_01", "f"), call("toolu_02", "g")];
        let answers = |ids: [&str; 2]| {
            ids.map(|id| Message {
                tool_call_id: Some(id.into()),
                ..msg(Role::Tool, "ok")
            })
        };
        let mut messages = vec![msg(Role::User, "go"), signed];
        messages.extend(answers(["call_a.sig.c2lnbmVk", "call_b"]));
        messages.push(unsigned);
        messages.extend(answers(["toolu_01", "toolu_02"]));
        let body = body_of(&request(messages, ChatParams::default()));
        let signatures = |content: usize| -> Vec<Value> {
            body["contents"][content]["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["thoughtSignature"].clone())
                .collect()
        };
        assert_eq!(signatures(1), [json!("c2lnbmVk"), Value::Null]);
        assert_eq!(signatures(3), [json!(SKIP_SIGNATURE), Value::Null]);
        assert_eq!(
            body["contents"][2]["parts"][0]["functionResponse"]["name"],
            "f"
        );
    }
}

//! `POST /v1/chat/completions` requests: the OpenAI shape, its validation, and the
//! translation into the provider-neutral [`ChatRequest`] parts.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::check_range;
use crate::error::ApiError;
use crate::providers::{
    ChatParams, Image, JsonSchema, Message, OutputFormat, Role, Tool, ToolCall, ToolChoice,
};

/// A chat completion request as OpenAI defines it. Fields the gateway cannot honour on every
/// tier are either mapped per provider, passed only to OpenAI (see [`OPENAI_ONLY`]), or
/// refused with a 400 naming them; unknown fields are ignored, as OpenAI's own compatible
/// servers do.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    #[serde(default)]
    pub tool_choice: Option<WireToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub top_logprobs: Option<u8>,
    /// Refused: the deprecated predecessors of `tools` and `tool_choice`, and audio output.
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    /// Everything else, for the fields in [`OPENAI_ONLY`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Fields passed to OpenAI untouched and dropped on the other tiers (which have no
/// equivalent): log probabilities, token biases, reasoning effort, and OpenAI's own storage
/// and service settings.
pub const OPENAI_ONLY: [&str; 8] = [
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "reasoning_effort",
    "metadata",
    "store",
    "service_tier",
    "verbosity",
];

#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// An entry of `tools`: only functions exist.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireTool {
    Function { function: FunctionDefinition },
}

#[derive(Debug, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode, or one named function.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireToolChoice {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum WireRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: WireRole,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A call in an assistant message's `tool_calls`.
#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    Refusal { refusal: String },
    InputAudio {},
    File {},
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

fn invalid(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message, Some(param.into()))
}

impl ChatCompletionRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for the final usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// Checks what OpenAI checks and converts to provider-neutral messages and settings.
    pub fn validate(&self) -> Result<(Vec<Message>, ChatParams), ApiError> {
        if self.model.trim().is_empty() {
            return Err(invalid("you must provide a model parameter", "model"));
        }
        if self.messages.is_empty() {
            return Err(invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                "messages",
            ));
        }
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        check_range("top_logprobs", self.top_logprobs.map(f64::from), 0.0, 20.0)?;
        if let Some(n) = self.n.filter(|n| *n != 1) {
            return Err(invalid(
                format!("Invalid 'n': {n}. This gateway returns exactly one choice; use n=1."),
                "n",
            ));
        }
        for (param, value) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if value == Some(0) {
                return Err(invalid(
                    format!("Invalid '{param}': integer below minimum value. Expected a value >= 1, but got 0 instead."),
                    param,
                ));
            }
        }
        if self.stream_options.is_some() && !self.is_stream() {
            return Err(invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            ));
        }
        self.refuse_unsupported()?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(invalid(
                    format!("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.", v.len()),
                    "stop",
                ));
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        let tools = self.tools()?;
        let tool_choice = self.tool_choice(&tools)?;
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        check_tool_turns(&messages)?;
        let params = ChatParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            stop,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            format: self.output_format()?,
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            user: self.user.clone(),
            openai_only: self.openai_only(),
        };
        Ok((messages, params))
    }

    /// Refuses what no tier can answer: several choices are refused above; audio output and
    /// the deprecated `functions` API here.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.functions.is_some() || self.function_call.is_some() {
            let param = if self.functions.is_some() {
                "functions"
            } else {
                "function_call"
            };
            return Err(invalid(
                format!("'{param}' is deprecated and not supported by this gateway; use 'tools' and 'tool_choice'."),
                param,
            ));
        }
        let audio_out = self.modalities.iter().flatten().any(|m| m != "text");
        if audio_out || self.audio.is_some() {
            let param = if self.audio.is_some() {
                "audio"
            } else {
                "modalities"
            };
            return Err(invalid(
                "This gateway answers with text only; audio output is not supported.",
                param,
            ));
        }
        Ok(())
    }

    fn tools(&self) -> Result<Vec<Tool>, ApiError> {
        let mut tools = Vec::new();
        for (i, WireTool::Function { function }) in self.tools.iter().flatten().enumerate() {
            if !valid_function_name(&function.name) {
                return Err(invalid(
                    format!("Invalid 'tools[{i}].function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$'."),
                    format!("tools[{i}].function.name"),
                ));
            }
            if let Some(params) = function.parameters.as_ref().filter(|p| !p.is_object()) {
                return Err(invalid(
                    format!("Invalid 'tools[{i}].function.parameters': expected an object (a JSON Schema), but got {params}."),
                    format!("tools[{i}].function.parameters"),
                ));
            }
            tools.push(Tool {
                name: function.name.clone(),
                description: function.description.clone(),
                parameters: function.parameters.clone(),
                strict: function.strict,
            });
        }
        Ok(tools)
    }

    fn tool_choice(&self, tools: &[Tool]) -> Result<Option<ToolChoice>, ApiError> {
        let Some(choice) = &self.tool_choice else {
            return Ok(None);
        };
        let choice = match choice {
            WireToolChoice::Mode(mode) => match mode.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(invalid(
                        format!("Invalid value: '{other}'. Supported values are: 'none', 'auto', and 'required'."),
                        "tool_choice",
                    ))
                }
            },
            WireToolChoice::Named(named) if named.kind == "function" => {
                if !tools.iter().any(|t| t.name == named.function.name) {
                    return Err(invalid(
                        format!("Invalid value for 'tool_choice': function '{}' is not among the request's 'tools'.", named.function.name),
                        "tool_choice",
                    ));
                }
                ToolChoice::Function(named.function.name.clone())
            }
            WireToolChoice::Named(named) => {
                return Err(invalid(
                    format!("Invalid value: '{}'. Supported values are: 'function'.", named.kind),
                    "tool_choice.type",
                ))
            }
        };
        if tools.is_empty() && choice != ToolChoice::None {
            return Err(invalid(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            ));
        }
        Ok(Some(choice))
    }

    fn output_format(&self) -> Result<Option<OutputFormat>, ApiError> {
        Ok(match &self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(OutputFormat::Json),
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                if !valid_function_name(&json_schema.name) {
                    return Err(invalid(
                        "Invalid 'response_format.json_schema.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                        "response_format.json_schema.name",
                    ));
                }
                let schema = match &json_schema.schema {
                    None => serde_json::json!({"type": "object"}),
                    Some(schema) if schema.is_object() => schema.clone(),
                    Some(_) => {
                        return Err(invalid(
                            "Invalid 'response_format.json_schema.schema': expected an object.",
                            "response_format.json_schema.schema",
                        ))
                    }
                };
                Some(OutputFormat::JsonSchema(JsonSchema {
                    name: json_schema.name.clone(),
                    description: json_schema.description.clone(),
                    schema,
                    strict: json_schema.strict,
                }))
            }
        })
    }

    fn openai_only(&self) -> Map<String, Value> {
        let mut extras: Map<String, Value> = self
            .other
            .iter()
            .filter(|(k, v)| OPENAI_ONLY.contains(&k.as_str()) && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(n) = self.top_logprobs {
            extras.insert("top_logprobs".into(), n.into());
        }
        extras
    }
}

/// OpenAI's pattern for function and schema names: `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// OpenAI's rules for tool turns: each `tool` message answers a call of the assistant turn
/// before it (tool messages in between), and every call is answered before the conversation
/// goes on.
fn check_tool_turns(messages: &[Message]) -> Result<(), ApiError> {
    let mut open: Vec<&str> = Vec::new();
    let mut caller: Option<usize> = None;
    for (i, m) in messages.iter().enumerate() {
        if m.role == Role::Tool {
            let id = m.tool_call_id.as_deref().unwrap_or_default();
            let Some(at) = open.iter().position(|o| *o == id) else {
                return Err(invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                    format!("messages.[{i}].role"),
                ));
            };
            open.remove(at);
            continue;
        }
        if let (Some(at), false) = (caller, open.is_empty()) {
            return Err(invalid(
                format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}", open.join(", ")),
                format!("messages.[{at}].role"),
            ));
        }
        open = m.tool_calls.iter().map(|c| c.id.as_str()).collect();
        caller = (!open.is_empty()).then_some(i);
    }
    if let (Some(at), false) = (caller, open.is_empty()) {
        return Err(invalid(
            format!("An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}", open.join(", ")),
            format!("messages.[{at}].role"),
        ));
    }
    Ok(())
}

fn convert_message(index: usize, m: &WireMessage) -> Result<Message, ApiError> {
    let role = match m.role {
        WireRole::System | WireRole::Developer => Role::System,
        WireRole::User => Role::User,
        WireRole::Assistant => Role::Assistant,
        WireRole::Tool => Role::Tool,
        WireRole::Function => {
            return Err(invalid(
                format!("messages[{index}]: the deprecated 'function' role is not supported; answer tool calls with 'tool' messages that carry 'tool_call_id'."),
                format!("messages.[{index}].role"),
            ))
        }
    };
    let param = |suffix: &str| format!("messages.[{index}].{suffix}");
    let mut message = Message::text(role, "");
    let tool_calls = m.tool_calls.iter().flatten();
    message.tool_calls = tool_calls
        .map(|call| ToolCall {
            id: call.id.clone(),
            name: call.function.name.clone(),
            arguments: call.function.arguments.clone(),
        })
        .collect();
    if role != Role::Assistant && !message.tool_calls.is_empty() {
        return Err(invalid(
            format!("Invalid parameter: only assistant messages can have 'tool_calls' (messages[{index}] is not)."),
            param("tool_calls"),
        ));
    }
    if role == Role::Tool {
        match m.tool_call_id.as_deref() {
            Some(id) if !id.is_empty() => message.tool_call_id = Some(id.to_owned()),
            _ => {
                return Err(invalid(
                    format!("Missing required parameter: 'messages[{index}].tool_call_id'."),
                    param("tool_call_id"),
                ))
            }
        }
    }
    match &m.content {
        None if role == Role::Assistant => {}
        None => {
            return Err(invalid(
                format!("Invalid value for 'messages[{index}].content': expected a string or an array of content parts, got null."),
                param("content"),
            ));
        }
        Some(Content::Text(text)) => message.content.clone_from(text),
        Some(Content::Parts(parts)) => {
            for part in parts {
                match part {
                    Part::Text { text } | Part::Refusal { refusal: text } => {
                        if !message.content.is_empty() {
                            message.content.push('\n');
                        }
                        message.content.push_str(text);
                    }
                    Part::ImageUrl { image_url } => {
                        message.images.push(image(index, &image_url.url)?);
                    }
                    Part::InputAudio {} | Part::File {} => {
                        return Err(invalid(
                            format!("messages[{index}]: audio and file content parts are not supported by this gateway."),
                            param("content"),
                        ));
                    }
                }
            }
        }
    }
    Ok(message)
}

/// The image a content part names: a `data:image/…;base64,…` URL, or a remote `http(s)` URL
/// (passed on to providers that take URLs, fetched by the gateway for the others).
fn image(index: usize, url: &str) -> Result<Image, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        return rest
            .split_once(";base64,")
            .map(|(media_type, data)| {
                let media_type = if media_type.is_empty() { "image/png" } else { media_type };
                Image::base64(media_type, data)
            })
            .ok_or_else(|| {
                invalid(
                    format!("messages[{index}]: a data: image URL must be base64 (data:image/png;base64,…)."),
                    format!("messages.[{index}].content"),
                )
            });
    }
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(Image::Url(url.to_owned())),
        _ => Err(invalid(
            format!("messages[{index}]: image_url must be an http(s) URL or a base64 data: URL."),
            format!("messages.[{index}].content"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::parse_body;

    fn parse(json: &str) -> Result<(Vec<Message>, ChatParams), ApiError> {
        parse_body::<ChatCompletionRequest>(json.as_bytes())?.validate()
    }

    #[test]
    fn refuses_what_openai_refuses() {
        let cases = [
            ("{", None),
            (r#"{"model":"auto"}"#, Some("messages")),
            (r#"{"model":"auto","messages":"hi"}"#, Some("messages")),
            (r#"{"model":"auto","messages":[]}"#, Some("messages")),
            (
                r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"auto","messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
        ];
        for (body, param) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.kind, "invalid_request_error");
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
    }

    #[test]
    fn converts_roles_parts_and_settings() {
        let (messages, params) = parse(
            r#"{"model":"auto","messages":[
                {"role":"developer","content":"rules"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"},{"type":"image_url","image_url":{"url":"data:image/png;base64,QUJD"}}]},
                {"role":"assistant","content":null}],
              "max_completion_tokens":9,"stop":"END","response_format":{"type":"json_object"},"unknown_field":1}"#,
        )
        .unwrap();
        assert_eq!(messages[0].role, Role::System);
        assert_eq!(messages[1].content, "a\nb");
        assert_eq!(messages[1].images, vec![Image::png("QUJD")]);
        assert_eq!(messages[2].content, "");
        assert_eq!(params.max_tokens, Some(9));
        assert_eq!(params.stop, vec!["END".to_owned()]);
        assert_eq!(params.format, Some(OutputFormat::Json));
    }

    const TOOLS: &str = r#""tools":[{"type":"function","function":{"name":"get_weather","description":"Weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":true}}]"#;

    fn with_tools(rest: &str) -> String {
        format!(r#"{{"model":"auto",{TOOLS},{rest}}}"#)
    }

    #[test]
    fn tools_choices_calls_and_results_are_read() {
        let (messages, params) = parse(&with_tools(
            r#""tool_choice":{"type":"function","function":{"name":"get_weather"}},"parallel_tool_calls":false,
            "messages":[{"role":"user","content":"weather?"},
              {"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
                {"id":"call_2","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},
              {"role":"tool","tool_call_id":"call_2","content":"rain"},
              {"role":"tool","tool_call_id":"call_1","content":[{"type":"text","text":"sun"}]},
              {"role":"user","content":"thanks"}],
            "logprobs":true,"top_logprobs":2,"logit_bias":{"50256":-100},"user":"u1","metadata":null"#,
        ))
        .unwrap();
        assert_eq!(params.tools.len(), 1);
        assert_eq!(params.tools[0].name, "get_weather");
        assert_eq!(params.tools[0].strict, Some(true));
        assert_eq!(
            params.tool_choice,
            Some(ToolChoice::Function("get_weather".into()))
        );
        assert_eq!(params.parallel_tool_calls, Some(false));
        assert_eq!(params.user.as_deref(), Some("u1"));
        assert_eq!(
            Value::Object(params.openai_only),
            serde_json::json!({"logprobs": true, "top_logprobs": 2, "logit_bias": {"50256": -100}})
        );
        assert_eq!(messages[1].tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(messages[1].content, "");
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_2"));
        assert_eq!(messages[3].content, "sun");
    }

    #[test]
    fn tool_turns_are_checked_as_openai_checks_them() {
        let call = r#"{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]}"#;
        let cases = [
            // A tool result without a call before it.
            (r#""messages":[{"role":"user","content":"x"},{"role":"tool","tool_call_id":"call_9","content":"r"}]"#.to_owned(), "messages.[1].role"),
            // A call nobody answered, before the next user turn and at the end.
            (format!(r#""messages":[{call},{{"role":"user","content":"x"}}]"#), "messages.[0].role"),
            (format!(r#""messages":[{{"role":"user","content":"x"}},{call}]"#), "messages.[1].role"),
            // A tool message without its call id.
            (format!(r#""messages":[{call},{{"role":"tool","content":"r"}}]"#), "messages.[1].tool_call_id"),
            // Calls only in assistant messages.
            (r#""messages":[{"role":"user","content":"x","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]"#.to_owned(), "messages.[0].tool_calls"),
            (r#""messages":[{"role":"function","name":"f","content":"x"}]"#.to_owned(), "messages.[0].role"),
            (r#""messages":[{"role":"user","content":"x"}],"tool_choice":"sometimes""#.to_owned(), "tool_choice"),
            (r#""messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"function","function":{"name":"other"}}"#.to_owned(), "tool_choice"),
        ];
        for (rest, param) in cases {
            let err = parse(&with_tools(&rest)).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{rest}: {}", err.message);
        }
        let unanswered = parse(&with_tools(&format!(
            r#""messages":[{{"role":"user","content":"x"}},{call}]"#
        )))
        .unwrap_err();
        assert!(
            unanswered
                .message
                .contains("did not have response messages: call_1"),
            "{}",
            unanswered.message
        );
    }

    #[test]
    fn unsupported_and_malformed_fields_are_named() {
        let user = r#""messages":[{"role":"user","content":"x"}]"#;
        let cases = [
            (format!(r#"{{"model":"auto",{user},"tool_choice":"required"}}"#), "tool_choice"),
            (format!(r#"{{"model":"auto",{user},"tools":[{{"type":"function","function":{{"name":"bad name"}}}}]}}"#), "tools[0].function.name"),
            (format!(r#"{{"model":"auto",{user},"tools":[{{"type":"function","function":{{"name":"f","parameters":"x"}}}}]}}"#), "tools[0].function.parameters"),
            (format!(r#"{{"model":"auto",{user},"functions":[{{"name":"f"}}]}}"#), "functions"),
            (format!(r#"{{"model":"auto",{user},"modalities":["text","audio"]}}"#), "modalities"),
            (format!(r#"{{"model":"auto",{user},"top_logprobs":30}}"#), "top_logprobs"),
            (format!(r#"{{"model":"auto",{user},"response_format":{{"type":"json_schema","json_schema":{{"name":"has space","schema":{{}}}}}}}}"#), "response_format.json_schema.name"),
            (r#"{"model":"auto","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x/y.png"}}]}]}"#.to_owned(), "messages.[0].content"),
        ];
        for (body, param) in cases {
            let err = parse(&body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
        let (messages, params) = parse(
            r#"{"model":"auto","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}],
               "tool_choice":"none","response_format":{"type":"json_schema","json_schema":{"name":"out","strict":true,"schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert_eq!(
            messages[0].images,
            vec![Image::Url("https://example.com/cat.png".into())]
        );
        assert_eq!(params.tool_choice, Some(ToolChoice::None));
        assert!(
            matches!(params.format, Some(OutputFormat::JsonSchema(JsonSchema { ref name, strict: Some(true), .. })) if name == "out")
        );
    }
}

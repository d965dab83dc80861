//! `POST /v1/chat/completions` requests: the OpenAI shape, its validation, and the
//! translation into the provider-neutral [`ChatRequest`] parts.

use serde::Deserialize;
use serde_json::Value;

use super::check_range;
use crate::error::ApiError;
use crate::providers::{ChatParams, Image, Message, OutputFormat, Role};

/// A chat completion request as OpenAI defines it (the fields this gateway acts on; others are
/// accepted and ignored, as OpenAI's own compatible servers do).
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
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub user: Option<String>,
}

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
    #[serde(default)]
    pub schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
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
            return Err(ApiError::invalid_request(
                "you must provide a model parameter",
                Some("model".into()),
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid_request(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages".into()),
            ));
        }
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid_request(
                    format!("Invalid 'n': {n}. This gateway returns exactly one choice; use n=1."),
                    Some("n".into()),
                ));
            }
        }
        for (param, value) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if value == Some(0) {
                return Err(ApiError::invalid_request(
                    format!("Invalid '{param}': integer below minimum value. Expected a value >= 1, but got 0 instead."),
                    Some(param.into()),
                ));
            }
        }
        if self.stream_options.is_some() && !self.is_stream() {
            return Err(ApiError::invalid_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options".into()),
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid_request(
                "Tool calling is not supported by this gateway yet; send the request without 'tools'.",
                Some("tools".into()),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => {
                return Err(ApiError::invalid_request(
                    format!("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.", v.len()),
                    Some("stop".into()),
                ));
            }
            Some(Stop::Many(v)) => v.clone(),
        };
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let format = match &self.response_format {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(OutputFormat::Json),
            Some(ResponseFormat::JsonSchema { json_schema }) => Some(
                json_schema
                    .schema
                    .clone()
                    .map_or(OutputFormat::Json, OutputFormat::JsonSchema),
            ),
        };
        let params = ChatParams {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            stop,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            format,
        };
        Ok((messages, params))
    }
}

fn convert_message(index: usize, m: &WireMessage) -> Result<Message, ApiError> {
    let role = match m.role {
        WireRole::System | WireRole::Developer => Role::System,
        WireRole::User => Role::User,
        WireRole::Assistant => Role::Assistant,
        WireRole::Tool | WireRole::Function => Role::Tool,
    };
    let param = |suffix: &str| Some(format!("messages.[{index}].{suffix}"));
    let mut content = String::new();
    let mut images = Vec::new();
    match &m.content {
        None if role == Role::Assistant => {}
        None => {
            return Err(ApiError::invalid_request(
                format!("Invalid value for 'messages[{index}].content': expected a string or an array of content parts, got null."),
                param("content"),
            ));
        }
        Some(Content::Text(text)) => content.clone_from(text),
        Some(Content::Parts(parts)) => {
            for part in parts {
                match part {
                    Part::Text { text } | Part::Refusal { refusal: text } => {
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        content.push_str(text);
                    }
                    Part::ImageUrl { image_url } => {
                        images.push(data_url_image(index, &image_url.url)?);
                    }
                    Part::InputAudio {} | Part::File {} => {
                        return Err(ApiError::invalid_request(
                            format!("messages[{index}]: audio and file content parts are not supported by this gateway."),
                            param("content"),
                        ));
                    }
                }
            }
        }
    }
    Ok(Message {
        role,
        content,
        images,
    })
}

/// The image in a `data:image/…;base64,…` URL; remote image URLs are refused because the
/// local tier cannot fetch them.
fn data_url_image(index: usize, url: &str) -> Result<Image, ApiError> {
    url.strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(media_type, data)| Image {
            media_type: if media_type.is_empty() { "image/png".to_owned() } else { media_type.to_owned() },
            data: data.to_owned(),
        })
        .ok_or_else(|| {
            ApiError::invalid_request(
                format!("messages[{index}]: image_url must be a base64 data: URL (remote image URLs are not fetched by this gateway)."),
                Some(format!("messages.[{index}].content")),
            )
        })
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
}

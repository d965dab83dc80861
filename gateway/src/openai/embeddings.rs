//! `POST /v1/embeddings` requests: the OpenAI shape and its validation.

use serde::Deserialize;

use crate::error::ApiError;
use crate::providers::EmbedInput;

/// Most inputs in one request, as OpenAI allows.
const MAX_INPUTS: usize = 2048;

/// An embeddings request as OpenAI defines it.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// How vectors are written back: JSON floats, or base64 of little-endian `f32`s (what the
/// official Python SDK asks for by default).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

impl EmbeddingRequest {
    /// What to embed, checked the way OpenAI checks it.
    pub fn inputs(&self) -> Result<EmbedInput, ApiError> {
        let inputs = match &self.input {
            EmbeddingInput::One(s) => EmbedInput::Texts(vec![s.clone()]),
            EmbeddingInput::Many(v) => EmbedInput::Texts(v.clone()),
            EmbeddingInput::Tokens(t) => EmbedInput::Tokens(vec![t.clone()]),
            EmbeddingInput::TokenBatches(t) => EmbedInput::Tokens(t.clone()),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(ApiError::invalid_request(
                format!(
                    "Invalid 'input': expected between 1 and {MAX_INPUTS} inputs, got {}.",
                    inputs.len()
                ),
                Some("input".into()),
            ));
        }
        let empty = match &inputs {
            EmbedInput::Texts(t) => t.iter().any(String::is_empty),
            EmbedInput::Tokens(t) => t.iter().any(Vec::is_empty),
        };
        if empty {
            return Err(ApiError::invalid_request(
                "Invalid 'input': an input is empty.",
                Some("input".into()),
            ));
        }
        if self.dimensions == Some(0) {
            return Err(ApiError::invalid_request(
                "Invalid 'dimensions': expected a value >= 1.",
                Some("dimensions".into()),
            ));
        }
        Ok(inputs)
    }
}

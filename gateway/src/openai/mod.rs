//! OpenAI's wire format: parsing and validating what clients send (refusing it the way OpenAI
//! does), and encoding responses, stream chunks and embeddings the way OpenAI's SDKs expect.

pub mod chat;
pub mod embeddings;
pub mod encode;

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Parses a JSON request body into `T`, naming the offending parameter on failure.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid_request(
                format!(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) Parser said: {inner}"
                ),
                None,
            );
        }
        let text = inner.to_string();
        if let Some(field) = text.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
            let param = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
            return ApiError::invalid_request(format!("Missing required parameter: '{param}'."), Some(param));
        }
        let param = if path == "." { None } else { Some(path) };
        let shown = param.as_deref().unwrap_or("body");
        let text = text.split(" at line ").next().unwrap_or(&text);
        ApiError::invalid_request(format!("Invalid value for '{shown}': {text}."), param)
    })
}

/// Refuses `value` outside `lo..=hi` the way OpenAI words it.
pub fn check_range(param: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid_request(
            format!("Invalid '{param}': {v} is not in the allowed range [{lo}, {hi}]."),
            Some(param.to_owned()),
        )),
        _ => Ok(()),
    }
}

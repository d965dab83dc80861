//! Placeholder: the gemini adapter is being written.

//! Placeholder: the openai adapter is being written.

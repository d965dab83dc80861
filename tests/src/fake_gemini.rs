//! Placeholder: the fake gemini is being written.

//! Placeholder: the fake openai is being written.

//! Placeholder: the anthropic adapter is being written.

//! Placeholder: the fake anthropic is being written.

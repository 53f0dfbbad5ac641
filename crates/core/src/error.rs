//! Validation errors: what was wrong with a value and what is allowed.

use thiserror::Error;

/// A value given by a user that does not meet the rules for its field.
///
/// The message names the field, what was wrong and what is allowed, so that
/// the API and the CLI can show it as is.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid {field}: {message}")]
pub struct ValidationError {
    /// The field (or argument) that was wrong, e.g. `name` or `memory_mib`.
    pub field: String,
    /// What was wrong and what is allowed.
    pub message: String,
}

impl ValidationError {
    /// A validation error for `field` with a human-readable `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

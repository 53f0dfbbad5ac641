//! API errors: each carries an HTTP status, a machine-readable code and a
//! message for people. Library errors are mapped to them here, once.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use skyvisor_core::ValidationError;
use skyvisor_core::api::{ErrorBody, ErrorDetail};
use skyvisor_store::StoreError;
use tracing::error;

use crate::scheduler::PlacementError;

/// An error the API answers with.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable kind.
    pub code: &'static str,
    /// What was wrong, for people.
    pub message: String,
    /// The request field at fault, if any.
    pub field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// The same error, naming the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 400: the request is malformed or a value is invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// 404: the object does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401: the caller is not authenticated; the message says why.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403: the caller may not do this; the message names what is needed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403: a project's quota would be exceeded.
    pub fn quota_exceeded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "quota_exceeded", message)
    }

    /// 409: the request conflicts with the object's state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 409: the object already exists.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "already_exists", message)
    }

    /// 409: no host has room.
    pub fn insufficient_capacity(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "insufficient_capacity", message)
    }

    /// 413: the request body is too large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 503: a dependency (the store, an agent) cannot be reached; retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 502: a host agent answered with an error.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "agent_error", message)
    }

    /// 500: a fault of ours. Logged; the message says what failed.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        error!(%message, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let mut err = ApiError::invalid(e.to_string());
        err.field = Some(e.field);
        err
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => {
                // Worded as the store guard's answer, which may not have
                // noticed the outage yet when a request meets it.
                ApiError::unavailable(format!(
                    "the state store is unreachable: {m}; the API answers again as soon as it is back"
                ))
            }
            other => ApiError::internal(format!("state store error: {other}")),
        }
    }
}

impl From<skyvisor_auth::AuthError> for ApiError {
    fn from(e: skyvisor_auth::AuthError) -> Self {
        use skyvisor_auth::AuthError;
        match e {
            e if e.is_unauthenticated() => ApiError::unauthenticated(e.to_string()),
            AuthError::NotFound { .. } => ApiError::not_found(e.to_string()),
            AuthError::Exists { .. } => ApiError::already_exists(e.to_string()),
            AuthError::Store(s) => s.into(),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<PlacementError> for ApiError {
    fn from(e: PlacementError) -> Self {
        ApiError::insufficient_capacity(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;

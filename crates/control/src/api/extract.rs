//! Extractors that turn malformed requests into our JSON errors (400)
//! instead of axum's plain-text rejections.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body; a malformed one is a 400 that says what was wrong.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(from_json(v)?)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Decodes a JSON value into `T`, taking whole numbers written with a
/// fraction (`9.0`) as the integers they are, as JSON Schema does.
pub fn from_json<T: DeserializeOwned>(mut v: serde_json::Value) -> Result<T, ApiError> {
    integral_floats_to_integers(&mut v);
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let mut err = if path == "." {
            ApiError::invalid(format!("the request body is invalid: {}", e.inner()))
        } else {
            ApiError::invalid(format!(
                "the request body is invalid: {path}: {}",
                e.inner()
            ))
        };
        if path != "." {
            err.field = Some(path);
        }
        err
    })
}

/// An optional JSON body: empty means `T::default()`.
pub fn optional_body<T: Default + DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    from_json(v)
}

/// Turns whole numbers written with a fraction (`9.0`) into integers.
pub fn integral_floats_to_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
            {
                // `u64::MAX as f64` is 2^64, one past the range: strictly below.
                if f >= 0.0 && f < u64::MAX as f64 {
                    *v = serde_json::Value::from(f as u64);
                } else if f < 0.0 && f > i64::MIN as f64 {
                    *v = serde_json::Value::from(f as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::invalid("the request body must be JSON with Content-Type: application/json")
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::invalid(format!(
            "the request body is not valid JSON: {}",
            e.body_text()
        )),
        JsonRejection::JsonDataError(e) => {
            ApiError::invalid(format!("the request body is invalid: {}", e.body_text()))
        }
        JsonRejection::BytesRejection(e) => ApiError::invalid(format!(
            "could not read the request body: {}",
            e.body_text()
        )),
        other => ApiError::invalid(other.body_text()),
    }
}

/// Query parameters; malformed ones are a 400 that says what was wrong.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::invalid(
                format!("invalid query parameters: {}", e.body_text()),
            )),
            Err(other) => Err(ApiError::invalid(other.body_text())),
        }
    }
}

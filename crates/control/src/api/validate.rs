//! Every JSON request body is checked against the very schema the OpenAPI
//! document publishes for it, before a handler sees it: what the document
//! allows, the server accepts, and what it forbids is refused with a 400
//! naming the field, so the two cannot drift. Handlers keep their own
//! checks of what depends on state (an image that must exist, a host with
//! room), which answer 404 or 409.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The largest JSON body accepted (uploads are multipart and not checked
/// here).
const MAX_JSON_BODY: usize = 2 << 20;

/// The compiled schema of each operation's JSON body.
pub struct BodySchemas {
    by_route: HashMap<(Method, String), (jsonschema::Validator, bool)>,
}

impl BodySchemas {
    /// Compiles the request body schemas of `doc` (the served document).
    pub fn from_doc(doc: &Value) -> Self {
        let mut by_route = HashMap::new();
        let components = doc["components"].clone();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let body = &op["requestBody"];
                let schema = &body["content"]["application/json"]["schema"];
                if schema.is_null() {
                    continue;
                }
                let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                    continue;
                };
                let mut root = schema.clone();
                if let Some(obj) = root.as_object_mut() {
                    obj.insert("components".into(), components.clone());
                } else {
                    root = json!({"allOf": [schema], "components": components});
                }
                match jsonschema::validator_for(&root) {
                    Ok(v) => {
                        let required = body["required"] == true;
                        by_route.insert((method, path.clone()), (v, required));
                    }
                    Err(e) => {
                        tracing::error!(%path, error = %e, "cannot compile a request body schema")
                    }
                }
            }
        }
        Self { by_route }
    }

    /// How many bodies are checked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_route.len()
    }

    /// Whether none is.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_route.is_empty()
    }
}

/// The layer: refuses a JSON body its operation's schema does not allow.
pub async fn check_body(
    State(schemas): State<Arc<BodySchemas>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(path) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
    else {
        return next.run(req).await;
    };
    let Some((validator, required)) = schemas.by_route.get(&(req.method().clone(), path)) else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_JSON_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::too_large(format!(
                "the request body could not be read (at most {MAX_JSON_BODY} bytes): {e}"
            ))
            .into_response();
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if *required {
            return ApiError::invalid("a JSON request body is required").into_response();
        }
    } else {
        let mut value: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                return ApiError::invalid(format!("the request body is not valid JSON: {e}"))
                    .into_response();
            }
        };
        super::extract::integral_floats_to_integers(&mut value);
        if let Err(e) = validator.validate(&value) {
            let at = e.instance_path.to_string();
            let mut err = ApiError::invalid(format!(
                "the request body is invalid{}: {e}",
                if at.is_empty() {
                    String::new()
                } else {
                    format!(" at {at}")
                }
            ));
            if !at.is_empty() {
                err.field = Some(at.trim_start_matches('/').replace('/', "."));
            }
            return err.into_response();
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_json_body_of_the_document_has_a_compiled_schema() {
        let doc = crate::api::openapi_json();
        let bodies = doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(_, item)| item.as_object().into_iter().flatten())
            .filter(|(_, op)| op["requestBody"]["content"]["application/json"].is_object())
            .count();
        let schemas = BodySchemas::from_doc(&doc);
        assert!(!schemas.is_empty());
        assert_eq!(schemas.len(), bodies);
        // The document's rules are the server's: a name that breaks the
        // pattern, a size out of range, a field that is not there.
        let create = &schemas.by_route[&(Method::POST, "/v1/instances".to_string())].0;
        assert!(create.is_valid(&json!({"name": "web", "image": "img", "instance_type": "nano"})));
        assert!(!create.is_valid(&json!({"name": "Web", "image": "img", "instance_type": "nano"})));
        assert!(
            !create
                .is_valid(&json!({"name": "web", "image": "img", "vcpus": 0, "memory_mib": 128}))
        );
        assert!(!create.is_valid(
            &json!({"name": "web", "image": "img", "instance_type": "nano", "colour": 1})
        ));
        assert!(
            !create.is_valid(&json!({"name": "web", "image": "img"})),
            "no size"
        );
        assert!(create.is_valid(&json!({"name": "web", "from_snapshot": "a/b"})));
        assert!(!create.is_valid(&json!({"name": "web", "from_snapshot": "a/b", "image": "img"})));
    }
}

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
    /// (validator, whether the body is required, the schema it was built from).
    by_route: HashMap<(Method, String), (jsonschema::Validator, bool, Value)>,
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
                        by_route.insert((method, path.clone()), (v, required, root));
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
    let Some((validator, required, root)) =
        schemas.by_route.get(&(req.method().clone(), path.clone()))
    else {
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
            // A value out of its rules gets a message naming the field and
            // what is allowed. A body of the wrong shape (a missing or
            // unknown field, a wrong type, fields that do not go together)
            // goes on to the handler, whose typed decoding and checks say
            // it in their own words; the fuzzer keeps the two in step.
            if let Some(err) = explain(&e, &value, &path, root) {
                return err.into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// A message for a value that breaks its field's rules, or `None` for an
/// error of shape that the handler reports itself.
fn explain(
    e: &jsonschema::ValidationError<'_>,
    body: &Value,
    route: &str,
    root: &Value,
) -> Option<ApiError> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let at = e.instance_path.to_string();
    let field = at.trim_start_matches('/').replace('/', ".");
    let value = body.pointer(&at).cloned().unwrap_or(Value::Null);
    let label = label_of(&field, route);
    let message = match &e.kind {
        // Several variants: explain the one the body came closest to.
        // Several variants: explain the one the body came closest to that
        // has something to explain (a null variant of an optional field
        // explains nothing).
        Kind::AnyOf { context } | Kind::OneOfNotValid { context } => {
            let mut branches: Vec<&Vec<jsonschema::ValidationError<'static>>> =
                context.iter().collect();
            let closest = branches.iter().map(|errs| errs.len()).min().unwrap_or(0);
            branches.retain(|errs| errs.len() == closest);
            // A value of the right type with a wrong value says more than
            // "not null" from an optional field's null variant.
            let of_value = branches.iter().find_map(|errs| {
                errs.iter()
                    .filter(|inner| !matches!(inner.kind, Kind::Type { .. }))
                    .find_map(|inner| explain(inner, body, route, root))
            });
            return of_value.or_else(|| {
                branches.into_iter().find_map(|errs| {
                    errs.iter()
                        .find_map(|inner| explain(inner, body, route, root))
                })
            });
        }
        Kind::Pattern { .. } | Kind::MinLength { .. } | Kind::MaxLength { .. } => {
            let text = value.as_str().unwrap_or_default();
            let rule = rule_of(root, &e.schema_path.to_string());
            let name_rule = rule["pattern"].as_str() == Some(skyvisor_core::names::NAME_PATTERN);
            let chars = text.chars().count();
            match (&e.kind, name_rule) {
                (_, true) => match skyvisor_core::names::validate_name(&label, text) {
                    Err(v) => v.to_string(),
                    Ok(()) => format!("invalid {label}: {value} does not match {}", pattern_of(e)),
                },
                (_, false) if field == "hostname" => {
                    match crate::guest_config::check_hostname(text) {
                        Err(v) => v.message,
                        Ok(()) => format!("invalid hostname {value}"),
                    }
                }
                // Not the value itself: it may be long.
                (Kind::MaxLength { limit }, false) => {
                    format!("{label} is {chars} characters; allowed: at most {limit} characters")
                }
                (Kind::MinLength { limit }, false) => {
                    format!("{label} is {chars} characters; allowed: at least {limit} characters")
                }
                _ => format!(
                    "invalid {label}: {:?} does not match {}",
                    text.chars().take(80).collect::<String>(),
                    pattern_of(e)
                ),
            }
        }
        Kind::Enum { options } => format!(
            "unknown {label} {value}; allowed: {}",
            options
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| !o.is_null())
                .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Kind::Minimum { .. } | Kind::Maximum { .. } => {
            let rule = rule_of(root, &e.schema_path.to_string());
            match (&rule["minimum"], &rule["maximum"]) {
                (Value::Number(lo), Value::Number(hi)) => {
                    format!("{label} {value} is out of range; allowed: {lo} to {hi}")
                }
                (Value::Number(lo), _) => {
                    format!("{label} {value} is out of range; allowed: {lo} or more")
                }
                (_, Value::Number(hi)) => {
                    format!("{label} {value} is out of range; allowed: at most {hi}")
                }
                _ => format!("{label} {value} is out of range"),
            }
        }
        Kind::MultipleOf { multiple_of } => {
            format!(
                "{label} {value} is out of range: it must be a whole number of MiB (a multiple of {multiple_of})"
            )
        }
        Kind::MaxItems { limit } => format!("{label} has too many items; allowed: at most {limit}"),
        Kind::UniqueItems => {
            let items = value.as_array().cloned().unwrap_or_default();
            let twice = items
                .iter()
                .enumerate()
                .find(|(i, v)| items[..*i].contains(v))
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            format!("{field}: {twice} given twice; each may be given once")
        }
        Kind::Format { format } => format!("invalid {label}: {value} is not a {format}"),
        // A JSON array where an object goes would otherwise be taken field
        // by field by the typed decoding.
        Kind::Type { .. } => format!("invalid type: {label}: {e}"),
        Kind::Constant { expected_value } => {
            format!("invalid {label}: {value}; allowed: {expected_value}")
        }
        _ => return None,
    };
    let mut err = ApiError::invalid(message);
    if !field.is_empty() {
        err.field = Some(field);
    }
    Some(err)
}

/// The schema holding the keyword at `schema_path` (its parent), following
/// `$ref`s through the components.
fn rule_of(root: &Value, schema_path: &str) -> Value {
    let mut segments: Vec<&str> = schema_path.split('/').filter(|s| !s.is_empty()).collect();
    segments.pop();
    let mut node = root;
    for seg in segments {
        let next = if seg == "$ref" {
            node["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix('#'))
                .and_then(|p| root.pointer(p))
        } else if let Ok(i) = seg.parse::<usize>()
            && node.is_array()
        {
            node.get(i)
        } else {
            node.get(seg)
        };
        match next {
            Some(n) => node = n,
            None => return Value::Null,
        }
    }
    node.clone()
}

fn pattern_of(e: &jsonschema::ValidationError<'_>) -> String {
    match &e.kind {
        jsonschema::error::ValidationErrorKind::Pattern { pattern } => pattern.clone(),
        _ => String::new(),
    }
}

/// What a field names, for messages: `image` → `image name`; a `name` is
/// the name of what the route makes.
fn label_of(field: &str, route: &str) -> String {
    let last = field.rsplit('.').next().unwrap_or(field);
    // Array items (`volumes.0`) are named by their array.
    let last = if last.chars().all(|c| c.is_ascii_digit()) {
        field.rsplit('.').nth(1).unwrap_or(last)
    } else {
        last
    };
    match last {
        "image" => "image name".into(),
        "root_volume" | "volumes" | "volume" => "volume name".into(),
        "spread_group" => "spread group".into(),
        "snapshot" => "snapshot name".into(),
        "to" | "from" => "host name".into(),
        "instance_type" => "type".into(),
        "name" => {
            let made = route
                .rsplit('/')
                .find(|s| !s.starts_with('{'))
                .unwrap_or_default();
            match made {
                "instances" => "instance name",
                "snapshots" => "snapshot name",
                "volumes" => "volume name",
                "build" | "images" => "image name",
                "projects" => "project name",
                "identities" => "identity name",
                _ => "name",
            }
            .into()
        }
        "" => "request body".into(),
        other => other.to_string(),
    }
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

#[cfg(test)]
mod messages {
    use super::*;

    fn message(route: &str, body: Value) -> Option<String> {
        let doc = crate::api::openapi_json();
        let schemas = BodySchemas::from_doc(&doc);
        let (v, _, root) = &schemas.by_route[&(Method::POST, route.to_string())];
        let e = v.validate(&body).err()?;
        explain(&e, &body, route, root).map(|e| e.message)
    }

    #[test]
    fn broken_rules_are_named_with_what_is_allowed_and_shapes_go_to_the_handler() {
        let m = |b: Value| message("/v1/instances", b).unwrap_or_default();
        assert!(
            m(json!({"name": "Bad_Name", "image": "i", "instance_type": "nano"}))
                .contains("invalid instance name"),
        );
        assert!(
            m(json!({"name": "a", "image": "i", "instance_type": "huge"}))
                .contains("unknown type \"huge\"; allowed: nano, micro")
        );
        assert!(
            m(json!({"name": "a", "image": "i", "vcpus": 1, "memory_mib": 10}))
                .contains("allowed: 96 to 1048576")
        );
        assert!(
            m(json!({"name": "a", "image": "i", "instance_type": "nano", "disk_replicas": 4}))
                .contains("allowed: 1 to 3")
        );
        assert!(
            m(json!({"name": "a", "image": "i", "instance_type": "nano", "restart_policy": "sometimes"}))
                .contains("allowed: never, on-failure, always")
        );
        assert!(
            message(
                "/v1/instances/{name}/snapshots",
                json!({"name": "Bad_Name"})
            )
            .unwrap_or_default()
            .contains("invalid snapshot name")
        );
        let v = |b: Value| message("/v1/volumes", b).unwrap_or_default();
        assert!(
            v(json!({"name": "v", "size_bytes": 1073741824u64, "replicas": 4}))
                .contains("allowed: 1 to 3")
        );
        assert!(v(json!({"name": "v", "size_bytes": 1000})).contains("out of range"));
        assert!(v(json!({"name": "v", "size_bytes": 1536000})).contains("whole number of MiB"));
        assert!(
            v(json!({"name": "Bad_Name", "size_bytes": 1073741824u64}))
                .contains("invalid volume name")
        );
        // Shape errors are left to the handler's own decoding.
        assert_eq!(message("/v1/instances", json!({"name": "a"})), None);
        assert_eq!(
            message(
                "/v1/instances",
                json!({"name": "a", "image": "x", "instance_type": "nano", "colour": 1})
            ),
            None
        );
    }
}

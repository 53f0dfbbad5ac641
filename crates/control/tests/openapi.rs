//! The OpenAPI document is generated from the handlers; the committed copy
//! in `docs/openapi.json` must match it, so API changes are reviewed.
//! Regenerate with `UPDATE_OPENAPI=1 cargo test -p skyvisor-control --test openapi`.

use std::path::PathBuf;

#[test]
fn committed_openapi_matches_the_code() {
    let doc = skyvisor_control::api::openapi_json();
    let generated = serde_json::to_string_pretty(&doc).expect("serialize") + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date with the API; regenerate it with \
         UPDATE_OPENAPI=1 cargo test -p skyvisor-control --test openapi, and review the diff"
    );
    // Every operation documents its error answers with our error body.
    let v: serde_json::Value = serde_json::from_str(&generated).expect("json");
    assert!(v["paths"]["/v1/instances"]["post"]["responses"]["409"].is_object());
    assert!(v["components"]["schemas"]["ErrorBody"].is_object());
}

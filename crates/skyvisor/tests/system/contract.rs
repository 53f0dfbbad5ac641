//! The API's contract: schemathesis, a widely used OpenAPI fuzzer, runs
//! every check (stateful phase included) against a real `skyvisor up`,
//! as a project member and as a cluster admin, and finds nothing: no
//! server error, no answer the document does not list, no request the
//! document allows refused, none it forbids accepted. A bounded sample;
//! `scripts/fuzz-api.sh SECONDS` runs longer.

use std::process::Command;

use crate::harness::{Cloud, skyvisor_bin};

/// The Python venv with schemathesis and openapi-python-client
/// (`scripts/test.sh` makes it).
fn venv() -> String {
    std::env::var("SCHEMATHESIS_VENV").unwrap_or_else(|_| "/opt/skyvisor-schemathesis".into())
}

#[test]
fn the_api_passes_an_openapi_fuzzer_with_zero_failures() {
    let dir = std::path::PathBuf::from("/tmp/svt-fuzz");
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/fuzz-api.sh"
        ))
        .arg("40")
        .env("SKYVISOR", skyvisor_bin())
        .env("FUZZ_DIR", &dir)
        .env("FUZZ_PORT", "17891")
        .output()
        .expect("run fuzz-api.sh");
    let report = |who: &str| {
        std::fs::read_to_string(dir.join(format!("report/{who}.txt"))).unwrap_or_default()
    };
    assert!(
        out.status.success(),
        "the fuzzer found failures:\n{}\n--- member ---\n{}\n--- admin ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        report("member"),
        report("admin")
    );
    for who in ["member", "admin"] {
        let text = report(who);
        // It really ran: cases were generated and every phase passed.
        assert!(text.contains(" generated"), "{who}: {text}");
        assert!(!text.contains("failures"), "{who}: {text}");
    }
}

#[test]
fn a_client_generated_from_the_document_creates_lists_and_deletes_a_vm() {
    let cloud = Cloud::start();
    let work = tempfile::tempdir().expect("tmp");
    let out = Command::new(format!("{}/bin/python3", venv()))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/client-check.py"
        ))
        .arg(&cloud.url)
        .arg(cloud.token().expect("the bootstrap token"))
        .arg(work.path())
        .output()
        .expect("run client-check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"deleted\": true"), "{stdout}");
}

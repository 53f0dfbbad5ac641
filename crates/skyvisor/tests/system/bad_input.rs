//! Bad input gets a clear error (4xx, non-zero exit) and leaves nothing
//! half-created.

use std::process::Command;

use crate::harness::{Cloud, skyvisor_bin};

#[test]
fn bad_requests_get_clear_errors_and_create_nothing() {
    let cloud = Cloud::start();
    let cases: &[(&[&str], &str)] = &[
        (
            &["vm", "create", "x1", "--image", "nope"],
            "image \"nope\" not found",
        ),
        (
            &["vm", "create", "x2", "--type", "huge"],
            "unknown type \"huge\"",
        ),
        (&["vm", "create", "Bad_Name"], "invalid instance name"),
        (
            &["vm", "create", "x3", "--vcpus", "1", "--memory", "10"],
            "allowed: 96",
        ),
        (
            &["vm", "create", "x4", "--vcpus", "64", "--memory", "1G"],
            "vCPU free, needs 64",
        ),
        (
            &["vm", "create", "x5", "--vcpus", "1", "--memory", "900G"],
            "MiB memory free, needs",
        ),
        (&["vm", "show", "ghost"], "instance \"ghost\" not found"),
        (&["vm", "start", "ghost"], "not found"),
        (&["vm", "delete", "ghost"], "not found"),
        (&["image", "show", "ghost"], "not found"),
        (&["host", "show", "ghost"], "not found"),
        (
            &["vm", "create", "x6", "--restart", "sometimes"],
            "allowed: never, on-failure, always",
        ),
        (
            &["vm", "create", "x7", "--label", "Tier=web"],
            "key \"Tier\" is not a label key",
        ),
        (
            &["vm", "create", "x8", "--label", "tier"],
            "is not KEY=VALUE",
        ),
    ];
    for (args, want) in cases {
        let err = cloud.sv_err(args);
        assert!(
            err.contains(want),
            "skyvisor {args:?}: wanted {want:?} in: {err}"
        );
    }
    // Nothing was created by the refused requests.
    let (_, list) = cloud.api("GET", "/v1/instances", None);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert!(cloud.qemu_pids().is_empty());

    // Raw API: status codes and JSON errors, never a 500.
    let api_cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "POST",
            "/v1/instances",
            Some("{not json"),
            400,
            "not valid JSON",
        ),
        (
            "POST",
            "/v1/instances",
            Some("{\"name\": \"a\"}"),
            400,
            "missing field `image`",
        ),
        (
            "POST",
            "/v1/instances",
            Some("{\"name\": \"a\", \"image\": \"x\", \"colour\": 1}"),
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/v1/instances",
            Some("{\"name\": 5, \"image\": \"x\"}"),
            400,
            "invalid type",
        ),
        (
            "POST",
            "/v1/instances/ghost/stop",
            Some("{\"timeout_secs\": 0}"),
            400,
            "out of range",
        ),
        (
            "GET",
            "/v1/instances/Bad_Name",
            None,
            400,
            "invalid instance name",
        ),
        ("GET", "/v1/nowhere", None, 404, "no such endpoint"),
        ("PATCH", "/v1/instances", None, 405, "method not allowed"),
        (
            "DELETE",
            "/v1/instances/x?force=maybe",
            None,
            400,
            "invalid query",
        ),
    ];
    for (method, path, body, want_status, want) in api_cases {
        let (status, v) = cloud.api(method, path, *body);
        assert_eq!(status, *want_status, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(want),
            "{method} {path}: wanted {want:?} in {msg:?}"
        );
    }

    // Duplicates are refused and the original is untouched.
    let first = cloud.sv_json(&["vm", "create", "dup", "--type", "nano", "--no-start"]);
    let err = cloud.sv_err(&["vm", "create", "dup", "--type", "nano"]);
    assert!(err.contains("already exists"), "{err}");
    let still = cloud.instance("dup");
    assert_eq!(still["spec"]["id"], first["spec"]["id"]);
    let (_, list) = cloud.api("GET", "/v1/instances", None);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // Labels find instances: every term of a selector must hold.
    for (name, labels) in [
        ("web1", vec!["tier=web", "canary=yes"]),
        ("web2", vec!["tier=web"]),
        ("db1", vec!["tier=db"]),
    ] {
        let mut args = vec!["vm", "create", name, "--type", "nano", "--no-start"];
        for l in &labels {
            args.extend(["--label", l]);
        }
        cloud.sv_ok(&args);
    }
    let names = |selector: &str| -> Vec<String> {
        let v = cloud.sv_json(&["vm", "list", "--label", selector]);
        let mut n: Vec<String> = v
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["spec"]["name"].as_str().unwrap_or_default().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names("tier=web"), ["web1", "web2"]);
    assert_eq!(names("tier=web,canary"), ["web1"]);
    assert_eq!(names("canary=yes"), ["web1"]);
    assert!(names("tier=cache").is_empty());
    // `vm label` sets and removes; the list follows.
    let v = cloud.sv_json(&["vm", "label", "web2", "canary=now", "tier-"]);
    assert_eq!(
        v["spec"]["labels"],
        serde_json::json!({"canary": "now"}),
        "{v}"
    );
    assert_eq!(names("tier=web"), ["web1"]);
    assert_eq!(names("canary"), ["web1", "web2"]);
    let (status, v) = cloud.api("GET", "/v1/instances?label=Bad", None);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not a label key"),
        "{v}"
    );
    let (status, v) = cloud.api(
        "PUT",
        "/v1/instances/web1/labels",
        Some("{\"labels\": {\"ok\": \"-bad\"}}"),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        cloud.instance("web1")["spec"]["labels"]["tier"],
        "web",
        "a refused change changes nothing"
    );

    // The OpenAPI document is served.
    let (status, doc) = cloud.api("GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/instances"].is_object());
}

#[test]
fn up_refuses_a_missing_qemu_and_a_bad_config() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(skyvisor_bin())
        .args([
            "up",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot run QEMU") && err.contains("/nonexistent/qemu-system-x86_64"),
        "{err}"
    );

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listn = \"127.0.0.1:1\"\n").expect("write");
    let out = Command::new(skyvisor_bin())
        .args(["up", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid config file") && err.contains("listn"),
        "{err}"
    );

    let out = Command::new(skyvisor_bin())
        .args(["vm", "list", "--url", "http://127.0.0.1:9"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the Skyvisor API"), "{err}");
}

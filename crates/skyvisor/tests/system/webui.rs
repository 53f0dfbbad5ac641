//! The web console in a real headless Chromium (Debian's, driven by
//! Playwright) against a real cloud with real guests: the story in
//! `ui/e2e/console.e2e.mjs` (sign in, create a VM and see it run, its
//! console's boot output and an echo of typed keys, a snapshot, its metric
//! charts, stop, what a viewer is offered and refused, a revoked token,
//! delete, and another project's objects never shown). This test makes the
//! projects, identities and tokens it needs, runs the story, then checks
//! through the API what the browser did.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::Cloud;

fn ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ui")
}

/// A new identity with `flags` and a token for it: (token, token id).
fn token_for(cloud: &Cloud, name: &str, flags: &[&str]) -> (String, String) {
    let mut args = vec!["identity", "create", name];
    args.extend(flags);
    cloud.sv_ok(&args);
    let made = cloud.sv_json(&["token", "create", "--identity", name]);
    (
        made["token"].as_str().expect("token").to_string(),
        made["id"].as_str().expect("token id").to_string(),
    )
}

#[test]
fn the_web_console_runs_a_vm_and_its_console_in_a_real_browser() {
    let cloud = Cloud::start();
    cloud.sv_ok(&["project", "create", "shop"]);
    cloud.sv_ok(&["project", "create", "other"]);
    let (member, _) = token_for(&cloud, "alice", &["--role", "shop=member"]);
    let (viewer, _) = token_for(&cloud, "victor", &["--role", "shop=viewer"]);
    let (revocable, revocable_id) = token_for(&cloud, "eve", &["--role", "shop=member"]);
    // Another project's instance, which the story must never see: a
    // container (running in a fraction of a second).
    cloud.sv_ok(&[
        "--project",
        "other",
        "vm",
        "create",
        "secret-c",
        "--kind",
        "container",
        "--type",
        "nano",
        "--wait",
    ]);
    // Screenshots: where the docs want them, else beside the cloud's data
    // (for looking at a failure).
    let shots = std::env::var_os("SKYVISOR_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cloud.data_dir.join("ui-shots"));
    let out = Command::new("node")
        .arg("e2e/console.e2e.mjs")
        .current_dir(ui_dir())
        .env("SV_URL", &cloud.url)
        .env("SV_PROJECT", "shop")
        .env("SV_MEMBER_TOKEN", &member)
        .env("SV_VIEWER_TOKEN", &viewer)
        .env("SV_REVOCABLE_TOKEN", &revocable)
        .env("SV_REVOCABLE_ID", &revocable_id)
        .env("SV_ADMIN_TOKEN", cloud.token().expect("admin token"))
        .env("SV_OTHER_INSTANCE", "secret-c")
        .env("SV_SHOTS", &shots)
        .output()
        .expect("run node (scripts/install-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all steps passed"),
        "the browser story failed ({}; screenshots in {}):\n{stdout}\n{stderr}\ndaemon log:\n{}",
        out.status,
        shots.display(),
        cloud.log_tail()
    );
    println!("{stdout}");

    // What the browser did, seen through the API.
    let as_member = |path: &str| {
        crate::harness::http_json_as("GET", &format!("{}{path}", cloud.url), None, Some(&member))
            .expect("API reachable")
    };
    let (status, _) = as_member("/v1/instances/ui-vm");
    assert_eq!(status, 404, "the VM deleted in the browser still exists");
    let (status, snaps) = as_member("/v1/snapshots");
    assert_eq!(status, 200);
    assert!(
        snaps.to_string().contains("before-stop"),
        "the snapshot taken in the browser is not kept: {snaps}"
    );
    // The revoked token stays revoked; the other project's container ran on.
    let (status, _) = crate::harness::http_json_as(
        "GET",
        &format!("{}/v1/whoami", cloud.url),
        None,
        Some(&revocable),
    )
    .expect("API reachable");
    assert_eq!(status, 401);
    let other = cloud.sv_json(&["--project", "other", "vm", "show", "secret-c"]);
    assert_eq!(other["status"]["phase"], "running", "{other}");
}

/// The console loaded from a server that then dies goes on with another
/// server of the cluster: its event stream and every later call.
#[test]
fn the_web_console_goes_on_with_another_server_when_its_server_dies() {
    use std::io::{BufRead, BufReader, Write};
    let bed = crate::testbed::TestBed::start(1, 2);
    let mut node = Command::new("node")
        .arg("e2e/failover.e2e.mjs")
        .current_dir(ui_dir())
        .env("SV_URL", bed.server_url(1))
        .env("SV_TOKEN", bed.token().expect("admin token"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run node (scripts/install-deps.sh installs it)");
    let mut stdin = node.stdin.take().expect("stdin");
    let mut out = BufReader::new(node.stdout.take().expect("stdout"));
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read the story's output");
        said.push_str(&line);
        assert!(n > 0, "the browser story ended early:\n{said}");
        if line.trim() == "READY-TO-KILL" {
            break;
        }
    }
    bed.script_ok(&["server-kill", "1"]);
    // Made through the surviving server (stopped: no guest boots).
    let made = bed.sv_at(
        &bed.server_url(2),
        &[
            "vm",
            "create",
            "after-failover",
            "--type",
            "nano",
            "--no-start",
        ],
    );
    assert!(
        made.status.success(),
        "create through s2: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    writeln!(stdin, "killed").expect("tell the story");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read the story's output");
    said.push_str(&rest);
    let status = node.wait().expect("node");
    assert!(
        status.success() && said.contains("all steps passed"),
        "the browser story failed ({status}):\n{said}\n{}",
        bed.logs_tail()
    );
    println!("{said}");
    let (code, _) = bed.api_on(2, "GET", "/v1/instances/after-failover", None);
    assert_eq!(code, 404, "the VM deleted in the browser still exists");
}

//! The API over TLS: `skyvisor up --tls` serves it with a certificate of
//! the cluster's CA; the local CLI trusts that CA by itself, other CLIs
//! pin it at `remote add` and refuse anything else; VMs work as before.

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{Cloud, CloudOptions, guest_json, skyvisor_bin};

/// The CLI with a config file of its own and no local server's files.
fn remote_cli(config: &std::path::Path, args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(skyvisor_bin());
    cmd.args(args)
        .env("SKYVISOR_CONFIG", config)
        .env("SKYVISOR_DATA_DIR", config.with_extension("nodata"))
        .env_remove("SKYVISOR_URL")
        .env_remove("SKYVISOR_CA_FILE")
        .env_remove("SKYVISOR_TOKEN")
        .stdin(std::process::Stdio::null());
    if let Some(t) = token {
        cmd.env("SKYVISOR_TOKEN", t);
    }
    cmd.output().expect("run skyvisor")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_api_over_tls_is_trusted_locally_pinned_by_remotes_and_serves_vms() {
    let cloud = Cloud::start_with(CloudOptions {
        extra_args: vec!["--tls".into()],
        ..Default::default()
    });
    assert!(cloud.url.starts_with("https://"), "{}", cloud.url);
    // The local CLI trusts the CA beside the bootstrap token by itself.
    let ip = cloud.create_vm("tls-vm", &["--type", "nano"]);
    assert_eq!(guest_json(ip, "/identity")["name"], "tls-vm");
    // The agent serves TLS too (the cluster has a CA), and the server
    // reaches it: the console comes from the agent through the server.
    let host = cloud.sv_json(&["host", "show"]);
    assert!(
        host["host"]["agent_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{host}"
    );
    let console = cloud.sv_ok(&["vm", "console", "tls-vm"]);
    assert!(console.contains("SKYVISOR-GUEST-READY"), "{console}");

    // Plain HTTP gets no API.
    let port = cloud.url.rsplit(':').next().expect("port");
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1"),
        "plain HTTP was answered"
    );

    // Elsewhere: nothing is trusted until pinned.
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("cli.toml");
    let token = cloud.token().expect("token");
    let out = remote_cli(&config, &["--url", &cloud.url, "whoami"], Some(&token));
    assert!(
        !out.status.success(),
        "an unpinned CA was trusted: {}",
        text(&out)
    );
    let out = remote_cli(&config, &["remote", "add", "t", &cloud.url], None);
    assert!(
        !out.status.success(),
        "added without a decision: {}",
        text(&out)
    );
    let said = text(&out);
    let fp = said
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no fingerprint shown: {said}"))
        .trim_end_matches([';', ','])
        .to_string();
    let wrong = format!("sha256:{}", "00:".repeat(31) + "00");
    let out = remote_cli(
        &config,
        &["remote", "add", "t", &cloud.url, "--fingerprint", &wrong],
        None,
    );
    assert!(!out.status.success(), "a wrong fingerprint was accepted");
    assert!(text(&out).contains("refusing"), "{}", text(&out));
    let out = remote_cli(
        &config,
        &["remote", "add", "t", &cloud.url, "--fingerprint", &fp],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = remote_cli(&config, &["--remote", "t", "whoami"], Some(&token));
    assert!(
        out.status.success(),
        "the pinned CA was not used: {}",
        text(&out)
    );
    assert!(text(&out).contains("admin"), "{}", text(&out));
}

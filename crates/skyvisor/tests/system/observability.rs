//! Metrics with a real Prometheus (Debian's) against a real `skyvisor up`
//! and real guests: service discovery through the API, authenticated
//! scrapes of the server and the agent over the cluster's TLS, `promtool
//! check metrics` on both endpoints, and PromQL that tells a busy guest
//! from an idle one.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cloud, free_port, guest_call, http_as, http_json_as, wait_until};

/// Kills the Prometheus it holds when the test ends, however it ends.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A token for a new identity made with `flags`.
fn token_for(cloud: &Cloud, name: &str, flags: &[&str]) -> String {
    let mut args = vec!["identity", "create", name];
    args.extend(flags);
    cloud.sv_ok(&args);
    let made = cloud.sv_json(&["token", "create", "--identity", name]);
    made["token"].as_str().expect("token").to_string()
}

/// What `url` answers with `token`, through curl (it trusts `ca`): status
/// and body.
fn curl(url: &str, token: &str, ca: &Path) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("curl output");
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// Runs `promtool check metrics` on `text`; panics with what it says if
/// it finds a problem.
fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (install-deps installs prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed on {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of a PromQL instant query with one result, if it has one yet.
fn query_one(prometheus: &str, promql: &str) -> Option<f64> {
    let url = format!(
        "{prometheus}/api/v1/query?query={}",
        promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let (status, v) = http_json_as("GET", &url, None, None).ok()?;
    if status != 200 {
        return None;
    }
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_finds_and_scrapes_every_endpoint_and_tells_a_busy_guest_from_an_idle_one() {
    let cloud = Cloud::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = cloud.data_dir.join("cluster-ca.pem");
    assert!(
        ca.exists(),
        "skyvisor up wrote no CA file at {}",
        ca.display()
    );
    let monitor = token_for(&cloud, "prom", &["--service-account", "--cluster-monitor"]);
    let viewer = token_for(&cloud, "watcher", &["--role", "default=viewer"]);

    cloud.sv_json(&["volume", "create", "data", "--size", "64M"]);
    let busy = cloud.create_vm("busy", &["--type", "nano", "--volume", "data"]);
    cloud.create_vm("idle", &["--type", "nano"]);
    // The busy guest writes 8 KiB to its volume, so that the volume's
    // families have something to count.
    let dev = wait_until("the volume in the guest", Duration::from_secs(60), || {
        crate::volumes::device_with_serial(busy, "data")
    });
    crate::volumes::guest_put(busy, &format!("/blk/{dev}?offset=0"), &"x".repeat(8192));
    // Unthrottled: the guest's one vCPU rewrites memory as fast as it can.
    guest_call(busy, "POST", "/memtest/start?mib=16&rate_mib_s=0", None);

    // Service discovery: the server and the agent, for a monitor only.
    let sd = format!("{}/v1/metrics/targets", cloud.url);
    let (status, _) = http_json_as("GET", &sd, None, Some(&viewer)).expect("sd");
    assert_eq!(status, 403, "a project viewer listed the scrape targets");
    // A monitor reads metrics and nothing else: no project's objects.
    let (status, v) = http_json_as(
        "GET",
        &format!("{}/v1/instances", cloud.url),
        None,
        Some(&monitor),
    )
    .expect("list");
    assert!(
        [403, 404].contains(&status),
        "a monitor listed VMs: {status} {v}"
    );
    let (status, targets) = http_json_as("GET", &sd, None, Some(&monitor)).expect("sd");
    assert_eq!(status, 200, "{targets}");
    let groups = targets.as_array().expect("groups");
    let of_role = |role: &str| -> Vec<&Value> {
        groups
            .iter()
            .filter(|g| g["labels"]["skyvisor_role"] == role)
            .collect()
    };
    assert_eq!(of_role("server").len(), 1, "{targets}");
    let agent = of_role("agent");
    assert_eq!(agent.len(), 1, "{targets}");
    assert_eq!(agent[0]["labels"]["__scheme__"], "https", "{targets}");
    let agent_url = format!(
        "https://{}/metrics",
        agent[0]["targets"][0].as_str().expect("agent target")
    );

    // Both endpoints: refused without a token or for a viewer, and what a
    // monitor gets passes promtool.
    let server_url = format!("{}/metrics", cloud.url);
    let (status, _) =
        http_as("GET", &server_url, None, Duration::from_secs(10), None).expect("server metrics");
    assert_eq!(status, 401);
    let (status, _) = http_as(
        "GET",
        &server_url,
        None,
        Duration::from_secs(10),
        Some(&viewer),
    )
    .expect("server metrics");
    assert_eq!(status, 403);
    assert_eq!(curl(&agent_url, "not-a-token", &ca).0, 401);
    assert_eq!(curl(&agent_url, &viewer, &ca).0, 403);
    let (status, server_text) = http_as(
        "GET",
        &server_url,
        None,
        Duration::from_secs(10),
        Some(&monitor),
    )
    .expect("server metrics");
    assert_eq!(status, 200, "{server_text}");
    promtool_check("the server's /metrics", &server_text);
    let (status, agent_text) = curl(&agent_url, &monitor, &ca);
    assert_eq!(status, 200, "{agent_text}");
    promtool_check("the agent's /metrics", &agent_text);
    for name in [
        "skyvisor_vm_vcpu_seconds_total{",
        "skyvisor_vm_disk_written_bytes_total{",
        "skyvisor_vm_network_receive_bytes_total{",
        "skyvisor_host_cpu_seconds_total{",
        "skyvisor_vm_phase{",
        "skyvisor_store_operation_duration_seconds_bucket{",
        "skyvisor_volume_operation_duration_seconds_bucket{",
        "skyvisor_volume_replica_state{",
    ] {
        assert!(agent_text.contains(name), "no {name} in:\n{agent_text}");
    }
    assert!(
        server_text.contains("route=\"/v1/instances\""),
        "no per-route request counts in:\n{server_text}"
    );
    assert!(
        server_text
            .contains("skyvisor_store_operation_duration_seconds_count{op=\"txn\",result=\"ok\"}"),
        "no store latency in:\n{server_text}"
    );

    // A real Prometheus: discovers both through the API, scrapes them.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &monitor).expect("token file");
    let port = free_port();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: skyvisor\n\
             \x20   scrape_timeout: 1s\n\
             \x20   authorization:\n\
             \x20     type: Bearer\n\
             \x20     credentials_file: {token}\n\
             \x20   tls_config:\n\
             \x20     ca_file: {ca}\n\
             \x20   http_sd_configs:\n\
             \x20     - url: {sd}\n\
             \x20       refresh_interval: 5s\n\
             \x20       authorization:\n\
             \x20         type: Bearer\n\
             \x20         credentials_file: {token}\n",
            token = token_file.display(),
            ca = ca.display(),
        ),
    )
    .expect("config");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).expect("log"))
        .spawn()
        .expect("run prometheus (install-deps installs it)");
    let _prometheus = Prometheus(child);
    let prometheus = format!("http://127.0.0.1:{port}");
    let log = || std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default();

    for role in ["server", "agent"] {
        let up = format!("up{{skyvisor_role=\"{role}\"}}");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while query_one(&prometheus, &up) != Some(1.0) {
            if std::time::Instant::now() > deadline {
                let targets = http_as(
                    "GET",
                    &format!("{prometheus}/api/v1/targets"),
                    None,
                    Duration::from_secs(10),
                    None,
                )
                .map(|r| r.1)
                .unwrap_or_default();
                panic!(
                    "Prometheus did not scrape the {role} within 120 s.\ntargets: {targets}\nlog:\n{}",
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The busy guest's vCPU runs flat out; the idle one's barely.
    let rate = |vm: &str| {
        format!("rate(skyvisor_vm_vcpu_seconds_total{{vm=\"{vm}\",project=\"default\"}}[15s])")
    };
    wait_until(
        "15 s of the guests' vCPU time in Prometheus",
        Duration::from_secs(120),
        || {
            query_one(
                &prometheus,
                "min(count_over_time(skyvisor_vm_vcpu_seconds_total[15s]))",
            )
            .filter(|n| *n >= 12.0)
        },
    );
    let busy_rate = query_one(&prometheus, &rate("busy")).unwrap_or_else(|| {
        panic!(
            "no vCPU rate for the busy guest; Prometheus log:\n{}",
            log()
        )
    });
    assert!(
        busy_rate > 0.5,
        "the busy guest used only {busy_rate:.2} cores"
    );
    let idle_rate = query_one(&prometheus, &rate("idle")).unwrap_or_else(|| {
        panic!(
            "no vCPU rate for the idle guest; Prometheus log:\n{}",
            log()
        )
    });
    assert!(
        idle_rate < 0.25,
        "the idle guest used {idle_rate:.2} cores (the busy one {busy_rate:.2})"
    );
    assert!(busy_rate <= 1.1, "one vCPU used {busy_rate:.2} cores");
    assert!(
        busy_rate > 10.0 * idle_rate,
        "busy {busy_rate:.3} and idle {idle_rate:.3} are not told apart"
    );
    eprintln!("vCPU rate: busy {busy_rate:.3} cores, idle {idle_rate:.3}");
    // The memtest's writes are its memory, not its disk: what the guest
    // sent on its network is counted too (the host's probes answered).
    let sent = query_one(
        &prometheus,
        "skyvisor_vm_network_transmit_bytes_total{vm=\"busy\"}",
    )
    .expect("network counter");
    assert!(sent > 0.0, "the busy guest sent nothing: {sent}");
    // The volume's primary counted the guest's write (at least the 8 KiB
    // it was sent, plus what the guest's kernel wrote on its own), and its
    // one replica is in sync.
    let written = query_one(
        &prometheus,
        "skyvisor_volume_bytes_total{volume=\"data\",project=\"default\",op=\"write\"}",
    )
    .unwrap_or_else(|| panic!("no volume write counter; log:\n{}", log()));
    assert!(
        written >= 8192.0,
        "the volume counted {written} bytes written"
    );
    assert_eq!(
        query_one(
            &prometheus,
            "skyvisor_volume_replicas_in_sync{volume=\"data\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        query_one(
            &prometheus,
            "skyvisor_volume_replica_state{volume=\"data\",state=\"in-sync\"}"
        ),
        Some(1.0)
    );
    let writes = query_one(
        &prometheus,
        "sum(skyvisor_volume_operation_duration_seconds_count{volume=\"data\",op=\"write\"})",
    )
    .expect("write latency histogram");
    assert!(writes >= 1.0, "{writes} writes in the latency histogram");

    // vm top and host top compute the same from two samples of the agent.
    let top = cloud.sv_json(&["vm", "top", "--once", "--interval", "3"]);
    let cores = |vm: &str| {
        top.as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == vm))
            .and_then(|r| r["cpu_cores"].as_f64())
            .unwrap_or_else(|| panic!("no {vm} in vm top: {top}"))
    };
    assert!(cores("busy") > 0.5, "vm top: {top}");
    assert!(cores("idle") < 0.25, "vm top: {top}");
    let hosts = cloud.sv_json(&["host", "top", "--once", "--interval", "3"]);
    let host = &hosts[0];
    assert_eq!(host["vms_running"], 2, "host top: {hosts}");
    assert!(
        host["cpu_percent"]
            .as_f64()
            .is_some_and(|p| p > 20.0 && p <= 100.0),
        "host top: {hosts}"
    );
}

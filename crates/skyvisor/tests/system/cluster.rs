//! Cluster tests on the multi-host test bed: three hosts (network
//! namespaces, each with a real `skyvisor agent` and real TCG guests), etcd
//! and one or two `skyvisor server`s.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{alive, guest_json, http, wait_until};
use crate::testbed::{LEASE_TTL, TestBed, TestBedOptions, vm_ip, whoami_server};

/// How long a host takes to be declared unreachable after it stops
/// renewing, with slack for a loaded machine.
fn unreachable_within() -> Duration {
    Duration::from_secs(LEASE_TTL * 2 + 10)
}

fn fetch_from_guest(from: std::net::Ipv4Addr, url: &str) -> Value {
    let v = guest_json(from, &format!("/fetch?url={url}"));
    assert_eq!(v["status"], 200, "{from} fetching {url}: {v}");
    v
}

#[test]
fn placement_spreads_replicas_and_vms_reach_each_other_across_hosts() {
    let bed = TestBed::start(3, 1);
    let hosts = bed.sv_json(&["host", "list"]);
    let list = hosts.as_array().expect("hosts");
    assert_eq!(list.len(), 3, "{hosts}");
    for h in list {
        assert_eq!(h["state"], "ready", "{h}");
        assert!(h["host"]["capacity"]["allocatable"]["vcpus"].as_u64() > Some(0));
        assert!(h["host"]["bridge_address"].is_string(), "{h}");
    }

    // Replicas of one service land on different hosts.
    let mut vms = Vec::new();
    for i in 1..=3 {
        vms.push(bed.create_vm(
            &format!("web-{i}"),
            &["--type", "nano", "--spread-group", "web"],
        ));
    }
    let placed: BTreeSet<u32> = vms.iter().map(|v| bed.host_of(v)).collect();
    assert_eq!(
        placed,
        BTreeSet::from([1, 2, 3]),
        "spread group members share a host"
    );
    // A fourth replica has nowhere to go, and the error says why, host by host.
    let err = bed.sv_err(&[
        "vm",
        "create",
        "web-4",
        "--type",
        "nano",
        "--spread-group",
        "web",
    ]);
    for i in 1..=3 {
        assert!(
            err.contains(&format!("h{i}: already runs web-")) && err.contains("spread group web"),
            "{err}"
        );
    }

    // VMs reach each other across hosts through the overlay.
    let ips: Vec<_> = vms.iter().map(vm_ip).collect();
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let got = fetch_from_guest(ips[from], &format!("http://{}/identity", ips[to]));
        let body: Value = serde_json::from_str(got["body"].as_str().expect("body")).expect("json");
        assert_eq!(body["name"], format!("web-{}", to + 1), "{got}");
    }
    // Every host reaches every VM's service at its IP, and so does the root
    // namespace (its route to the VM subnet goes through h1).
    for h in 1..=3 {
        for (i, ip) in ips.iter().enumerate() {
            let (status, body) = bed
                .http_from_host(h, &format!("http://{ip}/identity"))
                .unwrap_or_else(|e| panic!("h{h} -> web-{}: {e}", i + 1));
            assert_eq!(status, 200);
            assert!(body.contains(&format!("\"web-{}\"", i + 1)), "{body}");
        }
    }
    for (i, ip) in ips.iter().enumerate() {
        assert_eq!(
            guest_json(*ip, "/identity")["name"],
            format!("web-{}", i + 1)
        );
    }
    // A VM always leaves the VM network through its own host: the gateway
    // address is on every host, but ARP for it never crosses the overlay.
    let port = whoami_server(bed.root_ip());
    for (v, ip) in vms.iter().zip(&ips) {
        let got = fetch_from_guest(*ip, &format!("http://{}:{port}/", bed.root_ip()));
        assert_eq!(
            got["body"].as_str(),
            Some(bed.host_ip(bed.host_of(v)).to_string().as_str()),
            "{} left through another host",
            v["spec"]["name"]
        );
    }

    // Cordon keeps new VMs off a host; the spread weigher would pick it.
    let cordoned = bed.sv_json(&["host", "cordon", "h3"]);
    assert_eq!(cordoned["state"], "cordoned");
    for i in 1..=3 {
        let v = bed.sv_json(&[
            "vm",
            "create",
            &format!("idle-{i}"),
            "--type",
            "nano",
            "--no-start",
        ]);
        assert_ne!(bed.host_of(&v), 3, "a VM landed on the cordoned host: {v}");
    }
    // Nothing fits: the error names the reason for every host.
    let err = bed.sv_err(&["vm", "create", "huge", "--vcpus", "9", "--memory", "128M"]);
    assert!(err.contains("h3: cordoned"), "{err}");
    for h in [1, 2] {
        let free = 8 - bed.api("GET", &format!("/v1/hosts/h{h}"), None).1["allocated"]["vcpus"]
            .as_u64()
            .expect("allocated");
        assert!(
            err.contains(&format!("h{h}: {free} vCPU free, needs 9")),
            "{err}"
        );
    }
    bed.sv_ok(&["host", "uncordon", "h3"]);
    let v = bed.sv_json(&["vm", "create", "idle-4", "--type", "nano", "--no-start"]);
    assert_eq!(
        bed.host_of(&v),
        3,
        "the uncordoned, emptiest host takes it: {v}"
    );

    // Addresses are allocated cluster-wide, never twice.
    let all = bed.sv_json(&["vm", "list"]);
    let addrs: Vec<_> = all.as_array().expect("vms").iter().map(vm_ip).collect();
    let unique: BTreeSet<_> = addrs.iter().collect();
    assert_eq!(
        unique.len(),
        addrs.len(),
        "an address was handed out twice: {addrs:?}"
    );
}

#[test]
fn pack_weigher_fills_one_host_first() {
    let bed = TestBed::start_with(
        3,
        1,
        TestBedOptions {
            server_args: vec!["--weigher".into(), "pack".into()],
            ..Default::default()
        },
    );
    let mut hosts = BTreeSet::new();
    for i in 1..=4 {
        let v = bed.sv_json(&[
            "vm",
            "create",
            &format!("p{i}"),
            "--type",
            "nano",
            "--no-start",
            // Replicated root disks spread their replicas over the pool
            // and the VM goes to one of them; the weigher decides alone
            // only for local disks.
            "--local-disk",
        ]);
        hosts.insert(bed.host_of(&v));
    }
    assert_eq!(hosts.len(), 1, "pack spread VMs over hosts {hosts:?}");
    // A spread group still wins over packing.
    let a = bed.sv_json(&[
        "vm",
        "create",
        "g1",
        "--type",
        "nano",
        "--no-start",
        "--spread-group",
        "g",
    ]);
    let b = bed.sv_json(&[
        "vm",
        "create",
        "g2",
        "--type",
        "nano",
        "--no-start",
        "--spread-group",
        "g",
    ]);
    assert_ne!(bed.host_of(&a), bed.host_of(&b));
}

#[test]
fn killing_the_leading_server_lets_another_take_over_and_loses_nothing() {
    let bed = TestBed::start(3, 2);
    let (_, info) = bed.api_on(2, "GET", "/v1/info", None);
    assert_eq!(info["leader"], "s1", "{info}");
    assert_eq!(info["servers"].as_array().map(Vec::len), Some(2), "{info}");
    // The second server copied the image the first one built.
    wait_until("s2 has the image files", Duration::from_secs(60), || {
        let dir = bed.dir.join("s2/images/default/debian-busybox");
        (std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) >= 2).then_some(())
    });

    let before = bed.create_vm("before", &["--type", "nano"]);
    // A create acknowledged by the leader, which dies right after answering.
    let body = r#"{"name":"acked","image":"debian-busybox","instance_type":"nano"}"#;
    let (status, acked) = bed.api_on(1, "POST", "/v1/instances", Some(body));
    assert_eq!(status, 201, "{acked}");
    bed.script_ok(&["server-kill", "1"]);
    let killed = Instant::now();

    wait_until("s2 leads", Duration::from_secs(LEASE_TTL * 2 + 10), || {
        let (_, info) = bed.api_on(2, "GET", "/v1/info", None);
        (info["leader"] == "s2").then_some(())
    });
    eprintln!("s2 took over {:?} after s1 was killed", killed.elapsed());
    // The acknowledged create survived the leader and runs.
    let v = wait_until("the acked VM running", Duration::from_secs(240), || {
        let (status, v) = bed.api_on(2, "GET", "/v1/instances/acked", None);
        (status == 200 && v["status"]["guest_ready"] == true).then_some(v)
    });
    assert_eq!(guest_json(vm_ip(&v), "/identity")["name"], "acked");
    assert_eq!(guest_json(vm_ip(&before), "/identity")["name"], "before");
    // The CLI, given both servers, fails over to the live one.
    let after = bed.create_vm("after", &["--type", "nano"]);
    assert_eq!(guest_json(vm_ip(&after), "/identity")["name"], "after");

    // The old leader comes back as a follower.
    bed.script_ok(&["server-start", "1"]);
    let (_, info) = bed.api_on(1, "GET", "/v1/info", None);
    assert_eq!(info["leader"], "s2", "{info}");
    let names: BTreeSet<String> = info["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, BTreeSet::from(["s1".to_string(), "s2".to_string()]));
    let (_, list) = bed.api_on(1, "GET", "/v1/instances", None);
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list}");
}

#[test]
fn etcd_restart_is_survived() {
    let bed = TestBed::start(3, 1);
    let a = bed.create_vm("a", &["--type", "nano", "--spread-group", "g"]);
    let b = bed.create_vm("b", &["--type", "nano", "--spread-group", "g"]);
    let pids: Vec<u64> = [&a, &b]
        .iter()
        .map(|v| {
            bed.instance(v["spec"]["name"].as_str().expect("name"))["status"]["pid"]
                .as_u64()
                .expect("pid")
        })
        .collect();
    let boot_a = guest_json(vm_ip(&a), "/identity")["boot_id"].clone();

    bed.script_ok(&["etcd-stop"]);
    let stopped = Instant::now();
    // The API says so, quickly and clearly, instead of hanging.
    let (status, err) = wait_until("503 from the API", Duration::from_secs(10), || {
        let r = bed.api("GET", "/v1/instances", None);
        (r.0 == 503).then_some(r)
    });
    assert_eq!(status, 503);
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("state store is unreachable"), "{err}");
    let asked = Instant::now();
    let (status, _) = bed.api(
        "POST",
        "/v1/instances",
        Some(r#"{"name":"during","image":"debian-busybox","instance_type":"nano"}"#),
    );
    assert_eq!(status, 503);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    let cli = bed.sv_err(&["vm", "list"]);
    assert!(cli.contains("state store is unreachable"), "{cli}");
    let (status, info) = bed.api("GET", "/v1/info", None);
    assert_eq!(
        (status, &info["store_ok"]),
        (200, &Value::Bool(false)),
        "{info}"
    );

    // Agents keep their VMs running through the outage, longer than a lease.
    std::thread::sleep(Duration::from_secs(LEASE_TTL + 2).saturating_sub(stopped.elapsed()));
    for (v, pid) in [&a, &b].iter().zip(&pids) {
        assert!(alive(*pid as u32), "{} died with etcd", v["spec"]["name"]);
        let (status, body) = http(
            "GET",
            &format!("http://{}/health", vm_ip(v)),
            None,
            Duration::from_secs(10),
        )
        .expect("guest answers during the outage");
        assert_eq!((status, body.trim()), (200, "ok"));
    }

    bed.script_ok(&["etcd-start"]);
    wait_until("the API back", Duration::from_secs(30), || {
        (bed.api("GET", "/v1/instances", None).0 == 200).then_some(())
    });
    for h in 1..=bed.hosts {
        bed.wait_host_state(h, "ready", Duration::from_secs(30));
    }
    for (v, pid) in [&a, &b].iter().zip(&pids) {
        let now = bed.instance(v["spec"]["name"].as_str().expect("name"));
        assert_eq!(now["status"]["pid"].as_u64(), Some(*pid), "{now}");
        assert_eq!(now["status"]["phase"], "running");
    }
    assert_eq!(
        guest_json(vm_ip(&a), "/identity")["boot_id"],
        boot_a,
        "a was rebooted"
    );
    let c = bed.create_vm("c", &["--type", "nano"]);
    assert_eq!(guest_json(vm_ip(&c), "/identity")["name"], "c");
}

#[test]
fn hosts_killed_cut_off_and_restored() {
    let bed = TestBed::start(3, 1);
    let mut vms = Vec::new();
    for i in 1..=3 {
        // Unprotected (local disks): a cut-off host keeps running them.
        vms.push(bed.create_vm(
            &format!("v{i}"),
            &["--type", "nano", "--spread-group", "v", "--local-disk"],
        ));
    }
    let on = |h: u32| -> Value {
        vms.iter()
            .find(|v| bed.host_of(v) == h)
            .cloned()
            .unwrap_or_else(|| panic!("no VM on h{h}"))
    };

    // An agent restart re-attaches to its VMs: same QEMU, no reboot.
    let v2 = on(2);
    let name2 = v2["spec"]["name"].as_str().expect("name").to_string();
    let pid2 = bed.instance(&name2)["status"]["pid"].as_u64().expect("pid");
    let boot2 = guest_json(vm_ip(&v2), "/identity")["boot_id"].clone();
    bed.script_ok(&["agent-kill", "2"]);
    assert!(alive(pid2 as u32), "QEMU died with its agent");
    bed.script_ok(&["agent-start", "2"]);
    bed.wait_host_state(2, "ready", Duration::from_secs(30));
    let back = wait_until("v2 re-attached", Duration::from_secs(60), || {
        let v = bed.instance(&name2);
        (v["status"]["phase"] == "running" && v["status"]["guest_ready"] == true).then_some(v)
    });
    assert_eq!(
        back["status"]["pid"].as_u64(),
        Some(pid2),
        "a new QEMU was started"
    );
    assert_eq!(guest_json(vm_ip(&v2), "/identity")["boot_id"], boot2);

    // Cut off: the host is unreachable, its VM keeps running, new VMs go
    // elsewhere; back on the network it is ready again, VM untouched.
    let v3 = on(3);
    let pid3 = bed.qemu_pids(3);
    assert_eq!(pid3.len(), 1);
    bed.script_ok(&["host-cut", "3"]);
    bed.wait_host_state(3, "unreachable", unreachable_within());
    let err = bed.sv_err(&[
        "vm",
        "create",
        "elsewhere",
        "--vcpus",
        "9",
        "--memory",
        "128M",
    ]);
    assert!(err.contains("h3: unreachable"), "{err}");
    let w = bed.sv_json(&["vm", "create", "w", "--type", "nano", "--no-start"]);
    assert_ne!(bed.host_of(&w), 3);
    assert!(alive(pid3[0]), "the cut-off host's VM died");
    bed.script_ok(&["host-restore", "3"]);
    bed.wait_host_state(3, "ready", Duration::from_secs(30));
    assert_eq!(bed.qemu_pids(3), pid3, "the VM was restarted");
    assert_eq!(
        guest_json(vm_ip(&v3), "/identity")["name"],
        v3["spec"]["name"]
    );

    // Killed (agent and QEMUs): unreachable; back, its VM is started again.
    let v1 = on(1);
    let name1 = v1["spec"]["name"].as_str().expect("name").to_string();
    let pids1 = bed.qemu_pids(1);
    bed.script_ok(&["host-kill", "1"]);
    bed.wait_host_state(1, "unreachable", unreachable_within());
    for pid in &pids1 {
        assert!(!alive(*pid), "QEMU {pid} survived the host kill");
    }
    let unknown = bed.instance(&name1);
    assert!(
        unknown["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("host h1 is unreachable")),
        "{unknown}"
    );
    bed.script_ok(&["host-restore", "1"]);
    bed.wait_host_state(1, "ready", Duration::from_secs(30));
    // Until its agent reports again, the VM shows its last report, marked.
    let stale = bed.instance(&name1);
    let again = wait_until(
        "v1 running again in a new QEMU",
        Duration::from_secs(240),
        || {
            let v = bed.instance(&name1);
            let pid = v["status"]["pid"].as_u64().unwrap_or(0) as u32;
            (v["status"]["phase"] == "running"
                && v["status"]["guest_ready"] == true
                && pid != 0
                && !pids1.contains(&pid))
            .then_some(v)
        },
    );
    assert!(
        again["status"]["boot_count"].as_u64() > stale["status"]["boot_count"].as_u64(),
        "{stale} -> {again}"
    );
    assert_eq!(guest_json(vm_ip(&v1), "/identity")["name"], name1);
}

#[test]
fn duplicate_host_names_and_other_versions_are_refused() {
    let bed = TestBed::start(2, 1);
    let skyvisor = crate::harness::skyvisor_bin();
    let token = bed.token().expect("the bed's token");
    let agent_as = |token: Option<&str>, ns: &str, name: &str, data: &str| {
        let mut c = std::process::Command::new("ip");
        if let Some(t) = token {
            c.env("SKYVISOR_JOIN_TOKEN", t);
        }
        c.args(["netns", "exec", ns])
            .arg(&skyvisor)
            .args(["agent", "--server", &bed.server_url(1), "--host-name", name])
            .args(["--address", &bed.host_ip(2).to_string(), "--accel", "tcg"])
            .args(["--bridge", "svdup0", "--data-dir", data, "--listen"])
            .arg(format!("{}:7799", bed.host_ip(2)))
            .output()
            .expect("run agent")
    };
    let agent = |ns: &str, name: &str, data: &str| agent_as(Some(&token), ns, name, data);

    // Another host's agent API (TLS) and replica server (mutual TLS) admit
    // only members of the cluster: no key, no answer but a refusal; health
    // stays open.
    let h1 = bed.host_ip(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The test does not hold the cluster's CA; what it checks is the
    // agent's refusal, not its certificate.
    let https = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let agent_api = |method: &str, path: &str, auth: Option<&str>| -> u16 {
        rt.block_on(async {
            let mut req = https.request(
                method.parse().expect("method"),
                format!("https://{h1}:7781{path}"),
            );
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            req.body("{}")
                .send()
                .await
                .expect("agent reachable over TLS")
                .status()
                .as_u16()
        })
    };
    assert_eq!(agent_api("GET", "/agent/v1/health", None), 200);
    assert_eq!(agent_api("GET", "/agent/v1/peer-probe?from=h2", None), 401);
    assert_eq!(agent_api("POST", "/agent/v1/overlay/steer", None), 401);
    // An API token is not the cluster's key.
    assert_eq!(
        agent_api("POST", "/agent/v1/overlay/steer", Some(&token)),
        401
    );
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((h1, 7782)).expect("replica port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Not TLS: the server hangs up, at most with a TLS alert, and never
        // gets as far as its link-key challenge.
        s.write_all(&[0u8; 64]).expect("send");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            !rest.windows(8).any(|w| w == b"SVREPL01"),
            "the replica server spoke to a client without TLS"
        );
        assert!(
            rest.is_empty() || rest[0] == 0x15,
            "the replica server answered a client without TLS with more than an alert: {rest:?}"
        );
    }
    let data = bed.dir.join("dup");
    let data = data.to_string_lossy();

    // Joining through a server needs a cluster admin's token; a wrong one
    // is refused by the server, naming why.
    let out = agent_as(None, &bed.netns(2), "h9", &data);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--join-token"), "{stderr}");
    let out = agent_as(
        Some(
            "svt_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
        ),
        &bed.netns(2),
        "h9",
        &data,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown API token"), "{stderr}");

    // A second live agent named h1 is refused, and touches nothing.
    let out = agent(&bed.netns(2), "h1", &data);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("host name \"h1\" is already used by a live agent"),
        "{stderr}"
    );
    assert_eq!(bed.host_state(1), "ready");
    assert_eq!(bed.host_state(2), "ready");

    // The join endpoint refuses another version with the cluster's.
    let (status, v) = bed.api("GET", "/v1/cluster/join?version=0.0.1", None);
    assert_eq!(status, 409, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("agent version 0.0.1 cannot join")
            && message.contains(&format!(
                "cluster runs version {}",
                env!("CARGO_PKG_VERSION")
            )),
        "{v}"
    );

    // An agent finding a cluster of another version in the store refuses
    // to run, naming both versions.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use skyvisor_store::StoreExt;
        let store = skyvisor_store::EtcdStore::connect(
            &[bed.etcd_url()],
            "/skyvisor/",
            skyvisor_store::EtcdOptions::default(),
        )
        .await
        .expect("etcd");
        let old = serde_json::json!({"version": "0.0.1", "set_at": "2020-01-01T00:00:00Z"});
        store
            .put("cluster/version", serde_json::to_vec(&old).expect("json"))
            .await
            .expect("put version");
    });
    let out = agent(&bed.netns(2), "h9", &data);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "this agent is version {} but the cluster runs version 0.0.1",
            env!("CARGO_PKG_VERSION")
        )),
        "{stderr}"
    );
    let (_, hosts) = bed.api("GET", "/v1/hosts", None);
    assert_eq!(
        hosts.as_array().map(Vec::len),
        Some(2),
        "a refused agent registered: {hosts}"
    );
}

/// Makes only host `only` take new VMs (the others cordoned).
fn only_host_takes_vms(bed: &TestBed, only: u32) {
    for h in 1..=bed.hosts {
        let verb = if h == only { "uncordon" } else { "cordon" };
        bed.sv_ok(&["host", verb, &format!("h{h}")]);
    }
}

#[test]
fn vms_start_on_hosts_without_the_image_after_its_server_dies_or_with_no_server_reachable() {
    let bed = TestBed::start(3, 2);
    wait_until("s2 has the image files", Duration::from_secs(60), || {
        let dir = bed.dir.join("s2/images/default/debian-busybox");
        (std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) >= 3).then_some(())
    });
    // h1 fetches the image from s1, which built it.
    only_host_takes_vms(&bed, 1);
    let first = bed.create_vm("first", &["--type", "nano"]);
    assert_eq!(bed.host_of(&first), 1);

    // s1 dies; h2, which has no copy yet, must fetch from s2 at once (its
    // list of servers still names s1 until s1's lease expires).
    bed.script_ok(&["server-kill", "1"]);
    only_host_takes_vms(&bed, 2);
    let second = bed.create_vm("second", &["--type", "nano"]);
    assert_eq!(bed.host_of(&second), 2);
    assert_eq!(guest_json(vm_ip(&second), "/identity")["name"], "second");

    // h3 cannot reach any server (its traffic to their ports is refused),
    // but reaches the store and its peers: it takes the image from a peer
    // host's verified copy.
    let root_ip = bed
        .server_url(2)
        .trim_start_matches("http://")
        .split(':')
        .next()
        .expect("server address")
        .to_string();
    bed.script_ok(&[
        "exec",
        "3",
        "iptables",
        "-I",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &root_ip,
        "--dport",
        "7780:7789",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);
    only_host_takes_vms(&bed, 3);
    let third = bed.create_vm("third", &["--type", "nano"]);
    assert_eq!(bed.host_of(&third), 3);
    assert_eq!(guest_json(vm_ip(&third), "/identity")["name"], "third");
    let log = std::fs::read_to_string(bed.dir.join("agent3.log")).unwrap_or_default();
    assert!(
        log.contains("/agent/v1/image-files/"),
        "h3 did not fetch from a peer host:\n{}",
        bed.logs_tail()
    );
}

#[test]
fn a_drain_with_a_migration_in_flight_finishes_through_the_new_leader() {
    let bed = TestBed::start(3, 2);
    only_host_takes_vms(&bed, 1);
    let mut boots = Vec::new();
    for i in 1..=2 {
        let v = bed.create_vm(&format!("d{i}"), &["--type", "nano"]);
        boots.push((
            vm_ip(&v),
            guest_json(vm_ip(&v), "/uptime")["boot_id"].clone(),
        ));
    }
    for h in 2..=3 {
        bed.sv_ok(&["host", "uncordon", &format!("h{h}")]);
    }
    let out = bed.sv_json(&["host", "drain", "h1", "--no-wait"]);
    assert_eq!(out["state"], "draining", "{out}");
    // The leader (s1) dies once the drain's first migration is under way.
    wait_until("a drain migration running", Duration::from_secs(60), || {
        let list = bed.sv_json(&["migration", "list"]);
        list.as_array()
            .expect("list")
            .iter()
            .any(|m| m["reason"] == "drain")
            .then_some(())
    });
    bed.script_ok(&["server-kill", "1"]);
    wait_until("h1 drained", Duration::from_secs(240), || {
        (1..=2)
            .all(|i| bed.instance(&format!("d{i}"))["spec"]["host"] != "h1")
            .then_some(())
    });
    wait_until("both running elsewhere", Duration::from_secs(120), || {
        (1..=2)
            .all(|i| bed.instance(&format!("d{i}"))["status"]["phase"] == "running")
            .then_some(())
    });
    for (ip, boot) in &boots {
        assert_eq!(
            &guest_json(*ip, "/uptime")["boot_id"],
            boot,
            "{ip} rebooted"
        );
    }
    assert!(bed.qemu_pids(1).is_empty(), "h1 still runs QEMUs");
    let (_, info) = bed.api_on(2, "GET", "/v1/info", None);
    assert_eq!(info["leader"], "s2", "{info}");
}

#[test]
fn creates_and_deletes_go_on_while_each_server_in_turn_dies() {
    let bed = TestBed::start(2, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A client creating and deleting (stopped) VMs in a loop through the
    // CLI with every server's URL; each operation's start and outcome.
    let worker = {
        let urls = bed.urls();
        let token = bed.token().expect("the bed's token");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ops: Vec<(Instant, bool, String)> = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let name = format!("loop{i}");
                for args in [
                    vec![
                        "vm",
                        "create",
                        name.as_str(),
                        "--type",
                        "nano",
                        "--no-start",
                    ],
                    vec!["vm", "delete", name.as_str(), "--force"],
                ] {
                    let at = Instant::now();
                    let out = std::process::Command::new(crate::harness::skyvisor_bin())
                        .args(&args)
                        .env("SKYVISOR_URL", &urls)
                        .env("SKYVISOR_TOKEN", &token)
                        .output()
                        .expect("run skyvisor");
                    ops.push((
                        at,
                        out.status.success(),
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ));
                }
            }
            ops
        })
    };
    let wait_some_ops = || std::thread::sleep(Duration::from_secs(3));
    wait_some_ops();
    bed.script_ok(&["server-kill", "1"]);
    wait_until("s2 leads", Duration::from_secs(LEASE_TTL * 2 + 10), || {
        let (_, info) = bed.api_on(2, "GET", "/v1/info", None);
        (info["leader"] == "s2").then_some(())
    });
    bed.script_ok(&["server-start", "1"]);
    wait_some_ops();
    bed.script_ok(&["server-kill", "2"]);
    wait_until("s1 leads", Duration::from_secs(LEASE_TTL * 2 + 10), || {
        let (_, info) = bed.api_on(1, "GET", "/v1/info", None);
        (info["leader"] == "s1").then_some(())
    });
    wait_some_ops();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ops = worker.join().expect("client thread");
    let ok = ops.iter().filter(|o| o.1).count();
    assert!(ok >= 10, "only {ok} of {} operations succeeded", ops.len());
    // The longest stretch during which operations kept failing.
    let mut longest = Duration::ZERO;
    let mut failing_since: Option<Instant> = None;
    for (at, success, _) in &ops {
        match (success, failing_since) {
            (false, None) => failing_since = Some(*at),
            (true, Some(since)) => {
                longest = longest.max(at.duration_since(since));
                failing_since = None;
            }
            _ => {}
        }
    }
    assert!(
        failing_since.is_none(),
        "the last operations failed: {:?}",
        ops.last()
    );
    let failures: Vec<&String> = ops.iter().filter(|o| !o.1).map(|o| &o.2).collect();
    eprintln!(
        "{} operations, {} failed, longest failing stretch {longest:?}: {failures:?}",
        ops.len(),
        failures.len()
    );
    assert!(
        longest < Duration::from_secs(LEASE_TTL),
        "operations failed for {longest:?} (lease TTL {LEASE_TTL}s): {failures:?}"
    );
}

#[test]
fn a_cluster_serves_its_api_over_tls_and_agents_join_through_it() {
    // `skyvisor server` serves TLS unless told --plain-http.
    let bed = TestBed::start_with(
        2,
        2,
        TestBedOptions {
            tls: true,
            ..Default::default()
        },
    );
    assert!(bed.server_url(2).starts_with("https://"));
    // Both agents joined through the servers over TLS (pinning the CA).
    let hosts = bed.sv_json(&["host", "list"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(2), "{hosts}");
    // The second server's certificate is of the same CA.
    let out = bed.sv_at(&bed.server_url(2), &["vm", "list", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = bed.create_vm("tls-vm", &["--type", "nano"]);
    assert_eq!(guest_json(vm_ip(&v), "/identity")["name"], "tls-vm");
    // Plain HTTP gets no API from any server.
    for i in 1..=2 {
        let plain = bed.server_url(i).replacen("https://", "http://", 1);
        let answer = http(
            "GET",
            &format!("{plain}/healthz"),
            None,
            Duration::from_secs(5),
        );
        assert!(
            answer.as_ref().map_or(true, |(status, _)| *status != 200),
            "server s{i} answered plain HTTP: {answer:?}"
        );
    }
}

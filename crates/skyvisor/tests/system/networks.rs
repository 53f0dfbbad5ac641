//! Projects' private networks and security groups with real guests on a
//! real host: two projects with the same subnet never reach each other,
//! and a security group's rules open and close a port while its member
//! runs.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cloud, ip_of, wait_until};
use crate::testbed::{TestBed, vm_ip};

/// A guest's endpoint as its network's router sees it (the only place on a
/// host a private network is reachable from): (HTTP status, body), or
/// None when nothing answers.
pub(crate) fn via_router(vni: u32, ip: Ipv4Addr, path: &str) -> Option<(u16, String)> {
    let ns = skyvisor_net::private_devices(vni).namespace;
    let script = format!(
        "import urllib.request, urllib.error, sys\n\
         try:\n\
         \x20 r = urllib.request.urlopen('http://{ip}{path}', timeout=20)\n\
         \x20 print(r.status); print(r.read().decode())\n\
         except urllib.error.HTTPError as e:\n\
         \x20 print(e.code); print(e.read().decode())\n\
         except Exception as e:\n\
         \x20 sys.exit(3)\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", &script])
        .output()
        .expect("run ip netns exec");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n')?;
    Some((status.trim().parse().ok()?, body.trim().to_string()))
}

/// What `url` answers when guest `from` (on network `vni`) fetches it: the
/// fetched page's body, or None when the guest could not reach it.
pub(crate) fn fetch_from(vni: u32, from: Ipv4Addr, url: &str) -> Option<String> {
    let (status, body) = via_router(vni, from, &format!("/fetch?url={url}"))
        .unwrap_or_else(|| panic!("guest {from} does not answer its router"));
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).expect("fetch answer");
    v["body"].as_str().map(str::to_string)
}

/// The name a guest's identity page gives, fetched by another guest.
fn name_seen(vni: u32, from: Ipv4Addr, target: Ipv4Addr) -> Option<String> {
    let body = fetch_from(vni, from, &format!("http://{target}/identity"))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["name"].as_str().map(str::to_string)
}

/// What guest `from` (on network `vni`) resolves `name` to with its own
/// resolver (its network's gateway): the addresses, or None when the name
/// does not resolve there.
pub(crate) fn resolved_by(vni: u32, from: Ipv4Addr, name: &str) -> Option<Vec<Ipv4Addr>> {
    let (status, body) = via_router(vni, from, &format!("/resolve?name={name}"))
        .unwrap_or_else(|| panic!("guest {from} does not answer its router"));
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).expect("resolve answer");
    Some(
        v["addresses"]
            .as_array()
            .expect("addresses")
            .iter()
            .map(|a| a.as_str().expect("address").parse().expect("ip"))
            .collect(),
    )
}

#[test]
fn projects_with_the_same_subnet_never_meet_and_security_groups_open_and_close_ports() {
    let cloud = Cloud::start();
    for p in ["alpha", "beta"] {
        cloud.sv_ok(&["project", "create", p]);
    }
    let vm = |project: &str, name: &str, extra: &[&str]| -> (Ipv4Addr, u32) {
        let mut args = vec![
            "--project",
            project,
            "vm",
            "create",
            name,
            "--type",
            "nano",
            "--wait",
            "--timeout",
            "300",
        ];
        args.extend(extra);
        let v = cloud.sv_json(&args);
        let vni = v["spec"]["network"]["vni"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} is not on a private network: {v}"));
        (ip_of(&v), u32::try_from(vni).expect("vni"))
    };
    let (a1, va) = vm("alpha", "a1", &[]);
    let (a2, va2) = vm("alpha", "a2", &[]);
    let (b1, vb) = vm("beta", "b1", &[]);
    assert_eq!(va, va2, "one project's VMs share its default network");
    assert_ne!(va, vb, "two projects share a network");
    // Both projects got the same default subnet, and the same first address.
    assert_eq!(a1, b1, "the projects' networks should overlap");
    let net = cloud.sv_json(&["--project", "beta", "network", "show", "default"]);
    assert_eq!(net["subnet"], "10.0.0.0/24", "{net}");

    // Inside a project: a2 reaches a1. Across: b1's 10.0.0.3 is nobody,
    // and its 10.0.0.2 is itself, never a1.
    assert_eq!(name_seen(va, a2, a1).as_deref(), Some("a1"));
    assert_eq!(
        name_seen(vb, b1, a2),
        None,
        "project beta reached alpha's a2"
    );
    assert_eq!(name_seen(vb, b1, a1).as_deref(), Some("b1"));

    // DNS on each network's gateway: a bare name is found in the guest's
    // own project (its search domain), the full name too; another
    // project's name does not exist for it, whatever its address.
    wait_until("a2 resolves a1", Duration::from_secs(30), || {
        (resolved_by(va, a2, "a1") == Some(vec![a1])).then_some(())
    });
    assert_eq!(
        resolved_by(va, a2, "a1.alpha.skyvisor.internal"),
        Some(vec![a1])
    );
    assert_eq!(resolved_by(vb, b1, "b1"), Some(vec![b1]));
    assert_eq!(resolved_by(vb, b1, "a1.alpha.skyvisor.internal"), None);
    assert_eq!(resolved_by(vb, b1, "a2"), None);
    assert_eq!(resolved_by(va, a1, "b1.beta.skyvisor.internal"), None);
    // And a guest reaches its neighbour by name.
    let body = fetch_from(va, a2, "http://a1/identity").expect("a2 fetches a1 by name");
    assert!(body.contains("\"a1\""), "{body}");
    // The host itself has no way in either (whatever answers it there, it
    // is not the VM: this machine's uplink may answer any address).
    if let Ok(mut s) =
        std::net::TcpStream::connect_timeout(&(a2, 80).into(), Duration::from_secs(1))
    {
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /identity HTTP/1.0\r\n\r\n");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            !answer.contains("\"a2\""),
            "the host reached a private VM: {answer}"
        );
    }

    // A security group with no rules: a3 is closed to its neighbours...
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "security-group",
        "create",
        "web",
        "--empty",
    ]);
    let (a3, _) = vm("alpha", "a3", &["--security-group", "web"]);
    assert_eq!(name_seen(va, a1, a3), None, "an empty group let a1 in");
    // ...until a rule opens port 80 to the subnet, while a3 runs...
    let allow = [
        "--project",
        "alpha",
        "security-group",
        "allow",
        "web",
        "--protocol",
        "tcp",
        "--port",
        "80",
        "--cidr",
        "10.0.0.0/24",
    ];
    cloud.sv_ok(&allow);
    wait_until("the rule to open port 80", Duration::from_secs(30), || {
        name_seen(va, a1, a3).filter(|n| n == "a3")
    });
    // ...and closes it again when the rule goes.
    let mut revoke = allow.to_vec();
    revoke[3] = "revoke";
    cloud.sv_ok(&revoke);
    wait_until(
        "the rule's removal to close port 80",
        Duration::from_secs(30),
        || name_seen(va, a1, a3).is_none().then_some(()),
    );
    // a3 still reaches out: answers to its own connections pass.
    assert_eq!(name_seen(va, a3, a1).as_deref(), Some("a1"));
    // Out of every group, a running a3 is not filtered; back in, it is.
    cloud.sv_ok(&["--project", "alpha", "vm", "set-security-groups", "a3"]);
    wait_until(
        "a3 to be open out of its group",
        Duration::from_secs(30),
        || name_seen(va, a1, a3).filter(|n| n == "a3"),
    );
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "vm",
        "set-security-groups",
        "a3",
        "--security-group",
        "web",
    ]);
    wait_until(
        "a3 to be closed in its group again",
        Duration::from_secs(30),
        || name_seen(va, a1, a3).is_none().then_some(()),
    );

    // Bad rules are refused naming the field.
    let err = cloud.sv_err(&[
        "--project",
        "alpha",
        "security-group",
        "allow",
        "web",
        "--protocol",
        "icmp",
        "--port",
        "80",
        "--cidr",
        "0.0.0.0/0",
    ]);
    assert!(err.contains("port_from"), "{err}");
    let err = cloud.sv_err(&[
        "--project",
        "alpha",
        "security-group",
        "allow",
        "web",
        "--protocol",
        "tcp",
        "--port",
        "80",
        "--cidr",
        "10.0.0.0/33",
    ]);
    assert!(err.contains("cidr"), "{err}");

    // What is in use cannot go, and the refusal names the users.
    let err = cloud.sv_err(&["--project", "alpha", "network", "delete", "default"]);
    assert!(err.contains("a1") && err.contains("a2"), "{err}");
    let err = cloud.sv_err(&["--project", "alpha", "security-group", "delete", "web"]);
    assert!(err.contains("a3"), "{err}");
    let err = cloud.sv_err(&["project", "delete", "alpha"]);
    assert!(
        err.contains("instance a1") && err.contains("security group web"),
        "{err}"
    );
    // Emptied, the project goes, its default network with it.
    for name in ["a1", "a2", "a3"] {
        cloud.sv_ok(&["--project", "alpha", "vm", "delete", name, "--force"]);
    }
    cloud.sv_ok(&["--project", "alpha", "security-group", "delete", "web"]);
    cloud.sv_ok(&["project", "delete", "alpha"]);
    let (status, _) = cloud.api("GET", "/v1/projects/alpha", None);
    assert_eq!(status, 404);
    // Beta's VM never noticed.
    assert!(via_router(vb, b1, "/health").is_some_and(|(s, _)| s == 200));
}

/// What guest `from` (on host `h`, network `vni`) sees at `target`'s
/// identity page: its name, or None.
fn name_seen_on(
    bed: &TestBed,
    h: u32,
    vni: u32,
    from: Ipv4Addr,
    target: Ipv4Addr,
) -> Option<String> {
    let (status, body) = bed
        .http_from_router(
            h,
            vni,
            &format!("http://{from}/fetch?url=http://{target}/identity"),
        )
        .unwrap_or_else(|e| panic!("guest {from} on h{h} does not answer its router: {e}"));
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    let page: Value = serde_json::from_str(v["body"].as_str()?).ok()?;
    page["name"].as_str().map(str::to_string)
}

#[test]
fn a_private_network_spans_hosts_follows_a_live_migration_and_stays_apart_from_others() {
    let bed = TestBed::start(3, 1);
    for p in ["alpha", "beta"] {
        bed.sv_ok(&["project", "create", p]);
    }
    let vm = |project: &str, name: &str| -> (Ipv4Addr, u32, u32) {
        let v = bed.create_vm(
            name,
            &[
                "--project",
                project,
                "--type",
                "nano",
                "--local-disk",
                "--spread-group",
                project,
            ],
        );
        let vni = v["spec"]["network"]["vni"]
            .as_u64()
            .expect("private network");
        (vm_ip(&v), bed.host_of(&v), u32::try_from(vni).expect("vni"))
    };
    let (a1, h1, va) = vm("alpha", "a1");
    let (a2, h2, _) = vm("alpha", "a2");
    let (b1, hb, vb) = vm("beta", "b1");
    assert_ne!(h1, h2, "the spread group put a1 and a2 on one host");
    // Across hosts, over the project's own segment.
    assert_eq!(name_seen_on(&bed, h1, va, a1, a2).as_deref(), Some("a2"));
    assert_eq!(name_seen_on(&bed, h2, va, a2, a1).as_deref(), Some("a1"));
    // Beta has a1's address; from beta, a2's address is nobody.
    assert_eq!(b1, a1, "the projects' subnets should overlap");
    assert_eq!(
        name_seen_on(&bed, hb, vb, b1, a2),
        None,
        "beta reached alpha's a2"
    );

    // a2 moves to the host it was not on; a1 keeps reaching it.
    let to = (1..=3)
        .find(|h| *h != h1 && *h != h2)
        .expect("a third host");
    let m = bed.sv_json(&[
        "--project",
        "alpha",
        "vm",
        "migrate",
        "a2",
        "--to",
        &format!("h{to}"),
    ]);
    assert_eq!(m["phase"], "completed", "{m}");
    wait_until(
        "a1 to reach a2 on its new host",
        Duration::from_secs(60),
        || name_seen_on(&bed, h1, va, a1, a2).filter(|n| n == "a2"),
    );
    assert_eq!(name_seen_on(&bed, to, va, a2, a1).as_deref(), Some("a1"));
    assert_eq!(
        name_seen_on(&bed, hb, vb, b1, a2),
        None,
        "beta reached alpha's a2"
    );
}

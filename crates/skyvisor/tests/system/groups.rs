//! Instance groups with real guests: members are made from the template
//! and answer; their agent's real health checks make them healthy; a
//! member that powers itself off and one whose QEMU is killed are both
//! replaced; scale out and in; delete takes every member with it. Bad
//! input is refused by the CLI with a non-zero exit naming the field.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cloud, alive, guest_json, wait_until};

/// The members not leaving, as (name, ip).
fn members(g: &Value) -> Vec<(String, std::net::Ipv4Addr)> {
    g["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["leaving"] == false)
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_string(),
                m["ip"].as_str().expect("ip").parse().expect("ip"),
            )
        })
        .collect()
}

fn group(cloud: &Cloud) -> Value {
    let (st, g) = cloud.api("GET", "/v1/groups/web", None);
    assert_eq!(st, 200, "{g}");
    g
}

/// Waits until the group has exactly `n` members, all healthy.
fn settled(cloud: &Cloud, n: usize, what: &str) -> Value {
    wait_until(what, Duration::from_secs(400), || {
        let g = group(cloud);
        (g["healthy"] == n && g["members"].as_array().is_some_and(|m| m.len() == n)).then_some(g)
    })
}

#[test]
fn a_group_keeps_its_members_serving_replaces_lost_ones_and_scales() {
    let cloud = Cloud::start();

    // Bad input: a non-zero exit naming what was wrong, nothing made.
    let err = cloud.sv_err(&[
        "group",
        "create",
        "web",
        "--image",
        "debian-busybox",
        "--min",
        "3",
        "--max",
        "2",
    ]);
    assert!(err.contains("min"), "{err}");
    let err = cloud.sv_err(&[
        "group", "create", "web", "--image", "debian-busybox", "--health", "udp:53",
    ]);
    assert!(err.contains("http:PORT"), "{err}");
    let (st, list) = cloud.api("GET", "/v1/groups", None);
    assert_eq!((st, list.as_array().map(Vec::len)), (200, Some(0)));

    // Two members, made and judged healthy by their agent's real checks.
    let g = cloud.sv_json(&[
        "group",
        "create",
        "web",
        "--image",
        "debian-busybox",
        "--type",
        "nano",
        "--restart",
        "never",
        "--max",
        "3",
        "--desired",
        "2",
        "--health",
        "http:80/health",
        "--health-interval",
        "1",
        "--health-grace",
        "120",
        "--wait",
        "--timeout",
        "400",
    ]);
    assert_eq!(g["healthy"], 2, "{g}");
    let first = members(&g);
    assert_eq!(first.len(), 2, "{g}");
    for (name, ip) in &first {
        assert!(name.starts_with("web-"), "{name}");
        // Each member serves as itself.
        assert_eq!(guest_json(*ip, "/identity")["name"], name.as_str());
        let inst = cloud.instance(name);
        assert_eq!(inst["status"]["health"]["state"], "healthy", "{inst}");
        assert_eq!(inst["spec"]["group"]["group"], "web", "{inst}");
    }
    let shown = cloud.sv_ok(&["group", "show", "web"]);
    assert!(
        shown.contains("2 healthy of 2 desired") && shown.contains(&first[0].0),
        "{shown}"
    );

    // One member powers itself off, the other's QEMU is killed: both are
    // replaced by new members that serve.
    let (off, _) = first[0].clone();
    let (killed, _) = first[1].clone();
    let (st, _) = crate::harness::http(
        "POST",
        &format!("http://{}/poweroff", first[0].1),
        None,
        Duration::from_secs(10),
    )
    .expect("poweroff");
    assert_eq!(st, 200);
    let pid = cloud.instance(&killed)["status"]["pid"]
        .as_u64()
        .expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let g = wait_until("both lost members replaced", Duration::from_secs(400), || {
        let g = group(&cloud);
        let now = members(&g);
        (g["healthy"] == 2
            && now.len() == 2
            && g["members"].as_array().is_some_and(|m| m.len() == 2)
            && now.iter().all(|(n, _)| *n != off && *n != killed))
        .then_some(g)
    });
    for (name, ip) in members(&g) {
        assert_eq!(guest_json(ip, "/identity")["name"], name.as_str());
    }
    for gone in [&off, &killed] {
        let (st, _) = cloud.api("GET", &format!("/v1/instances/{gone}"), None);
        assert_eq!(st, 404, "{gone} was not removed");
    }
    assert!(!alive(pid as u32));
    let (_, events) = cloud.api("GET", "/v1/events?limit=500", None);
    let text = events.to_string();
    assert!(
        text.contains(&format!("{off}: replaced")) && text.contains(&format!("{killed}: replaced")),
        "the replacements are recorded: {text}"
    );

    // Scale out to 3, then in to 1: the group says so and converges.
    cloud.sv_ok(&["group", "scale", "web", "3", "--wait", "--timeout", "400"]);
    let g = settled(&cloud, 3, "3 healthy members");
    let three: HashSet<String> = members(&g).into_iter().map(|(n, _)| n).collect();
    cloud.sv_ok(&["group", "scale", "web", "1"]);
    let g = settled(&cloud, 1, "1 member");
    assert!(three.contains(&members(&g)[0].0));
    let err = cloud.sv_err(&["group", "scale", "web", "4"]);
    assert!(err.contains("desired"), "{err}");

    // Deleting the group deletes its members; nothing is left running.
    cloud.sv_ok(&["group", "delete", "web", "--wait"]);
    let (st, _) = cloud.api("GET", "/v1/groups/web", None);
    assert_eq!(st, 404);
    let (_, vms) = cloud.api("GET", "/v1/instances", None);
    assert_eq!(vms.as_array().map(Vec::len), Some(0), "{vms}");
    wait_until("no QEMU left", Duration::from_secs(60), || {
        cloud.qemu_pids().is_empty().then_some(())
    });
}

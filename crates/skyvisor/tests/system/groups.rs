//! Instance groups, load balancers and autoscaling with real guests:
//! members are made from the template and answer; their agent's real
//! health checks make them healthy; a member that powers itself off and
//! one whose QEMU is killed are both replaced; scale out and in; delete
//! takes every member with it. A balancer spreads a client's connections
//! over every member, loses nothing after a member's death past the
//! health window, and nothing to a rolling update or a scale-in; a load
//! step grows a group whose new members take traffic; on the multi-host
//! test bed a guest reaches members on other hosts through the balancer
//! and a dead host's member is replaced. Bad input is refused by the CLI
//! with a non-zero exit naming the field.

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
        "group",
        "create",
        "web",
        "--image",
        "debian-busybox",
        "--health",
        "udp:53",
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
    let g = wait_until(
        "both lost members replaced",
        Duration::from_secs(400),
        || {
            let g = group(&cloud);
            let now = members(&g);
            (g["healthy"] == 2
                && now.len() == 2
                && g["members"].as_array().is_some_and(|m| m.len() == 2)
                && now.iter().all(|(n, _)| *n != off && *n != killed))
            .then_some(g)
        },
    );
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

/// What a client saw: when, and which member answered (or the error).
type Seen = Vec<(std::time::Instant, Result<String, String>)>;

/// A client opening a new connection to `url` every 10 ms until told to
/// stop, recording every answer.
fn client(
    url: String,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Seen>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut seen = Seen::new();
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let at = std::time::Instant::now();
            let r = match crate::harness::http("GET", &url, None, Duration::from_secs(5)) {
                Ok((200, body)) => serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["name"].as_str().map(str::to_string))
                    .ok_or_else(|| format!("not an identity: {body}")),
                Ok((st, body)) => Err(format!("HTTP {st}: {body}")),
                Err(e) => Err(e.to_string()),
            };
            seen.push((at, r));
            // The client's pace: one new connection every 10 ms.
            std::thread::sleep(Duration::from_millis(10).saturating_sub(at.elapsed()));
        }
        seen
    });
    (stop, handle)
}

fn failures(seen: &[(std::time::Instant, Result<String, String>)]) -> Vec<String> {
    seen.iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect()
}

#[test]
fn a_load_balancer_spreads_over_serving_members_and_loses_nothing_to_updates_or_scale_in() {
    let cloud = Cloud::start();
    cloud.sv_json(&[
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
        "4",
        "--desired",
        "3",
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
    // Bad input first: an unknown group, a port listed twice.
    let err = cloud.sv_err(&["lb", "create", "x", "--group", "nope", "--listen", "80"]);
    assert!(err.contains("group \"nope\" not found"), "{err}");
    let err = cloud.sv_err(&[
        "lb", "create", "x", "--group", "web", "--listen", "80", "--listen", "80:81",
    ]);
    assert!(err.contains("listed twice"), "{err}");
    let lb = cloud.sv_json(&[
        "lb", "create", "web-lb", "--group", "web", "--listen", "80", "--drain", "2",
    ]);
    let vip: std::net::Ipv4Addr = lb["spec"]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("ip");
    // Deleting a group a balancer sends to is refused, naming it.
    let err = cloud.sv_err(&["group", "delete", "web"]);
    assert!(err.contains("web-lb"), "{err}");
    wait_until("3 active backends", Duration::from_secs(60), || {
        let (_, lb) = cloud.api("GET", "/v1/load-balancers/web-lb", None);
        (lb["backends"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    let url = format!("http://{vip}/identity");

    // From inside a member, the balancer's name answers with its address
    // and the group's with its healthy members; a page comes through the
    // balancer by its name.
    let g = group(&cloud);
    let mut ips: Vec<std::net::Ipv4Addr> = members(&g).into_iter().map(|(_, ip)| ip).collect();
    ips.sort();
    let asker = ips[0];
    let resolve = |name: &str| -> Vec<String> {
        let url = format!("http://{asker}/resolve?name={name}");
        match crate::harness::http("GET", &url, None, Duration::from_secs(30)) {
            Ok((200, text)) => {
                serde_json::from_str::<Value>(&text).expect("resolve answer")["addresses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    };
    wait_until(
        "the group's name answers with its members",
        Duration::from_secs(30),
        || {
            let want: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
            (resolve("web") == want).then_some(())
        },
    );
    // Published within a tick of its creation.
    wait_until(
        "the balancer's name answers",
        Duration::from_secs(30),
        || (resolve("web-lb") == vec![vip.to_string()]).then_some(()),
    );
    assert_eq!(
        resolve("web-lb.default.skyvisor.internal"),
        vec![vip.to_string()]
    );
    // The CLI lists the same names.
    let zone = cloud.sv_json(&["dns", "list"]);
    assert_eq!(zone["domain"], "default.skyvisor.internal", "{zone}");
    let listed = zone["names"]
        .as_array()
        .expect("names")
        .iter()
        .find(|n| n["name"] == "web-lb")
        .unwrap_or_else(|| panic!("web-lb not listed: {zone}"));
    assert_eq!(listed["addresses"][0], vip.to_string());
    assert_eq!(listed["fqdn"], "web-lb.default.skyvisor.internal");
    let via_name = guest_json(asker, "/fetch?url=http://web-lb/identity");
    assert_eq!(via_name["status"], 200, "{via_name}");

    // An external balancer of the same group also listens on the host's
    // own address, where a client outside the cluster reaches every member.
    let port = crate::harness::free_port();
    let ext = cloud.sv_json(&[
        "lb",
        "create",
        "web-ext",
        "--group",
        "web",
        "--listen",
        &format!("{port}:80"),
        "--external",
    ]);
    let endpoint = format!("127.0.0.1:{port}");
    assert_eq!(ext["external_endpoints"][0], endpoint, "{ext}");
    let mut outside: HashSet<String> = HashSet::new();
    wait_until(
        "every member answers on the host's address",
        Duration::from_secs(60),
        || {
            if let Ok((200, v)) =
                crate::harness::http_json("GET", &format!("http://{endpoint}/identity"), None)
            {
                outside.insert(v["name"].as_str().unwrap_or_default().to_string());
            }
            (outside.len() == 3).then_some(())
        },
    );
    cloud.sv_ok(&["lb", "delete", "web-ext"]);

    // Requests spread over every member.
    let (stop, handle) = client(url.clone());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = handle.join().expect("client");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    let names: HashSet<String> = seen.iter().filter_map(|(_, r)| r.clone().ok()).collect();
    let g = group(&cloud);
    let all: HashSet<String> = members(&g).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, all, "every member answered through the balancer");

    // A member's QEMU dies: only requests in flight to it may fail, none
    // after the health check's window (3 s), and it is replaced.
    let (stop, handle) = client(url.clone());
    std::thread::sleep(Duration::from_secs(1));
    let victim = members(&g)[0].0.clone();
    let pid = cloud.instance(&victim)["status"]["pid"]
        .as_u64()
        .expect("pid") as i32;
    let killed_at = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    settled_without(&cloud, &victim);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = handle.join().expect("client");
    let late: Vec<&String> = seen
        .iter()
        .filter(|(at, r)| r.is_err() && at.duration_since(killed_at) > Duration::from_secs(3))
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(late.is_empty(), "failed after the window: {late:?}");

    // A rolling update and a scale-in lose no request: a member leaving
    // gets no new connection and keeps the ones it has.
    let (stop, handle) = client(url.clone());
    cloud.sv_ok(&[
        "group",
        "update",
        "web",
        "--image",
        "debian-busybox",
        "--type",
        "micro",
        "--restart",
        "never",
        "--max-surge",
        "2",
    ]);
    // Two new members at a time: the group holds 5 while they boot.
    let mut most = 0;
    wait_until(
        "every member from the new template",
        Duration::from_secs(600),
        || {
            let g = group(&cloud);
            most = most.max(members(&g).len());
            let m = g["members"].as_array().expect("members");
            (g["healthy"] == 3 && m.len() == 3 && m.iter().all(|m| m["template_generation"] == 2))
                .then_some(())
        },
    );
    assert_eq!(most, 5, "a surge of 2 over 3 desired");
    assert_eq!(group(&cloud)["spec"]["rollout"]["max_surge"], 2);
    cloud.sv_ok(&["group", "scale", "web", "2"]);
    settled(&cloud, 2, "2 members after scale-in");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = handle.join().expect("client");
    assert!(seen.len() > 100, "the client ran: {}", seen.len());
    assert!(
        failures(&seen).is_empty(),
        "{} of {} requests failed during the update and scale-in: {:?}",
        failures(&seen).len(),
        seen.len(),
        failures(&seen)
    );

    cloud.sv_ok(&["lb", "delete", "web-lb"]);
    cloud.sv_ok(&["group", "delete", "web", "--wait"]);
    let (_, list) = cloud.api("GET", "/v1/load-balancers", None);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}

/// Waits until `gone` is no longer a member and 3 healthy members serve.
fn settled_without(cloud: &Cloud, gone: &str) {
    wait_until("the dead member replaced", Duration::from_secs(400), || {
        let g = group(cloud);
        (g["healthy"] == 3
            && g["members"]
                .as_array()
                .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["name"] != gone)))
        .then_some(())
    });
}

#[test]
fn a_load_step_makes_the_autoscaler_add_members_that_take_traffic() {
    let cloud = Cloud::start_with(crate::harness::CloudOptions {
        extra_env: vec![(
            "RUST_LOG".into(),
            "info,skyvisor_control::groups::autoscale=debug".into(),
        )],
        ..Default::default()
    });
    cloud.sv_json(&[
        "group",
        "create",
        "web",
        "--image",
        "debian-busybox",
        "--type",
        "nano",
        "--max",
        "3",
        "--desired",
        "1",
        "--health",
        "http:80/health",
        "--health-interval",
        "1",
        "--wait",
        "--timeout",
        "400",
    ]);
    let lb = cloud.sv_json(&["lb", "create", "web-lb", "--group", "web", "--listen", "80"]);
    let vip = lb["spec"]["address"].as_str().expect("address").to_string();
    wait_until("1 active backend", Duration::from_secs(60), || {
        let (_, lb) = cloud.api("GET", "/v1/load-balancers/web-lb", None);
        (lb["backends"].as_array().map(Vec::len) == Some(1)).then_some(())
    });
    // Bad policies are refused naming the field.
    let err = cloud.sv_err(&["group", "autoscale", "web", "--target-cpu", "0"]);
    assert!(err.contains("target_cpu_percent"), "{err}");
    let err = cloud.sv_err(&["group", "autoscale", "web", "--at", "25:00=2"]);
    assert!(err.contains("\"25:00\""), "{err}");
    let g = cloud.sv_json(&[
        "group",
        "autoscale",
        "web",
        "--target-rps",
        "20",
        "--window",
        "10",
        "--out-cooldown",
        "0",
    ]);
    assert_eq!(g["spec"]["autoscale"]["target_requests_per_member"], 20);

    // About 100 new connections a second against 20 per member: the
    // group grows to its maximum, and the new members take traffic.
    let (stop, handle) = client(format!("http://{vip}/identity"));
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let g = loop {
        let g = group(&cloud);
        if g["healthy"] == 3 && g["members"].as_array().is_some_and(|m| m.len() == 3) {
            break g;
        }
        if std::time::Instant::now() > deadline {
            let log: Vec<String> = cloud
                .log()
                .lines()
                .filter(|l| l.contains("autoscal") || l.contains("WARN"))
                .map(str::to_string)
                .collect();
            panic!("not 3 members after the load step: {g}\n{}", log.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = handle.join().expect("client");
    let all: HashSet<String> = members(&g).into_iter().map(|(n, _)| n).collect();
    let last: HashSet<String> = seen
        .iter()
        .rev()
        .take(100)
        .filter_map(|(_, r)| r.clone().ok())
        .collect();
    assert_eq!(last, all, "the new members take traffic");
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    // The decision says why, with its numbers.
    let shown = group(&cloud);
    let reason = shown["autoscaled"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("connections/s"), "{shown}");
    let (_, events) = cloud.api("GET", "/v1/events?limit=500", None);
    assert!(
        events.to_string().contains("by autoscaling"),
        "the decision is an event: {events}"
    );
    cloud.sv_ok(&["lb", "delete", "web-lb"]);
    cloud.sv_ok(&["group", "delete", "web", "--wait"]);
}

/// Fetches `url` from inside the guest at `ip` (its test hook): the body.
fn fetch_from(ip: std::net::Ipv4Addr, url: &str) -> Option<Value> {
    let (st, body) = crate::harness::http(
        "GET",
        &format!("http://{ip}/fetch?url={url}"),
        None,
        Duration::from_secs(10),
    )
    .ok()?;
    if st != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    (v["status"] == 200).then(|| serde_json::from_str(v["body"].as_str()?).ok())?
}

#[test]
fn across_hosts_a_guest_reaches_every_member_through_the_balancer_and_a_dead_hosts_member_is_replaced()
 {
    use crate::testbed::{TestBed, vm_ip};
    let bed = TestBed::start(3, 1);
    // Members on local disks: a dead host's member is the group's to
    // replace (HA restarts protected ones itself).
    bed.sv_json(&[
        "group",
        "create",
        "web",
        "--image",
        "debian-busybox",
        "--type",
        "nano",
        "--local-disk",
        "--desired",
        "2",
        "--health",
        "http:80/health",
        "--health-interval",
        "1",
        "--wait",
        "--timeout",
        "400",
    ]);
    let (_, g) = bed.api("GET", "/v1/groups/web", None);
    let hosts: HashSet<String> = g["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["host"].as_str().expect("host").to_string())
        .collect();
    assert_eq!(hosts.len(), 2, "members on two hosts: {g}");
    let lb = bed.sv_json(&["lb", "create", "web-lb", "--group", "web", "--listen", "80"]);
    let vip = lb["spec"]["address"].as_str().expect("address").to_string();
    let client = bed.create_vm("client", &["--type", "nano", "--local-disk"]);
    let client_ip = vm_ip(&client);
    let client_host = client["spec"]["host"].as_str().expect("host").to_string();

    // From inside a guest, the balancer's address answers with both
    // members, wherever they run.
    let url = format!("http://{vip}/identity");
    let names_seen = |n: usize| {
        let mut seen = HashSet::new();
        for _ in 0..n {
            if let Some(v) = fetch_from(client_ip, &url) {
                seen.insert(v["name"].as_str().unwrap_or_default().to_string());
            }
        }
        seen
    };
    let all: HashSet<String> = members(&g).into_iter().map(|(n, _)| n).collect();
    wait_until(
        "both members through the balancer",
        Duration::from_secs(60),
        || (names_seen(10) == all).then_some(()),
    );
    // In HTTP mode a member learns who asked: X-Forwarded-For is the
    // guest's own address. In TCP mode nothing is added.
    let web_http = bed.sv_json(&[
        "lb", "create", "web-http", "--group", "web", "--listen", "8080:80", "--http",
    ]);
    let http_vip = web_http["spec"]["address"]
        .as_str()
        .expect("address")
        .to_string();
    let headers = wait_until(
        "headers through the HTTP balancer",
        Duration::from_secs(60),
        || fetch_from(client_ip, &format!("http://{http_vip}:8080/headers")),
    );
    assert_eq!(
        headers["x-forwarded-for"],
        client_ip.to_string(),
        "{headers}"
    );
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    let plain = fetch_from(client_ip, &format!("http://{vip}/headers")).expect("headers");
    assert!(plain.get("x-forwarded-for").is_none(), "{plain}");
    bed.sv_ok(&["lb", "delete", "web-http"]);

    // A member's host dies (not the client's): the group is back to 2
    // healthy members elsewhere and the client reaches them.
    let victim_host = hosts
        .iter()
        .find(|h| **h != client_host)
        .expect("a member host other than the client's")
        .clone();
    let h: u32 = victim_host
        .trim_start_matches('h')
        .parse()
        .expect("host number");
    bed.script_ok(&["host-kill", &h.to_string()]);
    let g = wait_until(
        "2 healthy members off the dead host",
        Duration::from_secs(300),
        || {
            let (_, g) = bed.api("GET", "/v1/groups/web", None);
            let now = members(&g);
            (g["healthy"] == 2
                && now.len() == 2
                && g["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .filter(|m| m["leaving"] == false)
                        .all(|m| m["host"] != victim_host.as_str())
                }))
            .then_some(g)
        },
    );
    let now: HashSet<String> = members(&g).into_iter().map(|(n, _)| n).collect();
    wait_until(
        "the new members through the balancer",
        Duration::from_secs(60),
        || (names_seen(10) == now).then_some(()),
    );
}

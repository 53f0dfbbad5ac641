//! Live migration on the multi-host test bed: real guests move between
//! hosts (network namespaces with their own agents) while a client keeps
//! opening connections to them; host drain; refusals; and faults (the
//! destination dies, the network between the hosts is cut).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{guest_call, guest_json, wait_until};
use crate::testbed::{LEASE_TTL, TestBed, vm_ip};

/// What a client that opens a new connection every 10 ms saw.
struct ClientReport {
    requests: usize,
    failures: Vec<String>,
    slowest: Duration,
}

/// A client that requests the guest's page over a new TCP connection
/// every 10 ms until stopped.
struct Client {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicUsize>,
    thread: JoinHandle<ClientReport>,
}

impl Client {
    fn start(ip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let thread = std::thread::spawn(move || {
            let mut report = ClientReport {
                requests: 0,
                failures: vec![],
                slowest: Duration::ZERO,
            };
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                match get_health(ip) {
                    Ok(()) => {}
                    Err(e) => report
                        .failures
                        .push(format!("{:?}: {e}", started.elapsed())),
                }
                report.requests += 1;
                counter.store(report.requests, Ordering::SeqCst);
                report.slowest = report.slowest.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            report
        });
        Self { stop, sent, thread }
    }

    /// Waits until the client has sent `n` requests.
    fn wait_for_requests(&self, n: usize) {
        wait_until("the client's requests", Duration::from_secs(60), || {
            (self.sent.load(Ordering::SeqCst) >= n).then_some(())
        });
    }

    fn finish(self) -> ClientReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("client thread")
    }
}

/// A stream of UDP datagrams to the guest's discard port, one every 2 ms
/// until stopped: frames that keep arriving during every pause.
struct Datagrams {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<usize>,
}

impl Datagrams {
    fn start(ip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
            let mut sent = 0;
            while !flag.load(Ordering::SeqCst) {
                if socket.send_to(b"frame", (ip, 9)).is_ok() {
                    sent += 1;
                }
                // Pacing, not waiting for anything.
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        });
        Self { stop, thread }
    }

    /// Stops; how many were sent.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("datagram thread")
    }
}

/// One request on a fresh connection; generous timeouts (TCP retries a
/// lost SYN after 1 s): only a request that does not complete fails.
fn get_health(ip: Ipv4Addr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, 80)), Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: vm\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    if buf.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        )))
    }
}

/// Migrates `name` to host `to` with the CLI (it waits); returns the record.
fn migrate(bed: &TestBed, name: &str, to: &str) -> Value {
    migrate_with(bed, name, to, false)
}

/// Migrates, over plain TCP when `insecure`.
fn migrate_with(bed: &TestBed, name: &str, to: &str, insecure: bool) -> Value {
    let mut args = vec!["vm", "migrate", name, "--to", to];
    if insecure {
        args.push("--insecure");
    }
    let m = bed.sv_json(&args);
    assert_eq!(m["phase"], "completed", "{m}");
    assert_eq!(m["destination"], to, "{m}");
    let r = &m["result"];
    assert!(r["pause_ms"].as_u64().is_some(), "{m}");
    assert!(r["ram_transferred"].as_u64() > Some(0), "{m}");
    assert_eq!(
        r["encrypted"], !insecure,
        "the streams are mutual TLS with the cluster's certificates unless asked otherwise: {m}"
    );
    m
}

fn host_name(v: &Value) -> String {
    v["spec"]["host"].as_str().expect("host").to_string()
}

/// Waits until the migration's record is in `phase`; returns it.
fn wait_phase(bed: &TestBed, id: &str, phases: &[&str], timeout: Duration) -> Value {
    wait_until(&format!("migration {id} in {phases:?}"), timeout, || {
        let (status, m) = bed.api("GET", &format!("/v1/migrations/{id}"), None);
        assert_eq!(status, 200, "{m}");
        phases
            .contains(&m["phase"].as_str().unwrap_or_default())
            .then_some(m)
    })
}

#[test]
fn running_vm_moves_between_hosts_without_failed_requests_and_keeps_its_state() {
    let bed = TestBed::start(3, 1);
    // A local disk: it is mirrored to each destination.
    let vm = bed.create_vm("mover", &["--type", "micro", "--local-disk"]);
    let ip = vm_ip(&vm);
    let first = host_name(&vm);
    let before = guest_json(ip, "/uptime");
    // State in RAM only, on disk, and a guest that keeps rewriting memory.
    guest_call(ip, "PUT", "/ram", Some("kept-in-ram"));
    for _ in 0..3 {
        guest_call(ip, "POST", "/counter/increment", None);
    }
    let memtest = guest_call(ip, "POST", "/memtest/start?mib=48&rate_mib_s=20", None);
    assert_eq!(memtest["running"], true, "{memtest}");

    // A -> B -> C -> A, with a client opening connections all along and
    // disk writes during the first move.
    let mut order: Vec<String> = ["h1", "h2", "h3"]
        .iter()
        .map(|s| s.to_string())
        .filter(|h| *h != first)
        .collect();
    order.push(first.clone());
    let client = Client::start(ip);
    let datagrams = Datagrams::start(ip);
    let writer = std::thread::spawn(move || {
        let mut acked = 0;
        for _ in 0..20 {
            let v = guest_call(ip, "POST", "/counter/increment", None);
            assert!(v["value"].as_u64().is_some(), "{v}");
            acked += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        acked
    });
    let mut records = vec![];
    for (i, to) in order.iter().enumerate() {
        // The last move sends the streams in the clear, as asked.
        records.push(migrate_with(&bed, "mover", to, i + 1 == order.len()));
        let now = bed.instance("mover");
        assert_eq!(&host_name(&now), to, "{now}");
        assert_eq!(now["status"]["phase"], "running", "{now}");
    }
    let acked = writer.join().expect("writer");
    // Migrations may take less time than a meaningful sample of requests.
    client.wait_for_requests(60);
    let report = client.finish();
    let sent = datagrams.finish();
    assert!(
        records
            .iter()
            .all(|m| m["result"]["disk_copied"].as_u64() > Some(0)),
        "a local disk is mirrored: {records:?}"
    );
    // With a datagram every 2 ms, some reach the old tap in the pauses:
    // the source holds them and sends them on to the destination.
    assert!(
        records
            .iter()
            .any(|m| m["result"]["held_frames"].as_u64() > Some(0)),
        "no move held a frame of the {sent} datagrams sent: {records:?}"
    );

    assert!(
        report.requests > 50,
        "the client barely ran: {}",
        report.requests
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed during migration: {:?}",
        report.failures.len(),
        report.requests,
        report.failures
    );
    eprintln!(
        "{} requests, slowest {:?}; pauses (ms) and frames held {:?}",
        report.requests,
        report.slowest,
        records
            .iter()
            .map(|m| (
                m["result"]["pause_ms"].as_u64(),
                m["result"]["held_frames"].as_u64()
            ))
            .collect::<Vec<_>>()
    );

    // Same boot, uptime kept growing, RAM-only state and every
    // acknowledged disk write still there, memory pattern intact.
    let after = guest_json(ip, "/uptime");
    assert_eq!(after["boot_id"], before["boot_id"], "the guest rebooted");
    assert!(
        after["uptime_secs"].as_f64() > before["uptime_secs"].as_f64(),
        "{before} -> {after}"
    );
    assert_eq!(guest_json(ip, "/ram")["value"], "kept-in-ram");
    assert_eq!(
        guest_json(ip, "/counter")["value"].as_u64(),
        Some(3 + acked),
        "acknowledged disk writes were lost"
    );
    // A full pass over the area after the moves checks every page.
    let mt = wait_until(
        "a memtest pass after the moves",
        Duration::from_secs(60),
        || {
            let mt = guest_json(ip, "/memtest");
            (mt["passes"].as_u64() >= Some(2)).then_some(mt)
        },
    );
    assert_eq!(mt["running"], true, "{mt}");
    assert_eq!(mt["mismatches"], 0, "memory changed in transit: {mt}");

    // The records tell the story; each old host kept nothing behind.
    let list = bed.sv_json(&["migration", "list"]);
    let done: Vec<&Value> = list
        .as_array()
        .expect("list")
        .iter()
        .filter(|m| m["instance"] == "mover")
        .collect();
    assert_eq!(done.len(), 3, "{list}");
    assert!(done.iter().all(|m| m["phase"] == "completed"), "{list}");
    // Each move is an event; a live migration is no stop and no start.
    let events = bed.sv_json(&["event", "list", "--vm", "mover"]);
    let kinds: Vec<&str> = events
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        kinds.iter().filter(|k| **k == "migrated").count(),
        3,
        "{events}"
    );
    assert!(
        !kinds.contains(&"stopped") && kinds.iter().filter(|k| **k == "started").count() == 1,
        "{events}"
    );
    let show = bed.sv_json(&["migration", "show", records[0]["id"].as_str().expect("id")]);
    assert_eq!(show["source"], first.as_str(), "{show}");
    for h in 1..=3u32 {
        let here = format!("h{h}") == first;
        let pids = bed.qemu_pids(h);
        assert_eq!(
            pids.len(),
            usize::from(here),
            "host h{h} runs {pids:?} after the round trip"
        );
    }
}

#[test]
fn drain_moves_every_running_vm_off_a_host_and_undrain_returns_it() {
    let bed = TestBed::start(3, 1);
    // All three VMs on h1: keep the others out while creating.
    bed.sv_ok(&["host", "cordon", "h2"]);
    bed.sv_ok(&["host", "cordon", "h3"]);
    let mut ips = vec![];
    for i in 1..=3 {
        let v = bed.create_vm(&format!("d{i}"), &["--type", "nano"]);
        assert_eq!(host_name(&v), "h1", "{v}");
        ips.push((
            vm_ip(&v),
            guest_json(vm_ip(&v), "/uptime")["boot_id"].clone(),
        ));
    }
    bed.sv_ok(&["host", "uncordon", "h2"]);
    bed.sv_ok(&["host", "uncordon", "h3"]);

    let client = Client::start(ips[0].0);
    let out = bed.sv_json(&["host", "drain", "h1"]);
    assert_eq!(out["state"], "draining", "{out}");
    let report = client.finish();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    for i in 1..=3 {
        let v = bed.instance(&format!("d{i}"));
        assert_ne!(host_name(&v), "h1", "d{i} still on h1: {v}");
        assert_eq!(v["status"]["phase"], "running", "{v}");
    }
    for (ip, boot) in &ips {
        assert_eq!(
            &guest_json(*ip, "/uptime")["boot_id"],
            boot,
            "{ip} rebooted"
        );
    }
    assert!(bed.qemu_pids(1).is_empty(), "h1 still runs QEMUs");
    let drains: Vec<Value> = bed
        .sv_json(&["migration", "list"])
        .as_array()
        .expect("list")
        .iter()
        .filter(|m| m["reason"] == "drain" && m["phase"] == "completed")
        .cloned()
        .collect();
    assert_eq!(drains.len(), 3, "{drains:?}");

    // Nothing new lands on a draining host.
    let v = bed.create_vm("after-drain", &["--type", "nano"]);
    assert_ne!(host_name(&v), "h1", "{v}");
    let out = bed.sv_json(&["host", "undrain", "h1"]);
    assert_eq!(out["state"], "ready", "{out}");

    // Rebalance: h1 is empty, the others hold everything: moves go to h1.
    let plan = bed.sv_json(&["host", "rebalance", "--max-moves", "1"]);
    let moves = plan["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), 1, "{plan}");
    assert_eq!(moves[0]["to"], "h1", "{plan}");
    let name = moves[0]["instance"].as_str().expect("instance").to_string();
    wait_until("the rebalance move", Duration::from_secs(120), || {
        (host_name(&bed.instance(&name)) == "h1").then_some(())
    });
}

#[test]
fn bad_migrations_are_refused_before_anything_starts() {
    let bed = TestBed::start(2, 1);
    let vm = bed.create_vm("stay", &["--type", "nano"]);
    let here = host_name(&vm);
    let other = if here == "h1" { "h2" } else { "h1" };

    let err = bed.sv_err(&["vm", "migrate", "stay", "--to", &here]);
    assert!(err.contains("already runs on host"), "{err}");
    let err = bed.sv_err(&["vm", "migrate", "stay", "--to", "h9"]);
    assert!(err.contains("no host \"h9\" in the pool"), "{err}");
    let err = bed.sv_err(&["vm", "migrate", "stay", "--to", "Not_A_Host"]);
    assert!(err.contains("host"), "{err}");
    let err = bed.sv_err(&["vm", "migrate", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let (status, body) = bed.api("POST", "/v1/instances/stay/migrate", Some("{\"to\": 3}"));
    assert_eq!(status, 400, "{body}");
    let (status, body) = bed.api(
        "POST",
        "/v1/instances/stay/migrate",
        Some("{\"max_bandwidth_mib_s\": 0}"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed"),
        "{body}"
    );
    let (status, body) = bed.api("GET", "/v1/migrations/not-an-id", None);
    assert_eq!(status, 400, "{body}");
    let (status, body) = bed.api(
        "GET",
        "/v1/migrations/6f1c1d2e-0000-4000-8000-000000000000",
        None,
    );
    assert_eq!(status, 404, "{body}");
    let err = bed.sv_err(&["vm", "migrate", "stay", "--cancel"]);
    assert!(err.contains("not migrating"), "{err}");

    // A cordoned destination, and a full one, say why.
    bed.sv_ok(&["host", "cordon", other]);
    let err = bed.sv_err(&["vm", "migrate", "stay", "--to", other]);
    assert!(err.contains("cordoned"), "{err}");
    let err = bed.sv_err(&["vm", "migrate", "stay"]);
    assert!(err.contains("no host can take"), "{err}");
    bed.sv_ok(&["host", "uncordon", other]);
    let free = bed.sv_json(&["host", "show", other])["free"]["memory_mib"]
        .as_u64()
        .expect("free memory");
    bed.sv_ok(&["host", "cordon", &here]);
    bed.sv_json(&[
        "vm",
        "create",
        "filler",
        "--no-start",
        "--vcpus",
        "1",
        "--memory",
        &(free - 64).to_string(),
    ]);
    bed.sv_ok(&["host", "uncordon", &here]);
    let err = bed.sv_err(&["vm", "migrate", "stay", "--to", other]);
    assert!(err.contains("memory free"), "{err}");

    // A stopped VM does not migrate live.
    bed.sv_ok(&["vm", "stop", "stay"]);
    let err = bed.sv_err(&["vm", "migrate", "stay"]);
    assert!(err.contains("only a running VM migrates live"), "{err}");

    // Nothing was recorded, nothing moved.
    let list = bed.sv_json(&["migration", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert_eq!(host_name(&bed.instance("stay")), here);
}

/// Starts a migration of a guest that keeps dirtying memory, capped to a
/// bandwidth that makes it last; returns the record once memory is being
/// copied.
fn start_slow_migration(bed: &TestBed, name: &str, to: &str) -> Value {
    start_slow_migration_of(bed, name, to, 160)
}

/// [`start_slow_migration`] with a memtest of `mib` MiB.
fn start_slow_migration_of(bed: &TestBed, name: &str, to: &str, mib: u32) -> Value {
    let v = bed.instance(name);
    let ip = vm_ip(&v);
    if guest_json(ip, "/memtest")["running"] != true {
        guest_call(
            ip,
            "POST",
            &format!("/memtest/start?mib={mib}&rate_mib_s=0"),
            None,
        );
    }
    let m = bed.sv_json(&[
        "vm",
        "migrate",
        name,
        "--to",
        to,
        "--bandwidth",
        "8",
        "--no-wait",
    ]);
    let id = m["id"].as_str().expect("id").to_string();
    wait_phase(bed, &id, &["transferring"], Duration::from_secs(60))
}

#[test]
fn destination_death_or_a_cut_network_leave_the_vm_running_on_its_source() {
    let bed = TestBed::start(3, 1);
    bed.sv_ok(&["host", "cordon", "h2"]);
    bed.sv_ok(&["host", "cordon", "h3"]);
    let vm = bed.create_vm("survivor", &["--type", "small"]);
    bed.sv_ok(&["host", "uncordon", "h2"]);
    bed.sv_ok(&["host", "uncordon", "h3"]);
    let ip = vm_ip(&vm);
    assert_eq!(host_name(&vm), "h1");
    let boot = guest_json(ip, "/uptime")["boot_id"].clone();
    guest_call(ip, "PUT", "/ram", Some("still-here"));

    // Cancelled mid-transfer: it stays, and says so.
    let m = start_slow_migration(&bed, "survivor", "h2");
    let id = m["id"].as_str().expect("id").to_string();
    let out = bed.sv_json(&["vm", "migrate", "survivor", "--cancel"]);
    assert_eq!(out["id"], id.as_str(), "{out}");
    let m = wait_phase(&bed, &id, &["cancelled"], Duration::from_secs(60));
    assert!(m["result"].is_null(), "{m}");
    assert_eq!(host_name(&bed.instance("survivor")), "h1");
    assert_eq!(guest_json(ip, "/uptime")["boot_id"], boot);
    wait_until(
        "h2 to drop the half-made VM",
        Duration::from_secs(60),
        || bed.qemu_pids(2).is_empty().then_some(()),
    );

    // The destination dies mid-transfer.
    let m = start_slow_migration(&bed, "survivor", "h2");
    let id = m["id"].as_str().expect("id").to_string();
    bed.script_ok(&["host-kill", "2"]);
    let m = wait_phase(&bed, &id, &["failed"], Duration::from_secs(90));
    assert!(m["error"].is_string(), "{m}");
    let v = bed.instance("survivor");
    assert_eq!(host_name(&v), "h1", "{v}");
    assert!(v["spec"]["migration"].is_null(), "{v}");
    assert_eq!(guest_json(ip, "/uptime")["boot_id"], boot);
    assert_eq!(guest_json(ip, "/ram")["value"], "still-here");
    assert_eq!(guest_json(ip, "/memtest")["mismatches"], 0);
    // The destination host comes back without the half-made VM.
    bed.script_ok(&["host-restore", "2"]);
    bed.wait_host_state(2, "ready", Duration::from_secs(60));
    assert!(bed.qemu_pids(2).is_empty(), "h2 kept a destination QEMU");

    // The network between source and destination is cut mid-transfer:
    // the source notices no progress, gives up and runs on.
    let m = start_slow_migration(&bed, "survivor", "h3");
    let id = m["id"].as_str().expect("id").to_string();
    bed.script_ok(&["host-cut", "3"]);
    let m = wait_phase(&bed, &id, &["failed"], Duration::from_secs(120));
    assert!(
        m["error"].as_str().unwrap_or_default().contains("stalled")
            || m["error"].as_str().unwrap_or_default().contains("failed"),
        "{m}"
    );
    let v = bed.instance("survivor");
    assert_eq!(host_name(&v), "h1", "{v}");
    assert_eq!(v["status"]["phase"], "running", "{v}");
    assert_eq!(guest_json(ip, "/uptime")["boot_id"], boot);
    let before = guest_json(ip, "/counter")["value"].as_u64().unwrap_or(0);
    let after = guest_call(ip, "POST", "/counter/increment", None);
    assert_eq!(
        after["value"].as_u64(),
        Some(before + 1),
        "the disk is stuck"
    );
    bed.script_ok(&["host-restore", "3"]);
    bed.wait_host_state(3, "ready", Duration::from_secs(LEASE_TTL * 10 + 60));
    wait_until(
        "h3 to drop the half-made VM",
        Duration::from_secs(60),
        || bed.qemu_pids(3).is_empty().then_some(()),
    );

    // And then it moves for real.
    guest_call(ip, "POST", "/memtest/stop", None);
    migrate(&bed, "survivor", "h3");
    assert_eq!(guest_json(ip, "/uptime")["boot_id"], boot);
    assert_eq!(guest_json(ip, "/ram")["value"], "still-here");
}

#[test]
fn a_restarted_source_agent_takes_the_migration_up_again_and_the_vm_runs_once() {
    let bed = TestBed::start(2, 1);
    bed.sv_ok(&["host", "cordon", "h2"]);
    let vm = bed.create_vm("phoenix", &["--type", "nano"]);
    bed.sv_ok(&["host", "uncordon", "h2"]);
    let ip = vm_ip(&vm);
    assert_eq!(host_name(&vm), "h1");
    let boot = guest_json(ip, "/uptime")["boot_id"].clone();
    guest_call(ip, "PUT", "/ram", Some("survives-the-agent"));

    // The source's agent dies mid-transfer (its QEMUs live on) and comes
    // back: it cancels what QEMU was doing and runs the migration again.
    let m = start_slow_migration_of(&bed, "phoenix", "h2", 24);
    let id = m["id"].as_str().expect("id").to_string();
    bed.script_ok(&["agent-kill", "1"]);
    assert_eq!(
        guest_json(ip, "/uptime")["boot_id"],
        boot,
        "the VM died with its agent"
    );
    // A new agent takes the host's name once the old one's lease is gone.
    bed.wait_host_state(1, "unreachable", Duration::from_secs(LEASE_TTL * 2 + 10));
    bed.script_ok(&["agent-start", "1"]);
    bed.wait_host_state(1, "ready", Duration::from_secs(60));
    let m = wait_phase(
        &bed,
        &id,
        &["completed", "failed"],
        Duration::from_secs(240),
    );
    let v = bed.instance("phoenix");
    let expect_host = if m["phase"] == "completed" {
        "h2"
    } else {
        "h1"
    };
    assert_eq!(host_name(&v), expect_host, "{m}\n{v}");
    assert!(v["spec"]["migration"].is_null(), "{v}");
    // Exactly one QEMU runs it, on the host it is bound to.
    let n = |h: u32| bed.qemu_pids(h).len();
    wait_until("one QEMU for the VM", Duration::from_secs(60), || {
        (n(1) + n(2) == 1).then_some(())
    });
    assert_eq!(n(if expect_host == "h1" { 1 } else { 2 }), 1);
    assert_eq!(guest_json(ip, "/uptime")["boot_id"], boot);
    assert_eq!(guest_json(ip, "/ram")["value"], "survives-the-agent");
    assert_eq!(guest_json(ip, "/memtest")["mismatches"], 0);
}

#[test]
fn volume_backed_vms_migrate_live_and_stopped_ones_leave_a_draining_host() {
    let bed = TestBed::start(3, 1);
    let vm = bed.create_vm("vb", &["--type", "micro", "--disk-replicas", "2"]);
    let ip = vm_ip(&vm);
    let first = host_name(&vm);
    let disk = bed.sv_json(&["volume", "show", "vb-disk"]);
    let replica_hosts: Vec<String> = disk["spec"]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h.as_str().expect("host").to_string())
        .collect();
    assert_eq!(replica_hosts.len(), 2, "{disk}");
    // First to the host without a replica (the disk is then all remote),
    // then back to the first.
    let bare = ["h1", "h2", "h3"]
        .into_iter()
        .find(|h| !replica_hosts.iter().any(|r| r == h))
        .expect("a host without a replica")
        .to_string();
    let order = if bare == first {
        let other = replica_hosts.iter().find(|h| **h != first).expect("other");
        vec![other.clone(), first.clone()]
    } else {
        vec![bare.clone(), first.clone()]
    };
    let before = guest_json(ip, "/uptime");
    guest_call(ip, "PUT", "/ram", Some("kept-in-ram"));
    guest_call(ip, "POST", "/counter/increment", None);

    let client = Client::start(ip);
    let writer = std::thread::spawn(move || {
        let mut acked = 0;
        for _ in 0..30 {
            let v = guest_call(ip, "POST", "/counter/increment", None);
            assert!(v["value"].as_u64().is_some(), "{v}");
            acked += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        acked
    });
    let mut pauses = vec![];
    for to in &order {
        let m = migrate(&bed, "vb", to);
        pauses.push(m["result"]["pause_ms"].as_u64());
        assert_eq!(m["result"]["disk_copied"].as_u64().unwrap_or(0), 0, "{m}");
        let now = bed.instance("vb");
        assert_eq!(&host_name(&now), to, "{now}");
        assert_eq!(now["status"]["phase"], "running", "{now}");
        // The disk follows: served where the VM runs, from a replica there
        // (moved before the switchover), still two replicas in sync.
        let disk = wait_until(
            &format!("vb-disk served by {to}"),
            Duration::from_secs(30),
            || {
                let disk = bed.sv_json(&["volume", "show", "vb-disk"]);
                (disk["primary"] == to.as_str()).then_some(disk)
            },
        );
        assert!(
            disk["spec"]["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h == to.as_str())),
            "no replica followed the VM to {to}: {disk}"
        );
        assert_eq!(disk["spec"]["replicas"], 2, "{disk}");
    }
    let acked = writer.join().expect("writer");
    client.wait_for_requests(40);
    let report = client.finish();
    eprintln!(
        "{} requests, slowest {:?}; pauses {pauses:?}",
        report.requests, report.slowest
    );
    assert!(
        report.requests > 30,
        "the client barely ran: {}",
        report.requests
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed while a volume-backed VM migrated: {:?}",
        report.failures.len(),
        report.requests,
        report.failures
    );
    let after = guest_json(ip, "/uptime");
    assert_eq!(after["boot_id"], before["boot_id"], "the guest rebooted");
    assert_eq!(guest_json(ip, "/ram")["value"], "kept-in-ram");
    assert_eq!(
        guest_json(ip, "/counter")["value"].as_u64(),
        Some(1 + acked),
        "acknowledged disk writes were lost"
    );
    for h in 1..=3u32 {
        let here = format!("h{h}") == first;
        assert_eq!(bed.qemu_pids(h).len(), usize::from(here), "host h{h}");
    }

    // Drain: a stopped volume-backed VM changes hosts too, disk intact.
    let s = bed.create_vm("sleeper", &["--type", "nano", "--disk-replicas", "2"]);
    let sip = vm_ip(&s);
    for _ in 0..3 {
        guest_call(sip, "POST", "/counter/increment", None);
    }
    bed.sv_ok(&["vm", "stop", "sleeper"]);
    let from = host_name(&bed.instance("sleeper"));
    let out = bed.sv_json(&["host", "drain", &from]);
    assert_eq!(out["state"], "draining", "{out}");
    let moved = wait_until(
        "the stopped VM to leave the draining host",
        Duration::from_secs(60),
        || {
            let v = bed.instance("sleeper");
            (host_name(&v) != from && v["status"]["phase"] == "stopped").then_some(v)
        },
    );
    assert_eq!(moved["spec"]["power"], "stopped", "{moved}");
    assert_ne!(
        host_name(&bed.instance("vb")),
        from,
        "the running VM left too"
    );
    bed.sv_ok(&["vm", "start", "sleeper", "--wait"]);
    let started = bed.instance("sleeper");
    assert_eq!(host_name(&started), host_name(&moved), "{started}");
    assert_eq!(
        wait_until("the moved VM's service", Duration::from_secs(120), || {
            crate::harness::http_json("GET", &format!("http://{sip}/counter"), None)
                .ok()
                .and_then(|(status, v)| (status == 200).then_some(v))
        })["value"]
            .as_u64(),
        Some(3),
        "the stopped VM's disk did not follow it"
    );
    // A resize restarts it with the new size on the same host, volume and
    // data included.
    let resized = bed.sv_json(&["vm", "resize", "sleeper", "--type", "micro", "--wait"]);
    assert_eq!(resized["spec"]["resources"]["memory_mib"], 256, "{resized}");
    assert_eq!(host_name(&resized), host_name(&moved), "{resized}");
    assert_eq!(guest_json(sip, "/counter")["value"].as_u64(), Some(3));
    bed.sv_ok(&["host", "undrain", &from]);
}

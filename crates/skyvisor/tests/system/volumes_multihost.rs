//! Replicated volumes across three hosts (in-process agents, real QEMU
//! guests): a VM booting from a 2-replica volume keeps its data while a
//! replica host is down and after it returns (only what changed is
//! resynced), runs on a host without a replica, and after that host dies
//! starts on yet another host with everything it wrote.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{guest_call, guest_json, ip_of, wait_until};
use crate::multihost::MultiHost;

fn replica_states(v: &Value) -> Vec<(String, String)> {
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["host"].as_str().unwrap_or_default().to_owned(),
                        r["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_ready(mh: &MultiHost, vm: &str, host: &str) {
    wait_until(
        &format!("{vm} ready on {host}"),
        Duration::from_secs(300),
        || {
            let v = mh.sv_json(&["vm", "show", vm]);
            let s = &v["status"];
            (s["phase"] == "running" && s["guest_ready"] == true && s["host"] == host).then_some(())
        },
    );
}

#[test]
fn two_replica_root_volume_survives_replica_loss_resyncs_and_moves_hosts() {
    let mut mh = MultiHost::start(3);
    let vol = mh.sv_json(&[
        "volume",
        "create",
        "boot",
        "--size",
        "256M",
        "--replicas",
        "2",
    ]);
    let hosts: Vec<String> = vol["spec"]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    assert_eq!(hosts, vec![mh.host(1), mh.host(2)], "one replica per host");
    assert_eq!(vol["health"], "healthy");

    // The VM lands on a host holding a replica (its reads stay local).
    let created = mh.sv_json(&[
        "vm",
        "create",
        "a",
        "--type",
        "nano",
        "--root-volume",
        "boot",
        "--wait",
        "--timeout",
        "300",
    ]);
    let ip = ip_of(&created);
    assert_eq!(created["spec"]["host"], mh.host(1));
    for want in 1..=3 {
        assert_eq!(
            guest_call(ip, "POST", "/counter/increment", None)["value"],
            want
        );
    }
    let shown = mh.sv_json(&["volume", "show", "boot"]);
    assert_eq!(shown["primary"], mh.host(1));
    assert!(
        shown["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .any(|r| r["host"] == mh.host(1).as_str() && r["read_source"] == true),
        "reads are local: {shown}"
    );

    // host-2 (the other replica) dies: writes go on, acknowledged by host-1.
    mh.kill_host(2);
    for want in 4..=6 {
        assert_eq!(
            guest_call(ip, "POST", "/counter/increment", None)["value"],
            want,
            "writes must go on with one in-sync replica"
        );
    }
    let degraded = mh.sv_json(&["volume", "show", "boot"]);
    assert_eq!(degraded["health"], "degraded", "{degraded}");
    let states = replica_states(&degraded);
    assert!(
        states
            .iter()
            .any(|(h, s)| h == &mh.host(2) && (s == "unreachable" || s == "out-of-sync")),
        "{states:?}"
    );

    // It returns: only the regions written meanwhile are copied.
    mh.start_host(2);
    let healed = wait_until("host-2 back in sync", Duration::from_secs(60), || {
        let v = mh.sv_json(&["volume", "show", "boot"]);
        (v["health"] == "healthy" && v["primary"] == mh.host(1).as_str()).then_some(v)
    });
    let resynced = healed["resynced_bytes"].as_u64().expect("resynced_bytes");
    eprintln!("resync after host-2 returned copied {resynced} bytes");
    assert!(
        resynced > 0 && resynced <= 32 << 20,
        "resynced {resynced} bytes of a 256 MiB volume: only what changed should be copied"
    );

    // Stop; both replicas hold the same bytes.
    mh.sv_ok(&["vm", "stop", "a"]);
    wait_until("volume released", Duration::from_secs(30), || {
        mh.sv_json(&["volume", "show", "boot"])["primary"]
            .is_null()
            .then_some(())
    });
    let id = vol["spec"]["id"].as_str().expect("id").replace('-', "");
    let data = |i: usize| {
        std::fs::read(
            mh.host_dir(i)
                .join("replicas/volumes")
                .join(&id)
                .join("data.img"),
        )
        .expect("replica data")
    };
    assert!(data(1) == data(2), "the replicas differ after the resync");

    // Start it on host-3, which holds no replica: served over the network.
    mh.rebind("a", 3);
    mh.sv_ok(&["vm", "start", "a"]);
    wait_ready(&mh, "a", &mh.host(3));
    assert_eq!(guest_json(ip, "/counter")["value"], 6);
    assert_eq!(
        guest_call(ip, "POST", "/counter/increment", None)["value"],
        7
    );
    let before = mh.sv_json(&["volume", "show", "boot"]);
    assert_eq!(before["primary"], mh.host(3));

    // host-3 dies with the VM running; once its lease expired the VM
    // starts on host-2, taking the volume over, with every acknowledged write.
    mh.kill_host(3);
    mh.rebind("a", 2);
    wait_ready(&mh, "a", &mh.host(2));
    assert_eq!(
        guest_json(ip, "/counter")["value"],
        7,
        "an acknowledged write was lost in the failover"
    );
    let after = mh.sv_json(&["volume", "show", "boot"]);
    assert_eq!(after["primary"], mh.host(2));
    assert!(
        after["epoch"].as_u64() > before["epoch"].as_u64(),
        "the takeover bumps the epoch: {before} -> {after}"
    );
    assert_eq!(after["health"], "healthy", "{after}");
}

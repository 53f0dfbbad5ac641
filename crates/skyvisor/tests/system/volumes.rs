//! Replicated volumes on one host with real guests: a VM booting from a
//! volume keeps its data across stop/start; a volume hot-plugged into a
//! running VM, written by the guest, unplugged and plugged into another VM
//! still holds the data; snapshots; and every bad request is refused with
//! its reason, leaving nothing behind.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cloud, guest_json, http, wait_until};

/// The guest device (`vdb`...) whose serial is `serial`, if plugged.
pub(crate) fn device_with_serial(ip: Ipv4Addr, serial: &str) -> Option<String> {
    let list = guest_json(ip, "/blk");
    list.as_array()?
        .iter()
        .find(|d| d["serial"] == serial)
        .and_then(|d| d["name"].as_str().map(str::to_owned))
}

pub(crate) fn guest_put(ip: Ipv4Addr, path: &str, body: &str) {
    let (status, text) = http(
        "PUT",
        &format!("http://{ip}{path}"),
        Some(body),
        Duration::from_secs(30),
    )
    .expect("guest reachable");
    assert_eq!(status, 200, "PUT {path}: {text}");
}

fn guest_get(ip: Ipv4Addr, path: &str) -> String {
    let (status, text) = http(
        "GET",
        &format!("http://{ip}{path}"),
        None,
        Duration::from_secs(30),
    )
    .expect("guest reachable");
    assert_eq!(status, 200, "GET {path}: {text}");
    text
}

fn volume(cloud: &Cloud, name: &str) -> Value {
    cloud.sv_json(&["volume", "show", name])
}

#[test]
fn root_volume_keeps_data_and_a_volume_moves_between_vms() {
    let cloud = Cloud::start();
    let created = cloud.sv_json(&["volume", "create", "root1", "--size", "256M"]);
    assert_eq!(created["status"]["phase"], "available", "{created}");
    assert_eq!(created["health"], "healthy");
    assert_eq!(created["replicas"][0]["host"], cloud.host.as_str());
    cloud.sv_json(&["volume", "create", "data", "--size", "64M"]);

    // A VM booting from a 1-replica volume: the counter lives on it.
    let ip = cloud.create_vm("a", &["--type", "nano", "--root-volume", "root1"]);
    let inst = cloud.instance("a");
    assert_eq!(inst["spec"]["volumes"][0]["name"], "root1");
    assert_eq!(inst["spec"]["volumes"][0]["root"], true);
    let shown = volume(&cloud, "root1");
    assert_eq!(shown["attached_to"]["instance"], "a");
    assert_eq!(shown["primary"], cloud.host.as_str(), "{shown}");
    for want in 1..=3 {
        let v = crate::harness::guest_call(ip, "POST", "/counter/increment", None);
        assert_eq!(v["value"], want);
    }
    // No local root disk was made: the volume is the disk.
    let id = inst["spec"]["id"].as_str().expect("id").replace('-', "");
    assert!(
        !cloud
            .data_dir
            .join("agent/vms")
            .join(&id)
            .join("root.qcow2")
            .exists()
    );
    cloud.sv_json(&["vm", "stop", "a"]);
    let stopped = volume(&cloud, "root1");
    assert_eq!(stopped["attached_to"]["instance"], "a", "still attached");
    wait_until(
        "root1 released by the stopped VM",
        Duration::from_secs(30),
        || volume(&cloud, "root1")["primary"].is_null().then_some(()),
    );
    cloud.sv_ok(&["vm", "start", "a", "--wait"]);
    assert_eq!(
        guest_json(ip, "/counter")["value"],
        3,
        "the counter on the root volume was lost"
    );

    // A running VM cannot have its volume grown or its root detached.
    let err = cloud.sv_err(&["volume", "grow", "root1", "--size", "512M"]);
    assert!(err.contains("which is running; stop it first"), "{err}");
    let err = cloud.sv_err(&["vm", "detach-volume", "a", "root1"]);
    assert!(
        err.contains("root disk of VM \"a\", which is running"),
        "{err}"
    );

    // Hot-plug a second volume, write through the guest, snapshot it.
    cloud.sv_ok(&["vm", "attach-volume", "a", "data"]);
    let dev = wait_until("data in the guest", Duration::from_secs(30), || {
        device_with_serial(ip, "data")
    });
    assert_eq!(dev, "vdb");
    guest_put(ip, &format!("/blk/{dev}?offset=1048576"), "written by a");
    assert_eq!(
        guest_get(ip, &format!("/blk/{dev}?offset=1048576&len=12")),
        "written by a"
    );
    let snap = cloud.sv_json(&["volume", "snapshot", "create", "data", "s1"]);
    assert_eq!(snap["name"], "s1");
    assert_eq!(snap["hosts"][0], cloud.host.as_str());
    // The guest service's VM has no guest agent to freeze it.
    assert_eq!(snap["consistency"], "crash", "{snap}");
    let list = cloud.sv_json(&["volume", "snapshot", "list", "data"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let err = cloud.sv_err(&["volume", "snapshot", "create", "data", "s1"]);
    assert!(err.contains("already has a snapshot"), "{err}");

    // Unplug: the guest loses the disk and the volume is free.
    cloud.sv_ok(&["vm", "detach-volume", "a", "data"]);
    assert!(device_with_serial(ip, "data").is_none(), "still plugged");
    assert!(volume(&cloud, "data")["attached_to"].is_null());
    assert_eq!(
        guest_json(ip, "/counter")["value"],
        3,
        "root volume untouched"
    );

    // Another VM gets it and reads what the first one wrote.
    let ip_b = cloud.create_vm("b", &["--type", "nano", "--volume", "data"]);
    let dev_b = device_with_serial(ip_b, "data").expect("data plugged into b");
    assert_eq!(
        guest_get(ip_b, &format!("/blk/{dev_b}?offset=1048576&len=12")),
        "written by a"
    );
    let err = cloud.sv_err(&["vm", "attach-volume", "a", "data"]);
    assert!(
        err.contains("already attached to VM \"b\""),
        "attached twice read-write: {err}"
    );
    let err = cloud.sv_err(&["volume", "delete", "data"]);
    assert!(err.contains("attached to VM \"b\""), "{err}");

    // Deleting the VMs keeps the volumes; deleting the volumes removes
    // their replicas and snapshots.
    cloud.sv_ok(&["vm", "delete", "a", "--force"]);
    cloud.sv_ok(&["vm", "delete", "b", "--force"]);
    assert!(volume(&cloud, "root1")["attached_to"].is_null());
    cloud.sv_ok(&["volume", "snapshot", "delete", "data", "s1"]);
    cloud.sv_ok(&["volume", "delete", "data"]);
    cloud.sv_ok(&["volume", "delete", "root1"]);
    let all = cloud.sv_json(&["volume", "list"]);
    assert_eq!(all.as_array().map(Vec::len), Some(0), "{all}");

    // The record has each volume's life, and usage meters its storage from
    // it: 320 MiB on one replica, for less than the time since root1 was
    // created; the snapshot's copy, and the demo image `up` built.
    let events = cloud.sv_json(&["event", "list"]);
    let story: Vec<String> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["object"] == "volume" || e["object"] == "volume-snapshot")
        .map(|e| format!("{} {} {}", e["kind"], e["object"], e["name"]).replace('"', ""))
        .collect();
    assert_eq!(
        story,
        [
            "created volume root1",
            "created volume data",
            "created volume-snapshot data/s1",
            "deleted volume-snapshot data/s1",
            "deleted volume data",
            "deleted volume root1",
        ],
        "{events}"
    );
    let created: chrono::DateTime<chrono::Utc> = created["spec"]["created_at"]
        .as_str()
        .expect("created_at")
        .parse()
        .expect("time");
    let lived = (chrono::Utc::now() - created).num_milliseconds() as f64 / 1000.0;
    let usage = cloud.sv_json(&["usage"]);
    let quantity = |meter: &str| -> f64 {
        usage["lines"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["meter"] == meter))
            .and_then(|x| x["quantity"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no {meter} in {usage}"))
    };
    let volume_gib_s = quantity("volume-storage");
    assert!(
        volume_gib_s > 0.0 && volume_gib_s < lived * 320.0 / 1024.0,
        "{volume_gib_s} GiB-s of volumes in {lived} s: {usage}"
    );
    assert!(quantity("snapshot-storage") > 0.0, "{usage}");
    assert!(quantity("image-storage") > 0.0, "{usage}");
    let replicas = cloud.data_dir.join("agent/replicas/volumes");
    wait_until("replica files removed", Duration::from_secs(10), || {
        std::fs::read_dir(&replicas)
            .map(|d| d.count() == 0)
            .unwrap_or(true)
            .then_some(())
    });
}

#[test]
fn bad_volume_requests_are_refused_and_leave_nothing() {
    let cloud = Cloud::start();
    let refused = |args: &[&str], want: &str| {
        let err = cloud.sv_err(args);
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["volume", "create", "v", "--size", "1G", "--replicas", "2"],
        "2 replicas need 2 hosts (one replica per host); the pool has 1",
    );
    refused(
        &["volume", "create", "v", "--size", "1G", "--replicas", "4"],
        "allowed: 1 to 3",
    );
    refused(&["volume", "create", "v", "--size", "10T"], "GiB disk free");
    refused(&["volume", "create", "v", "--size", "1000"], "out of range");
    refused(
        &["volume", "create", "v", "--size", "1500K"],
        "whole number of MiB",
    );
    refused(
        &["volume", "create", "Bad_Name", "--size", "1G"],
        "invalid volume name",
    );
    refused(
        &[
            "volume",
            "create",
            "v",
            "--size",
            "1G",
            "--min-in-sync",
            "2",
        ],
        "min_in_sync",
    );
    refused(&["volume", "show", "nope"], "volume \"nope\" not found");
    refused(&["volume", "delete", "nope"], "not found");
    refused(&["volume", "grow", "nope", "--size", "2G"], "not found");
    refused(&["volume", "snapshot", "create", "nope", "s"], "not found");

    cloud.sv_json(&["volume", "create", "v", "--size", "128M"]);
    refused(&["volume", "create", "v", "--size", "1G"], "already exists");
    refused(
        &["volume", "grow", "v", "--size", "64M"],
        "volumes only grow",
    );
    refused(
        &["volume", "snapshot", "create", "v", "Bad/Name"],
        "invalid snapshot name",
    );
    refused(
        &["vm", "create", "x", "--root-volume", "nope", "--no-start"],
        "volume \"nope\" not found",
    );
    refused(
        &[
            "vm",
            "create",
            "x",
            "--volume",
            "v",
            "--volume",
            "v",
            "--no-start",
        ],
        "given twice",
    );
    let (status, body) = cloud.api(
        "POST",
        "/v1/instances",
        Some(r#"{"name":"x","image":"debian-busybox","instance_type":"nano","root_volume":"v","disk_gib":4,"start":false}"#),
    );
    assert_eq!(status, 400, "{body}");

    // A stopped VM holds the volume: nobody else may take it, nor delete it.
    let vm = cloud.sv_json(&[
        "vm",
        "create",
        "x",
        "--type",
        "nano",
        "--volume",
        "v",
        "--no-start",
    ]);
    assert_eq!(vm["spec"]["volumes"][0]["name"], "v");
    refused(
        &["vm", "create", "y", "--volume", "v", "--no-start"],
        "already attached to VM \"x\"",
    );
    refused(&["volume", "delete", "v"], "attached to VM \"x\"");
    refused(&["vm", "attach-volume", "x", "v"], "already attached");
    refused(&["vm", "attach-volume", "nope", "v"], "not found");
    refused(&["vm", "detach-volume", "x", "nope"], "not attached");
    // Growing while its VM is stopped is fine.
    let grown = cloud.sv_json(&["volume", "grow", "v", "--size", "256M"]);
    assert_eq!(grown["status"]["size_bytes"], 256u64 << 20, "{grown}");
    // Detaching from a stopped VM frees it at once.
    cloud.sv_ok(&["vm", "detach-volume", "x", "v"]);
    assert!(volume(&cloud, "v")["attached_to"].is_null());
    cloud.sv_ok(&["vm", "delete", "x"]);

    // Nothing of the refused requests exists.
    let vols = cloud.sv_json(&["volume", "list"]);
    let names: Vec<&str> = vols
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["spec"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["v"]);
    let vms = cloud.sv_json(&["vm", "list"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(0), "{vms}");
    cloud.sv_ok(&["volume", "delete", "v"]);
    let (status, _) = cloud.api("GET", "/v1/volumes/v", None);
    assert_eq!(status, 404);
}

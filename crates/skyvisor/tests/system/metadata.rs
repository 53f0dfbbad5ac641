//! The instance metadata service at 169.254.169.254 with real guests on a
//! real host: each VM reads only its own metadata, on the cluster network
//! and on projects' private networks (two of which give their VMs the same
//! address), and a VM that sends from another's address gets nothing.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cloud, http_json, ip_of};
use crate::networks::via_router;

const METADATA: &str = "http://169.254.169.254";

/// Where a guest is reached from: the host (cluster network) or its
/// private network's router.
#[derive(Clone, Copy)]
enum Reach {
    Host,
    Router(u32),
}

/// What the guest at `ip` gets from the metadata service at `path`
/// (sending from `from` if given): (status, body), or None when it got
/// no answer at all.
fn metadata_seen(
    reach: Reach,
    ip: Ipv4Addr,
    path: &str,
    from: Option<Ipv4Addr>,
) -> Option<(u16, String)> {
    let mut fetch = format!("/fetch?url={METADATA}{path}");
    if let Some(f) = from {
        fetch.push_str(&format!("&from={f}"));
    }
    let (status, text) = match reach {
        Reach::Host => {
            let (s, v) = crate::harness::http(
                "GET",
                &format!("http://{ip}{fetch}"),
                None,
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("guest {ip}: {e}"));
            (s, v)
        }
        Reach::Router(vni) => via_router(vni, ip, &fetch)
            .unwrap_or_else(|| panic!("guest {ip} does not answer its router")),
    };
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&text).expect("fetch answer");
    Some((
        u16::try_from(v["status"].as_u64().expect("status")).expect("status"),
        v["body"].as_str().expect("body").to_string(),
    ))
}

/// The body of a 200 answer at `path` for the guest at `ip`.
fn own(reach: Reach, ip: Ipv4Addr, path: &str) -> String {
    match metadata_seen(reach, ip, path, None) {
        Some((200, body)) => body,
        other => panic!("guest {ip} asked {path}: {other:?}"),
    }
}

#[test]
fn each_vm_reads_only_its_own_metadata_and_a_forged_address_gets_nothing() {
    let cloud = Cloud::start();
    let tmp = tempfile::tempdir().expect("tmp");
    for p in ["alpha", "beta"] {
        cloud.sv_ok(&["project", "create", p]);
    }
    let key_file = tmp.path().join("mine");
    cloud.sv_ok(&[
        "--project",
        "alpha",
        "keypair",
        "create",
        "mine",
        "--out",
        key_file.to_str().expect("path"),
    ]);
    let public_key =
        cloud.sv_json(&["--project", "alpha", "keypair", "show", "mine"])["public_key"]
            .as_str()
            .expect("public key")
            .to_string();
    let user_data = tmp.path().join("user-data");
    std::fs::write(&user_data, "#!/bin/sh\necho configured by user data\n").expect("user data");

    let vm = |project: &str, name: &str, extra: &[&str]| -> (Value, Ipv4Addr, Reach) {
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
        let reach = match v["spec"]["network"]["vni"].as_u64() {
            Some(vni) => Reach::Router(u32::try_from(vni).expect("vni")),
            None => Reach::Host,
        };
        (v.clone(), ip_of(&v), reach)
    };
    let (a1, a1_ip, a_net) = vm(
        "alpha",
        "a1",
        &[
            "--key",
            "mine",
            "--user-data",
            user_data.to_str().expect("path"),
            "--hostname",
            "a1-host",
        ],
    );
    let (a2, a2_ip, _) = vm("alpha", "a2", &[]);
    let (b1, b1_ip, b_net) = vm("beta", "b1", &[]);
    let (c1, c1_ip, c_net) = vm("default", "c1", &[]);
    assert_eq!(a1_ip, b1_ip, "the two projects' first VMs share an address");
    assert!(
        matches!(c_net, Reach::Host),
        "the default project's VM is on the cluster network"
    );
    let id = |v: &Value| v["spec"]["id"].as_str().expect("id").to_string();

    // Each VM reads its own id, however many share its address.
    let instance_id = "/latest/meta-data/instance-id";
    assert_eq!(own(a_net, a1_ip, instance_id), id(&a1));
    assert_eq!(own(b_net, b1_ip, instance_id), id(&b1));
    assert_eq!(own(a_net, a2_ip, instance_id), id(&a2));
    assert_eq!(own(c_net, c1_ip, instance_id), id(&c1));

    // What a1 was given at create, EC2's way.
    assert_eq!(own(a_net, a1_ip, "/latest/meta-data/hostname"), "a1-host");
    assert_eq!(
        own(a_net, a1_ip, "/latest/meta-data/local-ipv4"),
        a1_ip.to_string()
    );
    assert_eq!(own(a_net, a1_ip, "/latest/meta-data/instance-type"), "nano");
    assert_eq!(
        own(a_net, a1_ip, "/latest/meta-data/public-keys/"),
        "0=mine/"
    );
    assert_eq!(
        own(a_net, a1_ip, "/latest/meta-data/public-keys/0/openssh-key").trim(),
        public_key.trim()
    );
    assert_eq!(
        own(a_net, a1_ip, "/latest/user-data"),
        "#!/bin/sh\necho configured by user data\n"
    );
    let doc: Value = serde_json::from_str(&own(
        a_net,
        a1_ip,
        "/latest/dynamic/instance-identity/document",
    ))
    .expect("identity document");
    assert_eq!(doc["instanceId"], id(&a1).as_str());
    assert_eq!(doc["accountId"], "alpha");
    // ...and nothing of it reaches b1 at the same address, or a2 beside it.
    assert_eq!(own(b_net, b1_ip, "/latest/meta-data/hostname"), "b1");
    assert_eq!(
        metadata_seen(b_net, b1_ip, "/latest/user-data", None).map(|a| a.0),
        Some(404)
    );
    assert_eq!(
        metadata_seen(a_net, a2_ip, "/latest/meta-data/public-keys/", None).map(|a| a.0),
        Some(404)
    );
    assert_eq!(
        own(c_net, c1_ip, "/latest/meta-data/local-ipv4"),
        c1_ip.to_string()
    );

    // a2 naming its own address as the source is answered (the guest's
    // way of sending from an address works)...
    assert_eq!(
        metadata_seen(a_net, a2_ip, instance_id, Some(a2_ip)),
        Some((200, id(&a2)))
    );
    // ...but sending from a1's is dropped at its tap: no answer at all,
    // while a2 (and a1) still read their own.
    let forged = metadata_seen(a_net, a2_ip, instance_id, Some(a1_ip));
    assert_eq!(forged, None, "a2 forging a1's address got an answer");
    let other_vm = metadata_seen(
        c_net,
        c1_ip,
        instance_id,
        Some(Ipv4Addr::from(u32::from(c1_ip) + 1)),
    );
    assert_eq!(
        other_vm, None,
        "c1 forging a neighbour's address got an answer"
    );
    assert_eq!(own(a_net, a2_ip, instance_id), id(&a2));
    assert_eq!(own(a_net, a1_ip, instance_id), id(&a1));

    // The host's own port for the service is not open to the host's side.
    let gateway: Ipv4Addr = c1["spec"]["network"]["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .expect("gateway");
    let direct = http_json(
        "GET",
        &format!(
            "http://{gateway}:{}{instance_id}",
            skyvisor_net::METADATA_PORT
        ),
        None,
    );
    assert!(
        direct.is_err(),
        "the host reached the metadata listener: {direct:?}"
    );
}

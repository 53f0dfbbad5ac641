//! Projects' private networks and the instance firewall on the real Linux
//! datapath (bridges, veths, namespaces, nftables), with network
//! namespaces standing in for instances: the whole test runs in a network
//! namespace of its own, so it touches nothing of the machine's.
//!
//! Guest-booting tests of the same behaviour live in the system tests;
//! these cover what guests cannot easily do (forged addresses) and run in
//! seconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use skyvisor_core::firewall::{AllowRule, Protocol};
use skyvisor_core::network::PRIVATE_VNI_BASE;
use skyvisor_core::{Ipv4Net, MacAddr};
use skyvisor_net::{
    FirewallConfig, HostNetwork, InboundFilter, LinuxNetwork, PrivateNetworkConfig, TapGuard,
    private_devices,
};

mod common;
use common::sh;

/// An "instance": a namespace with one veth on `bridge`, named like a tap.
struct Instance {
    ns: String,
    servers: std::cell::RefCell<Vec<std::process::Child>>,
    tap: String,
    ip: Ipv4Addr,
    mac: MacAddr,
}

impl Instance {
    fn new(tag: &str, name: &str, bridge: &str, ip: Ipv4Addr, gw: Ipv4Addr, mac_byte: u8) -> Self {
        let ns = format!("svtest-{tag}-{name}");
        let tap = format!("svt{name}{}", &tag[..tag.len().min(4)]);
        let mac = MacAddr([0x52, 0x54, 0x00, 0x77, 0x00, mac_byte]);
        sh(&format!("ip netns add {ns}"));
        sh(&format!(
            "ip link add {tap} type veth peer name eth0 netns {ns} && \
             ip link set {tap} master {bridge} up && \
             ip -n {ns} link set eth0 address {mac} && \
             ip -n {ns} addr add {ip}/24 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && \
             ip -n {ns} route add default via {gw}"
        ));
        Self {
            ns,
            servers: Default::default(),
            tap,
            ip,
            mac,
        }
    }

    /// Serves its name on `port` (TCP) until the namespace goes.
    fn serve(&self, name: &str, port: u16) {
        let script = format!(
            "import socket\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0',{port})); s.listen(16)\n\
             while True:\n  c,a=s.accept(); c.sendall(('{name} '+a[0]).encode()); c.close()\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", "-c", &script])
            .spawn()
            .expect("start server");
        self.servers.borrow_mut().push(child);
    }

    /// What `addr` answers to a connection from this instance (None: no
    /// answer within a second). `from` binds another source address.
    fn fetch(&self, addr: SocketAddr, from: Option<Ipv4Addr>) -> Option<String> {
        let bind = from.map_or(String::new(), |ip| format!("s.bind(('{ip}',0))\n"));
        let script = format!(
            "import socket\n\
             s=socket.socket(); s.settimeout(1.0)\n\
             {bind}\
             s.connect(('{}',{})); print(s.recv(100).decode())\n",
            addr.ip(),
            addr.port()
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "python3", "-c", &script])
            .output()
            .expect("run client");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for mut child in self.servers.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Waits until `check` holds, or fails naming `what`.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("subnet")
}

#[test]
fn private_networks_isolate_projects_nat_out_and_filter_forged_and_unwanted_traffic() {
    // The scenario runs in a network namespace of its own: this test runs
    // itself again in a fresh namespace, and that run does the work.
    if std::env::var_os(IN_NAMESPACE).is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(scenario());
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    // `ip netns exec` also mounts the namespace's own /sys, which is where
    // the code under test looks for devices.
    let ns = format!("svtest-run-{}", std::process::id());
    sh(&format!("ip netns add {ns}"));
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args([
            "private_networks_isolate_projects_nat_out_and_filter_forged_and_unwanted_traffic",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(IN_NAMESPACE, "1")
        .status()
        .expect("run ip netns exec (needs root)");
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(status.success(), "the scenario failed in its namespace");
}

/// Set in the run that happens inside the test's own namespace.
const IN_NAMESPACE: &str = "SKYVISOR_TEST_IN_NETNS";

async fn scenario() {
    sh("ip link set lo up");
    let tag = format!("{}", std::process::id());
    let linux = LinuxNetwork::new();
    // Two projects' networks with the same subnet.
    let subnet = net("10.77.0.0/24");
    let (va, vb) = (PRIVATE_VNI_BASE + 7, PRIVATE_VNI_BASE + 8);
    for vni in [va, vb] {
        linux
            .ensure_private_network(&PrivateNetworkConfig {
                vni,
                subnet,
                overlay: None,
            })
            .await
            .expect("private network");
    }
    // Idempotent: a second pass changes nothing and fails nothing.
    linux
        .ensure_private_network(&PrivateNetworkConfig {
            vni: va,
            subnet,
            overlay: None,
        })
        .await
        .expect("again");
    let (da, db) = (private_devices(va), private_devices(vb));
    let gw = subnet.gateway();
    // "The outside": a namespace behind an uplink of the host.
    let outside = format!("svtest-{tag}-out");
    sh(&format!(
        "ip netns add {outside} && ip link add testuplink type veth peer name eth0 netns {outside} && \
         ip addr add 198.51.100.254/24 dev testuplink && ip link set testuplink up && \
         ip -n {outside} addr add 198.51.100.1/24 dev eth0 && ip -n {outside} link set eth0 up && \
         ip -n {outside} link set lo up"
    ));
    let a1 = Instance::new(&tag, "a1", &da.bridge, Ipv4Addr::new(10, 77, 0, 2), gw, 1);
    let a2 = Instance::new(&tag, "a2", &da.bridge, Ipv4Addr::new(10, 77, 0, 3), gw, 2);
    // Project B's instance has a2's address.
    let b1 = Instance::new(&tag, "b1", &db.bridge, Ipv4Addr::new(10, 77, 0, 3), gw, 3);
    for (i, name) in [(&a1, "a1"), (&a2, "a2"), (&b1, "b1")] {
        i.serve(name, 80);
        i.serve(name, 81);
    }
    let outside_server = Instance {
        ns: outside.clone(),
        servers: Default::default(),
        tap: String::new(),
        ip: Ipv4Addr::new(198, 51, 100, 1),
        mac: MacAddr([0; 6]),
    };
    outside_server.serve("outside", 80);
    let web = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));

    // Inside a project: reachable. Across projects: the same address is
    // another instance, and a's other address is nobody.
    eventually("a1 to reach a2", || {
        a1.fetch(web(a2.ip, 80), None)
            .is_some_and(|s| s.starts_with("a2 "))
    });
    assert_eq!(
        b1.fetch(web(a1.ip, 80), None),
        None,
        "project B reached project A's instance"
    );
    // Out through NAT: the outside sees the host's address, never 10.77.
    let seen = a1
        .fetch(web(outside_server.ip, 80), None)
        .expect("a1 reaches the outside");
    assert_eq!(seen, "outside 198.51.100.254", "the router must masquerade");
    let seen = b1
        .fetch(web(outside_server.ip, 80), None)
        .expect("b1 reaches the outside");
    assert_eq!(seen, "outside 198.51.100.254");
    // The host has no way into a private network; the router has.
    assert!(
        std::net::TcpStream::connect_timeout(&web(a1.ip, 80), Duration::from_millis(500)).is_err(),
        "the host reached a private instance"
    );
    let mut stream =
        skyvisor_net::connect_in_namespace(&da.namespace, web(a2.ip, 80), Duration::from_secs(2))
            .await
            .expect("connect from the router");
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
        .await
        .expect("read");
    assert!(answer.starts_with("a2 10.77.0.1"), "{answer}");
    // The outside cannot open connections into a router.
    assert_eq!(
        outside_server.fetch(web(da.uplink_address, 22), None),
        None,
        "the outside reached a router"
    );

    // Guards: a forged source address or MAC goes nowhere.
    let guard = |i: &Instance| TapGuard {
        tap: i.tap.clone(),
        mac: i.mac,
        ip: i.ip,
    };
    let mut config = FirewallConfig {
        scope: "test".into(),
        guards: vec![guard(&a1), guard(&a2), guard(&b1)],
        filters: vec![],
    };
    linux.apply_firewall(&config).await.expect("firewall");
    sh(&format!("ip -n {} addr add 10.77.0.9/24 dev eth0", a1.ns));
    assert_eq!(
        a1.fetch(web(a2.ip, 80), Some(Ipv4Addr::new(10, 77, 0, 9))),
        None,
        "a forged source address passed"
    );
    assert!(
        a1.fetch(web(a2.ip, 80), None).is_some(),
        "the guard blocked a1's own address"
    );
    sh(&format!(
        "ip -n {} link set eth0 address 52:54:00:77:00:99 && ip -n {} neigh flush all && ip -n {} neigh flush all",
        a1.ns, a1.ns, a2.ns
    ));
    assert_eq!(a1.fetch(web(a2.ip, 80), None), None, "a forged MAC passed");
    sh(&format!(
        "ip -n {} link set eth0 address {} && ip -n {} neigh flush all",
        a1.ns, a1.mac, a1.ns
    ));
    eventually("a1 to reach a2 with its own MAC again", || {
        a1.fetch(web(a2.ip, 80), None).is_some()
    });

    // Security group on a2: port 80 from a1 only; 81 closed; then opened.
    let from = |ip: Ipv4Addr| Ipv4Net {
        network: ip,
        prefix_len: 32,
    };
    config.filters = vec![InboundFilter {
        instance: "a2".into(),
        bridge: da.bridge.clone(),
        ip: a2.ip,
        platform: Some(gw),
        allow: vec![AllowRule {
            protocol: Protocol::Tcp,
            ports: Some((80, 80)),
            sources: vec![from(a1.ip)],
        }],
    }];
    linux.apply_firewall(&config).await.expect("firewall");
    assert!(
        a1.fetch(web(a2.ip, 80), None).is_some(),
        "the rule's port is closed"
    );
    assert_eq!(
        a1.fetch(web(a2.ip, 81), None),
        None,
        "a port without a rule is open"
    );
    // The router (the host's health checks) is always let in.
    assert!(
        skyvisor_net::connect_in_namespace(&da.namespace, web(a2.ip, 81), Duration::from_secs(2))
            .await
            .is_ok(),
        "the router was filtered"
    );
    // a2 still reaches out (answers pass), while nothing new comes in.
    assert!(
        a2.fetch(web(a1.ip, 81), None).is_some(),
        "a2's own connections broke"
    );
    config.filters[0].allow.push(AllowRule {
        protocol: Protocol::Tcp,
        ports: Some((81, 81)),
        sources: vec![Ipv4Net {
            network: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        }],
    });
    linux.apply_firewall(&config).await.expect("firewall");
    assert!(
        a1.fetch(web(a2.ip, 81), None).is_some(),
        "an added rule did not open its port"
    );
    // B's instance with a2's address is not filtered by A's group: the
    // filter is bound to A's bridge.
    let b2 = Instance::new(&tag, "b2", &db.bridge, Ipv4Addr::new(10, 77, 0, 4), gw, 4);
    eventually("b2 to reach b1's closed-in-A port", || {
        b2.fetch(web(b1.ip, 81), None)
            .is_some_and(|s| s.starts_with("b1 "))
    });
    drop(b2);

    drop((a1, a2, b1, outside_server));
    for vni in [va, vb] {
        linux.remove_private_network(vni).await.expect("remove");
        assert!(
            !std::path::Path::new("/sys/class/net")
                .join(private_devices(vni).bridge)
                .exists(),
            "the bridge is left behind"
        );
    }
    let namespaces = sh("ip netns list");
    assert!(
        !namespaces.contains(&da.namespace),
        "the router is left behind: {namespaces}"
    );
}

//! [`HostNetwork`] on Linux through iproute2 and nftables.
//!
//! Commands rather than netlink: they are stable across kernel and crate
//! versions, idempotent when used as below, and their errors read well.

use std::path::Path;

use async_trait::async_trait;
use tokio::process::Command;
use tracing::debug;

use std::net::Ipv4Addr;

use skyvisor_core::MacAddr;

use crate::{
    BridgeConfig, DNS_PORT, FirewallConfig, HostNetwork, METADATA_ADDRESS, METADATA_PORT, NetError,
    OverlayConfig, PrivateNetworkConfig, ROUTER_GATEWAY_PORT, private_devices, validate_ifname,
};

/// The host's real network.
#[derive(Debug, Clone, Default)]
pub struct LinuxNetwork;

impl LinuxNetwork {
    /// A handle on the host's network.
    pub fn new() -> Self {
        Self
    }
}

/// Runs `program args...`, feeding `stdin` if given; fails with its stderr.
async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use tokio::io::AsyncWriteExt;
    let command = format!("{program} {}", args.join(" "));
    debug!(%command, "net command");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::ToolMissing {
                tool: program.to_string(),
            }
        } else {
            NetError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            }
        }
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| NetError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether link `name` is already up and a port of `bridge` (a VM restarted
/// on its tap, e.g. for a restore): then there is nothing to run.
fn attached_and_up(name: &str, bridge: &str) -> bool {
    let dir = Path::new("/sys/class/net").join(name);
    let master = std::fs::read_link(dir.join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let up = std::fs::read_to_string(dir.join("flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 0x1 != 0);
    up && master.as_deref() == Some(bridge)
}

/// The nftables table name for a bridge's NAT rules.
fn nat_table(bridge: &str) -> String {
    format!("skyvisor-{bridge}")
}

#[async_trait]
impl HostNetwork for LinuxNetwork {
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetError> {
        validate_ifname(&bridge.name)?;
        if !link_exists(&bridge.name) {
            // A concurrent creator may win the race; "exists" is fine then.
            if let Err(e) = run("ip", &["link", "add", &bridge.name, "type", "bridge"], None).await
                && !link_exists(&bridge.name)
            {
                return Err(e);
            }
        }
        let subnet = bridge.subnet;
        let gw = subnet.gateway();
        match bridge.host_address {
            None => {
                let gw = format!("{gw}/{}", subnet.prefix_len);
                run("ip", &["addr", "replace", &gw, "dev", &bridge.name], None).await?;
            }
            Some(host) => {
                if !subnet.contains(host) || host == gw {
                    return Err(NetError::Command {
                        command: format!("configure bridge {}", bridge.name),
                        stderr: format!(
                            "host address {host} must be in {subnet} and differ from the gateway {gw}"
                        ),
                    });
                }
                // The host's own address carries the subnet (and is what the
                // host sends from); the shared gateway is a bare /32, so it is
                // never chosen as a source address.
                let keep = [format!("{host}/{}", subnet.prefix_len), format!("{gw}/32")];
                for addr in bridge_addresses(&bridge.name).await? {
                    let in_subnet = addr
                        .split('/')
                        .next()
                        .and_then(|a| a.parse().ok())
                        .is_some_and(|a| subnet.contains(a));
                    if in_subnet && !keep.contains(&addr) {
                        run("ip", &["addr", "del", &addr, "dev", &bridge.name], None).await?;
                    }
                }
                for addr in &keep {
                    run("ip", &["addr", "replace", addr, "dev", &bridge.name], None).await?;
                }
                // ARP from the host names its own address, never the gateway.
                write_sysctl(
                    &format!("/proc/sys/net/ipv4/conf/{}/arp_announce", bridge.name),
                    "2",
                )
                .await?;
            }
        }
        run("ip", &["link", "set", &bridge.name, "up"], None).await?;
        {
            if bridge.nat || bridge.host_address.is_some() {
                write_sysctl("/proc/sys/net/ipv4/ip_forward", "1").await?;
            }
            let table = nat_table(&bridge.name);
            let name = &bridge.name;
            let metadata = metadata_redirect(name, gw);
            let masquerade = if bridge.nat {
                format!("ip saddr {subnet} ip daddr != {subnet} masquerade\n")
            } else {
                String::new()
            };
            // Traffic routed into the VM network from outside may enter at
            // any host; answering from here keeps the flow on one host.
            let inbound = match bridge.host_address {
                Some(host) => {
                    format!("oifname \"{name}\" ip saddr != {subnet} snat to {host}\n")
                }
                None => String::new(),
            };
            // Add-then-delete-then-define is one atomic nft transaction that
            // works whether or not the table existed.
            let script = format!(
                "table ip {table} {{}}\n\
                 delete table ip {table}\n\
                 table ip {table} {{\n\
                   chain prerouting {{\n\
                     type nat hook prerouting priority dstnat; policy accept;\n\
                     {metadata}\n\
                   }}\n\
                   chain postrouting {{\n\
                     type nat hook postrouting priority srcnat; policy accept;\n\
                     {masquerade}\
                     {inbound}\
                   }}\n\
                   chain forward {{\n\
                     type filter hook forward priority filter; policy accept;\n\
                     iifname \"{name}\" accept\n\
                     oifname \"{name}\" ct state established,related accept\n\
                   }}\n\
                 }}\n"
            );
            run("nft", &["-f", "-"], Some(&script)).await?;
        }
        Ok(())
    }

    async fn ensure_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        if attached_and_up(name, bridge) {
            return Ok(());
        }
        if !link_exists(name) {
            run("ip", &["tuntap", "add", "dev", name, "mode", "tap"], None).await?;
        }
        run("ip", &["link", "set", name, "master", bridge], None).await?;
        run("ip", &["link", "set", name, "up"], None).await?;
        Ok(())
    }

    async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        if link_exists(name)
            && let Err(e) = run("ip", &["link", "del", name], None).await
            && link_exists(name)
        {
            return Err(e);
        }
        Ok(())
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let mut out = Vec::new();
        let mut dir =
            tokio::fs::read_dir("/sys/class/net")
                .await
                .map_err(|e| NetError::Command {
                    command: "read /sys/class/net".into(),
                    stderr: e.to_string(),
                })?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && entry.path().join("tun_flags").exists() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn pin_mac(&self, mac: MacAddr, tap: &str) -> Result<(), NetError> {
        validate_ifname(tap)?;
        let mac = mac.to_string();
        run(
            "bridge",
            // Sticky: frames from the VM's old place must not move it.
            &[
                "fdb", "replace", &mac, "dev", tap, "master", "static", "sticky",
            ],
            None,
        )
        .await
        .map(drop)
    }

    async fn redirect_mac(
        &self,
        mac: MacAddr,
        overlay: &str,
        remote: Ipv4Addr,
    ) -> Result<(), NetError> {
        validate_ifname(overlay)?;
        // The overlay's own entry (where to send) and the bridge's (send
        // it to the overlay) are separate tables: set both at once, since
        // the guest's clients wait from here on.
        let mac_text = mac.to_string();
        // Sticky: frames the VM still sends from its tap until it is paused
        // must not move the entry back (learning moves static entries that
        // are not sticky).
        let args = [
            "fdb", "replace", &mac_text, "dev", overlay, "master", "static", "sticky",
        ];
        let bridge_entry = run("bridge", &args, None);
        let (steered, bridged) = tokio::join!(self.steer_mac(mac, overlay, remote), bridge_entry);
        steered?;
        bridged.map(drop)
    }

    async fn steer_mac(
        &self,
        mac: MacAddr,
        overlay: &str,
        remote: Ipv4Addr,
    ) -> Result<(), NetError> {
        validate_ifname(overlay)?;
        // Permanent: learning does not move it.
        run(
            "bridge",
            &[
                "fdb",
                "replace",
                &mac.to_string(),
                "dev",
                overlay,
                "dst",
                &remote.to_string(),
                "self",
                "permanent",
            ],
            None,
        )
        .await
        .map(drop)
    }

    async fn forward_queued_frames(
        &self,
        tap: std::sync::Arc<std::os::fd::OwnedFd>,
        mac: MacAddr,
        overlay: &str,
    ) -> Result<usize, NetError> {
        use std::os::fd::AsFd;
        validate_ifname(overlay)?;
        let overlay = overlay.to_string();
        tokio::task::spawn_blocking(move || {
            crate::forward_queued_frames(tap.as_fd(), mac, &overlay)
        })
        .await
        .map_err(|e| NetError::System {
            action: "forward queued frames".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    async fn kill_connections(&self, remote: Ipv4Addr, port: u16) -> Result<(), NetError> {
        run(
            "ss",
            &[
                "-K",
                "dst",
                &remote.to_string(),
                "dport",
                "=",
                &port.to_string(),
            ],
            None,
        )
        .await
        .map(drop)
    }

    async fn ensure_private_network(&self, network: &PrivateNetworkConfig) -> Result<(), NetError> {
        let d = private_devices(network.vni);
        let ns = d.namespace.as_str();
        let gw = network.subnet.gateway();
        // The bridge: a plain switch, no address of the host's on it.
        if !link_exists(&d.bridge)
            && let Err(e) = run("ip", &["link", "add", &d.bridge, "type", "bridge"], None).await
            && !link_exists(&d.bridge)
        {
            return Err(e);
        }
        run("ip", &["link", "set", &d.bridge, "up"], None).await?;
        // The router's namespace. A file left without its namespace (its
        // mount went with the mount namespace of an agent that ran under
        // `ip netns exec`) is cleared first.
        let ns_path = Path::new("/run/netns").join(ns);
        if ns_path.exists() && !is_namespace(&ns_path) {
            let _ = tokio::fs::remove_file(&ns_path).await;
        }
        if !is_namespace(&ns_path)
            && let Err(e) = run("ip", &["netns", "add", ns], None).await
            && !is_namespace(&ns_path)
        {
            return Err(e);
        }
        // Its gateway port on the bridge.
        if !link_exists(&d.gateway_port) {
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &d.gateway_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "gw0",
                    "netns",
                    ns,
                ],
                None,
            )
            .await?;
        }
        run(
            "ip",
            &["link", "set", &d.gateway_port, "master", &d.bridge],
            None,
        )
        .await?;
        run("ip", &["link", "set", &d.gateway_port, "up"], None).await?;
        let gw_cidr = format!("{gw}/{}", network.subnet.prefix_len);
        run(
            "ip",
            &["-n", ns, "addr", "replace", &gw_cidr, "dev", "gw0"],
            None,
        )
        .await?;
        run("ip", &["-n", ns, "link", "set", "gw0", "up"], None).await?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"], None).await?;
        // Its uplink to the host.
        let host_end = std::net::Ipv4Addr::from(u32::from(d.uplink_address) - 1);
        if !link_exists(&d.uplink) {
            run(
                "ip",
                &[
                    "link", "add", &d.uplink, "type", "veth", "peer", "name", "up0", "netns", ns,
                ],
                None,
            )
            .await?;
        }
        run(
            "ip",
            &[
                "addr",
                "replace",
                &format!("{host_end}/30"),
                "dev",
                &d.uplink,
            ],
            None,
        )
        .await?;
        run("ip", &["link", "set", &d.uplink, "up"], None).await?;
        run(
            "ip",
            &[
                "-n",
                ns,
                "addr",
                "replace",
                &format!("{}/30", d.uplink_address),
                "dev",
                "up0",
            ],
            None,
        )
        .await?;
        run("ip", &["-n", ns, "link", "set", "up0", "up"], None).await?;
        run(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "replace",
                "default",
                "via",
                &host_end.to_string(),
            ],
            None,
        )
        .await?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ],
            None,
        )
        .await?;
        // The router: instances out through NAT, answers back, nothing in;
        // the metadata service's address leads to the router's own listener.
        let metadata = metadata_redirect(ROUTER_GATEWAY_PORT, gw);
        let router = format!(
            "table ip skyvisor-router {{}}\n\
             delete table ip skyvisor-router\n\
             table ip skyvisor-router {{\n\
               chain prerouting {{\n\
                 type nat hook prerouting priority dstnat; policy accept;\n\
                 {metadata}\n\
               }}\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 oifname \"up0\" masquerade\n\
               }}\n\
               chain forward {{\n\
                 type filter hook forward priority filter; policy drop;\n\
                 iifname \"gw0\" oifname \"up0\" accept\n\
                 iifname \"up0\" oifname \"gw0\" ct state established,related accept\n\
               }}\n\
               chain input {{\n\
                 type filter hook input priority filter; policy accept;\n\
                 iifname \"up0\" ct state established,related accept\n\
                 iifname \"up0\" drop\n\
               }}\n\
             }}\n"
        );
        run(
            "ip",
            &["netns", "exec", ns, "nft", "-f", "-"],
            Some(&router),
        )
        .await?;
        // The host: routers reach the outside only; bridged traffic of the
        // network is tracked in its own zone.
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1").await?;
        let bridge = &d.bridge;
        let zone = d.zone;
        let table = format!("skyvisor-net-{:06x}", network.vni);
        let host_rules = format!(
            "table ip skyvisor-private {{}}\n\
             delete table ip skyvisor-private\n\
             table ip skyvisor-private {{\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr 100.64.0.0/10 oifname != \"svu*\" masquerade\n\
               }}\n\
               chain forward {{\n\
                 type filter hook forward priority filter - 5; policy accept;\n\
                 iifname \"svu*\" oifname \"sv*\" drop\n\
                 oifname \"svu*\" iifname \"sv*\" drop\n\
                 oifname \"svu*\" ct state established,related accept\n\
                 oifname \"svu*\" drop\n\
               }}\n\
               chain input {{\n\
                 type filter hook input priority filter - 5; policy accept;\n\
                 iifname \"svu*\" ct state established,related accept\n\
                 iifname \"svu*\" drop\n\
               }}\n\
             }}\n\
             table ip {table} {{}}\n\
             delete table ip {table}\n\
             table ip {table} {{\n\
               chain prerouting {{\n\
                 type filter hook prerouting priority raw; policy accept;\n\
                 iifname \"{bridge}\" ct zone set {zone}\n\
               }}\n\
             }}\n"
        );
        run("nft", &["-f", "-"], Some(&host_rules)).await?;
        if let Some(o) = &network.overlay {
            self.ensure_overlay(
                &d.bridge,
                &OverlayConfig {
                    name: d.vxlan.clone(),
                    vni: network.vni,
                    local: o.local,
                    port: o.port,
                    peers: o.peers.clone(),
                    gateway: gw,
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn remove_private_network(&self, vni: u32) -> Result<(), NetError> {
        let d = private_devices(vni);
        for dev in [&d.vxlan, &d.gateway_port, &d.uplink, &d.bridge] {
            if link_exists(dev)
                && let Err(e) = run("ip", &["link", "del", dev], None).await
                && link_exists(dev)
            {
                return Err(e);
            }
        }
        if Path::new("/run/netns").join(&d.namespace).exists() {
            run("ip", &["netns", "del", &d.namespace], None).await?;
        }
        let table = format!("skyvisor-net-{vni:06x}");
        let script = format!("table ip {table} {{}}\ndelete table ip {table}\n");
        run("nft", &["-f", "-"], Some(&script)).await?;
        let ovl = format!("skyvisor-ovl-{}", d.vxlan);
        let script = format!("table bridge {ovl} {{}}\ndelete table bridge {ovl}\n");
        run("nft", &["-f", "-"], Some(&script)).await.map(drop)
    }

    async fn apply_firewall(&self, config: &FirewallConfig) -> Result<(), NetError> {
        for g in &config.guards {
            validate_ifname(&g.tap)?;
        }
        for f in &config.filters {
            validate_ifname(&f.bridge)?;
        }
        if !config.filters.is_empty() {
            ensure_bridge_netfilter().await?;
        }
        run("nft", &["-f", "-"], Some(&config.script()))
            .await
            .map(drop)
    }

    async fn listen_metadata(
        &self,
        vni: Option<u32>,
        bridge: &str,
        gateway: Ipv4Addr,
    ) -> Result<Option<std::net::TcpListener>, NetError> {
        let (namespace, device) = gateway_side(vni, bridge)?;
        let addr = std::net::SocketAddr::from((gateway, METADATA_PORT));
        tokio::task::spawn_blocking(move || {
            crate::listen_on_device(namespace.as_deref(), addr, &device)
        })
        .await
        .map_err(|e| NetError::Command {
            command: format!("listen on {addr}"),
            stderr: e.to_string(),
        })?
        .map(Some)
    }

    async fn listen_dns(
        &self,
        vni: Option<u32>,
        bridge: &str,
        gateway: Ipv4Addr,
    ) -> Result<Option<(std::net::UdpSocket, std::net::TcpListener)>, NetError> {
        let (namespace, device) = gateway_side(vni, bridge)?;
        let addr = std::net::SocketAddr::from((gateway, DNS_PORT));
        tokio::task::spawn_blocking(move || {
            crate::dns_sockets_on_device(namespace.as_deref(), addr, &device)
        })
        .await
        .map_err(|e| NetError::Command {
            command: format!("listen for DNS on {addr}"),
            stderr: e.to_string(),
        })?
        .map(Some)
    }

    async fn set_service_addresses(
        &self,
        vni: Option<u32>,
        bridge: &str,
        overlay: Option<&str>,
        addrs: &[Ipv4Addr],
    ) -> Result<(), NetError> {
        let (namespace, device, vxlan) = match vni {
            Some(v) => {
                let d = private_devices(v);
                (
                    Some(d.namespace),
                    ROUTER_GATEWAY_PORT.to_string(),
                    Some(d.vxlan),
                )
            }
            None => (None, bridge.to_string(), overlay.map(str::to_string)),
        };
        validate_ifname(&device)?;
        // Ours carry a label of their own, so the gateway and the host's
        // address are never touched.
        let label = format!("{device}:lb");
        let ip = |args: Vec<String>| {
            let mut full: Vec<String> = Vec::new();
            if let Some(ns) = &namespace {
                full.extend(["-n".to_string(), ns.clone()]);
            }
            full.extend(args);
            full
        };
        let listed = run(
            "ip",
            &ip(vec![
                "-4".into(),
                "-o".into(),
                "addr".into(),
                "show".into(),
                "dev".into(),
                device.clone(),
                "label".into(),
                label.clone(),
            ])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
            None,
        )
        .await?;
        let current: Vec<String> = listed
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next().map(str::to_string)
            })
            .collect();
        let wanted: Vec<String> = addrs.iter().map(|a| format!("{a}/32")).collect();
        for old in current.iter().filter(|c| !wanted.contains(c)) {
            let args = ip(vec![
                "addr".into(),
                "del".into(),
                old.clone(),
                "dev".into(),
                device.clone(),
            ]);
            run(
                "ip",
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                None,
            )
            .await?;
        }
        for new in wanted.iter().filter(|w| !current.contains(w)) {
            let args = ip(vec![
                "addr".into(),
                "replace".into(),
                new.clone(),
                "dev".into(),
                device.clone(),
                "label".into(),
                label.clone(),
            ]);
            run(
                "ip",
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                None,
            )
            .await?;
        }
        // Every host answers for them: ARP about them stays off the overlay.
        if let Some(vxlan) = vxlan.filter(|v| link_exists(v)) {
            validate_ifname(&vxlan)?;
            let script = arp_kept_local(&format!("skyvisor-svc-{vxlan}"), &vxlan, addrs);
            run("nft", &["-f", "-"], Some(&script)).await?;
        }
        Ok(())
    }

    async fn listen_service(
        &self,
        vni: Option<u32>,
        addr: std::net::SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, NetError> {
        let fail = |e: String| NetError::Command {
            command: format!("listen on {addr}"),
            stderr: e,
        };
        match vni {
            Some(v) => {
                let ns = private_devices(v).namespace;
                tokio::task::spawn_blocking(move || {
                    crate::listen_on_device(Some(&ns), addr, ROUTER_GATEWAY_PORT)
                })
                .await
                .map_err(|e| fail(e.to_string()))?
                .map(Some)
            }
            None => {
                let open = || -> std::io::Result<std::net::TcpListener> {
                    use socket2::{Domain, Protocol, Socket, Type};
                    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                    socket.set_reuse_address(true)?;
                    socket.bind(&addr.into())?;
                    socket.listen(1024)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket.into())
                };
                open().map(Some).map_err(|e| fail(e.to_string()))
            }
        }
    }

    async fn clear_redirect(&self, mac: MacAddr, overlay: &str) -> Result<(), NetError> {
        validate_ifname(overlay)?;
        if !link_exists(overlay) {
            return Ok(());
        }
        let m = mac.to_string();
        let _ = run(
            "bridge",
            &["fdb", "del", &m, "dev", overlay, "master"],
            None,
        )
        .await;
        let _ = run("bridge", &["fdb", "del", &m, "dev", overlay, "self"], None).await;
        Ok(())
    }

    async fn ensure_overlay(&self, bridge: &str, overlay: &OverlayConfig) -> Result<(), NetError> {
        validate_ifname(&overlay.name)?;
        let name = overlay.name.as_str();
        let vni = overlay.vni.to_string();
        let local = overlay.local.to_string();
        let port = overlay.port.to_string();
        if link_exists(name) {
            // A device left with other parameters (another VNI, address or
            // port) is replaced rather than silently kept.
            let details = run("ip", &["-d", "link", "show", "dev", name], None).await?;
            let matches = details.contains(&format!("vxlan id {vni} "))
                && details.contains(&format!("local {local} "))
                && details.contains(&format!("dstport {port} "));
            if !matches {
                run("ip", &["link", "del", name], None).await?;
            }
        }
        if !link_exists(name) {
            run(
                "ip",
                &[
                    "link", "add", name, "type", "vxlan", "id", &vni, "local", &local, "dstport",
                    &port,
                ],
                None,
            )
            .await?;
        }
        run("ip", &["link", "set", name, "master", bridge], None).await?;
        run("ip", &["link", "set", name, "up"], None).await?;
        // Head-end replication: broadcast and unknown unicast go to every
        // peer; the bridge then learns where each MAC lives. The list is
        // made exactly the peers: departed hosts are dropped.
        let fdb = run("bridge", &["fdb", "show", "dev", name], None).await?;
        let current = flood_destinations(&fdb);
        for peer in &overlay.peers {
            let peer = peer.to_string();
            if !current.contains(&peer) {
                run(
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        name,
                        "dst",
                        &peer,
                    ],
                    None,
                )
                .await?;
            }
        }
        for old in &current {
            if !overlay.peers.iter().any(|p| &p.to_string() == old) {
                run(
                    "bridge",
                    &["fdb", "del", "00:00:00:00:00:00", "dev", name, "dst", old],
                    None,
                )
                .await?;
            }
        }
        // Every host's bridge answers for the gateway: ARP about it must
        // not cross the overlay, or a VM could learn another host's bridge.
        let script = arp_kept_local(&overlay_table(name), name, &[overlay.gateway]);
        run("nft", &["-f", "-"], Some(&script)).await?;
        Ok(())
    }
}

/// Where a VM network's gateway services listen: the namespace (a private
/// network's router; none: the host's own) and the device their sockets
/// take packets from (the router's port, or the cluster `bridge`).
fn gateway_side(vni: Option<u32>, bridge: &str) -> Result<(Option<String>, String), NetError> {
    let (namespace, device) = match vni {
        Some(v) => (
            Some(private_devices(v).namespace),
            ROUTER_GATEWAY_PORT.to_string(),
        ),
        None => (None, bridge.to_string()),
    };
    validate_ifname(&device)?;
    Ok((namespace, device))
}

/// The nftables script of bridge table `table` that drops ARP about
/// `addrs` in and out of overlay device `vxlan`: every host answers for
/// them itself (the gateway, balancers' addresses), so ARP about them
/// must never cross the overlay, or an instance could learn another
/// host's bridge. Replaces the table whole.
fn arp_kept_local(table: &str, vxlan: &str, addrs: &[Ipv4Addr]) -> String {
    let mut rules = String::new();
    for a in addrs {
        for dir in ["iifname", "oifname"] {
            for field in ["daddr", "saddr"] {
                rules.push_str(&format!("{dir} \"{vxlan}\" arp {field} ip {a} drop\n"));
            }
        }
    }
    format!(
        "table bridge {table} {{}}\n\
         delete table bridge {table}\n\
         table bridge {table} {{\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             {rules}\
           }}\n\
           chain input {{\n\
             type filter hook input priority filter; policy accept;\n\
             {rules}\
           }}\n\
           chain output {{\n\
             type filter hook output priority filter; policy accept;\n\
             {rules}\
           }}\n\
         }}\n"
    )
}

/// The nft rule that sends what arrives on `device` for the metadata
/// service's address (TCP port 80) to its listener at `gateway`.
fn metadata_redirect(device: &str, gateway: Ipv4Addr) -> String {
    format!(
        "iifname \"{device}\" ip daddr {METADATA_ADDRESS} tcp dport 80 dnat to {gateway}:{METADATA_PORT}"
    )
}

/// The nftables (bridge family) table of an overlay's ARP filter.
fn overlay_table(vxlan: &str) -> String {
    format!("skyvisor-ovl-{vxlan}")
}

/// The destinations of the all-zero (flooding) entries of `bridge fdb show`.
fn flood_destinations(fdb: &str) -> Vec<String> {
    fdb.lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "dst")?;
            words.next().map(str::to_string)
        })
        .collect()
}

/// The IPv4 addresses (`a.b.c.d/len`) on `dev`.
async fn bridge_addresses(dev: &str) -> Result<Vec<String>, NetError> {
    let out = run("ip", &["-4", "-o", "addr", "show", "dev", dev], None).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_string)
        })
        .collect())
}

/// Whether `path` is a namespace (a mount of the namespace file system).
fn is_namespace(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // `f_type`'s integer type differs between targets.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == NSFS_MAGIC)
}

/// Makes the host show bridged IPv4 traffic to its IP hooks, with
/// connection tracking: security groups filter there.
async fn ensure_bridge_netfilter() -> Result<(), NetError> {
    let knob = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !Path::new(knob).exists() {
        // Built as a module on Debian's kernels.
        let _ = run("modprobe", &["br_netfilter"], None).await;
    }
    if !Path::new(knob).exists() {
        return Err(NetError::Command {
            command: "enable br_netfilter".into(),
            stderr: "security groups need the kernel's br_netfilter (modprobe br_netfilter)".into(),
        });
    }
    write_sysctl(knob, "1").await
}

async fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    tokio::fs::write(path, format!("{value}\n"))
        .await
        .map_err(|e| NetError::Command {
            command: format!("write {value} to {path}"),
            stderr: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flooding_entries() {
        let fdb = "00:00:00:00:00:00 dst 10.0.0.2 self permanent\n\
                   00:00:00:00:00:00 dst 10.0.0.3 self permanent\n\
                   52:54:00:aa:bb:cc dst 10.0.0.2 self\n";
        assert_eq!(flood_destinations(fdb), vec!["10.0.0.2", "10.0.0.3"]);
    }

    #[test]
    fn arp_about_local_addresses_stays_off_the_overlay_in_every_chain() {
        let a: Ipv4Addr = "10.0.0.1".parse().expect("ip");
        let b: Ipv4Addr = "10.0.0.200".parse().expect("ip");
        let script = arp_kept_local("skyvisor-svc-svvx0", "svvx0", &[a, b]);
        assert!(script.starts_with("table bridge skyvisor-svc-svvx0 {}\ndelete table"));
        for chain in ["forward", "input", "output"] {
            assert!(script.contains(&format!("chain {chain} {{")), "{script}");
        }
        for ip in ["10.0.0.1", "10.0.0.200"] {
            for rule in [
                format!("iifname \"svvx0\" arp daddr ip {ip} drop"),
                format!("iifname \"svvx0\" arp saddr ip {ip} drop"),
                format!("oifname \"svvx0\" arp daddr ip {ip} drop"),
                format!("oifname \"svvx0\" arp saddr ip {ip} drop"),
            ] {
                assert_eq!(script.matches(&rule).count(), 3, "{rule} in each chain");
            }
        }
        // No address: an empty table (the last balancer went).
        assert!(!arp_kept_local("t", "svvx0", &[]).contains("drop"));
    }
}

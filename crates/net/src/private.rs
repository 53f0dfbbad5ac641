//! Projects' private networks on a host.
//!
//! Each private network has, on every host that runs one of its instances:
//! - a bridge `svb<vni>` with no address of the host's on it, so the host
//!   neither routes to nor answers its instances;
//! - a router: a network namespace `svn-<vni>-<host namespace>` joined to the bridge by a
//!   veth (`gw0`, holding the network's gateway address) and to the host by
//!   another (`up0`, a /30 of 100.64.0.0/10 unique to the network), which
//!   masquerades the instances' traffic to the outside. Its own connection
//!   table keeps overlapping subnets of different projects apart;
//! - in a cluster, a VXLAN device `svx<vni>` on the bridge with the
//!   network's id, so the segment spans hosts;
//! - a connection-tracking zone for the bridged traffic (the host's
//!   `br_netfilter` tracks it for security groups), so two projects' flows
//!   with the same addresses are never taken for one.
//!
//! The host drops whatever its routers send to its bridges, to each other
//! or to the host itself: a private network reaches the outside only.

use std::net::{Ipv4Addr, SocketAddr};

use skyvisor_core::Ipv4Net;

use crate::NetError;

/// The router's port on its network's bridge, inside its namespace: it holds
/// the network's gateway address.
pub const ROUTER_GATEWAY_PORT: &str = "gw0";

/// A private network as a host sets it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateNetworkConfig {
    /// Its VXLAN id (unique in the cluster).
    pub vni: u32,
    /// Its subnet; the gateway is the first address.
    pub subnet: Ipv4Net,
    /// Its VXLAN segment across hosts, in a cluster.
    pub overlay: Option<PrivateOverlay>,
}

/// How a private network's segment reaches other hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateOverlay {
    /// This host's underlay address.
    pub local: Ipv4Addr,
    /// UDP port of VXLAN.
    pub port: u16,
    /// The other hosts' underlay addresses.
    pub peers: Vec<Ipv4Addr>,
}

/// The names of a private network's devices on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateDevices {
    /// The bridge instances' taps join.
    pub bridge: String,
    /// The VXLAN device (clusters).
    pub vxlan: String,
    /// The router's network namespace.
    pub namespace: String,
    /// The host end of the veth to the router's gateway port (a bridge port).
    pub gateway_port: String,
    /// The host end of the router's uplink veth.
    pub uplink: String,
    /// The router's uplink address (host end is one below).
    pub uplink_address: Ipv4Addr,
    /// The connection-tracking zone of its bridged traffic.
    pub zone: u16,
}

/// The devices of the private network with id `vni`.
pub fn private_devices(vni: u32) -> PrivateDevices {
    // 100.64.0.0/10 holds 2^20 /30s: the id's low 20 bits choose one (a
    // cluster's ids are a range of 65520, so they never share one).
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (vni & 0xf_ffff) * 4;
    PrivateDevices {
        bridge: format!("svb{vni:06x}"),
        vxlan: format!("svx{vni:06x}"),
        namespace: format!("svn-{vni:06x}-{:x}", own_namespace_id()),
        gateway_port: format!("svg{vni:06x}"),
        uplink: format!("svu{vni:06x}"),
        uplink_address: Ipv4Addr::from(base + 2),
        // Zone 0 is the host's own; ids map onto 1..=0xffff, distinct
        // within any range of 65520 ids.
        zone: u16::try_from((vni % 0xffff) + 1).unwrap_or(u16::MAX),
    }
}

/// The inode of this process's network namespace: router namespaces are
/// named after it, so that hosts sharing a machine (each agent in a
/// namespace of its own, as test beds run them) never share a router.
fn own_namespace_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Opens a TCP connection to `addr` from inside network namespace
/// `namespace` (a private network's router, the only place its instances
/// are reachable from on a host). The socket keeps working from any thread.
pub async fn connect_in_namespace(
    namespace: &str,
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, NetError> {
    let path = format!("/run/netns/{namespace}");
    let fail = |stderr: String| NetError::Command {
        command: format!("connect to {addr} in namespace {namespace}"),
        stderr,
    };
    let stream = tokio::task::spawn_blocking(move || {
        in_namespace(&path, || {
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .map_err(|e| fail(e.to_string()))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    tokio::net::TcpStream::from_std(stream).map_err(|e| fail(e.to_string()))
}

/// Opens a TCP listener on `addr` that takes connections arriving through
/// interface `device` only (`SO_BINDTODEVICE`), in network namespace
/// `namespace` (by its name under `/run/netns`) or, with none, in this
/// process's own. Whoever connects is then known to be on that device's
/// network; the listener keeps working from any thread.
pub fn listen_on_device(
    namespace: Option<&str>,
    addr: SocketAddr,
    device: &str,
) -> Result<std::net::TcpListener, NetError> {
    let fail = |stderr: String| NetError::Command {
        command: format!(
            "listen on {addr} through {device}{}",
            namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        ),
        stderr,
    };
    let open = || -> std::io::Result<std::net::TcpListener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind_device(Some(device.as_bytes()))?;
        socket.bind(&addr.into())?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let Some(namespace) = namespace else {
        return open().map_err(|e| fail(e.to_string()));
    };
    in_namespace(&format!("/run/netns/{namespace}"), open).map_err(|e| fail(e.to_string()))
}

/// A DNS server's sockets on `addr`: UDP and TCP, both taking packets
/// arriving through interface `device` only, in network namespace
/// `namespace` or this process's own (see [`listen_on_device`]).
pub fn dns_sockets_on_device(
    namespace: Option<&str>,
    addr: SocketAddr,
    device: &str,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), NetError> {
    let fail = |stderr: String| NetError::Command {
        command: format!("listen for DNS on {addr} through {device}"),
        stderr,
    };
    let open = || -> std::io::Result<std::net::UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.bind_device(Some(device.as_bytes()))?;
        socket.bind(&addr.into())?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let udp = match namespace {
        Some(n) => in_namespace(&format!("/run/netns/{n}"), open),
        None => open(),
    }
    .map_err(|e| fail(e.to_string()))?;
    let tcp = listen_on_device(namespace, addr, device)?;
    Ok((udp, tcp))
}

/// Runs `make` on a throwaway thread inside the network namespace at
/// `path`: a socket it makes is made there and stays there, while the
/// caller's threads never move.
fn in_namespace<T: Send>(
    path: &str,
    make: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(std::io::Error::from)?;
                make()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// The identity of network namespace `namespace` (its inode), to tell a
/// namespace from a later one of the same name.
pub fn namespace_id(namespace: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{namespace}"))
        .map(|m| m.ino())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::network::PRIVATE_VNI_BASE;

    #[test]
    fn device_names_fit_and_differ() {
        let a = private_devices(PRIVATE_VNI_BASE);
        let b = private_devices(PRIVATE_VNI_BASE + 1);
        for d in [&a, &b] {
            for name in [&d.bridge, &d.vxlan, &d.gateway_port, &d.uplink] {
                crate::validate_ifname(name).expect("valid interface name");
            }
        }
        assert_ne!(a.bridge, b.bridge);
        assert_ne!(a.zone, b.zone);
        assert_ne!(a.zone, 0);
        assert_eq!(a.uplink_address, Ipv4Addr::new(100, 68, 0, 2));
        assert_eq!(b.uplink_address, Ipv4Addr::new(100, 68, 0, 6));
    }
}

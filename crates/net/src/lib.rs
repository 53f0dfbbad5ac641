//! Host networking for VMs: one Linux bridge per host with the VM subnet's
//! gateway address and NAT to the outside, one tap per VM on that bridge,
//! and (for clusters) a VXLAN overlay joining the bridges of all hosts.
//!
//! In a cluster every host's bridge carries the same gateway address (the
//! subnet's first), so a VM always leaves through its own host wherever it
//! runs; ARP for that address never crosses the overlay, so each VM learns
//! its own host's bridge. Each host also has a cluster-unique address of
//! its own on the VM network ([`BridgeConfig::host_address`]): hosts reach
//! VMs of other hosts through the overlay from it, and traffic a host
//! forwards into the VM network from outside (routed to it) is
//! source-translated to it, so that the answer comes back through the same
//! host whichever host the VM runs on.
//!
//! Everything goes through the narrow [`HostNetwork`] trait: [`LinuxNetwork`]
//! drives iproute2 and nftables, [`FakeNetwork`] keeps state in memory for
//! tests. This crate never decides addresses; allocation is the control
//! plane's job.

mod fake;
mod firewall;
mod linux;
mod private;
mod queued;

use std::net::Ipv4Addr;

use async_trait::async_trait;
use skyvisor_core::{InstanceId, Ipv4Net, MacAddr};
use thiserror::Error;

pub use fake::FakeNetwork;
pub use firewall::{FirewallConfig, InboundFilter, TapGuard};
pub use linux::LinuxNetwork;
pub use private::{
    PrivateDevices, PrivateNetworkConfig, PrivateOverlay, ROUTER_GATEWAY_PORT,
    connect_in_namespace, dns_sockets_on_device, listen_on_device, namespace_id, private_devices,
};
pub use queued::forward_queued_frames;

/// The link-local address guests reach the instance metadata service at
/// (EC2's and OpenStack's).
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Where the metadata service really listens: port 80 of
/// [`METADATA_ADDRESS`], arriving from a VM network, is redirected to this
/// port of that network's gateway address (the host's own address, or the
/// private network's router's), on a socket bound to that network's device
/// so that only the network's instances reach it. The host keeps
/// [`METADATA_ADDRESS`] itself free for a cloud it may run in.
pub const METADATA_PORT: u16 = 8775;
/// The port of the DNS server on every VM network's gateway.
pub const DNS_PORT: u16 = 53;

/// Longest Linux interface name.
pub const IFNAME_MAX: usize = 15;

/// What went wrong configuring the host's network.
#[derive(Debug, Error)]
pub enum NetError {
    /// A command (`ip`, `nft`, `sysctl`) failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A needed tool is not installed.
    #[error("`{tool}` is not installed (install the iproute2 and nftables packages)")]
    ToolMissing {
        /// The missing tool.
        tool: String,
    },
    /// A system call on a device, file or socket failed.
    #[error("could not {action}: {source}")]
    System {
        /// What was being done, to what.
        action: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An interface name is not usable.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The host bridge VMs attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// Bridge device name, e.g. `svbr0`.
    pub name: String,
    /// The VM subnet; the bridge gets its gateway address.
    pub subnet: Ipv4Net,
    /// Masquerade VM traffic leaving the subnet.
    pub nat: bool,
    /// The host's own, cluster-unique address in the subnet (cluster mode):
    /// the bridge then holds the gateway as a /32 and this address with the
    /// subnet's prefix.
    pub host_address: Option<Ipv4Addr>,
}

/// A VXLAN tunnel joining this host's bridge to other hosts' bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// VXLAN device name, e.g. `svvx0`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// This host's underlay address.
    pub local: Ipv4Addr,
    /// UDP port (4789 is the IANA default).
    pub port: u16,
    /// The other hosts' underlay addresses (head-end replication).
    pub peers: Vec<Ipv4Addr>,
    /// The gateway address every host's bridge carries: ARP for it is
    /// dropped on the overlay so each VM only ever hears its own host.
    pub gateway: Ipv4Addr,
}

/// The host's networking, as the agent needs it.
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Creates (or checks) the bridge with its gateway address, IP forwarding
    /// and NAT. Idempotent.
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetError>;

    /// Creates (or re-uses) tap `name` enslaved to `bridge`, up. Idempotent.
    async fn ensure_tap(&self, name: &str, bridge: &str) -> Result<(), NetError>;

    /// Deletes tap `name`; no error if it does not exist.
    async fn delete_tap(&self, name: &str) -> Result<(), NetError>;

    /// The names of existing taps that start with `prefix`.
    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError>;

    /// Creates or updates the VXLAN overlay on `bridge`: the device, its
    /// flooding list (exactly `overlay.peers`) and the ARP filter for the
    /// gateway. Idempotent.
    async fn ensure_overlay(&self, bridge: &str, overlay: &OverlayConfig) -> Result<(), NetError>;

    /// Live migration, destination side: frames for `mac` go to `tap` (the
    /// paused destination VM's; they queue there until it runs) whatever the
    /// bridge learned before. The entry goes with the tap.
    async fn pin_mac(&self, mac: MacAddr, tap: &str) -> Result<(), NetError>;

    /// Live migration, source side: frames for `mac` leave through the
    /// overlay device `overlay` to the host at `remote`, whatever the
    /// bridge learns meanwhile. Undo with [`HostNetwork::clear_redirect`].
    async fn redirect_mac(
        &self,
        mac: MacAddr,
        overlay: &str,
        remote: Ipv4Addr,
    ) -> Result<(), NetError>;

    /// Live migration, on every other host: the overlay sends frames for
    /// `mac` to the host at `remote`, whatever it learns meanwhile (the VM
    /// still talks from its old host until it is paused). Undo with
    /// [`HostNetwork::clear_redirect`].
    async fn steer_mac(
        &self,
        mac: MacAddr,
        overlay: &str,
        remote: Ipv4Addr,
    ) -> Result<(), NetError>;

    /// Live migration, source side, after the handover: sends the frames
    /// for `mac` that queued in the paused guest's tap (`tap`: a reference
    /// to the tap's open file, taken from its QEMU) out of overlay device
    /// `overlay`, to the guest's new host. Returns how many were sent.
    async fn forward_queued_frames(
        &self,
        tap: std::sync::Arc<std::os::fd::OwnedFd>,
        mac: MacAddr,
        overlay: &str,
    ) -> Result<usize, NetError>;

    /// Breaks this host's TCP connections to `remote`:`port` (a live
    /// migration's streams to a destination that stopped answering: a
    /// blocked send would otherwise hold QEMU for many minutes).
    async fn kill_connections(&self, remote: Ipv4Addr, port: u16) -> Result<(), NetError>;

    /// Creates (or checks) a project's private network on this host: its
    /// bridge, its router (a network namespace holding the gateway, with
    /// NAT to the outside) and, in a cluster, its VXLAN segment. Nothing
    /// passes between it and any other network of the host. Idempotent.
    async fn ensure_private_network(&self, network: &PrivateNetworkConfig) -> Result<(), NetError>;

    /// Removes a private network's devices and router from this host (no
    /// instance of it runs here any more). No error if it is not here.
    async fn remove_private_network(&self, vni: u32) -> Result<(), NetError>;

    /// Replaces the host's instance firewall with `config`: the guards
    /// that stop each tap from sending as another address, and the
    /// inbound filters of instances in security groups. One atomic change.
    async fn apply_firewall(&self, config: &FirewallConfig) -> Result<(), NetError>;

    /// Opens the DNS server's sockets (UDP and TCP) for a VM network, at
    /// port 53 of its `gateway`, taking queries from that network's
    /// segment only, like [`HostNetwork::listen_metadata`]. None where
    /// there is no real network to listen on.
    async fn listen_dns(
        &self,
        vni: Option<u32>,
        bridge: &str,
        gateway: std::net::Ipv4Addr,
    ) -> Result<Option<(std::net::UdpSocket, std::net::TcpListener)>, NetError>;

    /// Opens the metadata service's listener for a VM network: the
    /// cluster network on `bridge` (`vni` none) or private network `vni`
    /// (in its router), at [`METADATA_PORT`] of the network's `gateway`,
    /// taking connections from that network's segment only. None where
    /// there is no real network to listen on.
    async fn listen_metadata(
        &self,
        vni: Option<u32>,
        bridge: &str,
        gateway: Ipv4Addr,
    ) -> Result<Option<std::net::TcpListener>, NetError>;

    /// Removes what [`HostNetwork::redirect_mac`] or
    /// [`HostNetwork::steer_mac`] set up (the bridge and the overlay then
    /// learn `mac`'s place again). No error if there is nothing to remove.
    async fn clear_redirect(&self, mac: MacAddr, overlay: &str) -> Result<(), NetError>;

    /// Makes `addrs` (load balancers' virtual addresses) this host's own
    /// on a VM network, as the gateway is: on `bridge` for the cluster
    /// network (`vni` none; `overlay` its VXLAN device, if any) or in
    /// private network `vni`'s router. ARP about them never crosses the
    /// overlay, so each instance reaches them on its own host. Addresses
    /// set before and not in `addrs` are removed. Idempotent.
    async fn set_service_addresses(
        &self,
        vni: Option<u32>,
        bridge: &str,
        overlay: Option<&str>,
        addrs: &[Ipv4Addr],
    ) -> Result<(), NetError>;

    /// Opens a TCP listener on `addr`, one of the service addresses of
    /// network `vni` (none: the cluster network, where host processes may
    /// connect too). None where there is no real network.
    async fn listen_service(
        &self,
        vni: Option<u32>,
        addr: std::net::SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, NetError>;
}

/// The tap device name of an instance: `svt` + the id's first 8 hex digits,
/// well inside Linux's 15-character limit.
pub fn tap_name(id: &InstanceId) -> String {
    format!("svt{}", id.short())
}

/// Checks that `name` can be a Linux interface name.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let invalid = |reason: &str| NetError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(invalid("must be 1 to 15 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            "allowed characters: letters, digits, '-', '_', '.'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_linux_limit() {
        let name = tap_name(&InstanceId::random());
        assert!(name.len() <= IFNAME_MAX);
        validate_ifname(&name).expect("valid");
        assert!(validate_ifname("this-name-is-far-too-long").is_err());
        assert!(validate_ifname("bad name").is_err());
    }
}

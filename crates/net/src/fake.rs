//! An in-memory [`HostNetwork`] for tests and simulated hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;

use skyvisor_core::MacAddr;

use crate::{
    BridgeConfig, FirewallConfig, HostNetwork, NetError, OverlayConfig, PrivateNetworkConfig,
    private_devices, validate_ifname,
};

/// Records bridges, taps and overlays instead of creating them.
#[derive(Debug, Default)]
pub struct FakeNetwork {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    bridges: BTreeMap<String, BridgeConfig>,
    taps: BTreeSet<String>,
    overlays: BTreeMap<String, OverlayConfig>,
    private: BTreeMap<u32, PrivateNetworkConfig>,
    firewall: FirewallConfig,
}

impl FakeNetwork {
    /// An empty fake network.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bridges created so far.
    pub fn bridges(&self) -> Vec<BridgeConfig> {
        self.lock().bridges.values().cloned().collect()
    }

    /// The overlays as last configured.
    pub fn overlays(&self) -> Vec<OverlayConfig> {
        self.lock().overlays.values().cloned().collect()
    }

    /// The private networks set up so far, by id.
    pub fn private_networks(&self) -> Vec<PrivateNetworkConfig> {
        self.lock().private.values().cloned().collect()
    }

    /// The firewall as last applied.
    pub fn firewall(&self) -> FirewallConfig {
        self.lock().firewall.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl HostNetwork for FakeNetwork {
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetError> {
        validate_ifname(&bridge.name)?;
        self.lock()
            .bridges
            .insert(bridge.name.clone(), bridge.clone());
        Ok(())
    }

    async fn ensure_private_network(&self, network: &PrivateNetworkConfig) -> Result<(), NetError> {
        let d = private_devices(network.vni);
        let mut s = self.lock();
        s.bridges.insert(
            d.bridge.clone(),
            BridgeConfig {
                name: d.bridge,
                subnet: network.subnet,
                nat: true,
                host_address: None,
            },
        );
        s.private.insert(network.vni, network.clone());
        Ok(())
    }

    async fn remove_private_network(&self, vni: u32) -> Result<(), NetError> {
        let d = private_devices(vni);
        let mut s = self.lock();
        s.bridges.remove(&d.bridge);
        s.private.remove(&vni);
        Ok(())
    }

    async fn apply_firewall(&self, config: &FirewallConfig) -> Result<(), NetError> {
        self.lock().firewall = config.clone();
        Ok(())
    }

    async fn ensure_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        let mut s = self.lock();
        if !s.bridges.contains_key(bridge) {
            return Err(NetError::Command {
                command: format!("ip link set {name} master {bridge}"),
                stderr: format!("Cannot find device \"{bridge}\""),
            });
        }
        s.taps.insert(name.to_string());
        Ok(())
    }

    async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        self.lock().taps.remove(name);
        Ok(())
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        Ok(self
            .lock()
            .taps
            .iter()
            .filter(|t| t.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn ensure_overlay(&self, _bridge: &str, overlay: &OverlayConfig) -> Result<(), NetError> {
        validate_ifname(&overlay.name)?;
        self.lock()
            .overlays
            .insert(overlay.name.clone(), overlay.clone());
        Ok(())
    }

    async fn pin_mac(&self, _mac: MacAddr, tap: &str) -> Result<(), NetError> {
        validate_ifname(tap)
    }

    async fn redirect_mac(
        &self,
        _mac: MacAddr,
        overlay: &str,
        _remote: std::net::Ipv4Addr,
    ) -> Result<(), NetError> {
        validate_ifname(overlay)
    }

    async fn steer_mac(
        &self,
        _mac: MacAddr,
        overlay: &str,
        _remote: std::net::Ipv4Addr,
    ) -> Result<(), NetError> {
        validate_ifname(overlay)
    }

    async fn forward_queued_frames(
        &self,
        _tap: std::sync::Arc<std::os::fd::OwnedFd>,
        _mac: MacAddr,
        overlay: &str,
    ) -> Result<usize, NetError> {
        validate_ifname(overlay)?;
        Ok(0)
    }

    async fn kill_connections(
        &self,
        _remote: std::net::Ipv4Addr,
        _port: u16,
    ) -> Result<(), NetError> {
        Ok(())
    }

    async fn clear_redirect(&self, _mac: MacAddr, overlay: &str) -> Result<(), NetError> {
        validate_ifname(overlay)
    }

    async fn set_service_addresses(
        &self,
        _vni: Option<u32>,
        bridge: &str,
        _overlay: Option<&str>,
        _addrs: &[std::net::Ipv4Addr],
    ) -> Result<(), NetError> {
        validate_ifname(bridge)
    }

    async fn listen_service(
        &self,
        _vni: Option<u32>,
        _addr: std::net::SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, NetError> {
        Ok(None)
    }

    async fn listen_dns(
        &self,
        _vni: Option<u32>,
        bridge: &str,
        _gateway: std::net::Ipv4Addr,
    ) -> Result<Option<(std::net::UdpSocket, std::net::TcpListener)>, NetError> {
        // No VM sends a packet here: nothing to listen for.
        validate_ifname(bridge).map(|()| None)
    }

    async fn listen_metadata(
        &self,
        _vni: Option<u32>,
        bridge: &str,
        _gateway: std::net::Ipv4Addr,
    ) -> Result<Option<std::net::TcpListener>, NetError> {
        // No VM sends a packet here: nothing to listen for.
        validate_ifname(bridge).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taps_need_their_bridge() {
        let net = FakeNetwork::new();
        assert!(net.ensure_tap("svt1", "br0").await.is_err());
        net.ensure_bridge(&BridgeConfig {
            name: "br0".into(),
            subnet: "10.0.0.0/24".parse().expect("subnet"),
            nat: true,
            host_address: None,
        })
        .await
        .expect("bridge");
        net.ensure_tap("svt1", "br0").await.expect("tap");
        net.ensure_tap("svt1", "br0").await.expect("idempotent");
        assert_eq!(net.list_taps("svt").await.expect("list"), vec!["svt1"]);
        net.delete_tap("svt1").await.expect("delete");
        net.delete_tap("svt1").await.expect("delete is idempotent");
        assert!(net.list_taps("svt").await.expect("list").is_empty());
    }
}

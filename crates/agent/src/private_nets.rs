//! The private networks this host carries: set up on the first start of one
//! of their instances here, and kept joined to every other host through
//! the overlay as hosts come and go.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use skyvisor_core::{Ipv4Net, NetworkAttachment};
use skyvisor_net::{HostNetwork, NetError, PrivateNetworkConfig, PrivateOverlay, private_devices};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::OverlaySettings;

/// How long a network no local instance is on stays, after it was last
/// asked for.
const KEEP_IDLE: Duration = Duration::from_secs(60);

/// The host's private networks.
pub struct PrivateNets {
    network: Arc<dyn HostNetwork>,
    overlay: Option<OverlaySettings>,
    cluster_bridge: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The overlay's peers, as last heard (none yet: not known).
    peers: Vec<Ipv4Addr>,
    /// Networks set up here, by id, with their subnets and when an
    /// instance last asked for them.
    ready: BTreeMap<u32, (Ipv4Net, Instant)>,
}

impl PrivateNets {
    /// No private network yet; `overlay` is the host's overlay in a
    /// cluster, `cluster_bridge` the cluster network's bridge.
    pub fn new(
        network: Arc<dyn HostNetwork>,
        overlay: Option<OverlaySettings>,
        cluster_bridge: String,
    ) -> Self {
        Self {
            network,
            overlay,
            cluster_bridge,
            state: Mutex::new(State::default()),
        }
    }

    /// The bridge an instance's tap joins: its private network's (set up
    /// here first if needed), or the cluster network's.
    pub async fn bridge_for(&self, attachment: &NetworkAttachment) -> Result<String, NetError> {
        let Some(vni) = attachment.vni else {
            return Ok(self.cluster_bridge.clone());
        };
        let subnet = Ipv4Net::new(attachment.gateway, attachment.prefix_len).map_err(|e| {
            NetError::Command {
                command: format!("private network {vni}"),
                stderr: e.to_string(),
            }
        })?;
        let mut st = self.state.lock().await;
        if st.ready.get(&vni).map(|r| r.0) != Some(subnet) {
            let config = self.config(vni, subnet, &st.peers);
            self.network.ensure_private_network(&config).await?;
            info!(vni, %subnet, "private network ready on this host");
        }
        st.ready.insert(vni, (subnet, Instant::now()));
        Ok(private_devices(vni).bridge)
    }

    /// Whether private network `vni` is set up on this host now.
    pub async fn carries(&self, vni: u32) -> bool {
        self.state.lock().await.ready.contains_key(&vni)
    }

    /// The bridge of an attachment's network, without setting anything up.
    pub fn bridge_name(&self, vni: Option<u32>) -> String {
        match vni {
            Some(v) => private_devices(v).bridge,
            None => self.cluster_bridge.clone(),
        }
    }

    /// The overlay device that carries an attachment's network to other
    /// hosts (none outside a cluster).
    pub fn overlay_device(&self, vni: Option<u32>) -> Option<String> {
        let overlay = self.overlay.as_ref()?;
        Some(match vni {
            Some(v) => private_devices(v).vxlan,
            None => overlay.device.clone(),
        })
    }

    /// Takes the overlay's new peers to every private network here.
    pub async fn set_peers(&self, peers: Vec<Ipv4Addr>) {
        let mut st = self.state.lock().await;
        if st.peers == peers {
            return;
        }
        st.peers = peers;
        for (vni, (subnet, _)) in st.ready.clone() {
            let config = self.config(vni, subnet, &st.peers);
            if let Err(e) = self.network.ensure_private_network(&config).await {
                warn!(vni, error = %e, "cannot update a private network's overlay peers");
                st.ready.remove(&vni);
            }
        }
    }

    /// Removes the networks none of `in_use` (the networks of this host's
    /// taps) is on, unless one was asked for lately (its instance may be
    /// starting).
    pub async fn collect(&self, in_use: &BTreeSet<u32>) {
        let mut st = self.state.lock().await;
        let idle: Vec<u32> = st
            .ready
            .iter()
            .filter(|(vni, (_, asked))| !in_use.contains(vni) && asked.elapsed() > KEEP_IDLE)
            .map(|(vni, _)| *vni)
            .collect();
        for vni in idle {
            match self.network.remove_private_network(vni).await {
                Ok(()) => {
                    info!(
                        vni,
                        "private network removed from this host: no instance of it here"
                    );
                    st.ready.remove(&vni);
                }
                Err(e) => warn!(vni, error = %e, "cannot remove an idle private network"),
            }
        }
    }

    fn config(&self, vni: u32, subnet: Ipv4Net, peers: &[Ipv4Addr]) -> PrivateNetworkConfig {
        PrivateNetworkConfig {
            vni,
            subnet,
            overlay: self.overlay.as_ref().map(|o| PrivateOverlay {
                local: o.local,
                port: o.port,
                peers: peers.to_vec(),
            }),
        }
    }
}

//! The agent's part in a cluster: the version check at start, the host's
//! own address on the VM network, the overlay's peers (every other
//! registered host) and where image files are fetched from (live servers
//! and peer hosts).
//!
//! This module must never hand the host an address another host or an
//! instance holds: addresses are claimed with create-if-absent keys.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skyvisor_core::cluster::{ClusterVersion, ServerRecord, versions_compatible};
use skyvisor_core::{Host, HostName, Network, keys};
use skyvisor_net::{HostNetwork, OverlayConfig};
use skyvisor_store::{Compare, Store, StoreExt, WatchEvent, decode, put_json};
use tracing::{debug, info, warn};

use crate::{AgentContext, AgentError};

/// How this host joins the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySettings {
    /// The VXLAN device's name, e.g. `svvx0`.
    pub device: String,
    /// Its UDP port (4789 is the IANA default).
    pub port: u16,
    /// This host's underlay address: where the other hosts send its traffic.
    pub local: Ipv4Addr,
}

/// Refuses to run against a cluster of another version.
pub async fn check_version(store: &dyn Store) -> Result<(), AgentError> {
    let Some((cluster, _)) = store
        .get_json::<ClusterVersion>(keys::CLUSTER_VERSION)
        .await?
    else {
        // No server recorded one yet; the server refuses mismatched agents'
        // hosts at placement anyway.
        return Ok(());
    };
    let mine = skyvisor_core::VERSION;
    if versions_compatible(mine, &cluster.version) {
        Ok(())
    } else {
        Err(AgentError::VersionMismatch {
            agent: mine.to_string(),
            cluster: cluster.version,
        })
    }
}

/// The host's own address on `network`: the one it claimed before, or the
/// highest free one (instances get the lowest, so the two rarely meet).
pub async fn claim_host_address(
    store: &dyn Store,
    host: &HostName,
    network: &Network,
) -> Result<Ipv4Addr, AgentError> {
    let mine = keys::host_claim_value(host);
    for _ in 0..16 {
        let listing = store.list(&keys::ipam_prefix(&network.name)).await?;
        let mut taken = std::collections::HashSet::new();
        for kv in &listing.items {
            let Ok(ip) = keys::name_of(&kv.key).parse::<Ipv4Addr>() else {
                continue;
            };
            if decode::<String>(kv).is_ok_and(|v| v == mine) {
                return Ok(ip);
            }
            taken.insert(ip);
        }
        let gateway = network.subnet.gateway();
        let Some(ip) = network
            .subnet
            .vm_addresses()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|ip| !taken.contains(ip) && *ip != gateway)
        else {
            return Err(AgentError::Network(format!(
                "network {} ({}) has no free address for host {host}",
                network.name, network.subnet
            )));
        };
        let key = keys::ipam_claim(&network.name, ip);
        let out = store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![put_json(key, &mine)],
            )
            .await?;
        if out.succeeded {
            info!(%host, %ip, "claimed the host's address on the VM network");
            return Ok(ip);
        }
    }
    Err(AgentError::Network(format!(
        "could not claim an address for host {host}: too many concurrent claims"
    )))
}

/// Keeps the overlay's flooding list equal to the other registered hosts'
/// addresses, forever.
pub async fn follow_peers(
    store: Arc<dyn Store>,
    network: Arc<dyn HostNetwork>,
    bridge: String,
    me: HostName,
    settings: OverlaySettings,
    vm_network: Network,
    private_nets: Arc<crate::private_nets::PrivateNets>,
) {
    let mut applied: Option<Vec<Ipv4Addr>> = None;
    loop {
        let listing = match store.list(keys::HOSTS).await {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "cannot list hosts for the overlay; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut hosts: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
        for kv in &listing.items {
            if let Some((name, addr)) = peer_of(kv, &me) {
                hosts.insert(name, addr);
            }
        }
        apply(
            &network,
            &bridge,
            &settings,
            &vm_network,
            &hosts,
            &mut applied,
        )
        .await;
        private_nets.set_peers(peers_of(&hosts)).await;
        let mut stream = match store.watch(keys::HOSTS, listing.revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot watch hosts for the overlay; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Put(kv)) => {
                    if let Some((name, addr)) = peer_of(&kv, &me) {
                        hosts.insert(name, addr);
                    }
                }
                Ok(WatchEvent::Delete { key, .. }) => {
                    hosts.remove(keys::name_of(&key));
                }
                Err(e) => {
                    debug!(error = %e, "host watch broke; relisting");
                    break;
                }
            }
            apply(
                &network,
                &bridge,
                &settings,
                &vm_network,
                &hosts,
                &mut applied,
            )
            .await;
            private_nets.set_peers(peers_of(&hosts)).await;
        }
    }
}

/// A registered host other than `me`, with its underlay address.
fn peer_of(kv: &skyvisor_store::KeyValue, me: &HostName) -> Option<(String, Ipv4Addr)> {
    let host: Host = decode(kv).ok()?;
    if &host.name == me {
        return None;
    }
    match host.address.parse::<Ipv4Addr>() {
        Ok(addr) => Some((host.name.to_string(), addr)),
        Err(_) => {
            warn!(host = %host.name, address = %host.address, "host address is not an IPv4 address; not an overlay peer");
            None
        }
    }
}

/// The other hosts' underlay addresses, sorted, each once.
fn peers_of(hosts: &BTreeMap<String, Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut peers: Vec<Ipv4Addr> = hosts.values().copied().collect();
    peers.sort();
    peers.dedup();
    peers
}

async fn apply(
    network: &Arc<dyn HostNetwork>,
    bridge: &str,
    settings: &OverlaySettings,
    vm_network: &Network,
    hosts: &BTreeMap<String, Ipv4Addr>,
    applied: &mut Option<Vec<Ipv4Addr>>,
) {
    let peers = peers_of(hosts);
    if applied.as_ref() == Some(&peers) {
        return;
    }
    let config = overlay_config(settings, vm_network, peers.clone());
    match network.ensure_overlay(bridge, &config).await {
        Ok(()) => {
            info!(peers = ?peers, "overlay peers updated");
            *applied = Some(peers);
        }
        Err(e) => warn!(error = %e, "cannot update the overlay"),
    }
}

/// The overlay configuration for `peers`.
pub fn overlay_config(
    settings: &OverlaySettings,
    vm_network: &Network,
    peers: Vec<Ipv4Addr>,
) -> OverlayConfig {
    OverlayConfig {
        name: settings.device.clone(),
        vni: vm_network.vni,
        local: settings.local,
        port: settings.port,
        peers,
        gateway: vm_network.subnet.gateway(),
    }
}

/// Keeps the image cache's sources (and the fence's list of peers)
/// current, forever: the live servers
/// (their records live as long as their leases) and the other hosts'
/// agents, each followed through a watch of its prefix, so a server's death
/// or arrival is seen within moments rather than at the next poll.
pub async fn follow_image_sources(ctx: Arc<AgentContext>) {
    let servers = {
        let ctx = ctx.clone();
        follow_prefix(ctx.store.clone(), keys::SERVERS, move |items| {
            let urls = items
                .values()
                .filter_map(|kv| decode::<ServerRecord>(kv).ok())
                .map(|s| s.url)
                .collect();
            ctx.images.set_servers(urls);
        })
    };
    let peers = {
        let ctx = ctx.clone();
        let me = ctx.host.clone();
        follow_prefix(ctx.store.clone(), keys::HOSTS, move |items| {
            let peers: Vec<(HostName, String)> = items
                .values()
                .filter_map(|kv| decode::<Host>(kv).ok())
                .filter(|h| h.name != me)
                .filter_map(|h| h.agent_url.map(|u| (h.name, u)))
                .collect();
            if let Some(fence) = &ctx.fence {
                fence.set_peers(peers.clone());
            }
            ctx.images
                .set_peers(peers.into_iter().map(|(h, u)| (h.to_string(), u)).collect());
        })
    };
    tokio::join!(servers, peers);
}

/// Calls `apply` with every key under `prefix` now and after every change,
/// forever: a listing, then a watch from the listing's revision; a broken
/// watch is followed by a new listing.
async fn follow_prefix(
    store: Arc<dyn Store>,
    prefix: &'static str,
    apply: impl Fn(&BTreeMap<String, skyvisor_store::KeyValue>),
) {
    loop {
        let listing = match store.list(prefix).await {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, prefix, "cannot list; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut items: BTreeMap<String, skyvisor_store::KeyValue> = listing
            .items
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        apply(&items);
        let mut stream = match store.watch(prefix, listing.revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, prefix, "cannot watch; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Put(kv)) => {
                    items.insert(kv.key.clone(), kv);
                }
                Ok(WatchEvent::Delete { key, .. }) => {
                    items.remove(&key);
                }
                Err(e) => {
                    debug!(error = %e, prefix, "watch broke; relisting");
                    break;
                }
            }
            apply(&items);
        }
        // The stream ended (store restarted, compaction): list again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! The host's instance firewall: a guard on every local tap (it may send
//! only as its instance) and the inbound filters of instances in security
//! groups, from the document the control plane resolves for this host
//! (`firewalls/<host>`).
//!
//! An instance in security groups whose rules have not reached this host
//! yet gets a filter that lets nothing new in: a member is never open by
//! accident while the document catches up.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use skyvisor_core::firewall::HostFirewall;
use skyvisor_core::{InstanceSpec, MacAddr, keys};
use skyvisor_net::{FirewallConfig, HostNetwork, InboundFilter, NetError, TapGuard};
use skyvisor_store::{WatchEvent, decode};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::AgentContext;
use crate::private_nets::PrivateNets;

/// A tap of this host and its instance.
#[derive(Debug, Clone)]
struct LocalTap {
    instance: String,
    mac: MacAddr,
    ip: Ipv4Addr,
    vni: Option<u32>,
    gateway: Ipv4Addr,
    filtered: bool,
    /// When it was added: a listing of taps older than that may miss it.
    since: Instant,
}

/// The firewall's inputs and what was last applied.
#[derive(Default)]
struct State {
    taps: BTreeMap<String, LocalTap>,
    doc: HostFirewall,
    applied: Option<FirewallConfig>,
}

/// The host's instance firewall.
pub struct Firewall {
    network: Arc<dyn HostNetwork>,
    state: Mutex<State>,
}

impl Firewall {
    /// A firewall with no taps and no rules yet.
    pub fn new(network: Arc<dyn HostNetwork>) -> Self {
        Self {
            network,
            state: Mutex::new(State::default()),
        }
    }

    /// Guards instance `spec`'s new tap (and filters it if it is in
    /// security groups) before its VM may send or receive a frame.
    pub async fn add_tap(
        &self,
        tap: &str,
        spec: &InstanceSpec,
        nets: &PrivateNets,
    ) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        st.taps.insert(
            tap.to_string(),
            LocalTap {
                instance: spec.instance_ref().to_string(),
                mac: spec.network.mac,
                ip: spec.network.ip,
                vni: spec.network.vni,
                gateway: spec.network.gateway,
                filtered: !spec.security_groups.is_empty(),
                since: Instant::now(),
            },
        );
        self.apply(&mut st, nets).await
    }

    /// Takes a new document from the control plane.
    async fn set_doc(&self, doc: HostFirewall, nets: &PrivateNets) {
        let mut st = self.state.lock().await;
        st.doc = doc;
        if let Err(e) = self.apply(&mut st, nets).await {
            warn!(error = %e, "cannot apply the firewall");
        }
    }

    /// Drops the taps that are gone and applies what changed; gives the
    /// taps that exist and when they were listed.
    async fn prune(&self, nets: &PrivateNets) -> Option<(Vec<String>, Instant)> {
        let listed_at = Instant::now();
        let existing = match self.network.list_taps("svt").await {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "cannot list taps");
                return None;
            }
        };
        let mut st = self.state.lock().await;
        // A tap added since the listing began is not missing, only new.
        st.taps
            .retain(|tap, t| t.since > listed_at || existing.contains(tap));
        if let Err(e) = self.apply(&mut st, nets).await {
            warn!(error = %e, "cannot apply the firewall");
        }
        let in_use = st.taps.values().filter_map(|t| t.vni).collect();
        drop(st);
        nets.collect(&in_use).await;
        Some((existing, listed_at))
    }

    async fn apply(&self, st: &mut State, nets: &PrivateNets) -> Result<(), NetError> {
        let config = render(st, nets);
        if st.applied.as_ref() == Some(&config) {
            return Ok(());
        }
        self.network.apply_firewall(&config).await?;
        debug!(
            guards = config.guards.len(),
            filters = config.filters.len(),
            "firewall applied"
        );
        st.applied = Some(config);
        Ok(())
    }
}

/// The firewall configuration from the local taps and the document.
fn render(st: &State, nets: &PrivateNets) -> FirewallConfig {
    let guards = st
        .taps
        .iter()
        .map(|(tap, t)| TapGuard {
            tap: tap.clone(),
            mac: t.mac,
            ip: t.ip,
        })
        .collect();
    let mut filters: BTreeMap<String, InboundFilter> = st
        .doc
        .instances
        .iter()
        .filter(|(_, f)| f.filtered)
        .map(|(name, f)| {
            (
                name.clone(),
                InboundFilter {
                    instance: name.clone(),
                    bridge: nets.bridge_name(f.vni),
                    ip: f.ip,
                    allow: f.allow.clone(),
                    platform: f.vni.map(|_| f.gateway),
                },
            )
        })
        .collect();
    // The document is the word on instances it lists; until it lists one,
    // what the instance's spec said at its start.
    for t in st
        .taps
        .values()
        .filter(|t| t.filtered && !st.doc.instances.contains_key(&t.instance))
    {
        filters
            .entry(t.instance.clone())
            .or_insert_with(|| InboundFilter {
                instance: t.instance.clone(),
                bridge: nets.bridge_name(t.vni),
                ip: t.ip,
                allow: Vec::new(),
                platform: t.vni.map(|_| t.gateway),
            });
    }
    FirewallConfig {
        scope: nets.bridge_name(None),
        guards,
        filters: filters.into_values().collect(),
    }
}

/// How often taps that went away are dropped from the firewall.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Follows this host's firewall document and keeps the firewall current,
/// forever.
pub async fn follow(ctx: Arc<AgentContext>) {
    let key = keys::firewall(&ctx.host);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    loop {
        // One listing gives the document and the revision to watch from.
        let (doc, revision) = match ctx.store.list(&key).await {
            Ok(listing) => {
                let doc = listing
                    .items
                    .iter()
                    .find(|kv| kv.key == key)
                    .and_then(|kv| decode::<HostFirewall>(kv).ok())
                    .unwrap_or_default();
                (doc, listing.revision)
            }
            Err(e) => {
                debug!(error = %e, "cannot read the firewall document; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        ctx.firewall.set_doc(doc, &ctx.private_nets).await;
        let mut stream = match ctx.store.watch(&key, revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot watch the firewall document; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    // The prefix also matches longer host names.
                    Some(Ok(WatchEvent::Put(kv))) if kv.key == key => {
                        if let Ok(doc) = decode::<HostFirewall>(&kv) {
                            ctx.firewall.set_doc(doc, &ctx.private_nets).await;
                        }
                    }
                    Some(Ok(WatchEvent::Delete { key: gone, .. })) if gone == key => {
                        ctx.firewall.set_doc(HostFirewall::default(), &ctx.private_nets).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %e, "firewall watch broke; reading again");
                        break;
                    }
                    None => break,
                },
                _ = prune.tick() => {
                    if let Some((taps, listed_at)) = ctx.firewall.prune(&ctx.private_nets).await {
                        ctx.metadata.retain(&taps, listed_at);
                    }
                }
            }
        }
    }
}

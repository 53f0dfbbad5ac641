//! The host's DNS service: the internal zone's records as the leader
//! publishes them (`dns/`), and the upstream resolvers other names go to.
//! The metadata service opens one server per VM network on its gateway
//! (see `metadata::MetadataService`), which knows who asks.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skyvisor_core::dns::{DnsRecords, ZONE};
use skyvisor_core::keys;
use skyvisor_dns::{Callers, Forwarder, Records, Resolver};
use skyvisor_store::{Store, WatchEvent, decode};
use tracing::{debug, info, warn};

/// What every DNS server of this host answers from.
pub struct DnsService {
    records: Records,
    forwarder: Option<Arc<Forwarder>>,
}

impl DnsService {
    /// A service forwarding other names to the resolvers of the host's
    /// `/etc/resolv.conf` (the agent's own namespace reaches them, even a
    /// loopback stub).
    pub fn new() -> Arc<Self> {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let upstream = Forwarder::upstream_of_resolv_conf(&text);
        if upstream.is_empty() {
            warn!("no nameserver in /etc/resolv.conf: guests resolve only internal names");
        }
        Arc::new(Self {
            records: Records::new(),
            forwarder: (!upstream.is_empty()).then(|| Arc::new(Forwarder::new(upstream))),
        })
    }

    /// The server of one network, whose callers `callers` knows.
    pub fn resolver(&self, callers: Callers) -> Option<Resolver> {
        match Resolver::new(ZONE, self.records.clone(), callers, self.forwarder.clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "cannot make a DNS server");
                None
            }
        }
    }

    fn put(&self, doc: DnsRecords) {
        self.records.replace(doc.project.as_str(), doc.names);
    }
}

/// Follows `dns/` into the records, for as long as the agent runs.
pub async fn follow(store: Arc<dyn Store>, dns: Arc<DnsService>) {
    loop {
        let revision = match store.list(keys::DNS).await {
            Ok(listing) => {
                let docs: Vec<DnsRecords> = listing
                    .items
                    .iter()
                    .filter_map(|kv| decode::<DnsRecords>(kv).ok())
                    .collect();
                let projects: Vec<String> = docs.iter().map(|d| d.project.to_string()).collect();
                dns.records.retain(|p| projects.iter().any(|q| q == p));
                for doc in docs {
                    dns.put(doc);
                }
                listing.revision
            }
            Err(e) => {
                debug!(error = %e, "cannot read DNS records; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = match store.watch(keys::DNS, revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot watch DNS records; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        info!("DNS records followed");
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Put(kv)) => {
                    if let Ok(doc) = decode::<DnsRecords>(&kv) {
                        dns.put(doc);
                    }
                }
                Ok(WatchEvent::Delete { key, .. }) => {
                    if let Some(project) = key.strip_prefix(keys::DNS) {
                        dns.records.remove(project);
                    }
                }
                Err(e) => {
                    debug!(error = %e, "DNS watch broke; reading again");
                    break;
                }
            }
        }
    }
}

//! This server's membership of the cluster: the version check at start,
//! its lease-bound registration under `servers/`, the leader election, the
//! work only the leader does, and the store health the API answers by.
//!
//! Every server serves the whole API (writes are guarded transactions, see
//! `instances.rs`); only the housekeeping below runs on the leader alone.
//! This module must never let a server of another version join a cluster
//! that has live servers, and never run leader-only work while not leading.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use skyvisor_core::cluster::{ClusterVersion, ServerRecord, versions_compatible};
use skyvisor_core::{InstanceSpec, ServerName, keys};
use skyvisor_store::{Compare, LeaseId, Op, Store, StoreError, StoreExt, decode, encode};
use thiserror::Error;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::election::{CandidateConfig, Election, Leadership};
use crate::inventory::Inventory;

/// How often the leader checks the per-host copies of specs (a safety net:
/// every write keeps them in step).
const REPAIR_EVERY: Duration = Duration::from_secs(300);

/// How this server takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This server's unique name.
    pub name: ServerName,
    /// The URL other servers, agents and users reach its API at.
    pub url: String,
    /// Lease time-to-live of its registration and leadership: a crashed
    /// leader is replaced this long after it stopped.
    pub lease_ttl: Duration,
    /// The etcd endpoints agents should connect to (empty with an embedded
    /// store: then no agent on another host can join).
    pub etcd_endpoints: Vec<String>,
    /// The etcd key prefix of the cluster.
    pub etcd_namespace: String,
    /// How often the leader compacts the store's history.
    pub compact_every: Duration,
    /// How many revisions of history the leader keeps when compacting
    /// (watchers further behind must relist).
    pub keep_revisions: i64,
    /// How long after a host's lease is gone before its HA-protected VMs
    /// are restarted elsewhere (its agent fenced itself a quarter of its
    /// TTL before the lease could expire; this is the extra safety).
    pub ha_margin: Duration,
    /// How long a host holding volume replicas may be gone before the
    /// leader has its replicas made again on other hosts.
    pub replica_grace: Duration,
    /// Admission control: new HA-protected VMs are refused unless the
    /// protected VMs could all restart after this many hosts fail (0: off).
    pub ha_reserve_hosts: u32,
}

impl ClusterSettings {
    /// Settings of a single server with an embedded store.
    pub fn single(name: ServerName, url: String) -> Self {
        Self {
            name,
            url,
            lease_ttl: Duration::from_secs(10),
            etcd_endpoints: Vec::new(),
            etcd_namespace: String::new(),
            compact_every: Duration::from_secs(300),
            keep_revisions: 100_000,
            ha_margin: DEFAULT_HA_MARGIN,
            replica_grace: DEFAULT_REPLICA_GRACE,
            ha_reserve_hosts: 0,
        }
    }
}

/// The default [`ClusterSettings::replica_grace`] (Ceph marks an OSD out
/// after 10 minutes).
pub const DEFAULT_REPLICA_GRACE: Duration = Duration::from_secs(600);

/// The default [`ClusterSettings::ha_margin`].
pub const DEFAULT_HA_MARGIN: Duration = Duration::from_secs(1);

/// Why a server cannot join the cluster.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Live servers of another version run the cluster.
    #[error(
        "this server is version {mine} but the cluster runs version {cluster} (live servers: {servers}); \
         stop every server and start them all with one version"
    )]
    VersionMismatch {
        /// This server's version.
        mine: String,
        /// The cluster's.
        cluster: String,
        /// The live servers, with their versions.
        servers: String,
    },
    /// A live server already uses this name.
    #[error(
        "server name {name:?} is already used by a live server at {url}; choose another --name or stop that server"
    )]
    NameTaken {
        /// The name.
        name: String,
        /// The other server's URL.
        url: String,
    },
}

/// Whether the store answers, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Whether the last probe succeeded.
    pub ok: bool,
    /// The last failure, for people.
    pub error: Option<String>,
}

/// What the API shows of the membership: cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This server.
    pub me: ServerRecord,
    /// The leadership as observed.
    pub leadership: watch::Receiver<Leadership>,
    /// The store's health as probed.
    pub health: watch::Receiver<StoreHealth>,
}

/// This server's membership; dropping it stops campaigning and the
/// leader-only work (the registration then expires with its lease).
pub struct Membership {
    /// This server.
    pub me: ServerRecord,
    election: Election,
    health: watch::Receiver<StoreHealth>,
    lease: Arc<Mutex<Option<LeaseId>>>,
    store: Arc<dyn Store>,
    tasks: Vec<JoinHandle<()>>,
}

impl Membership {
    /// Checks the cluster version, registers this server, starts the
    /// election and, while leading, the leader-only work.
    pub async fn join(
        store: Arc<dyn Store>,
        inventory: Arc<Inventory>,
        settings: &ClusterSettings,
    ) -> Result<Self, ClusterError> {
        check_version(store.as_ref()).await?;
        let me = ServerRecord {
            name: settings.name.clone(),
            url: settings.url.clone(),
            version: skyvisor_core::VERSION.to_string(),
            started_at: Utc::now(),
        };
        let lease = store.grant_lease(settings.lease_ttl).await?;
        if let Err(e) = register(store.as_ref(), &me, lease).await {
            let _ = store.revoke_lease(lease).await;
            return Err(e);
        }
        let slot = Arc::new(Mutex::new(Some(lease)));
        let election = Election::start_with_lease(
            store.clone(),
            CandidateConfig {
                key: keys::LEADER.to_string(),
                name: me.name.clone(),
                url: me.url.clone(),
                ttl: settings.lease_ttl,
            },
            slot.clone(),
        );
        let (health_tx, health) = watch::channel(StoreHealth {
            ok: true,
            error: None,
        });
        let tasks = vec![
            tokio::spawn(keep_registered(store.clone(), me.clone(), slot.clone())),
            tokio::spawn(probe_store(store.clone(), health_tx)),
            tokio::spawn(leader_work(
                store.clone(),
                inventory,
                election.subscribe(),
                settings.clone(),
            )),
        ];
        info!(server = %me.name, url = %me.url, "joined the cluster");
        Ok(Self {
            me,
            election,
            health,
            lease: slot,
            store,
            tasks,
        })
    }

    /// The leadership as last observed.
    pub fn leadership(&self) -> Leadership {
        self.election.current()
    }

    /// Follows the leadership.
    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.election.subscribe()
    }

    /// Whether the store answered the last probe.
    pub fn store_health(&self) -> StoreHealth {
        self.health.borrow().clone()
    }

    /// A view for the API.
    pub fn view(&self) -> ClusterView {
        ClusterView {
            me: self.me.clone(),
            leadership: self.election.subscribe(),
            health: self.health.clone(),
        }
    }

    /// Leaves the cluster: revokes the lease so that the registration goes
    /// and another server may lead at once.
    pub async fn leave(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let lease = self.lease.lock().await.take();
        if let Some(lease) = lease
            && let Err(e) = self.store.revoke_lease(lease).await
        {
            debug!(error = %e, "could not revoke the server lease");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Records this server's version as the cluster's, or refuses to join a
/// cluster whose live servers run another one.
pub async fn check_version(store: &dyn Store) -> Result<(), ClusterError> {
    let mine = skyvisor_core::VERSION;
    let record = ClusterVersion {
        version: mine.to_string(),
        set_at: Utc::now(),
    };
    if store.create(keys::CLUSTER_VERSION, encode(&record)).await? {
        info!(version = mine, "recorded the cluster version");
        return Ok(());
    }
    let Some((current, _)) = store
        .get_json::<ClusterVersion>(keys::CLUSTER_VERSION)
        .await?
    else {
        return Ok(());
    };
    if versions_compatible(mine, &current.version) {
        return Ok(());
    }
    let (servers, _) = store.list_json::<ServerRecord>(keys::SERVERS).await?;
    let others: Vec<String> = servers
        .iter()
        .filter(|(s, _)| s.version != mine)
        .map(|(s, _)| format!("{} {}", s.name, s.version))
        .collect();
    if !others.is_empty() {
        return Err(ClusterError::VersionMismatch {
            mine: mine.to_string(),
            cluster: current.version,
            servers: others.join(", "),
        });
    }
    // No live server runs the old version: this is an upgrade.
    store.put(keys::CLUSTER_VERSION, encode(&record)).await?;
    warn!(from = %current.version, to = mine, "upgraded the cluster version");
    Ok(())
}

/// Creates this server's record bound to `lease`, refusing a name a live
/// server holds.
async fn register(
    store: &dyn Store,
    me: &ServerRecord,
    lease: LeaseId,
) -> Result<(), ClusterError> {
    let key = keys::server(&me.name);
    let out = store
        .txn(
            vec![Compare::Absent(key.clone())],
            vec![Op::Put {
                key: key.clone(),
                value: encode(me),
                lease: Some(lease),
            }],
        )
        .await?;
    if out.succeeded {
        return Ok(());
    }
    let url = match store.get(&key).await? {
        Some(kv) => decode::<ServerRecord>(&kv)
            .map(|r| r.url)
            .unwrap_or_default(),
        None => String::new(),
    };
    Err(ClusterError::NameTaken {
        name: me.name.to_string(),
        url,
    })
}

/// Re-creates the registration when the lease was replaced (it expired
/// during an outage and the election granted a new one).
async fn keep_registered(
    store: Arc<dyn Store>,
    me: ServerRecord,
    slot: Arc<Mutex<Option<LeaseId>>>,
) {
    let key = keys::server(&me.name);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(lease) = *slot.lock().await else {
            continue;
        };
        match store.get(&key).await {
            Ok(Some(kv)) if kv.lease == Some(lease) => {}
            Ok(_) => match register(store.as_ref(), &me, lease).await {
                Ok(()) => info!(server = %me.name, "re-registered under a new lease"),
                Err(e) => debug!(error = %e, "cannot re-register yet"),
            },
            Err(e) => debug!(error = %e, "cannot check the registration"),
        }
    }
}

/// Probes the store every second so the API can answer 503 at once while
/// it is unreachable, instead of every request waiting for a timeout.
async fn probe_store(store: Arc<dyn Store>, health: watch::Sender<StoreHealth>) {
    loop {
        let now = match store.get(keys::CLUSTER_VERSION).await {
            Ok(_) => StoreHealth {
                ok: true,
                error: None,
            },
            Err(e) => StoreHealth {
                ok: false,
                error: Some(e.to_string()),
            },
        };
        health.send_if_modified(|h| {
            let changed = *h != now;
            if changed {
                if now.ok {
                    info!("the state store answers again");
                } else {
                    warn!(error = ?now.error, "the state store is unreachable");
                }
                *h = now;
            }
            changed
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the leader-only work while this server leads, and stops it the
/// moment it does not.
async fn leader_work(
    store: Arc<dyn Store>,
    inventory: Arc<Inventory>,
    mut leadership: watch::Receiver<Leadership>,
    settings: ClusterSettings,
) {
    loop {
        if leadership.wait_for(|l| l.is_leader).await.is_err() {
            return;
        }
        info!(server = %settings.name, "starting leader-only work");
        let work = tokio::spawn(housekeeping(
            store.clone(),
            inventory.clone(),
            settings.clone(),
        ));
        let lost = leadership.wait_for(|l| !l.is_leader).await;
        work.abort();
        info!(server = %settings.name, "stopped leader-only work");
        if lost.is_err() {
            return;
        }
    }
}

/// The leader's periodic housekeeping: repair the per-host spec copies and
/// compact the store's history.
async fn housekeeping(store: Arc<dyn Store>, inventory: Arc<Inventory>, settings: ClusterSettings) {
    let mut last_compact = tokio::time::Instant::now();
    loop {
        match repair_bindings(store.as_ref()).await {
            Ok(0) => {}
            Ok(n) => info!(repaired = n, "repaired per-host instance records"),
            Err(e) => debug!(error = %e, "cannot check per-host instance records"),
        }
        if last_compact.elapsed() >= settings.compact_every {
            let target = inventory.revision() - settings.keep_revisions;
            if target > 0 {
                match store.compact(target).await {
                    Ok(()) => debug!(revision = target, "compacted the store history"),
                    Err(e) => debug!(error = %e, "cannot compact the store"),
                }
            }
            last_compact = tokio::time::Instant::now();
        }
        tokio::time::sleep(REPAIR_EVERY).await;
    }
}

/// Makes the per-host copies of instance specs match the specs: writes a
/// missing or stale copy, deletes a copy whose spec is gone or moved. Every
/// write is guarded by the spec's revision, so it can race nothing.
/// Returns how many copies it changed.
pub async fn repair_bindings(store: &dyn Store) -> Result<usize, StoreError> {
    let specs = store.list(keys::INSTANCE_SPECS).await?;
    let bindings = store.list(keys::BINDINGS).await?;
    let mut wanted = HashSet::new();
    let mut repaired = 0;
    let have: std::collections::HashMap<&str, &[u8]> = bindings
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    /// What the copy's key needs; the rest of the spec is not decoded.
    #[derive(serde::Deserialize)]
    struct Placement {
        name: skyvisor_core::InstanceName,
        #[serde(default = "skyvisor_core::auth::default_project")]
        project: skyvisor_core::ProjectName,
        host: skyvisor_core::HostName,
    }
    for kv in &specs.items {
        let at: Placement = match decode(kv) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "skipping undecodable instance spec");
                continue;
            }
        };
        let key = keys::binding(
            &at.host,
            &skyvisor_core::InstanceRef::new(at.project, at.name),
        );
        // Copies are written with the spec's own bytes; only when they
        // differ is a full comparison needed.
        let stale = have.get(key.as_str()).is_none_or(|v| {
            *v != kv.value.as_slice()
                && serde_json::from_slice::<InstanceSpec>(v).ok()
                    != serde_json::from_slice::<InstanceSpec>(&kv.value).ok()
        });
        wanted.insert(key.clone());
        if stale {
            let out = store
                .txn(
                    vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                    vec![Op::Put {
                        key,
                        value: kv.value.clone(),
                        lease: None,
                    }],
                )
                .await?;
            repaired += usize::from(out.succeeded);
        }
    }
    for kv in &bindings.items {
        if wanted.contains(&kv.key) {
            continue;
        }
        // Delete only if the spec it copies is still absent or elsewhere.
        // `bindings/<host>/<project>/<name>`
        let Some(name) = kv
            .key
            .strip_prefix(keys::BINDINGS)
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(_, instance)| instance.parse::<skyvisor_core::InstanceRef>().ok())
        else {
            continue;
        };
        let spec_key = keys::instance_spec(&name);
        let guard = match store.get(&spec_key).await? {
            None => Compare::Absent(spec_key),
            Some(s) => {
                let spec: Result<InstanceSpec, _> = decode(&s);
                if spec.is_ok_and(|sp| keys::binding(&sp.host, &sp.instance_ref()) == kv.key) {
                    continue;
                }
                Compare::ModRevision(spec_key, s.mod_revision)
            }
        };
        let out = store
            .txn(
                vec![guard, Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                vec![Op::Delete(kv.key.clone())],
            )
            .await?;
        repaired += usize::from(out.succeeded);
    }
    Ok(repaired)
}

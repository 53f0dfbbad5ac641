//! An in-memory view of hosts and instance specs, kept current by watching
//! the store, so that placement and listing never scan the store.
//!
//! The view is a cache: the store stays the only authority. Writers that
//! need to see their own write wait for the view to reach the write's
//! revision ([`Inventory::wait_for`]). Everything in one view is as of one
//! store revision, so a decision taken on it can be guarded by comparing
//! the mod revisions it saw (see `HostEntry::alloc_revision`).
//!
//! The view knows whether it is following the store ([`Inventory::connected`]):
//! while its watch is broken, it must not be served as current.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skyvisor_core::keys;
use skyvisor_core::{
    GroupName, Host, HostName, HostState, Instance, InstanceName, InstanceRef, InstanceSpec,
    InstanceStatus, Resources, Scoped,
};
use skyvisor_store::{KeyValue, Op, Revision, Store, StoreError, WatchEvent, decode};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;
use tracing::{debug, warn};

/// What the inventory knows about one host.
#[derive(Debug, Clone)]
pub struct HostEntry {
    /// The agent's registration (shared: a snapshot of a thousand hosts
    /// costs no copies).
    pub host: Arc<Host>,
    /// Whether its liveness key exists (its lease is held).
    pub alive: bool,
    /// Administrative state set through the API, if any.
    pub admin_state: Option<HostState>,
    /// Resources promised to the instances bound to it.
    pub allocated: Resources,
    /// Number of instances bound to it.
    pub instances: u32,
    /// Mod revision of its allocation marker (0: never written).
    pub alloc_revision: Revision,
    /// Mod revision of its administrative state key (0: none set).
    pub state_revision: Revision,
}

impl HostEntry {
    /// The state to show: unreachable when dead, else the admin state or ready.
    pub fn state(&self) -> HostState {
        if !self.alive {
            HostState::Unreachable
        } else {
            self.admin_state.unwrap_or(HostState::Ready)
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The revision of the last watch event applied (or the lowest listing
    /// revision after a load).
    applied: Revision,
    hosts: BTreeMap<HostName, Arc<Host>>,
    alive: BTreeSet<HostName>,
    admin: BTreeMap<HostName, HostState>,
    instances: BTreeMap<InstanceRef, InstanceSpec>,
    statuses: BTreeMap<InstanceRef, InstanceStatus>,
    used_ips: HashMap<String, HashSet<Ipv4Addr>>,
    /// Address claims (`ipam/<network>/<ip>`), held by instances or hosts.
    claims: HashMap<String, HashSet<Ipv4Addr>>,
    allocated: HashMap<HostName, (Resources, u32)>,
    alloc_revs: HashMap<HostName, Revision>,
    state_revs: HashMap<HostName, Revision>,
    /// Spread group (of a project) -> member -> its host.
    groups: HashMap<Scoped<GroupName>, BTreeMap<InstanceName, HostName>>,
}

impl State {
    fn add_instance(&mut self, spec: InstanceSpec) {
        self.remove_instance(&spec.instance_ref());
        self.used_ips
            .entry(spec.network.ipam_scope())
            .or_default()
            .insert(spec.network.ip);
        let entry = self.allocated.entry(spec.host.clone()).or_default();
        entry.0 = entry.0.plus(spec.resources);
        entry.1 += 1;
        // A VM on its way holds its resources on the destination too.
        if let Some(m) = &spec.migration {
            let dest = self.allocated.entry(m.destination.clone()).or_default();
            dest.0 = dest.0.plus(spec.resources);
        }
        if let Some(g) = &spec.spread_group {
            self.groups
                .entry(Scoped::new(spec.project.clone(), g.clone()))
                .or_default()
                .insert(spec.name.clone(), spec.host.clone());
        }
        self.instances.insert(spec.instance_ref(), spec);
    }

    fn remove_instance(&mut self, name: &InstanceRef) {
        if let Some(old) = self.instances.remove(name) {
            if let Some(ips) = self.used_ips.get_mut(&old.network.ipam_scope()) {
                ips.remove(&old.network.ip);
            }
            if let Some(entry) = self.allocated.get_mut(&old.host) {
                entry.0 = entry.0.minus(old.resources);
                entry.1 = entry.1.saturating_sub(1);
            }
            if let Some(m) = &old.migration
                && let Some(dest) = self.allocated.get_mut(&m.destination)
            {
                dest.0 = dest.0.minus(old.resources);
            }
            if let Some(g) = &old.spread_group {
                let g = Scoped::new(old.project.clone(), g.clone());
                if let Some(members) = self.groups.get_mut(&g) {
                    members.remove(&name.name);
                    if members.is_empty() {
                        self.groups.remove(&g);
                    }
                }
            }
        }
    }

    /// `ipam/<network>/<ip>` split into network and address.
    fn claim_of(key: &str) -> Option<(String, Ipv4Addr)> {
        let rest = key.strip_prefix(keys::IPAM)?;
        let (network, ip) = rest.split_once('/')?;
        Some((network.to_string(), ip.parse().ok()?))
    }

    fn apply(&mut self, event: &WatchEvent) {
        let key = event.key();
        let name = keys::name_of(key);
        if key.starts_with(keys::IPAM) {
            if let Some((network, ip)) = Self::claim_of(key) {
                match event {
                    WatchEvent::Put(_) => {
                        self.claims.entry(network).or_default().insert(ip);
                    }
                    WatchEvent::Delete { .. } => {
                        if let Some(c) = self.claims.get_mut(&network) {
                            c.remove(&ip);
                        }
                    }
                }
            }
            return;
        }
        if key.starts_with(keys::HOST_ALLOCS) || key.starts_with(keys::HOST_STATES) {
            let Ok(h) = HostName::new(name) else { return };
            let revs = if key.starts_with(keys::HOST_ALLOCS) {
                &mut self.alloc_revs
            } else {
                &mut self.state_revs
            };
            match event {
                WatchEvent::Put(kv) => {
                    revs.insert(h.clone(), kv.mod_revision);
                }
                WatchEvent::Delete { .. } => {
                    revs.remove(&h);
                }
            }
            // The state key also carries the state itself (below).
            if key.starts_with(keys::HOST_ALLOCS) {
                return;
            }
        }
        match event {
            WatchEvent::Put(kv) => {
                if key.starts_with(keys::INSTANCE_SPECS) {
                    match decode::<InstanceSpec>(kv) {
                        Ok(spec) => self.add_instance(spec),
                        Err(e) => warn!(error = %e, "skipping undecodable instance spec"),
                    }
                } else if key.starts_with(keys::INSTANCE_STATUSES) {
                    match (
                        keys::instance_of(keys::INSTANCE_STATUSES, key),
                        decode::<InstanceStatus>(kv),
                    ) {
                        (Some(n), Ok(status)) => {
                            self.statuses.insert(n, status);
                        }
                        _ => warn!(key, "skipping undecodable instance status"),
                    }
                } else if key.starts_with(keys::HOSTS_ALIVE) {
                    if let Ok(h) = HostName::new(name) {
                        self.alive.insert(h);
                    }
                } else if key.starts_with(keys::HOST_STATES) {
                    match (HostName::new(name), decode::<HostState>(kv)) {
                        (Ok(h), Ok(s)) => {
                            self.admin.insert(h, s);
                        }
                        _ => warn!(key, "skipping undecodable host state"),
                    }
                } else if key.starts_with(keys::HOSTS) {
                    match decode::<Host>(kv) {
                        Ok(host) => {
                            self.hosts.insert(host.name.clone(), Arc::new(host));
                        }
                        Err(e) => warn!(error = %e, "skipping undecodable host"),
                    }
                }
            }
            WatchEvent::Delete { .. } => {
                if let Some(n) = keys::instance_of(keys::INSTANCE_SPECS, key) {
                    self.remove_instance(&n);
                    return;
                }
                if let Some(n) = keys::instance_of(keys::INSTANCE_STATUSES, key) {
                    self.statuses.remove(&n);
                    return;
                }
                let Ok(h) = HostName::new(name) else { return };
                if key.starts_with(keys::HOSTS_ALIVE) {
                    self.alive.remove(&h);
                } else if key.starts_with(keys::HOST_STATES) {
                    self.admin.remove(&h);
                } else if key.starts_with(keys::HOSTS) {
                    self.hosts.remove(&h);
                }
            }
        }
    }
}

/// The prefixes the inventory follows. The guards (allocation markers,
/// host states, claims) are listed before what they guard: after a fresh
/// load the view may pair an older guard revision with newer specs, which
/// only makes a guarded transaction fail and retry, never pass wrongly.
const PREFIXES: [&str; 7] = [
    keys::HOST_ALLOCS,
    keys::HOST_STATES,
    keys::IPAM,
    keys::HOSTS,
    keys::HOSTS_ALIVE,
    keys::INSTANCE_SPECS,
    keys::INSTANCE_STATUSES,
];

fn followed(key: &str) -> bool {
    PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The cached view of hosts and instance specs.
pub struct Inventory {
    state: RwLock<State>,
    /// The lowest revision every followed prefix has caught up to.
    revision: watch::Sender<Revision>,
    /// Whether the view follows the store (false while its watch is broken).
    connected: watch::Sender<bool>,
}

impl Inventory {
    /// The state for reading. A plain lock: every critical section is short
    /// and never awaits, so placement never queues behind async writers.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // The state is plain data; a panic elsewhere leaves it usable.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the view from `store` and keeps following it in background
    /// tasks until the returned inventory is dropped.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let inv = Arc::new(Self {
            state: RwLock::new(State::default()),
            revision: watch::channel(0).0,
            connected: watch::channel(true).0,
        });
        let revision = inv.load(store.as_ref()).await?;
        inv.revision.send_replace(revision);
        tokio::spawn(follow(Arc::downgrade(&inv), store, revision));
        Ok(inv)
    }

    /// Replaces the view with a fresh listing; returns the lowest revision
    /// the listings were read at (watching from there replays, harmlessly,
    /// what a later listing already showed).
    async fn load(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let mut fresh = State::default();
        let mut low = Revision::MAX;
        for prefix in PREFIXES {
            let listing = store.list(prefix).await?;
            for kv in listing.items {
                fresh.apply(&WatchEvent::Put(kv));
            }
            low = low.min(listing.revision);
        }
        fresh.applied = low;
        *self.write() = fresh;
        Ok(low)
    }

    /// Waits until the view reflects every write up to `revision`, or the
    /// timeout passes (then the view is merely a little stale). Returns
    /// whether it caught up.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision)).await,
            Ok(Ok(_))
        )
    }

    /// Applies the writes of a transaction this server just committed at
    /// `revision`, before the watch delivers them, so that this server's
    /// next decision (and the client's next read) sees them at once. The
    /// watch re-applies them later, in order; an older event replayed in
    /// between can only make the view look older than it is, which a
    /// guarded transaction turns into a retry, never into a wrong write.
    pub async fn apply_committed(&self, ops: &[Op], revision: Revision) {
        let mut st = self.write();
        // Already delivered by the watch, maybe with later changes on top:
        // applying it again would bring older values back.
        if st.applied >= revision || *self.revision.borrow() >= revision {
            return;
        }
        for op in ops {
            let event = match op {
                Op::Put { key, value, lease } => WatchEvent::Put(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: revision,
                    mod_revision: revision,
                    lease: *lease,
                }),
                Op::Delete(key) => WatchEvent::Delete {
                    key: key.clone(),
                    mod_revision: revision,
                },
            };
            if followed(event.key()) {
                st.apply(&event);
            }
        }
    }

    /// The lowest address of `subnet` VMs may get that is neither claimed
    /// in `network` nor in `skip`.
    pub async fn next_free_ip(
        &self,
        network: &str,
        subnet: &skyvisor_core::Ipv4Net,
        skip: &HashSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let st = self.read();
        let empty = HashSet::new();
        let used = st.used_ips.get(network).unwrap_or(&empty);
        let claimed = st.claims.get(network).unwrap_or(&empty);
        crate::ipam::lowest_free(subnet, |ip| {
            used.contains(&ip) || claimed.contains(&ip) || skip.contains(&ip)
        })
    }

    /// The store revision the view reflects.
    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Whether the view is following the store now; false from the moment
    /// its watch broke until a fresh listing succeeded.
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Where the members of spread group `group` run: one member per host.
    pub async fn spread_members(
        &self,
        group: &Scoped<GroupName>,
    ) -> HashMap<HostName, InstanceName> {
        let st = self.read();
        let mut out = HashMap::new();
        if let Some(members) = st.groups.get(group) {
            for (name, host) in members {
                out.entry(host.clone()).or_insert_with(|| name.clone());
            }
        }
        out
    }

    /// All hosts with their state and allocation.
    pub async fn hosts(&self) -> Vec<HostEntry> {
        let st = self.read();
        st.hosts.values().map(|h| host_entry(&st, h)).collect()
    }

    /// One host.
    pub async fn host(&self, name: &HostName) -> Option<HostEntry> {
        let st = self.read();
        st.hosts.get(name).map(|h| host_entry(&st, h))
    }

    /// One instance spec.
    pub async fn instance(&self, name: &InstanceRef) -> Option<InstanceSpec> {
        self.read().instances.get(name).cloned()
    }

    /// One instance: spec and status (pending if no agent reported yet).
    pub async fn instance_full(&self, name: &InstanceRef) -> Option<Instance> {
        let st = self.read();
        st.instances.get(name).map(|spec| full(&st, spec))
    }

    /// All instances, by project and name.
    pub async fn instances_full(&self) -> Vec<Instance> {
        let st = self.read();
        st.instances.values().map(|spec| full(&st, spec)).collect()
    }

    /// The instances whose spec `keep` accepts: only those are copied
    /// (the group controllers ask several times a second).
    pub async fn instances_full_where(
        &self,
        keep: impl Fn(&InstanceSpec) -> bool,
    ) -> Vec<Instance> {
        let st = self.read();
        st.instances
            .values()
            .filter(|spec| keep(spec))
            .map(|spec| full(&st, spec))
            .collect()
    }

    /// All instance specs, by project and name.
    pub async fn instances(&self) -> Vec<InstanceSpec> {
        self.read().instances.values().cloned().collect()
    }

    /// Whether `ip` is in use in `network`.
    pub async fn ip_in_use(&self, network: &str, ip: Ipv4Addr) -> bool {
        self.read()
            .used_ips
            .get(network)
            .is_some_and(|s| s.contains(&ip))
    }

    /// The addresses in use in `network`: those of instances and every
    /// claimed one (hosts hold claims too).
    pub async fn used_ips(&self, network: &str) -> HashSet<Ipv4Addr> {
        let st = self.read();
        let mut used = st.used_ips.get(network).cloned().unwrap_or_default();
        if let Some(claims) = st.claims.get(network) {
            used.extend(claims.iter().copied());
        }
        used
    }
}

/// An instance as shown: its status is its agent's last report, marked as
/// such while its host is unreachable (the report may be stale).
fn full(st: &State, spec: &InstanceSpec) -> Instance {
    let mut status = st
        .statuses
        .get(&spec.instance_ref())
        .cloned()
        .unwrap_or_else(InstanceStatus::pending);
    if !st.alive.contains(&spec.host) {
        let last = status
            .message
            .take()
            .map(|m| format!("; its last message: {m}"))
            .unwrap_or_default();
        status.message = Some(format!(
            "host {} is unreachable: this status is its last report, from {}{last}",
            spec.host,
            status.updated_at.format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }
    Instance {
        spec: spec.clone(),
        status,
        protection: None,
    }
}

fn host_entry(st: &State, h: &Arc<Host>) -> HostEntry {
    let (allocated, instances) = st.allocated.get(&h.name).copied().unwrap_or_default();
    HostEntry {
        host: Arc::clone(h),
        alive: st.alive.contains(&h.name),
        admin_state: st.admin.get(&h.name).copied(),
        allocated,
        instances,
        alloc_revision: st.alloc_revs.get(&h.name).copied().unwrap_or(0),
        state_revision: st.state_revs.get(&h.name).copied().unwrap_or(0),
    }
}

/// Follows the store: one watch over every key (so events arrive in one
/// revision order), relisting when the watch breaks or history was compacted.
async fn follow(inv: std::sync::Weak<Inventory>, store: Arc<dyn Store>, mut revision: Revision) {
    loop {
        match store.watch("", revision + 1).await {
            Ok(mut stream) => loop {
                let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
                let Some(inventory) = inv.upgrade() else {
                    return;
                };
                match next {
                    // Idle: loop to check the inventory is still wanted.
                    Err(_) => continue,
                    Ok(Some(Ok(event))) => {
                        revision = event.revision();
                        if followed(event.key()) {
                            let mut st = inventory.write();
                            st.apply(&event);
                            st.applied = revision;
                        }
                        inventory.revision.send_replace(revision);
                    }
                    Ok(Some(Err(e))) => {
                        warn!(error = %e, "inventory watch broke; relisting");
                        inventory.connected.send_replace(false);
                        break;
                    }
                    Ok(None) => {
                        inventory.connected.send_replace(false);
                        break;
                    }
                }
            },
            Err(e) => {
                debug!(error = %e, "inventory watch failed; retrying");
                if let Some(inventory) = inv.upgrade() {
                    inventory.connected.send_replace(false);
                }
            }
        }
        loop {
            let Some(inventory) = inv.upgrade() else {
                return;
            };
            match inventory.load(store.as_ref()).await {
                Ok(r) => {
                    revision = r;
                    inventory.revision.send_modify(|v| *v = (*v).max(r));
                    inventory.connected.send_replace(true);
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "inventory relist failed; retrying");
                    drop(inventory);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

//! The volume controller of one agent: level-triggered reconciliation of
//! the volumes this host controls, plus clean-up of this host's own state.
//!
//! A volume is controlled by the agent of the first live host in its
//! spec's `hosts` (a replica holder, so its replica is local). The
//! controller creates the replicas and the membership record, grows them,
//! deletes them, and writes the volume's status. Each agent also
//! - deletes local replicas of volumes that no longer exist (their
//!   deletion happened while this host was away), and
//! - clears the primary of records naming this host when it does not serve
//!   them (it restarted while serving), so another host may serve them.
//!
//! Every step is idempotent and re-run every few seconds and on every
//! change of a volume spec, so a restart of any agent resumes where it
//! stopped. This module must never serve a volume to a VM (see
//! [`super::VolumeService::serve`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use skyvisor_core::{Host, HostName, VolumePhase, VolumeSpec, VolumeStatus, keys};
use skyvisor_store::{Compare, Op, StoreExt, WatchStream, encode};
use skyvisor_volume::{Membership, MembershipStore, VolumeId as DataId, create_volume};
use tracing::{debug, info, warn};

use super::{REPLICA_CALL_TIMEOUT, VolumeService};

/// How often the controller looks again without a change.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the controller until the task is aborted.
pub async fn run(svc: Arc<VolumeService>) {
    let mut watch: Option<WatchStream> = None;
    loop {
        if watch.is_none() {
            watch = svc.store.watch(keys::VOLUME_SPECS, 0).await.ok();
        }
        svc.reconcile_all().await;
        let woke = async {
            match watch.as_mut() {
                Some(w) => w.next().await.map(|e| e.is_ok()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = woke => {
                if ev != Some(true) {
                    // The watch ended or broke: make a new one next turn.
                    watch = None;
                }
            }
            () = tokio::time::sleep(RESYNC_INTERVAL) => {}
        }
    }
}

fn same_status(a: &VolumeStatus, b: &VolumeStatus) -> bool {
    a.phase == b.phase
        && a.size_bytes == b.size_bytes
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

impl VolumeService {
    /// One pass over every volume, its replicas converged to the wanted
    /// hosts too (see [`super::replicas`]).
    pub async fn reconcile_all(self: &Arc<Self>) {
        // Local replicas first, then the specs: a replica made after this
        // listing belongs to a spec written before it.
        let local = self.replicas.volumes();
        let specs = match self.store.list_json::<VolumeSpec>(keys::VOLUME_SPECS).await {
            Ok((s, _)) => s,
            Err(e) => {
                debug!(error = %e, "cannot list volumes");
                return;
            }
        };
        let Some(alive) = self.alive_hosts().await else {
            return;
        };
        for (spec, rev) in &specs {
            if spec.controller(|h| alive.contains(h.as_str())) == Some(&self.host)
                && let Err(e) = self.reconcile(spec, *rev).await
            {
                warn!(volume = %spec.name, error = %e, "volume reconciliation failed; retrying");
            }
        }
        let existing: HashSet<String> = specs.iter().map(|(s, _)| s.id.data_id()).collect();
        for v in local {
            if !existing.contains(v.as_str()) {
                self.remove_orphan(&v).await;
            } else if let Ok(Some((_, m))) = self.load(&v).await
                && m.member(&self.node).is_none()
            {
                // Removed from the volume while this host was away (its
                // replica was moved elsewhere).
                info!(volume = %v, "this host's replica is no longer a member: removing it");
                self.remove_orphan(&v).await;
            }
        }
        self.clear_stale_primaries().await;
        self.converge_replicas(specs, &alive).await;
    }

    /// Converges the replicas of every volume this host serves, or
    /// controls while no one serves it, to the hosts its spec wants (see
    /// [`super::replicas`]).
    /// `specs` and `alive` are the pass's listing of volumes and live hosts.
    async fn converge_replicas(
        self: &Arc<Self>,
        specs: Vec<(VolumeSpec, i64)>,
        alive: &HashSet<String>,
    ) {
        for (spec, _) in specs.into_iter().filter(|(s, _)| !s.deleting) {
            if let Some((device, _)) = self.served_device(&spec.id) {
                if let Err(e) = self.converge_device(&spec, &device).await {
                    warn!(volume = %spec.name, error = %e, "moving replicas failed; retrying");
                }
                continue;
            }
            if spec.controller(|h| alive.contains(h.as_str())) != Some(&self.host) {
                continue;
            }
            let fresh = self
                .converging
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.id);
            if fresh {
                let svc = self.clone();
                tokio::spawn(async move {
                    svc.converge_unserved(&spec).await;
                    svc.converging
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&spec.id);
                });
            }
        }
    }

    /// The names of the hosts whose lease is alive; none if the store
    /// cannot say.
    async fn alive_hosts(&self) -> Option<HashSet<String>> {
        match self.store.list(keys::HOSTS_ALIVE).await {
            Ok(l) => Some(
                l.items
                    .iter()
                    .map(|kv| keys::name_of(&kv.key).to_owned())
                    .collect(),
            ),
            Err(e) => {
                debug!(error = %e, "cannot list live hosts");
                None
            }
        }
    }

    async fn write_status(&self, spec: &VolumeSpec, status: VolumeStatus) -> Result<(), String> {
        let key = keys::volume_status(&spec.volume_ref());
        let current = self
            .store
            .get_json::<VolumeStatus>(&key)
            .await
            .map_err(|e| e.to_string())?;
        if let Some((c, _)) = &current
            && same_status(c, &status)
        {
            return Ok(());
        }
        // Only while the spec exists: never resurrect a deleted volume's status.
        let out = self
            .store
            .txn(
                vec![Compare::Exists(keys::volume_spec(&spec.volume_ref()))],
                vec![Op::Put {
                    key,
                    value: encode(&status),
                    lease: None,
                }],
            )
            .await
            .map_err(|e| e.to_string())?;
        if out.succeeded {
            debug!(volume = %spec.name, phase = %status.phase, "volume status written");
        }
        Ok(())
    }

    fn status(
        spec: &VolumeSpec,
        phase: VolumePhase,
        size: u64,
        message: Option<String>,
    ) -> VolumeStatus {
        VolumeStatus {
            phase,
            size_bytes: size,
            message,
            observed_generation: spec.generation,
            updated_at: Utc::now(),
        }
    }

    async fn load(&self, id: &DataId) -> Result<Option<(u64, Membership)>, String> {
        self.membership
            .load(id)
            .await
            .map(|r| r.map(|v| (v.version, v.value)))
            .map_err(|e| e.to_string())
    }

    /// Converges one volume this host controls.
    async fn reconcile(&self, spec: &VolumeSpec, rev: i64) -> Result<(), String> {
        let data_id = DataId::new(spec.id.data_id()).map_err(|e| e.to_string())?;
        if spec.deleting {
            return self.delete(spec, rev, &data_id).await;
        }
        let record = self.load(&data_id).await?;
        match record {
            None => self.create(spec, &data_id).await,
            Some((_, m)) if m.size < spec.size_bytes => self.grow(spec, &data_id, &m).await,
            Some((_, m)) => {
                self.write_status(
                    spec,
                    Self::status(spec, VolumePhase::Available, m.size, None),
                )
                .await
            }
        }
    }

    async fn create(&self, spec: &VolumeSpec, data_id: &DataId) -> Result<(), String> {
        let current = self
            .store
            .get_json::<VolumeStatus>(&keys::volume_status(&spec.volume_ref()))
            .await
            .map_err(|e| e.to_string())?;
        if let Some((s, _)) = &current
            && s.phase == VolumePhase::Failed
            && s.observed_generation == spec.generation
        {
            // A failed creation stays failed until the volume is deleted.
            return Ok(());
        }
        self.write_status(spec, Self::status(spec, VolumePhase::Creating, 0, None))
            .await?;
        let mut replicas = vec![];
        for h in &spec.hosts {
            match self.replica_addr_of(h).await {
                Ok(addr) => {
                    let node =
                        skyvisor_volume::NodeId::new(h.as_str()).map_err(|e| e.to_string())?;
                    replicas.push((node, addr));
                }
                Err(message) => {
                    return self
                        .write_status(
                            spec,
                            Self::status(spec, VolumePhase::Failed, 0, Some(message)),
                        )
                        .await;
                }
            }
        }
        let mut vspec =
            skyvisor_volume::VolumeSpec::new(data_id.clone(), spec.size_bytes, replicas);
        vspec.min_in_sync = spec.min_in_sync;
        match create_volume(
            self.membership.as_ref(),
            &vspec,
            Some(&self.replicas),
            REPLICA_CALL_TIMEOUT,
        )
        .await
        {
            Ok(m) => {
                info!(volume = %spec.name, size = m.size, hosts = ?spec.hosts, "volume created");
                self.write_status(
                    spec,
                    Self::status(spec, VolumePhase::Available, m.size, None),
                )
                .await
            }
            Err(e) => {
                warn!(volume = %spec.name, error = %e, "volume creation failed");
                self.write_status(
                    spec,
                    Self::status(
                        spec,
                        VolumePhase::Failed,
                        0,
                        Some(format!("creating the replicas failed: {e}")),
                    ),
                )
                .await
            }
        }
    }

    pub(crate) async fn replica_addr_of(&self, host: &HostName) -> Result<String, String> {
        match self.store.get_json::<Host>(&keys::host(host)).await {
            Ok(Some((h, _))) => h
                .replica_addr
                .ok_or_else(|| format!("host {host} runs no replica server")),
            Ok(None) => Err(format!("host {host} is not registered")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn grow(
        &self,
        spec: &VolumeSpec,
        data_id: &DataId,
        m: &Membership,
    ) -> Result<(), String> {
        if self.is_serving(&spec.id) {
            return self
                .write_status(
                    spec,
                    Self::status(
                        spec,
                        VolumePhase::Growing,
                        m.size,
                        Some("waiting for the VM using it to stop".into()),
                    ),
                )
                .await;
        }
        if let Some(p) = &m.primary
            && p != &self.node
        {
            return self
                .write_status(
                    spec,
                    Self::status(
                        spec,
                        VolumePhase::Growing,
                        m.size,
                        Some(format!("waiting for host {p} to stop serving it")),
                    ),
                )
                .await;
        }
        self.write_status(spec, Self::status(spec, VolumePhase::Growing, m.size, None))
            .await?;
        let lock = self.lock_for(&spec.id);
        let _g = lock.lock().await;
        match skyvisor_volume::grow_volume(
            self.membership.as_ref(),
            data_id,
            &self.node,
            spec.size_bytes,
            Some(&self.replicas),
            REPLICA_CALL_TIMEOUT,
        )
        .await
        {
            Ok(m) => {
                info!(volume = %spec.name, size = m.size, "volume grown");
                self.write_status(
                    spec,
                    Self::status(spec, VolumePhase::Available, m.size, None),
                )
                .await
            }
            Err(e) => {
                self.write_status(
                    spec,
                    Self::status(
                        spec,
                        VolumePhase::Growing,
                        m.size,
                        Some(format!("growing failed, retrying: {e}")),
                    ),
                )
                .await
            }
        }
    }

    async fn delete(&self, spec: &VolumeSpec, rev: i64, data_id: &DataId) -> Result<(), String> {
        self.write_status(spec, Self::status(spec, VolumePhase::Deleting, 0, None))
            .await?;
        if let Some((_, m)) = self.load(data_id).await? {
            // Replicas on hosts that are away are removed by their agents
            // when they return (the spec is gone by then).
            for (node, e) in
                skyvisor_volume::delete_replicas(&m, Some(&self.replicas), REPLICA_CALL_TIMEOUT)
                    .await
            {
                warn!(volume = %spec.name, %node, error = %e, "could not delete a replica now; its host removes it later");
            }
        }
        let mut ops = vec![
            Op::Delete(keys::volume_spec(&spec.volume_ref())),
            Op::Delete(keys::volume_status(&spec.volume_ref())),
            Op::Delete(keys::volume_runtime(&spec.volume_ref())),
            Op::Delete(keys::volume_membership(data_id.as_str())),
        ];
        let snaps = self
            .store
            .list(&keys::volume_snapshots(&spec.volume_ref()))
            .await
            .map_err(|e| e.to_string())?;
        ops.extend(snaps.items.into_iter().map(|kv| Op::Delete(kv.key)));
        let out = self
            .store
            .txn(
                vec![Compare::ModRevision(
                    keys::volume_spec(&spec.volume_ref()),
                    rev,
                )],
                ops,
            )
            .await
            .map_err(|e| e.to_string())?;
        if out.succeeded {
            info!(volume = %spec.name, "volume deleted");
        }
        Ok(())
    }

    /// Deletes a local replica whose volume no longer exists.
    async fn remove_orphan(&self, v: &DataId) {
        let frame = skyvisor_volume::wire::RequestFrame {
            id: 0,
            epoch: u64::MAX,
            volume: v.clone(),
            request: skyvisor_volume::wire::Request::Delete,
        };
        match self.replicas.handle(frame).await {
            Ok(_) => info!(volume = %v, "removed the replica of a deleted volume"),
            Err(e) => warn!(volume = %v, error = %e, "could not remove an orphaned replica"),
        }
    }

    /// Clears the primary of records naming this host while it does not
    /// serve them (e.g. after an agent restart), so that another host may
    /// serve them without waiting for this host's lease to expire.
    async fn clear_stale_primaries(&self) {
        let listing = match self.store.list(keys::VOLUME_MEMBERSHIP).await {
            Ok(l) => l,
            Err(_) => return,
        };
        for kv in listing.items {
            let Ok(m) = serde_json::from_slice::<Membership>(&kv.value) else {
                continue;
            };
            if m.primary.as_ref() != Some(&self.node) {
                continue;
            }
            let Ok(uuid) = uuid::Uuid::parse_str(m.volume.as_str()) else {
                continue;
            };
            let id = skyvisor_core::VolumeId(uuid);
            let lock = self.lock_for(&id);
            let _g = lock.lock().await;
            if self.is_serving(&id) {
                continue;
            }
            let Ok(Some(record)) = self.membership.load(&m.volume).await else {
                continue;
            };
            if record.value.primary.as_ref() != Some(&self.node) {
                continue;
            }
            let mut cleared = record.value.clone();
            cleared.primary = None;
            match self
                .membership
                .cas(&m.volume, Some(record.version), &cleared)
                .await
            {
                Ok(Some(_)) => {
                    info!(volume = %m.volume, "cleared a stale primary claim of this host")
                }
                Ok(None) => {}
                Err(e) => debug!(volume = %m.volume, error = %e, "could not clear a stale primary"),
            }
        }
    }
}

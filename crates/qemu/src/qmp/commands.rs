//! Typed helpers for the QMP commands Skyvisor uses. Each is a thin layer
//! over [`Qmp::execute`]; argument names follow QEMU 10's schema.

use serde_json::{Value, json};

use super::Qmp;
use super::types::{
    AnnounceParameters, BlockJobInfo, BlockStatsEntry, BlockdevBackup, BlockdevMirror, CpuInfoFast,
    JobInfo, MigrationCapability, MigrationInfo, MigrationParameters, NbdListen, StatusInfo,
    VersionInfo,
};
use crate::error::QmpError;

fn encode<T: serde::Serialize>(command: &str, v: &T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|source| QmpError::Decode {
        command: command.to_owned(),
        source,
    })
}

impl Qmp {
    async fn unit(&self, command: &str, args: Value) -> Result<(), QmpError> {
        self.execute(command, args).await.map(drop)
    }

    /// Runs the guest's CPUs (`cont`).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.unit("cont", Value::Null).await
    }

    /// Pauses the guest's CPUs (`stop`).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.unit("stop", Value::Null).await
    }

    /// The run state (`query-status`).
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute_as("query-status", Value::Null).await
    }

    /// Presses the ACPI power button (`system_powerdown`); the guest decides.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.unit("system_powerdown", Value::Null).await
    }

    /// Resets the machine like its reset button (`system_reset`).
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.unit("system_reset", Value::Null).await
    }

    /// Makes QEMU exit (`quit`). QEMU closing the connection right after
    /// counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.unit("quit", Value::Null).await {
            Err(QmpError::Disconnected { .. }) => Ok(()),
            other => other,
        }
    }

    /// QEMU's version (`query-version`).
    pub async fn query_version(&self) -> Result<VersionInfo, QmpError> {
        self.execute_as("query-version", Value::Null).await
    }

    /// Starts migrating to `uri` (`migrate`), e.g. `tcp:10.0.0.2:4444` or
    /// `unix:/path`. Returns at once; follow with [`Qmp::query_migrate`] or
    /// `MIGRATION` events.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.unit("migrate", json!({"uri": uri})).await
    }

    /// Starts listening for an incoming migration on `uri`
    /// (`migrate-incoming`; needs `-incoming defer`). If the incoming
    /// migration fails, QEMU 10 exits with an error (its `exit-on-error`
    /// default), which the owner sees as the VM's exit.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.unit("migrate-incoming", json!({"uri": uri})).await
    }

    /// Sets migration capabilities; both ends must agree on most of them.
    pub async fn migrate_set_capabilities(
        &self,
        caps: &[(MigrationCapability, bool)],
    ) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c.as_str(), "state": on}))
            .collect();
        self.unit("migrate-set-capabilities", json!({"capabilities": caps}))
            .await
    }

    /// Sets migration parameters; only the fields that are `Some` change.
    pub async fn migrate_set_parameters(
        &self,
        params: &MigrationParameters,
    ) -> Result<(), QmpError> {
        let args = encode("migrate-set-parameters", params)?;
        self.unit("migrate-set-parameters", args).await
    }

    /// The migration's progress (`query-migrate`).
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.execute_as("query-migrate", Value::Null).await
    }

    /// Cancels the outgoing migration (`migrate_cancel`); the source keeps
    /// running.
    pub async fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.unit("migrate_cancel", Value::Null).await
    }

    /// Lets a migration paused in `pre-switchover` finish
    /// (`migrate-continue`).
    pub async fn migrate_continue(&self) -> Result<(), QmpError> {
        self.unit("migrate-continue", json!({"state": "pre-switchover"}))
            .await
    }

    /// Adds a block node graph (`blockdev-add`); see
    /// [`crate::DiskConfig::blockdev_json`].
    pub async fn blockdev_add(&self, options: Value) -> Result<(), QmpError> {
        self.unit("blockdev-add", options).await
    }

    /// Removes a block node that no device uses (`blockdev-del`).
    pub async fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError> {
        self.unit("blockdev-del", json!({"node-name": node_name}))
            .await
    }

    /// Hot-plugs a device (`device_add`); `device` holds `driver`, `id` and
    /// properties, see [`crate::DiskConfig::device_json`].
    pub async fn device_add(&self, device: Value) -> Result<(), QmpError> {
        self.unit("device_add", device).await
    }

    /// Asks the guest to release a device (`device_del`). The device is gone
    /// when the `DEVICE_DELETED` event arrives.
    pub async fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.unit("device_del", json!({"id": id})).await
    }

    /// Adds a network backend (`netdev_add`); see
    /// [`crate::NicConfig::netdev_json`].
    pub async fn netdev_add(&self, netdev: Value) -> Result<(), QmpError> {
        self.unit("netdev_add", netdev).await
    }

    /// Removes a network backend (`netdev_del`).
    pub async fn netdev_del(&self, id: &str) -> Result<(), QmpError> {
        self.unit("netdev_del", json!({"id": id})).await
    }

    /// Starts mirroring a disk to another node (`blockdev-mirror`).
    pub async fn blockdev_mirror(&self, mirror: &BlockdevMirror) -> Result<(), QmpError> {
        let args = encode("blockdev-mirror", mirror)?;
        self.unit("blockdev-mirror", args).await
    }

    /// Cancels a block job (`block-job-cancel`). For a ready mirror without
    /// `force`, this completes it without switching to the target.
    pub async fn block_job_cancel(&self, job: &str, force: bool) -> Result<(), QmpError> {
        self.unit("block-job-cancel", json!({"device": job, "force": force}))
            .await
    }

    /// Completes a ready block job (`block-job-complete`): a mirror switches
    /// the device to its target.
    pub async fn block_job_complete(&self, job: &str) -> Result<(), QmpError> {
        self.unit("block-job-complete", json!({"device": job}))
            .await
    }

    /// Completes a ready job by its job id (`job-complete`).
    pub async fn job_complete(&self, id: &str) -> Result<(), QmpError> {
        self.unit("job-complete", json!({"id": id})).await
    }

    /// Starts a point-in-time copy of a node (`blockdev-backup`).
    pub async fn blockdev_backup(&self, backup: &BlockdevBackup) -> Result<(), QmpError> {
        let args = encode("blockdev-backup", backup)?;
        self.unit("blockdev-backup", args).await
    }

    /// Passes `fd` to QEMU into a new fd set (`add-fd`); returns the fd
    /// set's id, usable as the path `/dev/fdset/<id>` wherever QEMU opens
    /// files. The fd set lives until [`Qmp::remove_fd`].
    pub async fn add_fd(&self, fd: std::os::fd::OwnedFd) -> Result<u64, QmpError> {
        #[derive(serde::Deserialize)]
        struct Added {
            #[serde(rename = "fdset-id")]
            fdset_id: u64,
        }
        let v = self.execute_with_fd("add-fd", Value::Null, fd).await?;
        serde_json::from_value::<Added>(v)
            .map(|a| a.fdset_id)
            .map_err(|source| QmpError::Decode {
                command: "add-fd".into(),
                source,
            })
    }

    /// Removes fd set `fdset_id` (`remove-fd`); QEMU closes its copies
    /// once nothing uses them.
    pub async fn remove_fd(&self, fdset_id: u64) -> Result<(), QmpError> {
        self.unit("remove-fd", json!({"fdset-id": fdset_id})).await
    }

    /// Sets a NIC's link up or down (`set_link`), as pulling its cable.
    pub async fn set_link(&self, name: &str, up: bool) -> Result<(), QmpError> {
        self.unit("set_link", json!({"name": name, "up": up})).await
    }

    /// Re-activates (or inactivates) every block node
    /// (`blockdev-set-active`). A completed outgoing migration leaves the
    /// nodes inactive until `cont`; activating them earlier lets a block
    /// job start while the guest is still paused.
    pub async fn blockdev_set_active(&self, active: bool) -> Result<(), QmpError> {
        self.unit("blockdev-set-active", json!({"active": active}))
            .await
    }

    /// All jobs (`query-jobs`), including concluded ones not yet dismissed.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, QmpError> {
        self.execute_as("query-jobs", Value::Null).await
    }

    /// Removes a concluded job (`job-dismiss`).
    pub async fn job_dismiss(&self, id: &str) -> Result<(), QmpError> {
        self.unit("job-dismiss", json!({"id": id})).await
    }

    /// Cancels a job (`job-cancel`).
    pub async fn job_cancel(&self, id: &str) -> Result<(), QmpError> {
        self.unit("job-cancel", json!({"id": id})).await
    }

    /// Every block device's I/O counters (`query-blockstats`).
    pub async fn query_blockstats(&self) -> Result<Vec<BlockStatsEntry>, QmpError> {
        self.execute_as("query-blockstats", Value::Null).await
    }

    /// The vCPUs and their host threads (`query-cpus-fast`).
    pub async fn query_cpus_fast(&self) -> Result<Vec<CpuInfoFast>, QmpError> {
        self.execute_as("query-cpus-fast", Value::Null).await
    }

    /// The running block jobs (`query-block-jobs`).
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.execute_as("query-block-jobs", Value::Null).await
    }

    /// Makes the guest's NICs announce their MACs (gratuitous ARP/RARP) so
    /// switches learn the new port, e.g. after a migration (`announce-self`).
    pub async fn announce_self(&self, params: &AnnounceParameters) -> Result<(), QmpError> {
        let args = encode("announce-self", params)?;
        self.unit("announce-self", args).await
    }

    /// Starts QEMU's built-in NBD server (`nbd-server-start`).
    pub async fn nbd_server_start(&self, listen: &NbdListen) -> Result<(), QmpError> {
        self.unit("nbd-server-start", json!({"addr": listen.to_legacy_json()}))
            .await
    }

    /// Exports block node `node_name` as NBD export `name` (the modern
    /// `block-export-add`; the export's id is `name` too).
    pub async fn nbd_server_add(
        &self,
        node_name: &str,
        name: &str,
        writable: bool,
    ) -> Result<(), QmpError> {
        let args = json!({"type": "nbd", "id": name, "node-name": node_name, "name": name, "writable": writable});
        self.unit("block-export-add", args).await
    }

    /// Removes NBD export `name` (`block-export-del`); it is gone when
    /// `BLOCK_EXPORT_DELETED` arrives.
    pub async fn nbd_server_remove(&self, name: &str) -> Result<(), QmpError> {
        self.unit("block-export-del", json!({"id": name})).await
    }

    /// Stops the NBD server (`nbd-server-stop`).
    pub async fn nbd_server_stop(&self) -> Result<(), QmpError> {
        self.unit("nbd-server-stop", Value::Null).await
    }

    /// Runs a human monitor (HMP) command and returns its output. For
    /// debugging and the few things QMP lacks; the output is not stable.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String, QmpError> {
        self.execute_as(
            "human-monitor-command",
            json!({"command-line": command_line}),
        )
        .await
    }
}

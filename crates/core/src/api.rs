//! Request and response bodies of the REST API (`/v1`), shared by the server
//! and the CLI.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accel::Accel;
use crate::cluster::ServerRecord;
use crate::instance::RestartPolicy;
use crate::snapshot::CheckpointSchedule;

/// Body of `POST /v1/instances`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceRequest {
    /// Unique name (a DNS label); required, except in a group's launch
    /// template, where it is left out (members are named after the group).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// What runs it: `vm` (the default) or `container` (a root file
    /// system image run by the host's OCI runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<crate::InstanceKind>,
    /// Image to boot (required, unless cloning).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Instance type; omit it and give `vcpus` and `memory_mib` for a custom size.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// vCPUs: overrides the type's.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB: overrides the type's.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Root disk in GiB: overrides the type's.
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// Restart policy; default `on-failure`.
    #[serde(default)]
    pub restart_policy: Option<RestartPolicy>,
    /// Start it at once (default true).
    #[serde(default)]
    pub start: Option<bool>,
    /// Graceful stop timeout in seconds (default 30).
    #[serde(default)]
    pub stop_timeout_secs: Option<u32>,
    /// A volume to boot from: it becomes the VM's `vda` instead of a local
    /// disk. A blank one gets its first contents on the first start: the
    /// image's disk if the image boots its own disk (the volume must hold
    /// it), else an ext4 file system.
    #[serde(default)]
    pub root_volume: Option<String>,
    /// Volumes to attach as further disks (`vdb`, `vdc`...).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Spread (anti-affinity) group: never placed on a host that already
    /// runs an instance of this group.
    #[serde(default)]
    pub spread_group: Option<String>,
    /// Only place it on hosts that run VMs with this accelerator.
    #[serde(default)]
    pub accel: Option<Accel>,
    /// Clone: start from snapshot `VM/SNAPSHOT` instead of booting. The
    /// image and size come from the snapshot (give none, or the same).
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Periodic checkpoints.
    #[serde(default)]
    pub checkpoint_schedule: Option<CheckpointSchedule>,
    /// What happens when its host dies: `restart` (the default for a VM
    /// with a root volume in a cluster) or `off`.
    #[serde(default)]
    pub ha: Option<crate::HaPolicy>,
    /// Restart order after a host's death, higher first (default 0).
    #[serde(default)]
    #[schema(maximum = 1000)]
    pub ha_priority: Option<u32>,
    /// In a cluster, keep the root disk on the VM's host (a local qcow2)
    /// instead of a replicated volume: the VM cannot then be restarted
    /// elsewhere if its host dies.
    #[serde(default)]
    pub local_disk: Option<bool>,
    /// In a cluster, the replicas of the VM's root disk, a replicated
    /// volume (1 to 3, each on its own host; default 2 when two or more
    /// hosts are ready, unless `local_disk`); with 2 or more the VM is
    /// HA-protected by default.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3)]
    pub disk_replicas: Option<u32>,
    /// The project's network to join (default `default`; a project's
    /// `default` network is made on its first use).
    #[serde(default)]
    pub network: Option<String>,
    /// Security groups of the project to put it in: only what they allow
    /// reaches it. None: not filtered.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Labels (`key: value`), to find it by.
    #[serde(default)]
    pub labels: crate::labels::Labels,
    /// Key pairs of the project whose public keys the guest's default user
    /// accepts (through cloud-init; images that run Skyvisor's guest
    /// service ignore them).
    #[serde(default)]
    pub keys: Vec<String>,
    /// User data for cloud-init at first boot: `#cloud-config` YAML, a
    /// `#!` script or MIME multipart; at most 16 KiB.
    #[serde(default)]
    pub user_data: Option<String>,
    /// The guest's hostname (a DNS label; default: the instance's name).
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Body of `PUT /v1/instances/{name}/labels`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLabelsRequest {
    /// The instance's labels from now on (they replace all it had).
    pub labels: crate::labels::Labels,
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkRequest {
    /// Name, unique in the project (a DNS label).
    pub name: String,
    /// Its IPv4 subnet (default 10.0.0.0/24; projects may overlap).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "10.0.0.0/24")]
    pub subnet: Option<String>,
}

/// Body of `POST /v1/security-groups`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroupRequest {
    /// Name, unique in the project (a DNS label).
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Its ingress rules; default: everything from its own members.
    #[serde(default)]
    pub rules: Option<Vec<crate::SecurityRule>>,
}

/// Body of `PUT /v1/instances/{name}/security-groups`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecurityGroupsRequest {
    /// The instance's groups from now on (empty: not filtered).
    pub security_groups: Vec<String>,
}

/// Body of `PUT /v1/security-groups/{name}/rules`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityRulesRequest {
    /// The whole new list of ingress rules (empty: nothing gets in).
    pub rules: Vec<crate::SecurityRule>,
}

/// Body of `POST /v1/instances/{name}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name; default `snap-<UTC time>`.
    #[serde(default)]
    pub name: Option<String>,
}

/// Body of `POST /v1/instances/{name}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreInstanceRequest {
    /// The snapshot of this instance to go back to.
    pub snapshot: String,
}

/// Body of `PUT /v1/instances/{name}/checkpoint-schedule`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The schedule, or null to turn periodic checkpoints off.
    pub schedule: Option<CheckpointSchedule>,
}

/// Body of `POST /v1/instances/{name}/stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopInstanceRequest {
    /// Skip the graceful shutdown and power off at once.
    #[serde(default)]
    pub force: bool,
    /// Graceful timeout for this stop, in seconds; default the VM's own.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

/// Body of `POST /v1/instances/{name}/resize`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeInstanceRequest {
    /// New instance type.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// New vCPU count (overrides the type's).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// New memory in MiB (overrides the type's).
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// Body of `POST /v1/images/build`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImageRequest {
    /// Name of the image to create.
    pub name: String,
    /// Recipe to build it with (see `GET /v1/recipes`).
    pub recipe: String,
}

/// The protocol of the upgraded connection between a server and an agent
/// that carries an interactive console session: raw terminal bytes both
/// ways.
pub const CONSOLE_UPGRADE_PROTOCOL: &str = "skyvisor-console";

/// An error as every non-2xx answer carries it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable kind, e.g. `not_found`, `invalid`, `conflict`, `insufficient_capacity`.
    pub code: String,
    /// For people: what was wrong and what is allowed.
    pub message: String,
    /// The field at fault, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `GET /v1/info`: what this server is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    /// Skyvisor version.
    pub version: String,
    /// Store backend: `embedded` or `etcd`.
    pub store: String,
    /// Hosts registered.
    pub hosts: u32,
    /// This server's name in the cluster.
    #[serde(default)]
    pub server: Option<String>,
    /// The server currently leading the cluster (running its controllers).
    #[serde(default)]
    pub leader: Option<String>,
    /// Every live server of the cluster.
    #[serde(default)]
    pub servers: Vec<ServerRecord>,
    /// Whether this server can reach its state store right now.
    #[serde(default = "store_ok_default")]
    pub store_ok: bool,
}

fn store_ok_default() -> bool {
    true
}

/// A slice of a VM's serial console log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLog {
    /// Byte offset in the log where `text` starts; pass the sum of it and
    /// the text's length to read on.
    pub offset: u64,
    /// The text.
    pub text: String,
}

/// Body of `POST /v1/instances/{name}/exec`: a command to run in a
/// running container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments (at most 256, each at most 4096
    /// bytes).
    pub command: Vec<String>,
    /// What the command reads on its standard input (at most 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Seconds it may run before it is killed (default 60, 1 to 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_secs: Option<u32>,
}

/// Most arguments of an exec'd command.
pub const EXEC_MAX_ARGS: usize = 256;
/// Most bytes of one argument.
pub const EXEC_MAX_ARG_BYTES: usize = 4096;
/// Most bytes of an exec's standard input, and of each of its outputs kept.
pub const EXEC_MAX_IO_BYTES: usize = 1 << 20;

impl ExecRequest {
    /// Checks the request; gives its timeout.
    pub fn validate(&self) -> Result<u32, crate::ValidationError> {
        let invalid = |field: &str, m: String| Err(crate::ValidationError::new(field, m));
        if self.command.is_empty() {
            return invalid(
                "command",
                "empty; give the program and its arguments".into(),
            );
        }
        if self.command.len() > EXEC_MAX_ARGS {
            return invalid(
                "command",
                format!(
                    "{} arguments; allowed: at most {EXEC_MAX_ARGS}",
                    self.command.len()
                ),
            );
        }
        if let Some(i) = self
            .command
            .iter()
            .position(|a| a.len() > EXEC_MAX_ARG_BYTES || a.contains('\0'))
        {
            return invalid(
                "command",
                format!(
                    "argument {i} is longer than {EXEC_MAX_ARG_BYTES} bytes or holds a NUL byte"
                ),
            );
        }
        if self.command[0].is_empty() {
            return invalid("command", "the program's name is empty".into());
        }
        if self
            .stdin
            .as_ref()
            .is_some_and(|s| s.len() > EXEC_MAX_IO_BYTES)
        {
            return invalid("stdin", format!("longer than {EXEC_MAX_IO_BYTES} bytes"));
        }
        let t = self.timeout_secs.unwrap_or(60);
        if !(1..=3600).contains(&t) {
            return invalid("timeout_secs", format!("{t}; allowed: 1 to 3600"));
        }
        Ok(t)
    }
}

/// What an exec'd command did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Its exit status (128 + N when killed by signal N); -1 if unknown.
    pub exit_code: i32,
    /// Its standard output (the first MiB; invalid UTF-8 replaced).
    pub stdout: String,
    /// Its standard error (the first MiB).
    pub stderr: String,
    /// It ran past its timeout and was killed.
    pub timed_out: bool,
    /// An output was longer than a MiB and was cut.
    pub truncated: bool,
}

/// Body of `POST /v1/instances/{name}/migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateInstanceRequest {
    /// The destination host; the scheduler picks one when absent.
    #[serde(default)]
    pub to: Option<String>,
    /// Cap on the copy's bandwidth (memory and disk), MiB per second, to
    /// spare the network; unlimited when absent.
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Send memory and disk without TLS, for a network the operator
    /// trusts (like Proxmox's `migration_type insecure`): less CPU per
    /// byte. Default: mutual TLS with the cluster's certificates.
    #[serde(default)]
    pub insecure: bool,
}

/// Body of `POST /v1/hosts/rebalance`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebalanceRequest {
    /// At most this many migrations (default 3, at most 50); they run one
    /// at a time.
    #[serde(default)]
    pub max_moves: Option<u32>,
}

/// What `POST /v1/hosts/rebalance` planned.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RebalancePlan {
    /// The moves, in order: instance, from, to.
    pub moves: Vec<PlannedMove>,
    /// Memory allocation spread (most minus least loaded host, percent of
    /// allocatable) before and, if all moves succeed, after.
    pub spread_before_percent: f64,
    /// See `spread_before_percent`.
    pub spread_after_percent: f64,
}

/// One move of a rebalance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    /// The VM.
    pub instance: String,
    /// The VM's project.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Where it runs.
    pub from: String,
    /// Where it goes.
    pub to: String,
}

/// One group of Prometheus scrape targets, in the format of Prometheus'
/// HTTP service discovery (`http_sd_configs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScrapeTargetGroup {
    /// `host:port` of each endpoint.
    pub targets: Vec<String>,
    /// Labels of every target of the group: `skyvisor_role` (`server` or
    /// `agent`), `skyvisor_server` or `skyvisor_host`, and `__scheme__`
    /// (`http` or `https`) for Prometheus.
    pub labels: std::collections::BTreeMap<String, String>,
}

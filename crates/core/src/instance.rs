//! Instances (VMs): the desired spec written by the API and the status
//! reported by the host agent that runs them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::accel::Accel;
use crate::error::ValidationError;
use crate::names::{GroupName, HostName, ImageName, InstanceName, TypeName};
use crate::network::NetworkAttachment;
use crate::resources::Resources;
use crate::snapshot::{CheckpointSchedule, CloneSource, RestoreRequest};
use crate::volume::InstanceVolume;

/// The unique, never reused id of an instance.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = "uuid")]
pub struct InstanceId(pub Uuid);

impl InstanceId {
    /// A new random id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The first 8 hex digits, for names with a length limit (tap devices).
    pub fn short(&self) -> String {
        self.0.simple().to_string()[..8].to_string()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether the user wants the VM running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// The VM should run.
    Running,
    /// The VM should be stopped (its disk is kept).
    Stopped,
}

/// What runs an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    /// A virtual machine with its own kernel, run by QEMU.
    #[default]
    Vm,
    /// A container: the host's kernel, its own namespaces (user namespace
    /// included) and cgroup limits, run by an OCI runtime.
    Container,
}

impl InstanceKind {
    /// Whether it is a VM.
    pub fn is_vm(&self) -> bool {
        *self == Self::Vm
    }
}

impl std::fmt::Display for InstanceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vm => "vm",
            Self::Container => "container",
        })
    }
}

/// What the agent does when a VM's QEMU process ends without being asked to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it stopped.
    Never,
    /// Restart it when QEMU crashed or was killed, not when the guest shut down.
    #[default]
    OnFailure,
    /// Restart it whenever it ends.
    Always,
}

impl FromStr for RestartPolicy {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            other => Err(ValidationError::new(
                "restart policy",
                format!("unknown policy {other:?}; allowed: never, on-failure, always"),
            )),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Never => "never",
            Self::OnFailure => "on-failure",
            Self::Always => "always",
        })
    }
}

/// The desired state of an instance, owned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceSpec {
    /// Its name, unique within its project.
    pub name: InstanceName,
    /// The project that owns it.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Unique id, never reused; distinguishes a re-created VM of the same name.
    pub id: InstanceId,
    /// What runs it: a VM (the default) or a container.
    #[serde(default, skip_serializing_if = "InstanceKind::is_vm")]
    pub kind: InstanceKind,
    /// The image the root disk was made from.
    pub image: ImageName,
    /// The instance type, or none for a custom size.
    pub instance_type: Option<TypeName>,
    /// What the VM gets.
    pub resources: Resources,
    /// Whether it should run.
    pub power: PowerState,
    /// What to do when it ends unasked.
    pub restart_policy: RestartPolicy,
    /// The host it is bound to.
    pub host: HostName,
    /// Its address.
    pub network: NetworkAttachment,
    /// Bumped by each reboot request; the agent reboots when its observed
    /// value is behind.
    pub reboot_generation: u64,
    /// How long a graceful stop may take before the VM is forced off.
    pub stop_timeout_secs: u32,
    /// Power off at once on the next stop instead of shutting down gracefully.
    pub force_stop: bool,
    /// Set once deletion was requested; the agent cleans up and then removes
    /// the records.
    pub deleting: bool,
    /// Bumped on every change to the spec.
    pub generation: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The latest restore asked for; acted on once (see [`RestoreRequest`]).
    #[serde(default)]
    pub restore: Option<RestoreRequest>,
    /// For a clone: the snapshot its first start continues from.
    #[serde(default)]
    pub clone_of: Option<CloneSource>,
    /// Periodic checkpoints, if wanted.
    #[serde(default)]
    pub checkpoint_schedule: Option<CheckpointSchedule>,
    /// Its spread (anti-affinity) group: placement never puts two instances
    /// of one group on the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_group: Option<GroupName>,
    /// The accelerator it must run with; any host's when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// Its security groups (of its project): inbound traffic they do not
    /// allow is dropped. None: not filtered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// Its labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: crate::labels::Labels,
    /// Replicated volumes it uses, in the order they were attached: the
    /// root volume (its `vda`, instead of a local disk) first if it has one.
    #[serde(default)]
    pub volumes: Vec<InstanceVolume>,
    /// A live migration in flight: the source's agent moves the VM to the
    /// destination and clears this when it is done, one way or the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::MigrationRequest>,
    /// What happens when its host dies.
    #[serde(default)]
    pub ha: crate::HaPolicy,
    /// Among instances restarted after one host's death, higher first.
    #[serde(default)]
    pub ha_priority: u32,
    /// What cloud-init gives the guest at first boot.
    #[serde(default, skip_serializing_if = "GuestConfig::is_empty")]
    pub guest: GuestConfig,
    /// The instance group it is a member of (made by the group's
    /// controller), with the health check its agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::group::GroupMembership>,
}

impl InstanceSpec {
    /// The guest's hostname: the one asked for at create, else the
    /// instance's name.
    pub fn guest_hostname(&self) -> String {
        self.guest
            .hostname
            .clone()
            .unwrap_or_else(|| self.name.to_string())
    }

    /// Its instance type's name, `custom` for a custom size.
    pub fn type_label(&self) -> String {
        self.instance_type
            .as_ref()
            .map_or_else(|| "custom".to_string(), ToString::to_string)
    }

    /// The instance as its project's name for it: what names it in the
    /// store and on hosts.
    pub fn instance_ref(&self) -> crate::InstanceRef {
        crate::InstanceRef::new(self.project.clone(), self.name.clone())
    }

    /// Volume `name` of this instance's project.
    pub fn volume_ref(&self, name: &crate::VolumeName) -> crate::VolumeRef {
        crate::VolumeRef::new(self.project.clone(), name.clone())
    }

    /// The volume it boots from, if any.
    pub fn root_volume(&self) -> Option<&InstanceVolume> {
        self.volumes.iter().find(|v| v.root)
    }
}

/// The lifecycle phase of an instance, as reported by its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstancePhase {
    /// Accepted; its agent has not acted on it yet.
    Pending,
    /// Its disk and network are being prepared and QEMU started.
    Starting,
    /// QEMU runs the guest.
    Running,
    /// Shutting down.
    Stopping,
    /// Not running; its disk is kept.
    Stopped,
    /// Could not be started, or ended and will not be restarted.
    Failed,
    /// Being deleted.
    Deleting,
}

impl fmt::Display for InstancePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// Why a VM's QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExitReason {
    /// The agent stopped it because the user asked.
    Requested,
    /// The guest powered itself off.
    GuestShutdown,
    /// QEMU was killed by a signal it did not ask for.
    Killed,
    /// QEMU exited with an error status.
    Crashed,
    /// QEMU is gone and how it ended is unknown (it ended while no agent watched).
    Vanished,
    /// QEMU could not be started.
    StartFailed,
}

impl ExitReason {
    /// Whether a restart policy of `on-failure` restarts after this.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Killed | Self::Crashed | Self::Vanished)
    }
}

/// How and when a VM last ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExitRecord {
    /// When the agent saw it end.
    pub at: DateTime<Utc>,
    /// Why.
    pub reason: ExitReason,
    /// Details: the signal, exit status or QEMU's last error line.
    pub detail: String,
}

/// What a VM's guest is told at first boot through cloud-init (its NoCloud
/// seed). Fixed at create: a key pair deleted later stays in the VMs made
/// with it, as on EC2.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestConfig {
    /// The guest's hostname (default: the instance's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The key pairs whose public keys the default user accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<GuestKey>,
    /// The user's user data, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// The user that gets the keys, from the image (`debian`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
}

impl GuestConfig {
    /// Whether nothing is set (the record then omits it).
    pub fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.ssh_keys.is_empty()
            && self.user_data.is_none()
            && self.ssh_user.is_none()
    }
}

/// A key pair's public key, as copied into a VM at create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GuestKey {
    /// The key pair's name.
    pub name: String,
    /// Its public key (OpenSSH one-line form).
    pub public_key: String,
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
}

/// What cloud-init in the guest reported, read through the QEMU guest
/// agent from `/run/cloud-init/result.json` (written when it has finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudInitReport {
    /// The data source it used, in its words.
    pub datasource: String,
    /// The errors it reported (empty: it succeeded).
    pub errors: Vec<String>,
}

/// The observed state of an instance, owned by its host agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStatus {
    /// Lifecycle phase.
    pub phase: InstancePhase,
    /// The host it runs on.
    pub host: Option<HostName>,
    /// QEMU's process id while it runs.
    pub pid: Option<u32>,
    /// The accelerator it runs with.
    pub accel: Option<Accel>,
    /// Whether the guest runs Skyvisor's guest service (so readiness is checked).
    #[serde(default)]
    pub guest_service: bool,
    /// Whether the guest's web service answered since the last boot.
    pub guest_ready: bool,
    /// How many times the guest was booted.
    pub boot_count: u64,
    /// How many times the agent restarted it after it ended unasked.
    pub restart_count: u64,
    /// The last time it ended.
    pub last_exit: Option<ExitRecord>,
    /// When the current QEMU process was started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the guest's service first answered after the current start.
    pub ready_at: Option<DateTime<Utc>>,
    /// The last error, for people.
    pub message: Option<String>,
    /// The spec generation this status reflects.
    pub observed_generation: u64,
    /// The reboot generation last carried out.
    pub observed_reboot_generation: u64,
    /// The restore generation last carried out (done or failed).
    #[serde(default)]
    pub observed_restore_generation: u64,
    /// The snapshot the running guest was last restored (or cloned) from.
    #[serde(default)]
    pub restored_from: Option<String>,
    /// The volumes plugged into the running VM, as its agent last saw.
    #[serde(default)]
    pub attached_volumes: Vec<crate::names::VolumeName>,
    /// Whether the VM has the QEMU guest agent's channel (images that do
    /// not run Skyvisor's guest service); whether a guest agent answers
    /// on it shows in `cloud_init` and `guest_addresses`.
    #[serde(default)]
    pub guest_agent_channel: bool,
    /// Whether its image says it runs cloud-init: the VM is ready once
    /// cloud-init has reported.
    #[serde(default)]
    pub cloud_init_expected: bool,
    /// cloud-init's report for the current boot, once it has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitReport>,
    /// The guest's IPv4 addresses as its guest agent reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_addresses: Vec<String>,
    /// A group member's health checks (none outside a group with a check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::group::HealthReport>,
    /// When this status was written.
    pub updated_at: DateTime<Utc>,
}

impl InstanceStatus {
    /// Whether the guest tells when it is ready (Skyvisor's guest service
    /// answers, or cloud-init reports through the guest agent), so that
    /// waiting for it makes sense.
    pub fn readiness_checked(&self) -> bool {
        self.guest_service || self.cloud_init_expected
    }

    /// The status of a VM no agent has acted on yet.
    pub fn pending() -> Self {
        Self {
            phase: InstancePhase::Pending,
            host: None,
            pid: None,
            accel: None,
            guest_service: false,
            guest_ready: false,
            boot_count: 0,
            restart_count: 0,
            last_exit: None,
            started_at: None,
            ready_at: None,
            message: None,
            observed_generation: 0,
            observed_reboot_generation: 0,
            observed_restore_generation: 0,
            restored_from: None,
            attached_volumes: Vec::new(),
            guest_agent_channel: false,
            cloud_init_expected: false,
            cloud_init: None,
            guest_addresses: Vec::new(),
            health: None,
            updated_at: Utc::now(),
        }
    }
}

/// An instance as the API shows it: spec and status together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// What the user asked for.
    pub spec: InstanceSpec,
    /// What the agent reports.
    pub status: InstanceStatus,
    /// Its HA protection right now (shown for one instance, not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<crate::Protection>,
}

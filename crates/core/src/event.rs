//! Events: the durable, ordered record of what was asked and what happened
//! to the cloud's objects. An action's event is written in the same store
//! transaction as the change it records wherever there is one, so the
//! record and the state never disagree; an event's place in the order is
//! the store revision it was committed at.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::{HostName, IdentityName, ProjectName};
use crate::resources::Resources;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// An instance was created.
    Created,
    /// An instance was deleted (asked; its host removes it).
    Deleted,
    /// Someone asked an instance to start.
    StartRequested,
    /// Someone asked an instance to stop.
    StopRequested,
    /// Someone asked an instance to reboot.
    RebootRequested,
    /// An instance's size changed.
    Resized,
    /// An instance's guest began running on its host.
    Started,
    /// An instance stopped running (asked to, or shut down from inside).
    Stopped,
    /// An instance's QEMU ended unasked (crash, out of memory, killed).
    Crashed,
    /// The agent restarted an instance after it ended unasked.
    Restarted,
    /// An instance could not be started.
    Failed,
    /// An instance moved to another host while running.
    Migrated,
    /// A dead host's instance was restarted on another host.
    FailedOver,
    /// A host was declared dead and its instances fenced off it.
    Fenced,
    /// A request was refused because it would exceed a project's quota.
    QuotaRefused,
    /// An API token was created.
    TokenCreated,
    /// An API token was revoked.
    TokenRevoked,
    /// An API token was used (recorded at most hourly per token and server;
    /// the audit trail has each request).
    TokenUsed,
    /// A snapshot or an image became ready (its size is known).
    Ready,
    /// An instance group's desired size changed (asked, or by a policy:
    /// the message has the numbers).
    Scaled,
    /// An instance group's launch template or health check changed.
    Updated,
    /// An instance group made a member.
    MemberAdded,
    /// An instance group removed a member (the message says why).
    MemberRemoved,
    /// The kernel killed a process of a container that reached its memory
    /// limit (the container and the host run on).
    OutOfMemory,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// The kind of object an event is about.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    /// A VM.
    Instance,
    /// A host.
    Host,
    /// A project (quota refusals).
    Project,
    /// An API token.
    Token,
    /// A replicated volume.
    Volume,
    /// A snapshot of a volume (named `volume/snapshot`).
    VolumeSnapshot,
    /// A VM checkpoint (named `vm/snapshot`).
    Snapshot,
    /// An image.
    Image,
    /// An instance group.
    Group,
    /// A load balancer.
    LoadBalancer,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Instance => "instance",
            ObjectKind::Host => "host",
            ObjectKind::Project => "project",
            ObjectKind::Token => "token",
            ObjectKind::Volume => "volume",
            ObjectKind::VolumeSnapshot => "volume-snapshot",
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Image => "image",
            ObjectKind::Group => "group",
            ObjectKind::LoadBalancer => "load-balancer",
        })
    }
}

/// Whether what the event records was done or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventResult {
    /// Done (or, for a request, accepted).
    Ok,
    /// Refused; the message says why.
    Refused,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Its place in the order of all events: the store revision it was
    /// committed at (0 before it is stored). Later events have higher
    /// numbers; a stream resumes after the last one it saw.
    #[serde(default)]
    pub seq: u64,
    /// When it happened (on the clock of whoever recorded it).
    pub at: DateTime<Utc>,
    /// The project of the object; none for cluster-wide objects (hosts).
    pub project: Option<ProjectName>,
    /// What happened.
    pub kind: EventKind,
    /// The kind of object.
    pub object: ObjectKind,
    /// The object's name (an instance's name within its project).
    pub name: String,
    /// Who asked, for actions; none for what the system did by itself
    /// (an agent reporting a crash, the HA controller failing over).
    pub identity: Option<IdentityName>,
    /// Done or refused.
    pub result: EventResult,
    /// What happened, for people.
    pub message: String,
    /// The host it happened on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostName>,
    /// The instance's type and size at that moment, for instance events
    /// (what usage is metered from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<EventSize>,
    /// What a stored object (volume, snapshot, image) takes up from this
    /// event on: what storage is metered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<EventStored>,
}

/// What a stored object takes up, as an event records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventStored {
    /// Bytes of one copy.
    pub bytes: u64,
    /// Copies kept (a volume's replicas; the replicas holding a volume
    /// snapshot; 1 otherwise).
    pub copies: u32,
}

/// An instance's type and size, as an event records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventSize {
    /// Its type's name; none for a custom size.
    pub instance_type: Option<String>,
    /// What it was given.
    pub resources: Resources,
}

impl Event {
    /// An event about `name` of kind `object`, done now by the system.
    pub fn new(
        kind: EventKind,
        object: ObjectKind,
        project: Option<ProjectName>,
        name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            seq: 0,
            at: Utc::now(),
            project,
            kind,
            object,
            name: name.into(),
            identity: None,
            result: EventResult::Ok,
            message: message.into(),
            host: None,
            size: None,
            stored: None,
        }
    }

    /// The same event, recording what the object takes up.
    pub fn stored(mut self, bytes: u64, copies: u32) -> Self {
        self.stored = Some(EventStored { bytes, copies });
        self
    }

    /// The same event, on `host`.
    pub fn on(mut self, host: &HostName) -> Self {
        self.host = Some(host.clone());
        self
    }

    /// The same event, recording the instance's size.
    pub fn sized(mut self, instance_type: Option<String>, resources: Resources) -> Self {
        self.size = Some(EventSize {
            instance_type,
            resources,
        });
        self
    }
}

impl Event {
    /// An event about instance `spec`, on its host, with its size.
    pub fn instance(
        kind: EventKind,
        spec: &crate::InstanceSpec,
        message: impl Into<String>,
    ) -> Self {
        Event::new(
            kind,
            ObjectKind::Instance,
            Some(spec.project.clone()),
            spec.name.to_string(),
            message,
        )
        .on(&spec.host)
        .sized(
            spec.instance_type.as_ref().map(|t| t.to_string()),
            spec.resources,
        )
    }
}

impl Event {
    /// An event about volume `spec`, recording its size and replicas.
    pub fn volume(kind: EventKind, spec: &crate::VolumeSpec, message: impl Into<String>) -> Self {
        Event::new(
            kind,
            ObjectKind::Volume,
            Some(spec.project.clone()),
            spec.name.to_string(),
            message,
        )
        .stored(spec.size_bytes, spec.replicas)
    }
}

impl Event {
    /// An event about snapshot `snapshot` of volume `volume` (named
    /// `volume/snapshot`, which a deletion of the volume ends too).
    pub fn volume_snapshot(
        kind: EventKind,
        volume: &crate::VolumeRef,
        snapshot: &str,
        message: impl Into<String>,
    ) -> Self {
        Event::new(
            kind,
            ObjectKind::VolumeSnapshot,
            Some(volume.project.clone()),
            format!("{}/{snapshot}", volume.name),
            message,
        )
    }

    /// An event about VM snapshot `snap` (named `vm/snapshot`), recording
    /// what its files take up.
    pub fn snapshot(kind: EventKind, snap: &crate::Snapshot, message: impl Into<String>) -> Self {
        Event::new(
            kind,
            ObjectKind::Snapshot,
            Some(snap.project.clone()),
            format!("{}/{}", snap.instance, snap.name),
            message,
        )
        .on(&snap.host)
        .stored(snap.memory_bytes + snap.disk_bytes, 1)
    }
}

impl Event {
    /// An event about image `image`, recording what its files take up.
    pub fn image(kind: EventKind, image: &crate::Image, message: impl Into<String>) -> Self {
        Event::new(
            kind,
            ObjectKind::Image,
            Some(image.project.clone()),
            image.name.to_string(),
            message,
        )
        .stored(image.files.iter().map(|f| f.size_bytes).sum(), 1)
    }
}

/// The events that going from status `prev` (what was last written) to
/// `next` records for instance `spec`: its guest began running (started,
/// or restarted by its agent), or its QEMU ended (stopped, crashed, or
/// failed to start). Each is timed by the status itself (when QEMU
/// started, when the agent saw it end), so writing them again after a
/// lost answer yields the same events.
pub fn status_transitions(
    spec: &crate::InstanceSpec,
    prev: Option<&crate::InstanceStatus>,
    next: &crate::InstanceStatus,
) -> Vec<Event> {
    use crate::instance::{ExitReason, InstancePhase};
    let mut out = Vec::new();
    let host = next.host.clone().unwrap_or_else(|| spec.host.clone());
    if let Some(exit) = &next.last_exit
        && prev.and_then(|p| p.last_exit.as_ref()) != Some(exit)
    {
        let kind = match exit.reason {
            ExitReason::StartFailed => EventKind::Failed,
            r if r.is_failure() => EventKind::Crashed,
            _ => EventKind::Stopped,
        };
        let mut e = Event::instance(kind, spec, format!("{}: {}", kind, exit.detail)).on(&host);
        e.at = exit.at;
        out.push(e);
    }
    let was_running = prev.is_some_and(|p| p.phase == InstancePhase::Running);
    if next.phase == InstancePhase::Running && !was_running {
        let restarted = prev.is_some_and(|p| next.restart_count > p.restart_count);
        let kind = if restarted {
            EventKind::Restarted
        } else {
            EventKind::Started
        };
        let message = if restarted {
            format!(
                "restarted by its agent on {host} (restart {})",
                next.restart_count
            )
        } else {
            format!("running on {host}")
        };
        let mut e = Event::instance(kind, spec, message).on(&host);
        e.at = next.started_at.unwrap_or(next.updated_at);
        out.push(e);
    }
    out
}

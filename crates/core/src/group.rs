//! Instance groups: many identical instances made from one launch template,
//! kept at a desired count between a minimum and a maximum, spread across
//! hosts, health-checked, and replaced when they fail.
//!
//! The group is desired state; the group controller (leader only) makes
//! and removes members to match it, and the member's host agent runs its
//! health check and reports the result in the member's status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::CreateInstanceRequest;
use crate::error::ValidationError;
use crate::names::GroupName;

/// Most members a group may have.
pub const MAX_GROUP_SIZE: u32 = 100;

/// How a member's health is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthProtocol {
    /// An HTTP `GET` of `path` must answer 2xx or 3xx.
    #[default]
    Http,
    /// A TCP connection to the port must be accepted.
    Tcp,
}

/// A member's health check, run by the agent of the member's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: HealthProtocol,
    /// The member's port to check (1 to 65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// For `http`: the path to `GET`, starting with `/` (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Seconds between checks (1 to 300, default 5).
    #[serde(default = "default_interval")]
    #[schema(minimum = 1, maximum = 300)]
    pub interval_secs: u32,
    /// Seconds a check may take (1 to 60, default 2); a check never takes
    /// longer than the interval (a longer timeout is cut to it).
    #[serde(default = "default_timeout")]
    #[schema(minimum = 1, maximum = 60)]
    pub timeout_secs: u32,
    /// Passing checks in a row that make a member healthy (1 to 10,
    /// default 2).
    #[serde(default = "default_healthy")]
    #[schema(minimum = 1, maximum = 10)]
    pub healthy_threshold: u32,
    /// Failing checks in a row that make a member unhealthy (1 to 10,
    /// default 3).
    #[serde(default = "default_unhealthy")]
    #[schema(minimum = 1, maximum = 10)]
    pub unhealthy_threshold: u32,
    /// Seconds after a member's start in which failing checks do not
    /// count, while it boots (0 to 3600, default 300).
    #[serde(default = "default_grace")]
    #[schema(maximum = 3600)]
    pub grace_secs: u32,
}

fn default_interval() -> u32 {
    5
}
fn default_timeout() -> u32 {
    2
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}
fn default_grace() -> u32 {
    300
}

impl HealthCheck {
    /// A check of `port` with every other setting at its default.
    pub fn new(protocol: HealthProtocol, port: u16, path: Option<String>) -> Self {
        Self {
            protocol,
            port,
            path,
            interval_secs: default_interval(),
            timeout_secs: default_timeout(),
            healthy_threshold: default_healthy(),
            unhealthy_threshold: default_unhealthy(),
            grace_secs: default_grace(),
        }
    }

    /// Parses the CLI's short form: `http:PORT[/PATH]` or `tcp:PORT`.
    pub fn parse_short(text: &str) -> Result<Self, ValidationError> {
        let field = "health_check";
        let bad = |why: &str| {
            ValidationError::new(
                field,
                format!("{why} (got {text:?}); allowed: http:PORT[/PATH] or tcp:PORT"),
            )
        };
        let (proto, rest) = text.split_once(':').ok_or_else(|| bad("no protocol"))?;
        let protocol = match proto {
            "http" => HealthProtocol::Http,
            "tcp" => HealthProtocol::Tcp,
            _ => return Err(bad("unknown protocol")),
        };
        let (port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(rest[i..].to_string())),
            None => (rest, None),
        };
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let check = Self::new(protocol, port, path);
        check.validate()?;
        Ok(check)
    }

    /// How long one check may take: the timeout, cut to the interval.
    pub fn effective_timeout_secs(&self) -> u32 {
        self.timeout_secs.min(self.interval_secs)
    }

    /// The path an HTTP check asks for.
    pub fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// Checks every field; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let range = |field: &str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ValidationError::new(
                    format!("health_check.{field}"),
                    format!("{v}; allowed: {lo} to {hi}"),
                ))
            }
        };
        if self.port == 0 {
            return Err(ValidationError::new(
                "health_check.port",
                "0; allowed: 1 to 65535",
            ));
        }
        range("interval_secs", self.interval_secs, 1, 300)?;
        range("timeout_secs", self.timeout_secs, 1, 60)?;
        range("healthy_threshold", self.healthy_threshold, 1, 10)?;
        range("unhealthy_threshold", self.unhealthy_threshold, 1, 10)?;
        range("grace_secs", self.grace_secs, 0, 3600)?;
        match (&self.protocol, &self.path) {
            (HealthProtocol::Tcp, Some(_)) => Err(ValidationError::new(
                "health_check.path",
                "a tcp check has no path; leave it out, or use http",
            )),
            (HealthProtocol::Http, Some(p))
                if !p.starts_with('/')
                    || p.len() > 256
                    || !p.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Err(ValidationError::new(
                    "health_check.path",
                    format!(
                        "{p:?}; allowed: a path starting with '/', at most 256 printable ASCII characters without spaces"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A member's health as its agent last judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Not judged yet (booting, or within the grace period).
    Unknown,
    /// Passed the healthy threshold.
    Healthy,
    /// Failed the unhealthy threshold.
    Unhealthy,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        })
    }
}

/// The result of a member's health checks, in its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthReport {
    /// The judgement.
    pub state: HealthState,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Why the last check failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// What makes an instance a group's member (in its spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GroupMembership {
    /// The group.
    #[schema(value_type = String)]
    pub group: GroupName,
    /// The group's template generation it was made from.
    pub template_generation: u64,
    /// Its health check, run by its host's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// Body of `POST /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// The group's name (a DNS label); members are named `NAME-xxxxx`.
    pub name: String,
    /// What each member is made from: an instance create request without
    /// its `name` (the image, type, network, security groups, user data,
    /// key pairs, labels...).
    pub template: CreateInstanceRequest,
    /// Fewest members (0 to 100, default 1).
    #[serde(default)]
    #[schema(maximum = 100)]
    pub min: Option<u32>,
    /// Most members (1 to 100, default the larger of `min` and `desired`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub max: Option<u32>,
    /// Members wanted now (between `min` and `max`; default `min`).
    #[serde(default)]
    #[schema(maximum = 100)]
    pub desired: Option<u32>,
    /// How members' health is checked; none: a member that runs is healthy.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// How the group sizes itself; none: it keeps `desired`.
    #[serde(default)]
    pub autoscale: Option<AutoscalePolicy>,
    /// How a template change rolls through the members (default: one
    /// extra member at a time, none fewer than `desired` serving).
    #[serde(default)]
    pub rollout: Option<Rollout>,
}

/// Body of `POST /v1/groups/{name}/scale`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleGroupRequest {
    /// Members wanted (between the group's `min` and `max`, unless those
    /// are given too).
    #[schema(maximum = 100)]
    pub desired: u32,
    /// A new minimum.
    #[serde(default)]
    #[schema(maximum = 100)]
    pub min: Option<u32>,
    /// A new maximum.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub max: Option<u32>,
}

/// Body of `PATCH /v1/groups/{name}`: a new launch template, health check,
/// or both. Members are then replaced by a rolling update.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGroupRequest {
    /// The new launch template (as at create, without a name).
    #[serde(default)]
    pub template: Option<CreateInstanceRequest>,
    /// The new health check.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// How this and later template changes roll through the members.
    #[serde(default)]
    pub rollout: Option<Rollout>,
}

/// How a rolling update replaces members: at most `max_surge` members
/// beyond `desired` at a time, and at most `max_unavailable` fewer than
/// `desired` serving. The default, 1 and 0, never drops below what serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Members made beyond `desired` at a time (0 to 100, default 1).
    #[serde(default = "one")]
    #[schema(maximum = 100)]
    pub max_surge: u32,
    /// Members fewer than `desired` that may be serving meanwhile (0 to
    /// 100, default 0).
    #[serde(default)]
    #[schema(maximum = 100)]
    pub max_unavailable: u32,
}

fn one() -> u32 {
    1
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

impl Rollout {
    /// Checks that an update can make progress and stays in bounds.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.max_surge > MAX_GROUP_SIZE || self.max_unavailable > MAX_GROUP_SIZE {
            return Err(ValidationError::new(
                field,
                format!(
                    "max_surge {} and max_unavailable {}; allowed: 0 to {MAX_GROUP_SIZE} each",
                    self.max_surge, self.max_unavailable
                ),
            ));
        }
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(ValidationError::new(
                field,
                "max_surge and max_unavailable are both 0, so no member could ever be replaced; \
                 allowed: at least one of them 1 or more",
            ));
        }
        Ok(())
    }
}

/// A scheduled size: every day at `at` (UTC, `HH:MM`) the group's desired
/// size becomes `desired` (within min and max).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduledSize {
    /// Time of day, UTC, `HH:MM`.
    pub at: String,
    /// The desired size from then on.
    #[schema(maximum = 100)]
    pub desired: u32,
}

impl ScheduledSize {
    /// Minutes after midnight UTC, or why `at` is not `HH:MM`.
    pub fn minute_of_day(&self) -> Result<u32, ValidationError> {
        let bad = || {
            ValidationError::new(
                "autoscale.schedule.at",
                format!("{:?}; allowed: HH:MM, 00:00 to 23:59 (UTC)", self.at),
            )
        };
        let (h, m) = self.at.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    }
}

/// How a group sizes itself. Each metric proposes a size (members needed
/// to bring it to its target); the largest proposal wins, within min and
/// max. Out only after `scale_out_cooldown_secs` since the last change,
/// in only after `scale_in_cooldown_secs` and only while every member
/// serves. Every decision is an event with the numbers that drove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoscalePolicy {
    /// Target average vCPU utilisation of the serving members, percent
    /// (1 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub target_cpu_percent: Option<u32>,
    /// Target new connections per second per serving member, counted by
    /// the group's load balancers (1 to 100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100000)]
    pub target_requests_per_member: Option<u32>,
    /// Sizes by time of day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduledSize>,
    /// Seconds the metrics are averaged over (10 to 3600, default 60).
    #[serde(default = "default_window")]
    #[schema(minimum = 10, maximum = 3600)]
    pub window_secs: u32,
    /// Seconds after a change before scaling out again (0 to 3600,
    /// default 60).
    #[serde(default = "default_out_cooldown")]
    #[schema(maximum = 3600)]
    pub scale_out_cooldown_secs: u32,
    /// Seconds after a change before scaling in (0 to 3600, default 300).
    #[serde(default = "default_in_cooldown")]
    #[schema(maximum = 3600)]
    pub scale_in_cooldown_secs: u32,
}

fn default_window() -> u32 {
    60
}
fn default_out_cooldown() -> u32 {
    60
}
fn default_in_cooldown() -> u32 {
    300
}

impl AutoscalePolicy {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let range = |field: &str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ValidationError::new(
                    format!("autoscale.{field}"),
                    format!("{v}; allowed: {lo} to {hi}"),
                ))
            }
        };
        if self.target_cpu_percent.is_none()
            && self.target_requests_per_member.is_none()
            && self.schedule.is_empty()
        {
            return Err(ValidationError::new(
                "autoscale",
                "no policy: give target_cpu_percent, target_requests_per_member or a schedule",
            ));
        }
        if let Some(c) = self.target_cpu_percent {
            range("target_cpu_percent", c, 1, 100)?;
        }
        if let Some(r) = self.target_requests_per_member {
            range("target_requests_per_member", r, 1, 100_000)?;
        }
        range("window_secs", self.window_secs, 10, 3600)?;
        range(
            "scale_out_cooldown_secs",
            self.scale_out_cooldown_secs,
            0,
            3600,
        )?;
        range(
            "scale_in_cooldown_secs",
            self.scale_in_cooldown_secs,
            0,
            3600,
        )?;
        for s in &self.schedule {
            s.minute_of_day()?;
            range("schedule.desired", s.desired, 0, MAX_GROUP_SIZE)?;
        }
        Ok(())
    }
}

/// A group as stored: the desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupSpec {
    /// Its project.
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Its name.
    #[schema(value_type = String)]
    pub name: GroupName,
    /// The launch template (`name` empty).
    pub template: CreateInstanceRequest,
    /// Bumped by each change to the template (members made from an older
    /// one are replaced by a rolling update).
    pub template_generation: u64,
    /// Fewest members.
    pub min: u32,
    /// Most members.
    pub max: u32,
    /// Members wanted now.
    pub desired: u32,
    /// The members' health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Set once deletion was asked: members go, then the group.
    #[serde(default)]
    pub deleting: bool,
    /// How it sizes itself, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscalePolicy>,
    /// How a template change rolls through the members.
    #[serde(default)]
    pub rollout: Rollout,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Checks a group's sizes: `min <= desired <= max <= MAX_GROUP_SIZE`.
pub fn validate_sizes(min: u32, desired: u32, max: u32) -> Result<(), ValidationError> {
    if max == 0 || max > MAX_GROUP_SIZE {
        return Err(ValidationError::new(
            "max",
            format!("{max}; allowed: 1 to {MAX_GROUP_SIZE}"),
        ));
    }
    if min > max {
        return Err(ValidationError::new(
            "min",
            format!("{min} is more than max ({max}); allowed: min <= max"),
        ));
    }
    if desired < min || desired > max {
        return Err(ValidationError::new(
            "desired",
            format!("{desired} is outside min..max ({min}..{max})"),
        ));
    }
    Ok(())
}

/// One member as a group shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupMember {
    /// The instance's name.
    pub name: String,
    /// Its host, once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Its address.
    pub ip: String,
    /// Its phase.
    pub phase: crate::InstancePhase,
    /// Its health: `unknown` until checked (or while it boots), always
    /// `healthy` for a running member of a group without a check.
    pub health: HealthState,
    /// The template generation it was made from.
    pub template_generation: u64,
    /// Whether it is being removed (scale-in, replacement, deletion).
    pub leaving: bool,
}

/// A group with its members, as the API answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Group {
    /// The desired state.
    pub spec: GroupSpec,
    /// Its members, by name.
    pub members: Vec<GroupMember>,
    /// Members running and healthy.
    pub healthy: u32,
    /// Why it is not at its desired size, if it is not (no capacity, a
    /// quota...): the controller keeps trying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The autoscaler's last decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaled: Option<AutoscaleDecision>,
}

/// The controller's note on a group, kept in the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupStatus {
    /// Why the last attempt to add a member failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Members leaving a group behind a load balancer, and since when:
    /// they get no new connections and keep theirs until the balancer's
    /// drain time has passed, then go.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub draining: std::collections::BTreeMap<String, DateTime<Utc>>,
    /// When written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// The autoscaler's last decision, with its numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleDecision>,
}

/// What the autoscaler last decided for a group, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AutoscaleDecision {
    /// When.
    pub at: DateTime<Utc>,
    /// The desired size before.
    pub from: u32,
    /// The desired size after.
    pub to: u32,
    /// The numbers that drove it, for people.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_form_parses_and_bad_ones_say_why() {
        let c = HealthCheck::parse_short("http:80/health").expect("http");
        assert_eq!(
            (c.protocol, c.port, c.http_path()),
            (HealthProtocol::Http, 80, "/health")
        );
        let c = HealthCheck::parse_short("tcp:22").expect("tcp");
        assert_eq!(
            (c.protocol, c.port, c.path),
            (HealthProtocol::Tcp, 22, None)
        );
        assert_eq!(
            HealthCheck::parse_short("http:8080")
                .expect("no path")
                .http_path(),
            "/"
        );
        for bad in [
            "udp:53",
            "http",
            "http:0",
            "http:99999",
            "tcp:22/x",
            "http:80/a b",
        ] {
            let e = HealthCheck::parse_short(bad).expect_err(bad);
            assert!(e.field.starts_with("health_check"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn sizes_are_ordered() {
        assert!(validate_sizes(1, 2, 3).is_ok());
        assert!(validate_sizes(0, 0, 1).is_ok());
        assert_eq!(validate_sizes(3, 3, 2).expect_err("min>max").field, "min");
        assert_eq!(
            validate_sizes(1, 5, 3).expect_err("desired").field,
            "desired"
        );
        assert_eq!(validate_sizes(0, 0, 0).expect_err("max 0").field, "max");
        assert_eq!(validate_sizes(0, 0, 101).expect_err("max").field, "max");
    }

    #[test]
    fn a_timeout_longer_than_the_interval_is_cut_to_it() {
        let mut c = HealthCheck::new(HealthProtocol::Tcp, 80, None);
        c.interval_secs = 2;
        c.timeout_secs = 3;
        assert!(c.validate().is_ok());
        assert_eq!(c.effective_timeout_secs(), 2);
    }
}

//! Instance groups (scale-out): the API's side (validate a request, write
//! the group's desired state, show a group with its members) and, in
//! [`controller`], the leader-side loop that makes and removes members to
//! match it. What the controller does next is the pure [`plan`].
//!
//! A member is an ordinary instance of the group's project whose spec
//! names the group; the API never makes members itself.

pub(crate) mod autoscale;
pub(crate) mod controller;
pub mod plan;

use std::collections::HashMap;

use chrono::Utc;
use skyvisor_core::api::CreateInstanceRequest;
use skyvisor_core::group::{
    AutoscalePolicy, CreateGroupRequest, Group, GroupMember, GroupSpec, GroupStatus, HealthCheck,
    HealthState, ScaleGroupRequest, UpdateGroupRequest, validate_sizes,
};
use skyvisor_core::{
    Event, EventKind, GroupName, HostName, ImageName, Instance, ObjectKind, ProjectName,
    ValidationError, keys,
};
use skyvisor_store::{Compare, Op, StoreExt, encode};

use crate::error::{ApiError, ApiResult};
use crate::{ControlPlane, READ_YOUR_WRITES};

/// Longest group name: members are named `GROUP-xxxxx` (63 characters).
pub const MAX_GROUP_NAME: usize = 57;

/// Checks a launch template without making anything: the fields a member
/// could not be made with are refused now, naming the field.
fn check_template(t: &CreateInstanceRequest) -> Result<(), ValidationError> {
    if !t.name.is_empty() {
        return Err(ValidationError::new(
            "template.name",
            "members are named after the group (GROUP-xxxxx); leave the name out",
        ));
    }
    if t.image.is_empty() {
        return Err(ValidationError::new(
            "template.image",
            "missing: give the image members boot",
        ));
    }
    ImageName::new(t.image.clone())
        .map_err(|e| ValidationError::new("template.image", e.message))?;
    if t.root_volume.is_some() || !t.volumes.is_empty() {
        return Err(ValidationError::new(
            "template.volumes",
            "a volume belongs to one instance; members of a group get their own disks (leave root_volume and volumes out)",
        ));
    }
    if t.from_snapshot.is_some() {
        return Err(ValidationError::new(
            "template.from_snapshot",
            "members boot from the template's image; leave from_snapshot out",
        ));
    }
    if t.start == Some(false) {
        return Err(ValidationError::new(
            "template.start",
            "members run: a stopped member is replaced; leave start out",
        ));
    }
    if t.hostname.is_some() {
        return Err(ValidationError::new(
            "template.hostname",
            "each member's hostname is its own name; leave hostname out",
        ));
    }
    crate::instances::resolve_size(
        t.instance_type.as_deref(),
        t.vcpus,
        t.memory_mib,
        t.disk_gib,
    )
    .map_err(|e| ValidationError::new(format!("template.{}", e.field), e.message))?;
    skyvisor_core::labels::validate_labels("template.labels", &t.labels)?;
    Ok(())
}

/// A policy in a few words, for events.
fn describe(p: &AutoscalePolicy) -> String {
    let mut parts = Vec::new();
    if let Some(c) = p.target_cpu_percent {
        parts.push(format!("vCPU {c}%"));
    }
    if let Some(r) = p.target_requests_per_member {
        parts.push(format!("{r} connections/s per member"));
    }
    if !p.schedule.is_empty() {
        parts.push(format!("{} scheduled sizes", p.schedule.len()));
    }
    format!(
        "{} (window {} s, cooldowns out {} s, in {} s)",
        parts.join(", "),
        p.window_secs,
        p.scale_out_cooldown_secs,
        p.scale_in_cooldown_secs
    )
}

fn check_name(name: &str) -> ApiResult<GroupName> {
    let group = GroupName::new(name).map_err(|e| ValidationError::new("name", e.message))?;
    if name.len() > MAX_GROUP_NAME {
        return Err(ValidationError::new(
            "name",
            format!(
                "{} characters; allowed: at most {MAX_GROUP_NAME} (members are named GROUP-xxxxx)",
                name.len()
            ),
        )
        .into());
    }
    Ok(group)
}

fn check_health(h: &Option<HealthCheck>) -> ApiResult<()> {
    if let Some(h) = h {
        h.validate()?;
    }
    Ok(())
}

impl ControlPlane {
    /// Makes a group; the controller then makes its members.
    pub async fn create_group(
        &self,
        project: &ProjectName,
        req: CreateGroupRequest,
    ) -> ApiResult<Group> {
        let name = check_name(&req.name)?;
        check_template(&req.template)?;
        check_health(&req.health_check)?;
        if let Some(a) = &req.autoscale {
            a.validate()?;
        }
        let min = req.min.unwrap_or(1);
        let desired = req.desired.unwrap_or(min);
        let max = req.max.unwrap_or(min.max(desired).max(1));
        validate_sizes(min, desired, max)?;
        let rollout = req.rollout.unwrap_or_default();
        rollout.validate("rollout")?;
        // What a member needs must exist now: the image, the network,
        // security groups and key pairs (and stay: a member made later
        // that cannot be made says so in the group).
        let image = self
            .image(project, &ImageName::new(req.template.image.clone())?)
            .await
            .map_err(|e| e.with_field("template.image"))?;
        if image.state == skyvisor_core::ImageState::Failed {
            return Err(ApiError::conflict(format!(
                "image \"{}\" failed to build; members could not boot it",
                image.name
            ))
            .with_field("template.image"));
        }
        self.check_security_groups(project, &req.template.security_groups)
            .await
            .map_err(|e| e.with_field("template.security_groups"))?;
        self.guest_config(project, &req.template)
            .await
            .map_err(|e| e.with_field("template"))?;
        if let Some(net) = &req.template.network
            && net != keys::DEFAULT_NETWORK
            && self.find_network(project, net).await?.is_none()
        {
            return Err(ApiError::not_found(format!(
                "network \"{net}\" not found in project {project}"
            ))
            .with_field("template.network"));
        }
        let spec = GroupSpec {
            project: project.clone(),
            name: name.clone(),
            template: req.template,
            template_generation: 1,
            min,
            max,
            desired,
            health_check: req.health_check,
            deleting: false,
            autoscale: req.autoscale,
            rollout,
            created_at: Utc::now(),
        };
        let key = keys::group(project, &name);
        let event = Event::new(
            EventKind::Created,
            ObjectKind::Group,
            Some(project.clone()),
            name.to_string(),
            format!("group created: min {min}, desired {desired}, max {max}"),
        );
        let out = self
            .store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![
                    Op::Put {
                        key,
                        value: encode(&spec),
                        lease: None,
                    },
                    crate::events::op(event),
                ],
            )
            .await?;
        if !out.succeeded {
            return Err(ApiError::already_exists(format!(
                "group \"{name}\" already exists"
            )));
        }
        tracing::info!(project = %project, group = %name, desired, "group created");
        self.inventory
            .wait_for(out.revision, READ_YOUR_WRITES)
            .await;
        Ok(self.group_view(spec, None).await)
    }

    /// The groups of `project`, by name, with their members.
    pub async fn groups(&self, project: &ProjectName) -> ApiResult<Vec<Group>> {
        let (list, _) = self
            .store
            .list_json::<GroupSpec>(&keys::in_project(keys::GROUPS, project))
            .await?;
        let mut out = Vec::new();
        for (spec, _) in list {
            let status = self.group_status(&spec).await;
            out.push(self.group_view(spec, status).await);
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// Group `name` of `project`, or 404.
    pub async fn group(&self, project: &ProjectName, name: &str) -> ApiResult<Group> {
        let (spec, _) = self.group_spec(project, name).await?;
        let status = self.group_status(&spec).await;
        Ok(self.group_view(spec, status).await)
    }

    async fn group_spec(&self, project: &ProjectName, name: &str) -> ApiResult<(GroupSpec, i64)> {
        let group = GroupName::new(name)?;
        self.store
            .get_json::<GroupSpec>(&keys::group(project, &group))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("group \"{name}\" not found")))
    }

    async fn group_status(&self, spec: &GroupSpec) -> Option<GroupStatus> {
        self.store
            .get_json::<GroupStatus>(&keys::group_status(&spec.project, &spec.name))
            .await
            .ok()
            .flatten()
            .map(|(s, _)| s)
    }

    /// Changes a group's spec with compare-and-swap (retrying when the
    /// controller or another request wrote in between); records `kind`.
    async fn change_group(
        &self,
        project: &ProjectName,
        name: &str,
        kind: EventKind,
        change: impl Fn(&mut GroupSpec) -> ApiResult<String>,
    ) -> ApiResult<Group> {
        for _ in 0..16 {
            let (mut spec, rev) = self.group_spec(project, name).await?;
            if spec.deleting {
                return Err(ApiError::conflict(format!(
                    "group \"{name}\" is being deleted"
                )));
            }
            let message = change(&mut spec)?;
            if self.put_group(&spec, rev, kind, message).await? {
                let status = self.group_status(&spec).await;
                return Ok(self.group_view(spec, status).await);
            }
        }
        Err(ApiError::unavailable(format!(
            "group \"{name}\" is changing too fast; retry"
        )))
    }

    /// Writes `spec` over the revision `rev` it was read at, with event
    /// `kind` saying `message`, in one transaction; false if the group
    /// changed meanwhile (read it again and retry).
    pub(crate) async fn put_group(
        &self,
        spec: &GroupSpec,
        rev: i64,
        kind: EventKind,
        message: String,
    ) -> ApiResult<bool> {
        let key = keys::group(&spec.project, &spec.name);
        let event = Event::new(
            kind,
            ObjectKind::Group,
            Some(spec.project.clone()),
            spec.name.to_string(),
            message,
        );
        let out = self
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![
                    Op::Put {
                        key,
                        value: encode(spec),
                        lease: None,
                    },
                    crate::events::op(event),
                ],
            )
            .await?;
        if out.succeeded {
            self.inventory
                .wait_for(out.revision, READ_YOUR_WRITES)
                .await;
        }
        Ok(out.succeeded)
    }

    /// Sets a group's desired size (and optionally its bounds).
    pub async fn scale_group(
        &self,
        project: &ProjectName,
        name: &str,
        req: ScaleGroupRequest,
    ) -> ApiResult<Group> {
        self.change_group(project, name, EventKind::Scaled, |spec| {
            let (min, max) = (req.min.unwrap_or(spec.min), req.max.unwrap_or(spec.max));
            validate_sizes(min, req.desired, max)?;
            let message = format!(
                "desired {} -> {} (min {min}, max {max}), asked",
                spec.desired, req.desired
            );
            (spec.min, spec.max, spec.desired) = (min, max, req.desired);
            Ok(message)
        })
        .await
    }

    /// Changes a group's launch template or health check: members are
    /// replaced by a rolling update, one at a time.
    pub async fn update_group(
        &self,
        project: &ProjectName,
        name: &str,
        req: UpdateGroupRequest,
    ) -> ApiResult<Group> {
        if let Some(t) = &req.template {
            check_template(t)?;
            self.image(project, &ImageName::new(t.image.clone())?)
                .await
                .map_err(|e| e.with_field("template.image"))?;
            self.check_security_groups(project, &t.security_groups)
                .await
                .map_err(|e| e.with_field("template.security_groups"))?;
            self.guest_config(project, t)
                .await
                .map_err(|e| e.with_field("template"))?;
        }
        if let Some(h) = &req.health_check {
            h.validate()?;
        }
        if let Some(r) = &req.rollout {
            r.validate("rollout")?;
        }
        if req.template.is_none() && req.health_check.is_none() && req.rollout.is_none() {
            return Err(ValidationError::new(
                "template",
                "nothing to change: give a template, a health_check, a rollout, or more",
            )
            .into());
        }
        self.change_group(project, name, EventKind::Updated, |spec| {
            let mut changed = Vec::new();
            if let Some(t) = &req.template
                && *t != spec.template
            {
                spec.template = t.clone();
                changed.push("template");
            }
            if let Some(h) = &req.health_check
                && Some(h) != spec.health_check.as_ref()
            {
                spec.health_check = Some(h.clone());
                changed.push("health check");
            }
            if !changed.is_empty() {
                spec.template_generation += 1;
            }
            // How updates roll is no change to the members themselves.
            if let Some(r) = req.rollout
                && r != spec.rollout
            {
                spec.rollout = r;
                if changed.is_empty() {
                    return Ok(format!(
                        "rollout set: max surge {}, max unavailable {}",
                        r.max_surge, r.max_unavailable
                    ));
                }
            }
            Ok(if changed.is_empty() {
                "no change".to_string()
            } else {
                format!(
                    "{} changed: rolling update to template generation {}",
                    changed.join(" and "),
                    spec.template_generation
                )
            })
        })
        .await
    }

    /// Sets (or, with none, removes) a group's autoscaling policy.
    pub async fn set_group_autoscale(
        &self,
        project: &ProjectName,
        name: &str,
        policy: Option<AutoscalePolicy>,
    ) -> ApiResult<Group> {
        if let Some(p) = &policy {
            p.validate()?;
        }
        self.change_group(project, name, EventKind::Updated, |spec| {
            spec.autoscale = policy.clone();
            Ok(match &policy {
                Some(p) => format!("autoscaling set: {}", describe(p)),
                None => "autoscaling removed: the group keeps its desired size".to_string(),
            })
        })
        .await
    }

    /// Deletes a group: its members go, then the group.
    pub async fn delete_group(&self, project: &ProjectName, name: &str) -> ApiResult<Group> {
        let (spec, _) = self.group_spec(project, name).await?;
        let balancers = self.balancers_of(project, &spec.name).await?;
        if !balancers.is_empty() {
            let names: Vec<&str> = balancers.iter().map(|b| b.name.as_str()).collect();
            return Err(ApiError::conflict(format!(
                "group \"{name}\" is the target of load balancer {}; delete {} first",
                names.join(", "),
                if names.len() == 1 { "it" } else { "them" }
            )));
        }
        for _ in 0..16 {
            let (mut spec, rev) = self.group_spec(project, name).await?;
            if spec.deleting {
                let status = self.group_status(&spec).await;
                return Ok(self.group_view(spec, status).await);
            }
            spec.deleting = true;
            let message = "group deleted: its members go".to_string();
            if self
                .put_group(&spec, rev, EventKind::Deleted, message)
                .await?
            {
                return Ok(self.group_view(spec, None).await);
            }
        }
        Err(ApiError::unavailable(format!(
            "group \"{name}\" is changing too fast; retry"
        )))
    }

    /// Every group's status, by its key (`keys::group_status`): read once
    /// a tick by the loops that need several.
    pub(crate) async fn group_statuses(
        &self,
    ) -> ApiResult<std::collections::BTreeMap<String, skyvisor_core::group::GroupStatus>> {
        Ok(self
            .store
            .list(keys::GROUP_STATUSES)
            .await?
            .items
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), skyvisor_store::decode(kv).ok()?)))
            .collect())
    }

    /// The instances of `group` in `project`.
    pub(crate) async fn group_instances(
        &self,
        project: &ProjectName,
        group: &GroupName,
    ) -> Vec<Instance> {
        self.inventory
            .instances_full_where(|s| {
                &s.project == project && s.group.as_ref().is_some_and(|m| &m.group == group)
            })
            .await
    }

    /// How many members of `group` each host runs (a member's placement
    /// prefers the hosts with fewest).
    pub(crate) async fn group_members_by_host(
        &self,
        project: &ProjectName,
        group: &GroupName,
    ) -> HashMap<HostName, u32> {
        let mut out = HashMap::new();
        for i in self.group_instances(project, group).await {
            if !i.spec.deleting {
                *out.entry(i.spec.host.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    async fn group_view(&self, spec: GroupSpec, status: Option<GroupStatus>) -> Group {
        let checked = spec.health_check.is_some();
        let mut members: Vec<GroupMember> = self
            .group_instances(&spec.project, &spec.name)
            .await
            .into_iter()
            .map(|i| {
                let view = plan::MemberView::of(&i.spec, &i.status, checked);
                GroupMember {
                    name: i.spec.name.to_string(),
                    host: Some(i.spec.host.to_string()),
                    ip: i.spec.network.ip.to_string(),
                    phase: i.status.phase,
                    health: view.health,
                    template_generation: view.template_generation,
                    leaving: i.spec.deleting,
                }
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let healthy = members
            .iter()
            .filter(|m| {
                !m.leaving
                    && m.phase == skyvisor_core::InstancePhase::Running
                    && m.health == HealthState::Healthy
            })
            .count() as u32;
        Group {
            spec,
            members,
            healthy,
            autoscaled: status.as_ref().and_then(|s| s.autoscale.clone()),
            message: status.and_then(|s| s.message),
        }
    }
}

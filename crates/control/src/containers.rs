//! What a container instance may and may not be asked for: the checks the
//! API makes before anything is made, so that every refusal names what was
//! wrong and what is allowed.

use skyvisor_core::api::CreateInstanceRequest;
use skyvisor_core::{Image, ImageKind, InstanceKind, InstanceSpec, ValidationError};

use crate::error::{ApiError, ApiResult};

/// Why a container cannot be checkpointed, restored from memory or moved
/// live: the one message every such refusal gives.
pub const NO_CRIU: &str = "containers cannot be checkpointed, restored or live-migrated: that needs CRIU, which does not work on this cloud's host kernels; stop and start it instead (its writable layer is kept)";

/// Refuses, before anything is made, what a container create asks for that
/// only a VM has.
pub(crate) fn check_request(req: &CreateInstanceRequest) -> ApiResult<()> {
    if req.kind != Some(InstanceKind::Container) {
        return Ok(());
    }
    let refuse = |field: &str, why: &str| -> ApiResult<()> {
        Err(ValidationError::new(field, format!("a container {why}")).into())
    };
    if req.from_snapshot.is_some() {
        return refuse(
            "from_snapshot",
            &format!("cannot be cloned from a snapshot: {NO_CRIU}"),
        );
    }
    if req.checkpoint_schedule.is_some() {
        return refuse(
            "checkpoint_schedule",
            &format!("has no checkpoints: {NO_CRIU}"),
        );
    }
    if req.root_volume.is_some() || !req.volumes.is_empty() {
        return refuse(
            if req.root_volume.is_some() {
                "root_volume"
            } else {
                "volumes"
            },
            "cannot use replicated volumes yet: a container would reach one through the host kernel's NBD block client, and the hosts' kernels here have none (no nbd module); its data lives in its writable layer, kept across stop and start on its host",
        );
    }
    if req.disk_replicas.is_some() {
        return refuse(
            "disk_replicas",
            "has no root disk to replicate: its root is the image under a writable layer on its host",
        );
    }
    if req.accel.is_some() {
        return refuse(
            "accel",
            "runs on its host's kernel: it has no accelerator; leave accel out",
        );
    }
    if req.user_data.is_some() || !req.keys.is_empty() {
        return refuse(
            if req.user_data.is_some() {
                "user_data"
            } else {
                "keys"
            },
            "runs no cloud-init and no SSH server: leave user_data and keys out and use `skyvisor vm exec`",
        );
    }
    Ok(())
}

/// Refuses an image that instances of `kind` cannot run.
pub(crate) fn check_image(kind: InstanceKind, image: &Image) -> ApiResult<()> {
    if image.kind.runs_as(kind) {
        return Ok(());
    }
    let message = match kind {
        InstanceKind::Container => format!(
            "image \"{}\" is a VM image (kind {}); a container runs a root file system image (kind rootfs), such as one built from recipe debian-rootfs or imported with `skyvisor image import --oci`",
            image.name, image.kind
        ),
        InstanceKind::Vm => format!(
            "image \"{}\" is a container root file system (kind {}); run it with kind container (--kind container), or give a VM image",
            image.name,
            ImageKind::Rootfs
        ),
    };
    Err(ValidationError::new("image", message).into())
}

/// Refuses `op` (a checkpoint, a restore, a live migration) on a container.
pub(crate) fn refuse_for_container(spec: &InstanceSpec) -> ApiResult<()> {
    if spec.kind != InstanceKind::Container {
        return Ok(());
    }
    let mut e = ApiError::conflict(format!(
        "instance \"{}\" is a container: {NO_CRIU}",
        spec.name
    ));
    e.field = Some("kind".into());
    Err(e)
}

impl crate::ControlPlane {
    /// Runs a command in `project`'s running container `name`, on its
    /// host, and gives what it did.
    pub async fn exec_in_instance(
        &self,
        project: &skyvisor_core::ProjectName,
        name: &str,
        req: &skyvisor_core::api::ExecRequest,
    ) -> ApiResult<skyvisor_core::api::ExecResult> {
        let timeout = req.validate()?;
        let (inst, agent) = self.exec_target(project, name).await?;
        let url = format!("{agent}/agent/v1/instances/{}/exec", inst.spec.id);
        let resp = self
            .http
            .post(&url)
            .json(req)
            .timeout(std::time::Duration::from_secs(u64::from(timeout) + 30))
            .send()
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("host {} unreachable: {e}", inst.spec.host))
            })?;
        let resp = agent_answer(resp, name, &inst).await?;
        resp.json().await.map_err(|e| {
            ApiError::bad_gateway(format!(
                "host {} sent a bad exec result: {e}",
                inst.spec.host
            ))
        })
    }

    /// Opens a terminal session of `req` in `project`'s running container
    /// `name` on its host: the agent's upgraded connection, carrying
    /// [`skyvisor_core::exec_stream`] frames.
    pub async fn exec_tty_upstream(
        &self,
        project: &skyvisor_core::ProjectName,
        name: &str,
        req: &skyvisor_core::api::ExecRequest,
    ) -> ApiResult<reqwest::Upgraded> {
        use skyvisor_core::exec_stream::UPGRADE_PROTOCOL;
        req.validate()?;
        if req.stdin.is_some() {
            return Err(ValidationError::new(
                "stdin",
                "a terminal session reads its input from the terminal; leave stdin out",
            )
            .into());
        }
        let (inst, agent) = self.exec_target(project, name).await?;
        let url = format!("{agent}/agent/v1/instances/{}/exec-tty", inst.spec.id);
        let spec = serde_json::to_string(req)
            .map_err(|e| ApiError::internal(format!("encoding the exec request: {e}")))?;
        let request = self.http.post(&url).query(&[("spec", spec)]);
        let resp = crate::console::ask_upgrade(request, UPGRADE_PROTOCOL, &inst.spec.host).await?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let resp = agent_answer(resp, name, &inst).await?;
            return Err(ApiError::bad_gateway(format!(
                "host {} answered {} to a terminal session",
                inst.spec.host,
                resp.status()
            )));
        }
        crate::console::upgraded(resp, &inst.spec.host, "terminal session").await
    }

    /// The running container `name` of `project` and its agent's URL, or
    /// why a command cannot run in it.
    async fn exec_target(
        &self,
        project: &skyvisor_core::ProjectName,
        name: &str,
    ) -> ApiResult<(skyvisor_core::Instance, String)> {
        let inst = self.instance(project, name).await?;
        if inst.spec.kind != InstanceKind::Container {
            let mut e = ApiError::conflict(format!(
                "instance \"{name}\" is a VM: exec runs commands in containers; reach a VM with `skyvisor vm ssh {name} -- COMMAND` (images with cloud-init) or through its service"
            ));
            e.field = Some("kind".into());
            return Err(e);
        }
        if inst.status.phase != skyvisor_core::InstancePhase::Running {
            return Err(ApiError::conflict(format!(
                "container \"{name}\" is {}, not running; start it first (`skyvisor vm start {name}`)",
                inst.status.phase
            )));
        }
        let host = self.inventory.host(&inst.spec.host).await.ok_or_else(|| {
            ApiError::unavailable(format!("host {} is not registered", inst.spec.host))
        })?;
        let Some(agent) = host.host.agent_url.clone() else {
            return Err(ApiError::unavailable(format!(
                "host {} serves no agent API",
                inst.spec.host
            )));
        };
        Ok((inst, agent))
    }
}

/// The agent's answer if it is a success; its refusal in the API's terms
/// otherwise.
async fn agent_answer(
    resp: reqwest::Response,
    name: &str,
    inst: &skyvisor_core::Instance,
) -> ApiResult<reqwest::Response> {
    let status = resp.status();
    if status.is_success() || status == reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(match status {
        reqwest::StatusCode::CONFLICT => {
            ApiError::conflict(format!("container \"{name}\": {text}"))
        }
        reqwest::StatusCode::BAD_REQUEST => ApiError::invalid(text),
        _ => ApiError::bad_gateway(format!("host {} answered {status}: {text}", inst.spec.host)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> CreateInstanceRequest {
        CreateInstanceRequest {
            name: "c".into(),
            image: "debian-rootfs".into(),
            kind: Some(InstanceKind::Container),
            ..Default::default()
        }
    }

    #[test]
    fn only_what_a_container_can_have_passes() {
        check_request(&container()).expect("plain container");
        let mut r = container();
        r.from_snapshot = Some("a/b".into());
        let e = check_request(&r).expect_err("clone");
        assert_eq!(e.field.as_deref(), Some("from_snapshot"));
        assert!(e.message.contains("CRIU"), "{}", e.message);
        let mut r = container();
        r.volumes = vec!["data".into()];
        let e = check_request(&r).expect_err("volume");
        assert_eq!(e.field.as_deref(), Some("volumes"));
        assert!(e.message.contains("NBD"), "{}", e.message);
        let mut r = container();
        r.accel = Some(skyvisor_core::Accel::Kvm);
        assert_eq!(
            check_request(&r).expect_err("accel").field.as_deref(),
            Some("accel")
        );
        let mut r = container();
        r.kind = None;
        r.volumes = vec!["data".into()];
        check_request(&r).expect("a VM may have volumes");
    }
}

//! Live counters for `vm top` and `host top`: asks the agents (members
//! only) for their samples, in parallel and briefly, and keeps what the
//! caller may see.

use std::time::Duration;

use skyvisor_core::top::{AgentSamples, HostMetrics, InstanceMetrics, TopSamples};
use skyvisor_core::{HostName, ProjectName};

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// How long an agent gets to answer: a live view shows who is slow rather
/// than waiting for them.
const ASK_DEADLINE: Duration = Duration::from_secs(3);

impl ControlPlane {
    pub(crate) async fn ask_agents(
        &self,
        hosts: Vec<HostName>,
    ) -> (Vec<AgentSamples>, Vec<String>) {
        let asks = hosts.into_iter().map(|name| async move {
            let Some(entry) = self.inventory.host(&name).await else {
                return Err(format!("{name}: not registered"));
            };
            if !entry.alive {
                return Err(format!("{name}: unreachable (its lease is gone)"));
            }
            let Some(url) = entry.host.agent_url.clone() else {
                return Err(format!("{name}: serves no agent API"));
            };
            let resp = self
                .http
                .get(format!("{url}/agent/v1/samples"))
                .timeout(ASK_DEADLINE)
                .send()
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{name}: answered {}", resp.status()));
            }
            resp.json::<AgentSamples>()
                .await
                .map_err(|e| format!("{name}: unreadable samples: {e}"))
        });
        let mut samples = Vec::new();
        let mut unreachable = Vec::new();
        for r in futures::future::join_all(asks).await {
            match r {
                Ok(s) => samples.push(s),
                Err(e) => unreachable.push(e),
            }
        }
        (samples, unreachable)
    }

    /// The counters of `project`'s VMs, from the hosts they are on.
    pub async fn top_instances(&self, project: &ProjectName) -> TopSamples {
        let mut hosts: Vec<HostName> = self
            .inventory
            .instances()
            .await
            .into_iter()
            .filter(|s| &s.project == project && !s.deleting)
            .map(|s| s.host)
            .collect();
        hosts.sort();
        hosts.dedup();
        let (samples, unreachable) = self.ask_agents(hosts).await;
        let mut vms: Vec<_> = samples
            .into_iter()
            .flat_map(|s| s.vms)
            .filter(|v| &v.project == project)
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        TopSamples {
            vms,
            hosts: Vec::new(),
            unreachable,
        }
    }

    /// The counters of every host.
    pub async fn top_hosts(&self) -> TopSamples {
        let hosts = self
            .inventory
            .hosts()
            .await
            .into_iter()
            .map(|h| h.host.name.clone())
            .collect();
        let (samples, unreachable) = self.ask_agents(hosts).await;
        let mut hosts: Vec<_> = samples.into_iter().map(|s| s.host).collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        TopSamples {
            vms: Vec::new(),
            hosts,
            unreachable,
        }
    }

    /// The recent metric history of `project`'s instance `name`, from the
    /// host it is on.
    pub async fn instance_history(
        &self,
        project: &ProjectName,
        name: &str,
        minutes: u64,
    ) -> ApiResult<InstanceMetrics> {
        let inst = self.instance(project, name).await?;
        let url = self.history_agent(&inst.spec.host).await?;
        let url = format!("{url}/agent/v1/history/instances/{project}/{name}");
        self.ask_history(&inst.spec.host, &url, minutes).await
    }

    /// The recent metric history of host `name`.
    pub async fn host_history(&self, name: &HostName, minutes: u64) -> ApiResult<HostMetrics> {
        let url = self.history_agent(name).await?;
        self.ask_history(name, &format!("{url}/agent/v1/history/host"), minutes)
            .await
    }

    async fn history_agent(&self, host: &HostName) -> ApiResult<String> {
        let entry = self
            .inventory
            .host(host)
            .await
            .ok_or_else(|| ApiError::not_found(format!("host \"{host}\" not found")))?;
        entry
            .host
            .agent_url
            .clone()
            .ok_or_else(|| ApiError::unavailable(format!("host {host} serves no agent API")))
    }

    async fn ask_history<T: serde::de::DeserializeOwned>(
        &self,
        host: &HostName,
        url: &str,
        minutes: u64,
    ) -> ApiResult<T> {
        let resp = self
            .http
            .get(url)
            .query(&[("minutes", minutes)])
            .timeout(ASK_DEADLINE)
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("host {host} unreachable: {e}")))?;
        if !resp.status().is_success() {
            return Err(ApiError::bad_gateway(format!(
                "host {host} answered {} to a history request",
                resp.status()
            )));
        }
        resp.json().await.map_err(|e| {
            ApiError::bad_gateway(format!("host {host} sent an unreadable history: {e}"))
        })
    }
}

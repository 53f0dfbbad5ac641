//! Where the cluster's metrics are: this server's own `/metrics`, and
//! `GET /v1/metrics/targets`, every server's and agent's metrics endpoint
//! for Prometheus' HTTP service discovery. Metrics name every project's
//! VMs, so both need a cluster admin or a cluster monitor.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use skyvisor_core::api::{ErrorBody, ScrapeTargetGroup};
use skyvisor_core::cluster::ServerRecord;
use skyvisor_core::{Host, exposition, keys};
use skyvisor_store::StoreExt;

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// `/metrics`: this server's metrics, for a cluster admin or monitor.
pub(super) async fn metrics(State(cp): State<ControlPlane>, headers: HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    match cp.directory.authenticate(auth).await {
        Err(e) => ApiError::from(e).into_response(),
        Ok(p) if !p.identity.may_read_metrics() => ApiError::forbidden(format!(
            "/metrics needs a cluster admin or a cluster monitor; {} is neither \
             (make one with `skyvisor identity create NAME --service-account --cluster-monitor`)",
            p.identity.name
        ))
        .into_response(),
        Ok(_) => {
            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
            let (content_type, body) = exposition::negotiate(accept, cp.metrics.encode());
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
    }
}

/// `host:port` and scheme of an endpoint's URL.
fn target_of(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then(|| (authority.to_string(), scheme.to_string()))
}

/// Every server's and agent's metrics endpoint, in the format of
/// Prometheus' HTTP service discovery.
#[utoipa::path(get, path = "/v1/metrics/targets", tag = "system",
    responses(
        (status = 200, body = Vec<ScrapeTargetGroup>),
        (status = 403, body = ErrorBody, description = "not a cluster admin or monitor"),
    ))]
pub(super) async fn targets(
    State(cp): State<ControlPlane>,
) -> ApiResult<Json<Vec<ScrapeTargetGroup>>> {
    let group = |url: &str, role: &str, key: &str, name: String| {
        let (target, scheme) = target_of(url)?;
        let labels = BTreeMap::from([
            ("__scheme__".to_string(), scheme),
            ("skyvisor_role".to_string(), role.to_string()),
            (key.to_string(), name),
        ]);
        Some(ScrapeTargetGroup {
            targets: vec![target],
            labels,
        })
    };
    let (servers, _) = cp.store.list_json::<ServerRecord>(keys::SERVERS).await?;
    let (hosts, _) = cp.store.list_json::<Host>(keys::HOSTS).await?;
    let mut out: Vec<ScrapeTargetGroup> = servers
        .iter()
        .filter_map(|(s, _)| group(&s.url, "server", "skyvisor_server", s.name.to_string()))
        .collect();
    out.extend(hosts.iter().filter_map(|(h, _)| {
        group(
            h.agent_url.as_deref()?,
            "agent",
            "skyvisor_host",
            h.name.to_string(),
        )
    }));
    if out.is_empty() {
        return Err(ApiError::unavailable(
            "no server or agent has registered yet",
        ));
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_host_and_port_with_the_scheme_apart() {
        assert_eq!(
            target_of("https://10.0.0.5:7781"),
            Some(("10.0.0.5:7781".into(), "https".into()))
        );
        assert_eq!(
            target_of("http://127.0.0.1:7780/"),
            Some(("127.0.0.1:7780".into(), "http".into()))
        );
        assert_eq!(target_of("10.0.0.5:7781"), None);
        assert_eq!(target_of("https://"), None);
    }
}

/// Live counters of the request project's VMs (vCPU seconds, memory,
/// disk and network bytes, each with the instant it was read), for
/// `skyvisor vm top`: two samples make rates.
#[utoipa::path(get, path = "/v1/top/instances", tag = "system",
    responses((status = 200, body = skyvisor_core::top::TopSamples)))]
pub(super) async fn top_instances(
    State(cp): State<ControlPlane>,
    caller: crate::access::Caller,
) -> Json<skyvisor_core::top::TopSamples> {
    Json(cp.top_instances(&caller.project).await)
}

/// Live counters of every host, for `skyvisor host top`; cluster admins
/// and monitors (they sum every project's use).
#[utoipa::path(get, path = "/v1/top/hosts", tag = "system",
    responses(
        (status = 200, body = skyvisor_core::top::TopSamples),
        (status = 403, body = ErrorBody, description = "not a cluster admin or monitor"),
    ))]
pub(super) async fn top_hosts(
    State(cp): State<ControlPlane>,
) -> Json<skyvisor_core::top::TopSamples> {
    Json(cp.top_hosts().await)
}

/// How much metric history to return.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    /// The last this many minutes (default and most: 60).
    #[serde(default)]
    #[param(minimum = 1, maximum = 60)]
    minutes: Option<u64>,
}

impl HistoryQuery {
    fn minutes(&self) -> Result<u64, crate::error::ApiError> {
        use skyvisor_core::top::HISTORY_MINUTES;
        let m = self.minutes.unwrap_or(HISTORY_MINUTES);
        if !(1..=HISTORY_MINUTES).contains(&m) {
            let mut e = crate::error::ApiError::invalid(format!(
                "minutes {m} is out of range; allowed: 1 to {HISTORY_MINUTES} (hosts keep an hour)"
            ));
            e.field = Some("minutes".into());
            return Err(e);
        }
        Ok(m)
    }
}

/// An instance's metrics over the last hour (or `minutes`): CPU, memory,
/// disk and network rates, one point every 15 s, as its current host
/// recorded them (a host keeps them in memory: after a migration or an
/// agent restart the history starts again).
#[utoipa::path(get, path = "/v1/instances/{name}/metrics", tag = "instances",
    params(("name" = String, Path, description = "instance name"), HistoryQuery),
    responses(
        (status = 200, body = skyvisor_core::top::InstanceMetrics),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn instance_history(
    State(cp): State<ControlPlane>,
    caller: crate::access::Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    super::ApiQuery(q): super::ApiQuery<HistoryQuery>,
) -> crate::error::ApiResult<Json<skyvisor_core::top::InstanceMetrics>> {
    let minutes = q.minutes()?;
    cp.visible_instance(&caller, &name).await?;
    Ok(Json(
        cp.instance_history(&caller.project, &name, minutes).await?,
    ))
}

/// A host's metrics over the last hour (or `minutes`): CPU busy, memory
/// in use, network rates and running VMs, one point every 15 s; cluster
/// admins and monitors.
#[utoipa::path(get, path = "/v1/hosts/{name}/metrics", tag = "hosts",
    params(("name" = String, Path, description = "host name"), HistoryQuery),
    responses(
        (status = 200, body = skyvisor_core::top::HostMetrics),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not a cluster admin or monitor"),
        (status = 404, body = ErrorBody),
    ))]
pub(super) async fn host_history(
    State(cp): State<ControlPlane>,
    axum::extract::Path(name): axum::extract::Path<String>,
    super::ApiQuery(q): super::ApiQuery<HistoryQuery>,
) -> crate::error::ApiResult<Json<skyvisor_core::top::HostMetrics>> {
    let minutes = q.minutes()?;
    let host = skyvisor_core::HostName::new(&name)?;
    Ok(Json(cp.host_history(&host, minutes).await?))
}

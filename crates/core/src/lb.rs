//! Load balancers: a virtual IP on a project's network whose listeners
//! spread connections over an instance group's serving members.
//!
//! The datapath is distributed: every host's agent answers for the
//! address on its own bridge (or private network router) and proxies the
//! connections of the instances on that host, so no host is a single
//! point of failure and a host's death takes only its own clients with
//! it. The leader computes each balancer's backends (its group's members
//! that serve, and those draining) into [`LbBackends`], which every agent
//! follows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::names::GroupName;

/// Most listeners on one load balancer.
pub const MAX_LISTENERS: usize = 8;
/// Longest connection draining a balancer may ask for, in seconds.
pub const MAX_DRAIN_SECS: u32 = 3600;

/// How a listener picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LbAlgorithm {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// The backend with the fewest open connections (from this host).
    LeastConnections,
}

/// What a listener passes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Bytes, as they come (L4).
    #[default]
    Tcp,
    /// HTTP/1: each request gets `X-Forwarded-For` (the client's address,
    /// after any the request had) and `X-Forwarded-Proto`.
    Http,
}

/// One port a load balancer listens on and where it sends connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// The port on the balancer's address (1 to 65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// The members' port (default: the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: Option<u16>,
    /// `tcp` (default) or `http`.
    #[serde(default)]
    pub protocol: ListenerProtocol,
}

impl Listener {
    /// The members' port.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// Body of `POST /v1/load-balancers`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLoadBalancerRequest {
    /// Its name (a DNS label).
    pub name: String,
    /// The instance group whose serving members get the connections; the
    /// balancer is on the group's network.
    pub group: String,
    /// Its listeners (1 to 8, distinct ports).
    pub listeners: Vec<Listener>,
    /// `round-robin` (default) or `least-connections`.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// Seconds a member leaving the group (scale-in, update, replacement)
    /// keeps its open connections before it is removed (0 to 3600,
    /// default 10); it gets no new ones meanwhile.
    #[serde(default)]
    #[schema(maximum = 3600)]
    pub drain_secs: Option<u32>,
    /// Also listen on every host's own address (the hosts' network), for
    /// clients outside the cluster: any host takes them. Its ports are
    /// then taken on every host, so another external balancer cannot
    /// have them, nor can Skyvisor's own ports be used.
    #[serde(default)]
    pub external: bool,
}

/// A load balancer as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoadBalancerSpec {
    /// Its project.
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Its name.
    pub name: String,
    /// Its group.
    #[schema(value_type = String)]
    pub group: GroupName,
    /// Its listeners.
    pub listeners: Vec<Listener>,
    /// How backends are picked.
    pub algorithm: LbAlgorithm,
    /// Seconds a leaving member keeps its connections.
    pub drain_secs: u32,
    /// Its virtual address, on the group's network.
    #[schema(value_type = String, format = "ipv4")]
    pub address: std::net::Ipv4Addr,
    /// The network's name.
    pub network: String,
    /// The network's VXLAN id for a private network (none: the cluster
    /// network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Whether it also listens on every host's address.
    #[serde(default)]
    pub external: bool,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// A backend's state in a balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Gets new connections.
    Active,
    /// Leaving: keeps its connections, gets no new ones.
    Draining,
}

/// One backend of a balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Backend {
    /// The member's name.
    pub member: String,
    /// Its address.
    #[schema(value_type = String, format = "ipv4")]
    pub ip: std::net::Ipv4Addr,
    /// Active or draining.
    pub state: BackendState,
}

/// What every agent's datapath serves for one balancer, written by the
/// leader when it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LbBackends {
    /// The balancer.
    pub spec: LoadBalancerSpec,
    /// Its backends.
    pub backends: Vec<Backend>,
}

/// A load balancer as the API answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoadBalancer {
    /// What was asked.
    pub spec: LoadBalancerSpec,
    /// Its backends now.
    pub backends: Vec<Backend>,
    /// Where clients outside the cluster reach it (`HOST_ADDRESS:PORT` of
    /// every live host, for an external balancer).
    #[serde(default)]
    pub external_endpoints: Vec<String>,
}

/// Ports of the hosts' own addresses an external balancer may not take:
/// SSH, etcd's client and peer ports, and Skyvisor's server, agent and
/// replica ports.
pub const RESERVED_HOST_PORTS: &[u16] = &[22, 2379, 2380, 7780, 7781, 7782];

/// Checks listeners: 1 to [`MAX_LISTENERS`], ports not 0, distinct.
pub fn validate_listeners(listeners: &[Listener]) -> Result<(), ValidationError> {
    if listeners.is_empty() || listeners.len() > MAX_LISTENERS {
        return Err(ValidationError::new(
            "listeners",
            format!(
                "{} listeners; allowed: 1 to {MAX_LISTENERS}",
                listeners.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for l in listeners {
        if l.port == 0 || l.target_port == Some(0) {
            return Err(ValidationError::new(
                "listeners.port",
                "0; allowed: 1 to 65535",
            ));
        }
        if !seen.insert(l.port) {
            return Err(ValidationError::new(
                "listeners.port",
                format!(
                    "port {} is listed twice; each listener has its own port",
                    l.port
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_checked() {
        let l = |port, target_port| Listener {
            port,
            target_port,
            protocol: ListenerProtocol::Tcp,
        };
        assert!(validate_listeners(&[l(80, None), l(443, Some(8443))]).is_ok());
        assert_eq!(l(80, Some(8080)).target(), 8080);
        assert_eq!(l(80, None).target(), 80);
        assert_eq!(
            validate_listeners(&[]).expect_err("none").field,
            "listeners"
        );
        assert_eq!(
            validate_listeners(&[l(80, None), l(80, Some(81))])
                .expect_err("dup")
                .field,
            "listeners.port"
        );
        assert!(validate_listeners(&[l(0, None)]).is_err());
        assert!(validate_listeners(&[l(80, Some(0))]).is_err());
    }
}

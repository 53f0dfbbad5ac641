//! Security groups (a project's inbound rules for its instances) and the
//! per-host firewall documents the control plane resolves them into.
//!
//! A security group is a list of ingress rules; an instance in one or more
//! groups accepts what any of its groups allows (and the answers to what
//! it sent) and nothing else. An instance in no group is not filtered.
//! Rules name a source as an address range or as another group of the same
//! project, which stands for the addresses of that group's members.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::network::{Ipv4Net, MacAddr};

/// The protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, to the rule's ports.
    Tcp,
    /// UDP, to the rule's ports.
    Udp,
    /// ICMP (ping and its kin).
    Icmp,
    /// Every protocol and port.
    Any,
}

impl Protocol {
    /// Whether rules of this protocol name ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// One ingress rule: what may reach a group's members, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityRule {
    /// The protocol allowed.
    pub protocol: Protocol,
    /// One end of the ports allowed (TCP and UDP only; none: every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub port_from: Option<u16>,
    /// The other end (defaults to `port_from`; the two may come in either
    /// order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub port_to: Option<u16>,
    /// The sources allowed, as an IPv4 range such as `0.0.0.0/0`; exactly
    /// one of `cidr` and `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "0.0.0.0/0")]
    pub cidr: Option<String>,
    /// The sources allowed, as the members of a security group of the same
    /// project; exactly one of `cidr` and `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Where a rule's traffic may come from, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// An address range.
    Cidr(Ipv4Net),
    /// The members of a group of the same project.
    Group(String),
}

impl SecurityRule {
    /// Checks the rule, naming the field that is wrong and what is allowed;
    /// returns its source and its port range (none: every port).
    pub fn check(&self) -> Result<(RuleSource, Option<(u16, u16)>), ValidationError> {
        let ports = match (self.port_from, self.port_to) {
            (None, None) => None,
            (a, b) => {
                let (a, b) = (a.or(b).unwrap_or(0), b.or(a).unwrap_or(0));
                if a == 0 || b == 0 {
                    return Err(ValidationError::new(
                        if a == 0 { "port_from" } else { "port_to" },
                        "port 0 is not a port; allowed: 1 to 65535",
                    ));
                }
                Some((a.min(b), a.max(b)))
            }
        };
        if ports.is_some() && !self.protocol.has_ports() {
            return Err(ValidationError::new(
                "port_from",
                format!(
                    "protocol {} has no ports; allowed: ports with tcp or udp only",
                    serde_json::to_value(self.protocol)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            ));
        }
        let source = match (&self.cidr, &self.group) {
            (Some(cidr), None) => {
                let net = parse_cidr(cidr)?;
                RuleSource::Cidr(net)
            }
            (None, Some(group)) => {
                crate::names::validate_name("group", group)?;
                RuleSource::Group(group.clone())
            }
            _ => {
                return Err(ValidationError::new(
                    "cidr",
                    "a rule needs exactly one source; allowed: cidr (like 10.0.0.0/8) or group (a security group's name)",
                ));
            }
        };
        Ok((source, ports))
    }
}

/// Parses a rule's source range: any prefix from /0 to /32 (unlike a
/// network's subnet); host bits are cleared, as for a subnet.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, ValidationError> {
    let err = |why: &str| ValidationError::new("cidr", format!("{s:?} {why}"));
    let (addr, len) = s.split_once('/').ok_or_else(|| {
        err("is not a range like 10.0.0.0/8 (an address, '/', a prefix length 0 to 32)")
    })?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| err("does not start with an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| err("has a prefix length out of range; allowed: 0 to 32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok(Ipv4Net {
        network: Ipv4Addr::from(u32::from(addr) & mask),
        prefix_len: len,
    })
}

/// A project's security group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroup {
    /// Name, unique in its project.
    pub name: String,
    /// The project that owns it.
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// What it says.
    #[serde(default)]
    pub description: String,
    /// Its ingress rules: what may reach its members.
    pub rules: Vec<SecurityRule>,
    /// Bumped on every change.
    pub generation: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// Security groups an instance may be in, at most.
pub const MAX_GROUPS_PER_INSTANCE: usize = 16;

/// The longest description of a group.
pub const MAX_DESCRIPTION: usize = 256;

/// Rules as many as a group may hold (each becomes a firewall rule on
/// every host running a member).
pub const MAX_RULES: usize = 100;

/// One resolved ingress rule of a host's firewall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowRule {
    /// The protocol allowed.
    pub protocol: Protocol,
    /// Its ports, first and last (none: every port).
    pub ports: Option<(u16, u16)>,
    /// The sources allowed (a group's members' addresses, resolved).
    pub sources: Vec<Ipv4Net>,
}

/// What a host filters in front of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFirewall {
    /// Whether it is in security groups at all (an instance in none is not
    /// filtered; `allow` is then empty and means nothing).
    pub filtered: bool,
    /// The instance's address.
    pub ip: Ipv4Addr,
    /// The instance's MAC.
    pub mac: MacAddr,
    /// The VXLAN id of its private network (none: the cluster network).
    pub vni: Option<u32>,
    /// Its network's gateway.
    pub gateway: Ipv4Addr,
    /// What may reach it, besides the answers to what it sent.
    pub allow: Vec<AllowRule>,
}

/// A host's firewall: every instance bound to it with its resolved rules,
/// written by the control plane and applied by the host's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFirewall {
    /// Instances by `project/name`.
    pub instances: std::collections::BTreeMap<String, InstanceFirewall>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        protocol: Protocol,
        from: Option<u16>,
        to: Option<u16>,
        cidr: Option<&str>,
        group: Option<&str>,
    ) -> SecurityRule {
        SecurityRule {
            protocol,
            port_from: from,
            port_to: to,
            cidr: cidr.map(str::to_string),
            group: group.map(str::to_string),
        }
    }

    #[test]
    fn rules_are_checked_field_by_field() {
        let ok = rule(Protocol::Tcp, Some(80), None, Some("0.0.0.0/0"), None);
        assert_eq!(
            ok.check().expect("valid").1,
            Some((80, 80)),
            "a single port is a range of one"
        );
        let reversed = rule(Protocol::Udp, Some(90), Some(80), Some("10.0.0.1/8"), None);
        let (source, ports) = reversed.check().expect("valid");
        assert_eq!(ports, Some((80, 90)), "the ends come in either order");
        assert_eq!(
            source,
            RuleSource::Cidr(parse_cidr("10.0.0.0/8").expect("cidr"))
        );
        assert_eq!(
            rule(Protocol::Tcp, None, Some(22), Some("0.0.0.0/0"), None)
                .check()
                .expect("valid")
                .1,
            Some((22, 22))
        );
        let by_group = rule(Protocol::Any, None, None, None, Some("web"));
        assert_eq!(
            by_group.check().expect("valid").0,
            RuleSource::Group("web".into())
        );
        let cases = [
            (
                rule(Protocol::Tcp, Some(0), None, Some("0.0.0.0/0"), None),
                "port_from",
            ),
            (
                rule(Protocol::Icmp, Some(80), None, Some("0.0.0.0/0"), None),
                "port_from",
            ),
            (
                rule(Protocol::Tcp, Some(80), Some(0), Some("0.0.0.0/0"), None),
                "port_to",
            ),
            (
                rule(Protocol::Tcp, Some(80), None, Some("10.0.0.0/33"), None),
                "cidr",
            ),
            (
                rule(Protocol::Tcp, Some(80), None, Some("nonsense"), None),
                "cidr",
            ),
            (rule(Protocol::Tcp, Some(80), None, None, None), "cidr"),
            (
                rule(
                    Protocol::Tcp,
                    Some(80),
                    None,
                    Some("0.0.0.0/0"),
                    Some("web"),
                ),
                "cidr",
            ),
        ];
        for (r, field) in cases {
            let e = r.check().expect_err("invalid");
            assert_eq!(e.field, field, "{r:?}: {e}");
        }
        assert_eq!(parse_cidr("0.0.0.0/0").expect("any").prefix_len, 0);
        assert_eq!(
            parse_cidr("10.1.2.3/32").expect("host").network,
            Ipv4Addr::new(10, 1, 2, 3)
        );
    }
}

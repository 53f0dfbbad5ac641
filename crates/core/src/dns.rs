//! The internal DNS zone's records, as the leader publishes them for every
//! agent's DNS server: per project, each name with its addresses.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ProjectName;

/// The internal zone: names are `NAME.PROJECT.ZONE`. `.internal` is
/// reserved for private use, so it never shadows a public name.
pub const ZONE: &str = "skyvisor.internal";

/// One project's names, written by the leader when they change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsRecords {
    /// The project.
    pub project: ProjectName,
    /// Each name with its addresses: an instance's, a group's healthy
    /// members', a load balancer's.
    pub names: BTreeMap<String, Vec<Ipv4Addr>>,
}

/// The search domain of `project`'s guests: `PROJECT.ZONE`, so that a
/// bare name resolves within the project.
pub fn search_domain(project: &ProjectName) -> String {
    format!("{project}.{ZONE}")
}

/// A name of a project's zone, as the API answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DnsName {
    /// The name, as a guest of the project may ask it (its search domain
    /// completes it).
    pub name: String,
    /// The fully qualified name: `NAME.PROJECT.skyvisor.internal`.
    pub fqdn: String,
    /// The addresses it answers with (none: a group with no serving
    /// member).
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<Ipv4Addr>,
}

/// A project's names in the internal zone, as its guests' resolver (their
/// network's gateway) answers them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DnsZone {
    /// The project's domain, its guests' search domain.
    pub domain: String,
    /// Its names, sorted.
    pub names: Vec<DnsName>,
}

impl DnsZone {
    /// The zone of `project` as published (`records`: none published yet).
    pub fn of(project: &ProjectName, records: Option<&DnsRecords>) -> Self {
        let domain = search_domain(project);
        let names = records
            .map(|r| {
                r.names
                    .iter()
                    .map(|(name, addresses)| DnsName {
                        name: name.clone(),
                        fqdn: format!("{name}.{domain}"),
                        addresses: addresses.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self { domain, names }
    }
}

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

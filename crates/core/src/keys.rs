//! The store's key layout. Every key Skyvisor writes is built here, so the
//! layout can be read in one place.
//!
//! Specs (desired state) and statuses (observed state) live under separate
//! keys so that the API and the agents never race on one record.

use std::net::Ipv4Addr;

use crate::names::{HostName, ImageRef, InstanceRef, VolumeRef};

/// Prefix of all instance specs: `instances/spec/<project>/<name>`.
pub const INSTANCE_SPECS: &str = "instances/spec/";
/// Prefix of all instance statuses.
pub const INSTANCE_STATUSES: &str = "instances/status/";
/// Prefix of all host registrations.
pub const HOSTS: &str = "hosts/registered/";
/// Prefix of the lease-bound liveness keys of hosts.
pub const HOSTS_ALIVE: &str = "hosts/alive/";
/// Prefix of administrative host states (cordoned, draining...).
pub const HOST_STATES: &str = "hosts/state/";
/// Prefix of all images.
pub const IMAGES: &str = "images/";
/// Prefix of all networks.
pub const NETWORKS: &str = "networks/";
/// The network every VM joins today.
pub const DEFAULT_NETWORK: &str = "default";
/// Prefix of all IP address claims.
pub const IPAM: &str = "ipam/";
/// Prefix of all snapshot records:
/// `snapshots/<project>/<instance>/<snapshot>`.
pub const SNAPSHOTS: &str = "snapshots/";
/// Prefix of the per-host allocation markers (see [`host_alloc`]).
pub const HOST_ALLOCS: &str = "hosts/alloc/";
/// Prefix of the per-host copies of instance specs (see [`binding`]).
pub const BINDINGS: &str = "bindings/";
/// Prefix of the lease-bound records of live control-plane servers.
pub const SERVERS: &str = "servers/";
/// The leader key: exists, bound to the leader's lease, while a server leads.
pub const LEADER: &str = "cluster/leader";
/// The version every server and agent of the cluster must run.
pub const CLUSTER_VERSION: &str = "cluster/version";
/// The prefix of the value of an address claim held by a host (its own
/// address on the VM network) rather than by an instance.
pub const HOST_CLAIM_PREFIX: &str = "host/";
/// Prefix of all volume specs.
pub const VOLUME_SPECS: &str = "volumes/spec/";
/// Prefix of all volume statuses.
pub const VOLUME_STATUSES: &str = "volumes/status/";
/// Prefix of the claims of volumes by the VMs using them.
pub const VOLUME_ATTACHMENTS: &str = "volumes/attachment/";
/// Prefix of what serving agents report about the volumes they serve.
pub const VOLUME_RUNTIMES: &str = "volumes/runtime/";
/// Prefix of the data path's membership records, by volume id.
pub const VOLUME_MEMBERSHIP: &str = "volumes/membership/";
/// Prefix of all volume snapshots.
pub const VOLUME_SNAPSHOTS: &str = "volumes/snapshot/";
/// Prefix of migration records (`migrations/record/<id>`).
pub const MIGRATIONS: &str = "migrations/record/";
/// Prefix of cancel requests of migrations (`migrations/cancel/<id>`).
pub const MIGRATION_CANCELS: &str = "migrations/cancel/";
/// A pending rebalance request: how many more moves it may make.
pub const REBALANCE: &str = "cluster/rebalance";
/// Prefix of the hosts' hearing reports ([`crate::HearingReport`]), bound
/// to each host's lease.
pub const HOST_HEARING: &str = "hosts/heard/";
/// Prefix of failover records ([`crate::FailoverRecord`]).
pub const FAILOVERS: &str = "failovers/";

/// The cluster's internal key: agents and servers prove with it that they
/// belong to the cluster (agent API, replica links). Readable by whoever
/// can read the store, which is trusted with everything anyway.
pub const CLUSTER_KEY: &str = "cluster/internal-key";

/// Prefix of all projects.
pub const PROJECTS: &str = "auth/projects/";
/// Prefix of all identities (users and service accounts).
pub const IDENTITIES: &str = "auth/identities/";
/// Prefix of all API tokens (by public id; only a hash of the secret).
pub const TOKENS: &str = "auth/tokens/";
/// Prefix of the per-project quota guards: a create that counts against a
/// quota rewrites its project's guard in the same transaction, so two
/// concurrent creates cannot both count the same room.
pub const QUOTA_GUARDS: &str = "auth/quota-guard/";

/// Prefix of the audit trail: `audit/<project>/<time>-<n>`, or
/// `audit/_cluster/...` for cluster-wide actions.
pub const AUDIT: &str = "audit/";

/// Prefix of the audit trail of `project` (none: cluster-wide actions).
pub fn audit_prefix(project: Option<&crate::ProjectName>) -> String {
    match project {
        Some(p) => format!("{AUDIT}{p}/"),
        None => format!("{AUDIT}_cluster/"),
    }
}

/// Prefix of the events (see [`crate::event`]).
pub const EVENTS: &str = "events/";

/// Prefix of the events of `project` (none: cluster-wide objects).
pub fn events_prefix(project: Option<&crate::ProjectName>) -> String {
    match project {
        Some(p) => format!("{EVENTS}{p}/"),
        None => format!("{EVENTS}_cluster/"),
    }
}

/// An event's key: under its project, in time order. The tail is a hash of
/// what the event is about, so the same event written twice (a retried
/// write whose first answer was lost) is one key, never two events.
pub fn event(event: &crate::Event) -> String {
    // FNV-1a: small, and stable across builds (std's hasher is not).
    let mut hash: u32 = 0x811c_9dc5;
    for part in [
        event.object.to_string(),
        event.name.clone(),
        event.kind.to_string(),
    ] {
        for b in part.bytes().chain([0]) {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    format!(
        "{}{:020}-{hash:08x}",
        events_prefix(event.project.as_ref()),
        event.at.timestamp_nanos_opt().unwrap_or_default(),
    )
}

/// The bytes `project`'s instances sent in `hour` (`YYYY-MM-DDTHH`, UTC).
pub fn egress_hour(project: &crate::ProjectName, hour: &str) -> String {
    format!("{}{hour}", egress_hours(project))
}

/// Prefix of [`egress_hour`] records of `project`.
pub fn egress_hours(project: &crate::ProjectName) -> String {
    format!("billing/egress/{project}/")
}

/// How much of instance `name`'s network counter on `host` has been
/// reported.
pub fn egress_mark(name: &InstanceRef, host: &HostName) -> String {
    format!("billing/egress-marks/{}/{}/{host}", name.project, name.name)
}

/// The price sheet invoices are made with.
pub const PRICE_SHEET: &str = "billing/price-sheet";

/// A closed month's invoice of `project` (`month`: `YYYY-MM`).
pub fn invoice(project: &crate::ProjectName, month: &str) -> String {
    format!("billing/invoices/{project}/{month}")
}

/// Project `name`.
pub fn project(name: &crate::ProjectName) -> String {
    format!("{PROJECTS}{name}")
}

/// Identity `name`.
pub fn identity(name: &crate::IdentityName) -> String {
    format!("{IDENTITIES}{name}")
}

/// The token with public id `id`.
pub fn token(id: &str) -> String {
    format!("{TOKENS}{id}")
}

/// The quota guard of `project`.
pub fn quota_guard(project: &crate::ProjectName) -> String {
    format!("{QUOTA_GUARDS}{project}")
}

/// A host's hearing report.
pub fn host_hearing(name: &HostName) -> String {
    format!("{HOST_HEARING}{name}")
}

/// A failover record.
pub fn failover(id: &str) -> String {
    format!("{FAILOVERS}{id}")
}

/// The spec of instance `name`.
pub fn instance_spec(name: &InstanceRef) -> String {
    format!("{INSTANCE_SPECS}{name}")
}

/// The status of instance `name`.
pub fn instance_status(name: &InstanceRef) -> String {
    format!("{INSTANCE_STATUSES}{name}")
}

/// Prefix of the records under `prefix` that belong to `project`: every
/// kind of object named within its project is keyed
/// `<prefix><project>/...`.
pub fn in_project(prefix: &str, project: &crate::ProjectName) -> String {
    format!("{prefix}{project}/")
}

/// The instance a key of the form `<prefix><project>/<name>` names (an
/// instance's spec, status or binding), if it has that form.
pub fn instance_of(prefix: &str, key: &str) -> Option<InstanceRef> {
    key.strip_prefix(prefix)?.parse().ok()
}

/// The registration of host `name`.
pub fn host(name: &HostName) -> String {
    format!("{HOSTS}{name}")
}

/// The liveness key of host `name`, bound to its agent's lease.
pub fn host_alive(name: &HostName) -> String {
    format!("{HOSTS_ALIVE}{name}")
}

/// The administrative state of host `name`.
pub fn host_state(name: &HostName) -> String {
    format!("{HOST_STATES}{name}")
}

/// Image `name`: `images/<project>/<name>`.
pub fn image(name: &ImageRef) -> String {
    format!("{IMAGES}{name}")
}

/// Network `name` of `project`.
pub fn network(project: &crate::ProjectName, name: &str) -> String {
    format!("{NETWORKS}{project}/{name}")
}

/// Where the cluster network was kept before networks belonged to projects.
pub const LEGACY_CLUSTER_NETWORK: &str = "networks/default";

/// The cluster network: the `default` project's `default` network.
pub fn cluster_network() -> String {
    format!(
        "{NETWORKS}{}/{DEFAULT_NETWORK}",
        crate::auth::DEFAULT_PROJECT
    )
}

/// Prefix of the networks of `project`.
pub fn networks_of(project: &crate::ProjectName) -> String {
    format!("{NETWORKS}{project}/")
}

/// Prefix of the VXLAN id claims of private networks.
pub const VNIS: &str = "network-vnis/";

/// The claim of VXLAN id `vni` by a private network.
pub fn vni_claim(vni: u32) -> String {
    format!("{VNIS}{vni}")
}

/// Prefix of all load balancers: `load-balancers/<project>/<name>`.
pub const LOAD_BALANCERS: &str = "load-balancers/";

/// Load balancer `name` of `project`.
pub fn load_balancer(project: &crate::ProjectName, name: &str) -> String {
    format!("{LOAD_BALANCERS}{project}/{name}")
}

/// Prefix of the balancers' backends, which every agent follows:
/// `lb-backends/<project>/<name>`.
pub const LB_BACKENDS: &str = "lb-backends/";

/// The backends of load balancer `name` of `project`.
pub fn lb_backends(project: &crate::ProjectName, name: &str) -> String {
    format!("{LB_BACKENDS}{project}/{name}")
}

/// Prefix of the ports external load balancers take on every host's
/// address: `lb-host-ports/<port>`.
pub const LB_HOST_PORTS: &str = "lb-host-ports/";

/// The claim of `port` on the hosts' addresses.
pub fn lb_host_port(port: u16) -> String {
    format!("{LB_HOST_PORTS}{port}")
}

/// Prefix of the internal DNS zone's records: `dns/<project>`.
pub const DNS: &str = "dns/";

/// The DNS records of `project`.
pub fn dns(project: &crate::ProjectName) -> String {
    format!("{DNS}{project}")
}

/// Prefix of all instance groups: `groups/<project>/<name>`.
pub const GROUPS: &str = "groups/";

/// Instance group `name` of `project`.
pub fn group(project: &crate::ProjectName, name: &crate::GroupName) -> String {
    format!("{GROUPS}{project}/{name}")
}

/// Prefix of the group controller's notes: `group-status/<project>/<name>`.
pub const GROUP_STATUSES: &str = "group-status/";

/// The controller's note on group `name` of `project`.
pub fn group_status(project: &crate::ProjectName, name: &crate::GroupName) -> String {
    format!("{GROUP_STATUSES}{project}/{name}")
}

/// Prefix of all security groups: `security-groups/<project>/<name>`.
pub const SECURITY_GROUPS: &str = "security-groups/";

/// Security group `name` of `project`.
pub fn security_group(project: &crate::ProjectName, name: &str) -> String {
    format!("{SECURITY_GROUPS}{project}/{name}")
}

/// Prefix of the security groups of `project`.
pub fn security_groups_of(project: &crate::ProjectName) -> String {
    format!("{SECURITY_GROUPS}{project}/")
}

/// Prefix of all SSH key pairs: `keypairs/<project>/<name>`.
pub const KEYPAIRS: &str = "keypairs/";

/// Key pair `name` of `project`.
pub fn keypair(project: &crate::ProjectName, name: &str) -> String {
    format!("{KEYPAIRS}{project}/{name}")
}

/// Prefix of the per-host firewall documents.
pub const FIREWALLS: &str = "firewalls/";

/// The firewall document of `host`: the resolved ingress rules of the
/// instances bound to it.
pub fn firewall(host: &HostName) -> String {
    format!("{FIREWALLS}{host}")
}

/// Prefix of the address claims of `network`.
pub fn ipam_prefix(network: &str) -> String {
    format!("{IPAM}{network}/")
}

/// The claim of `ip` in `network`.
pub fn ipam_claim(network: &str, ip: Ipv4Addr) -> String {
    format!("{IPAM}{network}/{ip}")
}

/// Prefix of the snapshots of instance `name`.
pub fn snapshots_of(name: &InstanceRef) -> String {
    format!("{SNAPSHOTS}{name}/")
}

/// Snapshot `snapshot` of instance `name`.
pub fn snapshot(name: &InstanceRef, snapshot: &crate::snapshot::SnapshotName) -> String {
    format!("{SNAPSHOTS}{name}/{snapshot}")
}

/// The allocation marker of host `name`. Every write that changes what is
/// allocated on a host (a placement, a resize) rewrites it and compares its
/// mod revision with the one its decision was based on, so two servers can
/// never book the same room.
pub fn host_alloc(name: &HostName) -> String {
    format!("{HOST_ALLOCS}{name}")
}

/// The prefix of the instance specs bound to host `host`.
pub fn bindings_of(host: &HostName) -> String {
    format!("{BINDINGS}{host}/")
}

/// The copy of instance `name`'s spec under its host, which that host's
/// agent watches (so an agent follows its own instances, not the whole
/// cluster's). Every write of a spec writes this copy in the same
/// transaction; every delete of a spec deletes it.
pub fn binding(host: &HostName, name: &InstanceRef) -> String {
    format!("{BINDINGS}{host}/{name}")
}

/// The record of live server `name`.
pub fn server(name: &crate::names::ServerName) -> String {
    format!("{SERVERS}{name}")
}

/// The value of the address claim of host `name`'s own address.
pub fn host_claim_value(name: &HostName) -> String {
    format!("{HOST_CLAIM_PREFIX}{name}")
}

/// The spec of volume `name`.
pub fn volume_spec(name: &VolumeRef) -> String {
    format!("{VOLUME_SPECS}{name}")
}

/// The status of volume `name`.
pub fn volume_status(name: &VolumeRef) -> String {
    format!("{VOLUME_STATUSES}{name}")
}

/// The claim of volume `name` by the VM using it.
pub fn volume_attachment(name: &VolumeRef) -> String {
    format!("{VOLUME_ATTACHMENTS}{name}")
}

/// What the agent serving volume `name` reports.
pub fn volume_runtime(name: &VolumeRef) -> String {
    format!("{VOLUME_RUNTIMES}{name}")
}

/// The membership record of the volume whose data id is `data_id`
/// (see `VolumeId::data_id`).
pub fn volume_membership(data_id: &str) -> String {
    format!("{VOLUME_MEMBERSHIP}{data_id}")
}

/// Prefix of the snapshots of volume `name`.
pub fn volume_snapshots(name: &VolumeRef) -> String {
    format!("{VOLUME_SNAPSHOTS}{name}/")
}

/// Snapshot `snapshot` of volume `name`.
pub fn volume_snapshot(name: &VolumeRef, snapshot: &str) -> String {
    format!("{VOLUME_SNAPSHOTS}{name}/{snapshot}")
}

/// A migration's record.
pub fn migration(id: &crate::MigrationId) -> String {
    format!("{MIGRATIONS}{id}")
}

/// The cancel request of a migration.
pub fn migration_cancel(id: &crate::MigrationId) -> String {
    format!("{MIGRATION_CANCELS}{id}")
}

/// The last path segment of `key`: the name of the object it holds.
pub fn name_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_their_prefixes() {
        let project = crate::ProjectName::new("shop").expect("project");
        let n = InstanceRef::new(
            project.clone(),
            crate::InstanceName::new("web").expect("name"),
        );
        assert!(instance_spec(&n).starts_with(INSTANCE_SPECS));
        assert_eq!(name_of(&instance_status(&n)), "web");
        assert_eq!(
            ipam_claim("default", Ipv4Addr::new(10, 0, 0, 2)),
            "ipam/default/10.0.0.2"
        );
        let h = HostName::new("h1").expect("host");
        assert!(binding(&h, &n).starts_with(&bindings_of(&h)));
        assert_eq!(name_of(&binding(&h, &n)), "web");
        assert_eq!(
            instance_of(&bindings_of(&h), &binding(&h, &n)),
            Some(n.clone())
        );
        assert_eq!(
            instance_of(INSTANCE_SPECS, &instance_spec(&n)),
            Some(n.clone())
        );
        // The same name in another project is another key.
        let other = InstanceRef::new(
            crate::ProjectName::new("blog").expect("project"),
            n.name.clone(),
        );
        assert_ne!(instance_spec(&n), instance_spec(&other));
        // A key of the layout before projects had names of their own
        // names no instance.
        assert_eq!(instance_of(INSTANCE_SPECS, "instances/spec/web"), None);
        // Host-level prefixes never swallow each other's keys.
        for (a, b) in [
            (HOSTS, HOST_ALLOCS),
            (HOSTS, HOSTS_ALIVE),
            (HOSTS, HOST_STATES),
        ] {
            assert!(!a.starts_with(b) && !b.starts_with(a), "{a} {b}");
        }
        let v = VolumeRef::new(project, crate::VolumeName::new("data").expect("volume"));
        let all = [
            VOLUME_SPECS,
            VOLUME_STATUSES,
            VOLUME_ATTACHMENTS,
            VOLUME_RUNTIMES,
            VOLUME_MEMBERSHIP,
            VOLUME_SNAPSHOTS,
        ];
        // No volume prefix swallows another's keys.
        for a in all {
            for b in all {
                assert!(a == b || !a.starts_with(b), "{a} {b}");
            }
        }
        assert!(volume_snapshot(&v, "s1").starts_with(&volume_snapshots(&v)));
        assert_eq!(name_of(&volume_attachment(&v)), "data");
    }
}

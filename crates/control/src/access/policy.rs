//! What each route needs: one table, so that the whole policy can be read
//! in one place, and a test fails on a route of the OpenAPI document that
//! is missing from it. A route with no rule is refused, never let through.

use axum::http::Method;
use skyvisor_core::auth::Action;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Any authenticated caller; the handler shows only what it may see.
    Authenticated,
    /// A role allowing the action in the request's project.
    Project(Action),
    /// A role allowing the action in the project named by the path's
    /// `{name}` (the project routes).
    ProjectInPath(Action),
    /// A cluster admin.
    ClusterAdmin,
    /// A cluster admin or a cluster monitor (metrics readers).
    Monitor,
    /// A cluster admin, or a join token (spent by the handler).
    Join,
}

use Action::{Manage, Read, Write};
use Rule::{Authenticated, ClusterAdmin, Monitor, Project, ProjectInPath};

/// Every route under `/v1` and its rule, by method and path template.
const RULES: &[(&str, &str, Rule)] = &[
    ("GET", "/v1/info", Authenticated),
    ("GET", "/v1/types", Authenticated),
    ("GET", "/v1/whoami", Authenticated),
    // Projects, identities, tokens.
    ("GET", "/v1/projects", Authenticated),
    ("POST", "/v1/projects", ClusterAdmin),
    ("GET", "/v1/projects/{name}", ProjectInPath(Read)),
    ("PATCH", "/v1/projects/{name}", ClusterAdmin),
    ("DELETE", "/v1/projects/{name}", ClusterAdmin),
    (
        "PUT",
        "/v1/projects/{name}/members/{identity}",
        ProjectInPath(Manage),
    ),
    (
        "DELETE",
        "/v1/projects/{name}/members/{identity}",
        ProjectInPath(Manage),
    ),
    ("GET", "/v1/identities", ClusterAdmin),
    ("POST", "/v1/identities", ClusterAdmin),
    ("GET", "/v1/identities/{name}", Authenticated),
    ("DELETE", "/v1/identities/{name}", ClusterAdmin),
    ("GET", "/v1/tokens", Authenticated),
    ("POST", "/v1/tokens", Authenticated),
    ("DELETE", "/v1/tokens/{id}", Authenticated),
    ("GET", "/v1/audit", Project(Manage)),
    // Events: a project's readers see its events; cluster=true is checked
    // by the handler (cluster admins only).
    ("GET", "/v1/events", Project(Read)),
    ("GET", "/v1/events/stream", Project(Read)),
    // Usage and invoices of the request's project; prices are public.
    ("GET", "/v1/usage", Project(Read)),
    ("GET", "/v1/invoices/{month}", Project(Read)),
    ("GET", "/v1/price-sheet", Authenticated),
    ("PUT", "/v1/price-sheet", ClusterAdmin),
    // Metrics: where Prometheus scrapes.
    ("GET", "/v1/metrics/targets", Monitor),
    ("GET", "/v1/top/instances", Project(Read)),
    ("GET", "/v1/top/hosts", Monitor),
    // Instances.
    ("GET", "/v1/instances", Project(Read)),
    ("POST", "/v1/instances", Project(Write)),
    ("GET", "/v1/instances/{name}", Project(Read)),
    ("DELETE", "/v1/instances/{name}", Project(Write)),
    ("POST", "/v1/instances/{name}/start", Project(Write)),
    ("POST", "/v1/instances/{name}/stop", Project(Write)),
    ("POST", "/v1/instances/{name}/reboot", Project(Write)),
    ("POST", "/v1/instances/{name}/resize", Project(Write)),
    ("GET", "/v1/instances/{name}/console", Project(Read)),
    ("GET", "/v1/instances/{name}/metrics", Project(Read)),
    // Viewers watch; only writers' keystrokes reach the serial port.
    ("GET", "/v1/instances/{name}/console/ws", Project(Read)),
    // Runs commands as root in a container: a writer's act.
    ("POST", "/v1/instances/{name}/exec", Project(Write)),
    ("POST", "/v1/instances/{name}/exec-tty", Project(Write)),
    (
        "PUT",
        "/v1/instances/{name}/checkpoint-schedule",
        Project(Write),
    ),
    ("POST", "/v1/instances/{name}/restore", Project(Write)),
    ("GET", "/v1/instances/{name}/snapshots", Project(Read)),
    ("POST", "/v1/instances/{name}/snapshots", Project(Write)),
    (
        "GET",
        "/v1/instances/{name}/snapshots/{snapshot}",
        Project(Read),
    ),
    (
        "DELETE",
        "/v1/instances/{name}/snapshots/{snapshot}",
        Project(Write),
    ),
    ("POST", "/v1/instances/{name}/volumes", Project(Write)),
    (
        "DELETE",
        "/v1/instances/{name}/volumes/{volume}",
        Project(Write),
    ),
    ("GET", "/v1/snapshots", Project(Read)),
    // Moving VMs between hosts is the operator's business.
    ("POST", "/v1/instances/{name}/migrate", ClusterAdmin),
    ("POST", "/v1/instances/{name}/migrate/cancel", ClusterAdmin),
    ("GET", "/v1/migrations", ClusterAdmin),
    ("GET", "/v1/migrations/{id}", ClusterAdmin),
    // Images: a project's own and the public ones.
    ("GET", "/v1/images", Project(Read)),
    ("POST", "/v1/images/build", Project(Write)),
    ("POST", "/v1/images/import", Project(Write)),
    ("GET", "/v1/images/{name}", Project(Read)),
    ("DELETE", "/v1/images/{name}", Project(Write)),
    ("GET", "/v1/images/{name}/files/{file}", Project(Read)),
    ("GET", "/v1/recipes", Authenticated),
    // Volumes.
    (
        "PUT",
        "/v1/instances/{name}/security-groups",
        Project(Write),
    ),
    ("PUT", "/v1/instances/{name}/labels", Project(Write)),
    ("GET", "/v1/networks", Project(Read)),
    ("POST", "/v1/networks", Project(Write)),
    ("GET", "/v1/networks/{name}", Project(Read)),
    ("DELETE", "/v1/networks/{name}", Project(Write)),
    ("GET", "/v1/security-groups", Project(Read)),
    ("POST", "/v1/security-groups", Project(Write)),
    ("GET", "/v1/security-groups/{name}", Project(Read)),
    ("DELETE", "/v1/security-groups/{name}", Project(Write)),
    ("PUT", "/v1/security-groups/{name}/rules", Project(Write)),
    // Instance groups.
    ("GET", "/v1/groups", Project(Read)),
    ("POST", "/v1/groups", Project(Write)),
    ("GET", "/v1/groups/{name}", Project(Read)),
    ("PATCH", "/v1/groups/{name}", Project(Write)),
    ("DELETE", "/v1/groups/{name}", Project(Write)),
    ("POST", "/v1/groups/{name}/scale", Project(Write)),
    ("PUT", "/v1/groups/{name}/autoscale", Project(Write)),
    ("DELETE", "/v1/groups/{name}/autoscale", Project(Write)),
    // Load balancers.
    ("GET", "/v1/load-balancers", Project(Read)),
    ("POST", "/v1/load-balancers", Project(Write)),
    ("GET", "/v1/load-balancers/{name}", Project(Read)),
    ("DELETE", "/v1/load-balancers/{name}", Project(Write)),
    ("GET", "/v1/dns", Project(Read)),
    ("GET", "/v1/keypairs", Project(Read)),
    ("POST", "/v1/keypairs", Project(Write)),
    ("GET", "/v1/keypairs/{name}", Project(Read)),
    ("DELETE", "/v1/keypairs/{name}", Project(Write)),
    ("GET", "/v1/volumes", Project(Read)),
    ("POST", "/v1/volumes", Project(Write)),
    ("GET", "/v1/volumes/{name}", Project(Read)),
    ("DELETE", "/v1/volumes/{name}", Project(Write)),
    ("POST", "/v1/volumes/{name}/grow", Project(Write)),
    ("POST", "/v1/volumes/{name}/replicas", Project(Write)),
    ("GET", "/v1/volumes/{name}/snapshots", Project(Read)),
    ("POST", "/v1/volumes/{name}/snapshots", Project(Write)),
    (
        "DELETE",
        "/v1/volumes/{name}/snapshots/{snapshot}",
        Project(Write),
    ),
    // Hosts: readable by every caller (a create waits for a host to
    // register), changed by the operator.
    ("GET", "/v1/hosts", Authenticated),
    ("GET", "/v1/hosts/{name}", Authenticated),
    ("GET", "/v1/hosts/{name}/metrics", Monitor),
    ("POST", "/v1/hosts/{name}/cordon", ClusterAdmin),
    ("POST", "/v1/hosts/{name}/uncordon", ClusterAdmin),
    ("POST", "/v1/hosts/{name}/drain", ClusterAdmin),
    ("POST", "/v1/hosts/{name}/undrain", ClusterAdmin),
    ("POST", "/v1/hosts/rebalance", ClusterAdmin),
    ("GET", "/v1/failovers", ClusterAdmin),
    ("GET", "/v1/servers", ClusterAdmin),
    ("GET", "/v1/cluster/join", Rule::Join),
    ("POST", "/v1/cluster/join-tokens", ClusterAdmin),
];

/// The rule of `method path` (a route template as axum matched it).
pub fn rule(method: &Method, path: &str) -> Option<Rule> {
    RULES
        .iter()
        .find(|(m, p, _)| *p == path && method.as_str() == *m)
        .map(|(_, _, r)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_the_api_has_exactly_one_rule() {
        let doc = crate::api::openapi();
        let mut seen = std::collections::HashSet::new();
        for (path, item) in &doc.paths.paths {
            for (method, op) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ] {
                if op.is_some() {
                    let m = Method::from_bytes(method.as_bytes()).expect("method");
                    assert!(rule(&m, path).is_some(), "{method} {path} has no rule");
                    seen.insert((method.to_string(), path.clone()));
                }
            }
        }
        for (m, p, _) in RULES {
            assert!(
                seen.contains(&(m.to_string(), p.to_string())),
                "rule for {m} {p}, which the API does not have"
            );
        }
    }
}

//! Networks and security groups, as projects own them.
//!
//! The cluster network (the `default` project's `default` network) is the
//! one hosts route to; every other network is a project's private one with
//! its own VXLAN id, claimed in the same transaction that creates it, and
//! its own address scope, so projects may use the same subnet. A project's
//! `default` network is made on its first use.
//!
//! Security groups are stored rules; the firewall controller
//! ([`crate::firewall`]) resolves them into each host's document.

use chrono::Utc;
use skyvisor_core::api::{CreateNetworkRequest, CreateSecurityGroupRequest};
use skyvisor_core::firewall::{MAX_RULES, RuleSource, SecurityGroup, SecurityRule};
use skyvisor_core::network::{DEFAULT_PRIVATE_SUBNET, PRIVATE_VNI_COUNT};
use skyvisor_core::{InstanceSpec, Ipv4Net, Network, ProjectName, ValidationError, keys};
use skyvisor_store::{Compare, Op, StoreExt, encode, put_json};
use tracing::info;

use crate::ControlPlane;
use crate::error::{ApiError, ApiResult};

/// The MTU of private networks: the cluster network's (both run over the
/// same underlay).
fn private_mtu(cluster: &Network) -> u32 {
    cluster.mtu
}

impl ControlPlane {
    /// Makes sure the cluster network is stored where networks live now,
    /// moving it from where it was kept before networks had projects.
    pub(crate) async fn ensure_cluster_network(&self, wanted: &Network) -> ApiResult<()> {
        let key = keys::cluster_network();
        if self.store.get(&key).await?.is_some() {
            return Ok(());
        }
        let network = match self
            .store
            .get_json::<Network>(keys::LEGACY_CLUSTER_NETWORK)
            .await?
        {
            Some((mut legacy, _)) => {
                legacy.project = skyvisor_core::auth::default_project();
                legacy
            }
            None => wanted.clone(),
        };
        // First writer wins; later servers adopt what is there.
        self.store.create(&key, encode(&network)).await?;
        Ok(())
    }

    /// Network `name` of `project`, made first if it is the project's
    /// `default` network and does not exist yet.
    pub async fn network_for_instance(
        &self,
        project: &ProjectName,
        name: Option<&str>,
    ) -> ApiResult<Network> {
        let name = name.unwrap_or(keys::DEFAULT_NETWORK);
        if let Some(n) = self.find_network(project, name).await? {
            return Ok(n);
        }
        if name != keys::DEFAULT_NETWORK {
            return Err(ApiError::not_found(format!(
                "network \"{name}\" not found in project {project}"
            ))
            .with_field("network"));
        }
        match self
            .create_network(
                project,
                CreateNetworkRequest {
                    name: name.to_string(),
                    subnet: None,
                },
            )
            .await
        {
            Ok(n) => Ok(n),
            // Made meanwhile by a concurrent create.
            Err(e) if e.code == "already_exists" => self
                .find_network(project, name)
                .await?
                .ok_or_else(|| ApiError::unavailable("the project's network is changing; retry")),
            Err(e) => Err(e),
        }
    }

    /// Network `name` of `project`, if it exists.
    pub async fn find_network(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<Option<Network>> {
        Ok(self
            .store
            .get_json::<Network>(&keys::network(project, name))
            .await?
            .map(|(n, _)| n))
    }

    /// The networks of `project`, by name.
    pub async fn networks(&self, project: &ProjectName) -> ApiResult<Vec<Network>> {
        let (list, _) = self
            .store
            .list_json::<Network>(&keys::networks_of(project))
            .await?;
        let mut out: Vec<Network> = list.into_iter().map(|(n, _)| n).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates a private network in `project` with a VXLAN id of its own.
    pub async fn create_network(
        &self,
        project: &ProjectName,
        req: CreateNetworkRequest,
    ) -> ApiResult<Network> {
        skyvisor_core::names::validate_name("name", &req.name)?;
        if skyvisor_core::network::is_cluster_network(project, &req.name) {
            return Err(ApiError::already_exists(format!(
                "network \"{}\" already exists",
                req.name
            )));
        }
        let subnet: Ipv4Net = req
            .subnet
            .as_deref()
            .unwrap_or(DEFAULT_PRIVATE_SUBNET)
            .parse()?;
        if subnet.prefix_len > 29 {
            return Err(ValidationError::new(
                "subnet",
                format!("{subnet} holds too few addresses; allowed: /8 to /29"),
            )
            .into());
        }
        let cluster = self.default_network().await?;
        let key = keys::network(project, &req.name);
        for _ in 0..16 {
            if self.store.get(&key).await?.is_some() {
                return Err(ApiError::already_exists(format!(
                    "network \"{}\" already exists in project {project}",
                    req.name
                )));
            }
            let claims = self.store.list(keys::VNIS).await?;
            let taken: std::collections::HashSet<u32> = claims
                .items
                .iter()
                .filter_map(|kv| keys::name_of(&kv.key).parse().ok())
                .collect();
            let base = self.config.private_vni_base;
            let Some(vni) =
                (base..base.saturating_add(PRIVATE_VNI_COUNT)).find(|v| !taken.contains(v))
            else {
                return Err(ApiError::insufficient_capacity(format!(
                    "the cluster holds {PRIVATE_VNI_COUNT} private networks, its most; delete one first"
                )));
            };
            let network = Network {
                name: req.name.clone(),
                project: project.clone(),
                subnet,
                vni,
                mtu: private_mtu(&cluster),
            };
            let claim = keys::vni_claim(vni);
            let out = self
                .store
                .txn(
                    vec![Compare::Absent(key.clone()), Compare::Absent(claim.clone())],
                    vec![
                        put_json(key.clone(), &network),
                        put_json(claim, &format!("{project}/{}", req.name)),
                    ],
                )
                .await?;
            if out.succeeded {
                info!(%project, network = %req.name, vni, %subnet, "network created");
                return Ok(network);
            }
        }
        Err(ApiError::unavailable(
            "networks are being created too fast to claim an id; retry",
        ))
    }

    /// The instances on network `name` of `project`.
    async fn network_users(&self, project: &ProjectName, network: &Network) -> Vec<String> {
        let vni = network.private_vni();
        self.inventory
            .instances()
            .await
            .into_iter()
            .filter(|s| &s.project == project && s.network.vni == vni)
            .map(|s| s.name.to_string())
            .collect()
    }

    /// Deletes a network no instance uses (the cluster network stays).
    pub async fn delete_network(&self, project: &ProjectName, name: &str) -> ApiResult<()> {
        let Some(network) = self.find_network(project, name).await? else {
            return Err(ApiError::not_found(format!("network \"{name}\" not found")));
        };
        if network.is_cluster_network() {
            return Err(ApiError::conflict(
                "the cluster network cannot be deleted: hosts route to it",
            ));
        }
        let users = self.network_users(project, &network).await;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "network \"{name}\" is used by instance(s) {}; delete them first",
                users.join(", ")
            )));
        }
        self.store
            .txn(
                vec![],
                vec![
                    Op::Delete(keys::network(project, name)),
                    Op::Delete(keys::vni_claim(network.vni)),
                ],
            )
            .await?;
        info!(%project, network = %name, "network deleted");
        Ok(())
    }

    /// Security group `name` of `project`, if it exists.
    pub async fn find_security_group(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<Option<(SecurityGroup, skyvisor_store::Revision)>> {
        Ok(self
            .store
            .get_json::<SecurityGroup>(&keys::security_group(project, name))
            .await?)
    }

    /// Security group `name` of `project`, or 404.
    pub async fn security_group(
        &self,
        project: &ProjectName,
        name: &str,
    ) -> ApiResult<SecurityGroup> {
        self.find_security_group(project, name)
            .await?
            .map(|(g, _)| g)
            .ok_or_else(|| ApiError::not_found(format!("security group \"{name}\" not found")))
    }

    /// The security groups of `project`, by name.
    pub async fn security_groups(&self, project: &ProjectName) -> ApiResult<Vec<SecurityGroup>> {
        let (list, _) = self
            .store
            .list_json::<SecurityGroup>(&keys::security_groups_of(project))
            .await?;
        let mut out: Vec<SecurityGroup> = list.into_iter().map(|(g, _)| g).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Checks rules: each is well formed and names only groups of the
    /// project (or `itself`, the group being written).
    async fn check_rules(
        &self,
        project: &ProjectName,
        itself: &str,
        rules: &[SecurityRule],
    ) -> ApiResult<()> {
        if rules.len() > MAX_RULES {
            return Err(ValidationError::new(
                "rules",
                format!("{} rules; allowed: at most {MAX_RULES}", rules.len()),
            )
            .into());
        }
        for (i, rule) in rules.iter().enumerate() {
            let (source, _) = rule
                .check()
                .map_err(|e| ValidationError::new(format!("rules[{i}].{}", e.field), e.message))?;
            if let RuleSource::Group(g) = source
                && g != itself
                && self.find_security_group(project, &g).await?.is_none()
            {
                // The rule is well formed; what it names is missing: a
                // conflict with the project's state, not a missing target.
                return Err(ApiError::conflict(format!(
                    "rules[{i}].group names security group \"{g}\", which project {project} does not have; make it first"
                ))
                .with_field(format!("rules[{i}].group")));
            }
        }
        Ok(())
    }

    /// Creates a security group; without rules it lets in everything from
    /// its own members and nothing else.
    pub async fn create_security_group(
        &self,
        project: &ProjectName,
        req: CreateSecurityGroupRequest,
    ) -> ApiResult<SecurityGroup> {
        skyvisor_core::names::validate_name("name", &req.name)?;
        let rules = req.rules.unwrap_or_else(|| {
            vec![SecurityRule {
                protocol: skyvisor_core::Protocol::Any,
                port_from: None,
                port_to: None,
                cidr: None,
                group: Some(req.name.clone()),
            }]
        });
        self.check_rules(project, &req.name, &rules).await?;
        let description = req.description.unwrap_or_default();
        if description.chars().count() > skyvisor_core::firewall::MAX_DESCRIPTION {
            return Err(ValidationError::new(
                "description",
                format!(
                    "{} characters; allowed: at most {}",
                    description.chars().count(),
                    skyvisor_core::firewall::MAX_DESCRIPTION
                ),
            )
            .into());
        }
        let group = SecurityGroup {
            name: req.name.clone(),
            project: project.clone(),
            description,
            rules,
            generation: 1,
            created_at: Utc::now(),
        };
        let created = self
            .store
            .create(&keys::security_group(project, &req.name), encode(&group))
            .await?;
        if !created {
            return Err(ApiError::already_exists(format!(
                "security group \"{}\" already exists",
                req.name
            )));
        }
        info!(%project, group = %req.name, "security group created");
        Ok(group)
    }

    /// Replaces a group's rules; the hosts running its members apply them
    /// at once, while the members run.
    pub async fn set_security_rules(
        &self,
        project: &ProjectName,
        name: &str,
        rules: Vec<SecurityRule>,
    ) -> ApiResult<SecurityGroup> {
        self.check_rules(project, name, &rules).await?;
        for _ in 0..16 {
            let Some((mut group, rev)) = self.find_security_group(project, name).await? else {
                return Err(ApiError::not_found(format!(
                    "security group \"{name}\" not found"
                )));
            };
            group.rules = rules.clone();
            group.generation += 1;
            let key = keys::security_group(project, name);
            let out = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), rev)],
                    vec![put_json(key, &group)],
                )
                .await?;
            if out.succeeded {
                info!(%project, group = %name, rules = group.rules.len(), "security group rules changed");
                return Ok(group);
            }
        }
        Err(ApiError::unavailable(
            "the security group is changing too fast; retry",
        ))
    }

    /// Deletes a group no instance is in and no other group's rule names.
    pub async fn delete_security_group(&self, project: &ProjectName, name: &str) -> ApiResult<()> {
        self.security_group(project, name).await?;
        let mut users: Vec<String> = self
            .inventory
            .instances()
            .await
            .into_iter()
            .filter(|s| &s.project == project && s.security_groups.iter().any(|g| g == name))
            .map(|s| format!("instance {}", s.name))
            .collect();
        for g in self.security_groups(project).await? {
            if g.name != name && g.rules.iter().any(|r| r.group.as_deref() == Some(name)) {
                users.push(format!("security group {}", g.name));
            }
        }
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "security group \"{name}\" is used by {}; change them first",
                users.join(", ")
            )));
        }
        self.store
            .delete(&keys::security_group(project, name))
            .await?;
        info!(%project, group = %name, "security group deleted");
        Ok(())
    }

    /// Checks that every group `names` exists in `project`.
    pub async fn check_security_groups(
        &self,
        project: &ProjectName,
        names: &[String],
    ) -> ApiResult<()> {
        if names.len() > skyvisor_core::firewall::MAX_GROUPS_PER_INSTANCE {
            return Err(ValidationError::new(
                "security_groups",
                format!(
                    "{} groups; allowed: at most {}",
                    names.len(),
                    skyvisor_core::firewall::MAX_GROUPS_PER_INSTANCE
                ),
            )
            .into());
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(ValidationError::new(
                    "security_groups",
                    format!("\"{name}\" is named twice; allowed: each group once"),
                )
                .into());
            }
            if self.find_security_group(project, name).await?.is_none() {
                return Err(ApiError::not_found(format!(
                    "security group \"{name}\" not found in project {project}"
                ))
                .with_field("security_groups"));
            }
        }
        Ok(())
    }

    /// Puts instance `name` of `project` in exactly `groups` (none: not
    /// filtered); its host applies the change while it runs.
    pub async fn set_instance_security_groups(
        &self,
        project: &ProjectName,
        name: &str,
        groups: Vec<String>,
    ) -> ApiResult<skyvisor_core::Instance> {
        self.check_security_groups(project, &groups).await?;
        let inst = self
            .update_spec(project, name, None, |spec, _| {
                spec.security_groups = groups.clone();
                Ok(())
            })
            .await?;
        info!(%project, instance = %name, groups = ?groups, "security groups changed");
        Ok(inst)
    }

    /// Replaces an instance's labels.
    pub async fn set_instance_labels(
        &self,
        project: &ProjectName,
        name: &str,
        labels: skyvisor_core::labels::Labels,
    ) -> ApiResult<skyvisor_core::Instance> {
        skyvisor_core::labels::validate_labels("labels", &labels)?;
        self.update_spec(project, name, None, |spec, _| {
            spec.labels = labels.clone();
            Ok(())
        })
        .await
    }

    /// What a project holds of networks and groups, for refusing its
    /// deletion (its unused `default` network goes with it).
    pub(crate) async fn project_network_contents(
        &self,
        project: &ProjectName,
    ) -> ApiResult<Vec<String>> {
        let mut out: Vec<String> = self
            .networks(project)
            .await?
            .into_iter()
            .filter(|n| n.name != keys::DEFAULT_NETWORK)
            .map(|n| format!("network {}", n.name))
            .collect();
        out.extend(
            self.security_groups(project)
                .await?
                .into_iter()
                .map(|g| format!("security group {}", g.name)),
        );
        Ok(out)
    }

    /// Removes a deleted project's `default` network.
    pub(crate) async fn delete_project_networks(&self, project: &ProjectName) -> ApiResult<()> {
        if self
            .find_network(project, keys::DEFAULT_NETWORK)
            .await?
            .is_some()
        {
            self.delete_network(project, keys::DEFAULT_NETWORK).await?;
        }
        Ok(())
    }
}

/// Whether `spec` is filtered by security groups.
pub fn is_filtered(spec: &InstanceSpec) -> bool {
    !spec.security_groups.is_empty()
}

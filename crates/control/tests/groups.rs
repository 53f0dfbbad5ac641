//! Instance groups in the control plane, with a stand-in for the agents
//! (a loop that reports every instance running, or failed when the test
//! says so, and removes deleted ones as an agent would): bad input is
//! refused naming the field with nothing made; the controller makes the
//! desired members spread over the hosts, replaces a failed one, scales
//! in and out, rolls a template change through without dropping below
//! the desired number that serve, and deletes a group with its members.
//! Real guests behind groups are tested in the system tests.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::group::{CreateGroupRequest, Group, ScaleGroupRequest, UpdateGroupRequest};
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::{
    Accel, Capacity, Host, HostName, Image, ImageName, InstancePhase, InstanceSpec, InstanceStatus,
    Overcommit, ProjectName, Resources, ServerName, keys,
};
use skyvisor_store::{EmbeddedStore, Op, Store, StoreExt, encode, put_json};

async fn fake_host(store: &dyn Store, name: &str) {
    let host = Host {
        name: HostName::new(name).expect("name"),
        address: "127.0.0.1".into(),
        capacity: Capacity::new(
            Resources {
                vcpus: 16,
                memory_mib: 64 * 1024,
                disk_gib: 1000,
            },
            Overcommit {
                cpu: 1.0,
                memory: 1.0,
                disk: 1.0,
            },
        ),
        accel: Accel::Tcg,
        accel_reason: "test".into(),
        qemu_version: "test".into(),
        container_runtime: None,
        containers_unavailable: None,
        agent_version: skyvisor_core::VERSION.into(),
        subnet: "10.99.0.0/16".parse().expect("subnet"),
        bridge_address: None,
        replica_addr: None,
        agent_url: None,
        disk_free_bytes: u64::MAX,
        started_at: Utc::now(),
    };
    store
        .txn(
            vec![],
            vec![
                put_json(keys::host(&host.name), &host),
                put_json(keys::host_alive(&host.name), &Utc::now()),
            ],
        )
        .await
        .expect("register host");
}

async fn ready_image(store: &dyn Store) {
    let image = Image {
        project: skyvisor_core::auth::default_project(),
        public: true,
        name: ImageName::new("img").expect("name"),
        kind: ImageKind::KernelInitrd,
        description: "test".into(),
        files: vec![],
        cmdline: None,
        guest_service: false,
        ssh_user: None,
        cloud_init: false,
        process: None,
        source: ImageSource::Import,
        state: ImageState::Ready,
        message: None,
        builder: None,
        created_at: Utc::now(),
    };
    store
        .put(&keys::image(&image.image_ref()), encode(&image))
        .await
        .expect("image");
}

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("s1"),
        cache_dir: dir.join("cache"),
        guest_binary: None,
        subnet: "10.99.0.0/16".parse().expect("subnet"),
        vni: 4213,
        private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
        audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
        event_retention: skyvisor_control::events::DEFAULT_RETENTION,
        mtu: 1450,
        weigher: Weigher::Spread,
        cluster: ClusterSettings::single(
            ServerName::new("s1").expect("name"),
            "http://s1.invalid".into(),
        ),
        max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
        bootstrap_token_file: None,
    }
}

/// Stands in for the agents: reports each instance running (or failed,
/// for the names in `failing`) and removes deleted ones.
fn fake_agents(store: Arc<dyn Store>, failing: Arc<Mutex<HashSet<String>>>) {
    tokio::spawn(async move {
        loop {
            if let Ok((specs, _)) = store.list_json::<InstanceSpec>(keys::INSTANCE_SPECS).await {
                for (spec, _) in specs {
                    let iref = spec.instance_ref();
                    if spec.deleting {
                        let _ = store
                            .txn(
                                vec![],
                                vec![
                                    Op::Delete(keys::instance_spec(&iref)),
                                    Op::Delete(keys::binding(&spec.host, &iref)),
                                    Op::Delete(keys::instance_status(&iref)),
                                ],
                            )
                            .await;
                        continue;
                    }
                    let failed = failing.lock().expect("lock").contains(spec.name.as_str());
                    let mut status = InstanceStatus::pending();
                    status.phase = if failed {
                        InstancePhase::Failed
                    } else {
                        InstancePhase::Running
                    };
                    status.host = Some(spec.host.clone());
                    status.observed_generation = spec.generation;
                    let current = store
                        .get_json::<InstanceStatus>(&keys::instance_status(&iref))
                        .await
                        .ok()
                        .flatten();
                    if current.is_none_or(|(c, _)| c.phase != status.phase) {
                        let _ = store
                            .put(&keys::instance_status(&iref), encode(&status))
                            .await;
                    }
                }
            }
            // The stand-in's own pace, not a readiness wait.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Names the members the stand-in agents report failed.
type Failing = Arc<Mutex<HashSet<String>>>;

/// A server on a fresh store with fake `hosts`, a ready image and the
/// stand-in agents (the directory must outlive the server).
async fn start(hosts: &[&str]) -> (Arc<dyn Store>, tempfile::TempDir, ControlPlane, Failing) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let dir = tempfile::tempdir().expect("tmp");
    for h in hosts {
        fake_host(store.as_ref(), h).await;
    }
    ready_image(store.as_ref()).await;
    let cp = ControlPlane::start(store.clone(), config(dir.path()))
        .await
        .expect("server");
    std::mem::forget(cp.join_cluster().await.expect("join"));
    let failing: Failing = Arc::new(Mutex::new(HashSet::new()));
    fake_agents(store.clone(), failing.clone());
    (store, dir, cp, failing)
}

/// Polls `cp`'s view of group `name` until `done` holds, or panics with
/// what it last saw.
async fn wait_group(
    cp: &ControlPlane,
    project: &ProjectName,
    name: &str,
    what: &str,
    done: impl Fn(&Group) -> bool,
) -> Group {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = cp.group(project, name).await.expect("group");
        if done(&g) {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in 60 s; last seen {g:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn present(g: &Group) -> Vec<&skyvisor_core::group::GroupMember> {
    g.members.iter().filter(|m| !m.leaving).collect()
}

fn request(v: serde_json::Value) -> CreateGroupRequest {
    serde_json::from_value(v).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_keep_their_size_replace_failures_roll_updates_and_delete_members() {
    let (store, _dir, cp, failing) = start(&["ha", "hb"]).await;
    let p = skyvisor_core::auth::default_project();
    let template = json!({"image": "img", "instance_type": "nano"});

    // Bad input: refused naming the field, nothing made.
    for (body, field, status) in [
        (
            json!({"name": "web", "template": template, "min": 3, "max": 2}),
            "min",
            400,
        ),
        (
            json!({"name": "web", "template": template, "min": 1, "max": 3, "desired": 5}),
            "desired",
            400,
        ),
        (
            json!({"name": "web", "template": {"image": "nope", "instance_type": "nano"}}),
            "template.image",
            404,
        ),
        (
            json!({"name": "web", "template": {"image": "img", "instance_type": "huge-ish"}}),
            "template.instance type",
            400,
        ),
        (
            json!({"name": "web", "template": {"name": "x", "image": "img"}}),
            "template.name",
            400,
        ),
        (
            json!({"name": "web", "template": template,
                "health_check": {"protocol": "http", "port": 80, "path": "health"}}),
            "health_check.path",
            400,
        ),
        (
            json!({"name": "web", "template": template,
                "health_check": {"protocol": "tcp", "port": 80, "interval_secs": 0}}),
            "health_check.interval_secs",
            400,
        ),
        (
            json!({"name": "a".repeat(58), "template": template}),
            "name",
            400,
        ),
        (
            json!({"name": "web", "template": template,
                "rollout": {"max_surge": 0, "max_unavailable": 0}}),
            "rollout",
            400,
        ),
    ] {
        let e = cp
            .create_group(&p, request(body.clone()))
            .await
            .expect_err(&body.to_string());
        assert_eq!(
            (e.status.as_u16(), e.field.as_deref()),
            (status, Some(field)),
            "{body}: {e:?}"
        );
    }
    assert!(cp.groups(&p).await.expect("list").is_empty());
    assert!(cp.instances().await.is_empty(), "nothing half-made");

    // Made with 3 members over both hosts.
    let g = cp
        .create_group(
            &p,
            request(json!({"name": "web", "template": template, "min": 1, "max": 5, "desired": 3})),
        )
        .await
        .expect("create");
    assert_eq!((g.spec.min, g.spec.desired, g.spec.max), (1, 3, 5));
    let e = cp
        .create_group(&p, request(json!({"name": "web", "template": template})))
        .await
        .expect_err("duplicate");
    assert_eq!(e.status.as_u16(), 409, "{e:?}");
    let g = wait_group(&cp, &p, "web", "3 members serving", |g| {
        g.healthy == 3 && present(g).len() == 3
    })
    .await;
    let mut per_host: BTreeMap<String, u32> = BTreeMap::new();
    for m in &g.members {
        *per_host.entry(m.host.clone().expect("host")).or_default() += 1;
        assert!(m.name.starts_with("web-"), "{}", m.name);
    }
    let mut counts: Vec<u32> = per_host.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [1, 2], "spread over both hosts: {per_host:?}");

    // A failed member is replaced.
    let victim = g.members[0].name.clone();
    failing.lock().expect("lock").insert(victim.clone());
    let g = wait_group(&cp, &p, "web", "the failed member replaced", |g| {
        g.healthy == 3 && present(g).len() == 3 && g.members.iter().all(|m| m.name != victim)
    })
    .await;
    let before: HashSet<String> = g.members.iter().map(|m| m.name.clone()).collect();

    // Scale out and in.
    cp.scale_group(
        &p,
        "web",
        ScaleGroupRequest {
            desired: 5,
            min: None,
            max: None,
        },
    )
    .await
    .expect("scale out");
    wait_group(&cp, &p, "web", "5 members", |g| {
        g.healthy == 5 && present(g).len() == 5
    })
    .await;
    let e = cp
        .scale_group(
            &p,
            "web",
            ScaleGroupRequest {
                desired: 6,
                min: None,
                max: None,
            },
        )
        .await
        .expect_err("above max");
    assert_eq!(e.field.as_deref(), Some("desired"), "{e:?}");
    cp.scale_group(
        &p,
        "web",
        ScaleGroupRequest {
            desired: 2,
            min: None,
            max: None,
        },
    )
    .await
    .expect("scale in");
    let g = wait_group(&cp, &p, "web", "2 members", |g| {
        g.members.len() == 2 && g.healthy == 2
    })
    .await;
    // The newest went first: the two left are from before the scale-out.
    assert!(g.members.iter().all(|m| before.contains(&m.name)), "{g:#?}");

    // A template change rolls through: never fewer than 2 serving.
    let low = Arc::new(Mutex::new(u32::MAX));
    let watcher = {
        let (cp, p, low) = (cp.clone(), p.clone(), low.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(g) = cp.group(&p, "web").await {
                    let mut l = low.lock().expect("lock");
                    *l = (*l).min(g.healthy);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let g = cp
        .update_group(
            &p,
            "web",
            UpdateGroupRequest {
                template: Some(
                    serde_json::from_value(json!({"image": "img", "instance_type": "micro"}))
                        .expect("template"),
                ),
                health_check: None,
                rollout: None,
            },
        )
        .await
        .expect("update");
    assert_eq!(g.spec.template_generation, 2);
    let g = wait_group(&cp, &p, "web", "both members from the new template", |g| {
        g.members.len() == 2
            && g.healthy == 2
            && g.members.iter().all(|m| m.template_generation == 2)
    })
    .await;
    watcher.abort();
    assert!(*low.lock().expect("lock") >= 2, "dropped below 2 serving");
    for m in &g.members {
        let i = cp.instance(&p, &m.name).await.expect("member");
        assert_eq!(
            i.spec.instance_type.as_ref().map(|t| t.as_str()),
            Some("micro")
        );
    }

    // Deleting the group deletes its members, then the group.
    cp.delete_group(&p, "web").await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while cp.group(&p, "web").await.is_ok() {
        assert!(Instant::now() < deadline, "the group is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cp.instances().await.is_empty(), "members left behind");

    // Every member made and removed was recorded.
    let events = store
        .list(keys::EVENTS)
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).to_string())
        .collect::<Vec<_>>();
    let added = events.iter().filter(|e| e.contains("member-added")).count();
    let removed = events
        .iter()
        .filter(|e| e.contains("member-removed"))
        .count();
    // 3 + 1 replacement + 2 scale-out + 2 rolling update.
    assert_eq!(added, 8, "{events:#?}");
    // 1 replaced + 3 scale-in + 2 update + 2 deleted with the group.
    assert_eq!(removed, 8, "{events:#?}");
}

/// Polls project `p`'s published zone until `done` holds.
async fn wait_zone(
    cp: &ControlPlane,
    p: &ProjectName,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<std::net::Ipv4Addr>>) -> bool,
) -> BTreeMap<String, Vec<std::net::Ipv4Addr>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let zone = cp.dns_zone(p).await.expect("zone");
        let names: BTreeMap<String, Vec<std::net::Ipv4Addr>> = zone
            .names
            .iter()
            .map(|n| (n.name.clone(), n.addresses.clone()))
            .collect();
        if done(&names) {
            for n in &zone.names {
                assert_eq!(n.fqdn, format!("{}.{}.skyvisor.internal", n.name, p));
            }
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in 60 s; last seen {names:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_zone_names_instances_groups_and_balancers_of_each_project_apart() {
    let (_store, _dir, cp, failing) = start(&["ha"]).await;
    let p = skyvisor_core::auth::default_project();
    let beta = ProjectName::new("beta").expect("name");
    cp.directory
        .create_project(serde_json::from_value(json!({"name": "beta"})).expect("project request"))
        .await
        .expect("project beta");
    let vm = |name: &str| -> skyvisor_core::api::CreateInstanceRequest {
        serde_json::from_value(json!({"name": name, "image": "img", "instance_type": "nano"}))
            .expect("request")
    };
    let api = cp.create_instance(&p, vm("api")).await.expect("api");
    let other = cp
        .create_instance(&beta, vm("api"))
        .await
        .expect("beta's api");
    cp.create_group(
        &p,
        request(
            json!({"name": "web", "template": {"image": "img", "instance_type": "nano"},
            "min": 0, "max": 4, "desired": 2}),
        ),
    )
    .await
    .expect("group");
    let g = wait_group(&cp, &p, "web", "2 serving", |g| g.healthy == 2).await;
    let ip = |m: &skyvisor_core::group::GroupMember| -> std::net::Ipv4Addr {
        m.ip.parse().expect("member ip")
    };
    let mut members: Vec<std::net::Ipv4Addr> = present(&g).iter().map(|m| ip(m)).collect();
    members.sort();

    // An instance by its name, a group by its serving members, each
    // member by its own name; another project's instance of the same
    // name is in its own zone with its own address.
    let names = wait_zone(&cp, &p, "api and web published", |n| {
        n.get("web") == Some(&members)
    })
    .await;
    assert_eq!(names["api"], vec![api.spec.network.ip]);
    for m in present(&g) {
        assert_eq!(names[&m.name], vec![ip(m)]);
    }
    let theirs = wait_zone(&cp, &beta, "beta's api", |n| n.contains_key("api")).await;
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(theirs["api"], vec![other.spec.network.ip]);

    // A failed member leaves the group's answer.
    let victim = present(&g)[0].name.clone();
    let victim_ip = ip(present(&g)[0]);
    failing.lock().expect("lock").insert(victim.clone());
    wait_zone(&cp, &p, "the failed member left the group's name", |n| {
        n.get("web").is_some_and(|a| !a.contains(&victim_ip))
    })
    .await;
    failing.lock().expect("lock").clear();

    // A balancer of the same name as its group takes the name.
    let lb = cp
        .create_load_balancer(
            &p,
            serde_json::from_value(json!({"name": "web", "group": "web",
                "listeners": [{"port": 80}]}))
            .expect("lb request"),
        )
        .await
        .expect("balancer");
    wait_zone(&cp, &p, "the balancer's name", |n| {
        n.get("web") == Some(&vec![lb.spec.address])
    })
    .await;

    // An external balancer takes its ports on every host's address: a
    // second one cannot have them, nor can Skyvisor's own ports be used.
    let ext = |name: &str, port: u16| -> skyvisor_core::lb::CreateLoadBalancerRequest {
        serde_json::from_value(json!({"name": name, "group": "web", "external": true,
            "listeners": [{"port": port, "target_port": 80}]}))
        .expect("lb request")
    };
    let e1 = cp
        .create_load_balancer(&p, ext("ext1", 8443))
        .await
        .expect("external");
    assert_eq!(e1.external_endpoints, vec!["127.0.0.1:8443".to_string()]);
    let taken = cp
        .create_load_balancer(&p, ext("ext2", 8443))
        .await
        .expect_err("port taken");
    assert_eq!(
        (taken.status.as_u16(), taken.field.as_deref()),
        (409, Some("listeners[0].port")),
        "{taken:?}"
    );
    let reserved = cp
        .create_load_balancer(&p, ext("ext2", 7780))
        .await
        .expect_err("reserved port");
    assert_eq!(
        (reserved.status.as_u16(), reserved.field.as_deref()),
        (400, Some("listeners[0].port")),
        "{reserved:?}"
    );
    assert!(
        cp.load_balancer(&p, "ext2").await.is_err(),
        "nothing half-made"
    );
    cp.delete_load_balancer(&p, "ext1").await.expect("delete");
    cp.create_load_balancer(&p, ext("ext2", 8443))
        .await
        .expect("the port is free again");

    // Deleted, an instance's name goes; a project with no names has none.
    cp.delete_instance(&beta, "api", true, false)
        .await
        .expect("delete");
    wait_zone(&cp, &beta, "beta emptied", BTreeMap::is_empty).await;
}

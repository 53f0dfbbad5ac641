//! Authorization over real HTTP: every route of the OpenAPI document
//! (enumerated from it, so a new route is covered without editing this
//! file) called with no token, a token of another project, a viewer, a
//! member, a project admin and a cluster admin; each gets what its role
//! allows, an object of another project is 404 as if it did not exist, and
//! nothing answers 500. Also: a revoked token stops working on every server
//! at once, and twenty concurrent creates never exceed a quota.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use skyvisor_control::access::policy::{self, Rule};
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::auth::Action;
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::volume::{VolumeSpec, VolumeStatus};
use skyvisor_core::{
    Accel, Capacity, Host, HostName, Image, ImageName, Overcommit, ProjectName, Resources,
    ServerName, VolumeId, VolumeName, keys,
};
use skyvisor_store::{EmbeddedStore, Store, StoreExt, encode, put_json};

/// A live host with room, registered as an agent would.
async fn fake_host(store: &dyn Store, name: &str) {
    let host = Host {
        name: HostName::new(name).expect("name"),
        address: "127.0.0.1".into(),
        capacity: Capacity::new(
            Resources {
                vcpus: 64,
                memory_mib: 256 * 1024,
                disk_gib: 10_000,
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
        subnet: "10.97.0.0/16".parse().expect("subnet"),
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

/// A ready image owned by `project`.
async fn image(store: &dyn Store, name: &str, project: &str, public: bool) {
    let image = Image {
        name: ImageName::new(name).expect("name"),
        project: ProjectName::new(project).expect("project"),
        public,
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

/// A volume record of `project` (no agent serves it; reads still work).
async fn volume(store: &dyn Store, name: &str, project: &str) {
    let spec = VolumeSpec {
        name: VolumeName::new(name).expect("name"),
        project: ProjectName::new(project).expect("project"),
        id: VolumeId::random(),
        size_bytes: 1 << 30,
        replicas: 1,
        min_in_sync: 1,
        hosts: vec![HostName::new("h1").expect("host")],
        deleting: false,
        generation: 1,
        created_at: Utc::now(),
        owner: None,
    };
    store
        .txn(
            vec![],
            vec![
                put_json(keys::volume_spec(&spec.volume_ref()), &spec),
                put_json(
                    keys::volume_status(&spec.volume_ref()),
                    &VolumeStatus::creating(),
                ),
            ],
        )
        .await
        .expect("volume");
}

struct Server {
    _cp: ControlPlane,
    base: String,
    _dir: tempfile::TempDir,
}

async fn server(store: Arc<dyn Store>, name: &str) -> Server {
    server_with(store, name, Vec::new()).await
}

/// A server that tells joining agents about `etcd_endpoints` (its own store
/// stays embedded).
async fn server_with(store: Arc<dyn Store>, name: &str, etcd_endpoints: Vec<String>) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let cp = ControlPlane::start(
        store,
        ServerConfig {
            data_dir: dir.path().join("server"),
            cache_dir: dir.path().join("cache"),
            guest_binary: None,
            subnet: "10.97.0.0/16".parse().expect("subnet"),
            vni: 4213,
            private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
            audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
            event_retention: skyvisor_control::events::DEFAULT_RETENTION,
            mtu: 1450,
            weigher: Weigher::Spread,
            cluster: ClusterSettings {
                etcd_endpoints,
                ..ClusterSettings::single(ServerName::new(name).expect("name"), base.clone())
            },
            max_upload_bytes: 1 << 20,
            bootstrap_token_file: Some(dir.path().join("admin.token")),
        },
    )
    .await
    .expect("control plane");
    std::mem::forget(cp.join_cluster().await.expect("join"));
    tokio::spawn(axum::serve(listener, skyvisor_control::api::router(cp.clone())).into_future());
    Server {
        _cp: cp,
        base,
        _dir: dir,
    }
}

/// One HTTP call: (status, JSON body or null).
async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    project: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut req = http.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        format!("{base}{path}"),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(p) = project {
        req = req.header("x-skyvisor-project", p);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let streaming = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        // An event stream never ends: its status is the answer.
        return (status, Value::Null);
    }
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The bootstrap admin's token from the file the server wrote.
fn admin_token(s: &Server) -> String {
    std::fs::read_to_string(s._dir.path().join("admin.token"))
        .expect("bootstrap token file")
        .trim()
        .to_string()
}

/// Makes an identity with `roles` and returns a token of it.
async fn identity(
    s: &Server,
    admin: &str,
    name: &str,
    roles: Value,
    cluster_admin: bool,
) -> String {
    let kind = if cluster_admin {
        "user"
    } else {
        "service_account"
    };
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/identities",
        Some(admin),
        None,
        Some(json!({"name": name, "kind": kind, "roles": roles, "cluster_admin": cluster_admin})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/tokens",
        Some(admin),
        None,
        Some(json!({"identity": name, "description": "test"})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    body["token"].as_str().expect("token").to_string()
}

/// The concrete path of a route template, naming project alpha's objects.
fn concrete(path: &str, token_id: &str) -> String {
    concrete_with(
        path,
        token_id,
        [
            "vm-a", "vol-a", "img-a", "net-a", "sg-a", "kp-a", "grp-a", "lb-a",
        ],
    )
}

/// The same path naming objects that do not exist anywhere.
fn missing(path: &str, token_id: &str) -> String {
    concrete_with(
        path,
        token_id,
        [
            "vm-zz", "vol-zz", "img-zz", "net-zz", "sg-zz", "kp-zz", "grp-zz", "lb-zz",
        ],
    )
}

fn concrete_with(
    path: &str,
    token_id: &str,
    [vm, vol, img, net, sg, kp, grp, lb]: [&str; 8],
) -> String {
    let object = if path.starts_with("/v1/instances/") {
        vm
    } else if path.starts_with("/v1/volumes/") {
        vol
    } else if path.starts_with("/v1/images/") {
        img
    } else if path.starts_with("/v1/networks/") {
        net
    } else if path.starts_with("/v1/security-groups/") {
        sg
    } else if path.starts_with("/v1/keypairs/") {
        kp
    } else if path.starts_with("/v1/groups/") {
        grp
    } else if path.starts_with("/v1/load-balancers/") {
        lb
    } else if path.starts_with("/v1/hosts/") {
        "h1"
    } else if path.starts_with("/v1/projects/") {
        "alpha"
    } else if path.starts_with("/v1/identities/") {
        "viewer"
    } else {
        "nothing"
    };
    path.replace("{name}", object)
        .replace("{snapshot}", "s1")
        .replace("{volume}", vol)
        .replace("{identity}", "viewer")
        .replace("{file}", "vmlinuz")
        .replace("{id}", token_id)
}

/// Whether a route names one of project alpha's objects in its path.
fn names_an_object(path: &str) -> bool {
    [
        "/v1/instances/{",
        "/v1/volumes/{",
        "/v1/images/{",
        "/v1/networks/{",
        "/v1/security-groups/{",
        "/v1/keypairs/{",
        "/v1/groups/{",
        "/v1/load-balancers/{",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// A body with the missing objects' names put back, to compare answers.
fn unmissing(v: &Value) -> Value {
    let text = v
        .to_string()
        .replace("vm-zz", "vm-a")
        .replace("vol-zz", "vol-a")
        .replace("img-zz", "img-a")
        .replace("net-zz", "net-a")
        .replace("sg-zz", "sg-a")
        .replace("kp-zz", "kp-a")
        .replace("grp-zz", "grp-a")
        .replace("lb-zz", "lb-a");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_as_its_rule_says() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "authz").await;
    let admin = admin_token(&s);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    image(store.as_ref(), "img-a", "alpha", false).await;
    for p in ["alpha", "beta"] {
        let (st, body) = call(
            &s.base,
            "POST",
            "/v1/projects",
            Some(&admin),
            None,
            Some(json!({"name": p})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    volume(store.as_ref(), "vol-a", "alpha").await;
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    tokens.insert(
        "viewer",
        identity(&s, &admin, "viewer", json!({"alpha": "viewer"}), false).await,
    );
    tokens.insert(
        "member",
        identity(&s, &admin, "member", json!({"alpha": "member"}), false).await,
    );
    tokens.insert(
        "padmin",
        identity(&s, &admin, "padmin", json!({"alpha": "admin"}), false).await,
    );
    tokens.insert(
        "outsider",
        identity(&s, &admin, "outsider", json!({"beta": "admin"}), false).await,
    );
    // Alpha's instance and snapshot, made through the API by a member.
    let member = tokens["member"].clone();
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances",
        Some(&member),
        Some("alpha"),
        Some(json!({"name": "vm-a", "image": "img-a", "instance_type": "nano", "start": false})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["spec"]["project"], "alpha", "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances/vm-a/snapshots",
        Some(&member),
        Some("alpha"),
        Some(json!({"name": "s1"})),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    // Alpha's network and security group.
    for (path, name) in [
        ("/v1/networks", "net-a"),
        ("/v1/security-groups", "sg-a"),
        ("/v1/keypairs", "kp-a"),
    ] {
        let (st, body) = call(
            &s.base,
            "POST",
            path,
            Some(&member),
            Some("alpha"),
            Some(json!({ "name": name })),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    // Alpha's instance group, with no members.
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/groups",
        Some(&member),
        Some("alpha"),
        Some(json!({"name": "grp-a", "min": 0, "desired": 0, "max": 2,
            "template": {"image": "img-a", "instance_type": "nano"}})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/load-balancers",
        Some(&member),
        Some("alpha"),
        Some(json!({"name": "lb-a", "group": "grp-a", "listeners": [{"port": 80}]})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    // A token to revoke on the token route.
    let (_, spare) = call(
        &s.base,
        "POST",
        "/v1/tokens",
        Some(&admin),
        None,
        Some(json!({"description": "spare"})),
    )
    .await;
    let spare_id = spare["id"].as_str().expect("id").to_string();

    let doc = skyvisor_control::api::openapi();
    let mut routes = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ] {
            if op.is_some() {
                let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
                let rule = policy::rule(&m, path)
                    .unwrap_or_else(|| panic!("{method} {path} has no authorization rule"));
                routes.push((method, path.clone(), rule));
            }
        }
    }
    assert!(routes.len() > 60, "only {} routes", routes.len());
    let body_for = |m: &str| (m == "POST" || m == "PUT" || m == "PATCH").then(|| json!({}));
    let mut failures = Vec::new();
    let mut check = |who: &str, method: &str, path: &str, status: u16, ok: bool, body: &Value| {
        if !ok || status >= 500 && status != 503 {
            failures.push(format!("{who}: {method} {path} -> {status} {body}"));
        }
    };

    // Callers that must change nothing go first.
    for (method, template, rule) in &routes {
        let path = concrete(template, &spare_id);
        let body = body_for(method);
        // No token: 401 everywhere.
        let (st, b) = call(&s.base, method, &path, None, None, body.clone()).await;
        check("anonymous", method, &path, st, st == 401, &b);
        // A garbled and a revoked-looking token: 401 too.
        let (st, b) = call(&s.base, method, &path, Some("svt_nope"), None, body.clone()).await;
        check("garbled", method, &path, st, st == 401, &b);

        // Another project's member, in its own project and asking for alpha.
        let outsider = tokens["outsider"].as_str();
        let (st, b) = call(&s.base, method, &path, Some(outsider), None, body.clone()).await;
        let expected = match rule {
            Rule::ClusterAdmin | Rule::Monitor | Rule::Join => st == 403,
            Rule::ProjectInPath(_) => st == 404,
            // Exactly what an object that does not exist gets.
            Rule::Project(_) if names_an_object(template) => {
                let (mst, mb) = call(
                    &s.base,
                    method,
                    &missing(template, &spare_id),
                    Some(outsider),
                    None,
                    body.clone(),
                )
                .await;
                st == mst && unmissing(&mb) == b
            }
            _ => st != 401 && st != 403,
        };
        check("outsider", method, &path, st, expected, &b);
        if let Some(list) = b.as_array() {
            let text = Value::Array(list.clone()).to_string();
            let leaked = [
                "vm-a",
                "vol-a",
                "img-a",
                "net-a",
                "sg-a",
                "kp-a",
                "\"alpha\"",
            ]
            .iter()
            .any(|n| text.contains(n));
            check("outsider list", method, &path, st, !leaked, &b);
        }
        let (st, b) = call(
            &s.base,
            method,
            &path,
            Some(outsider),
            Some("alpha"),
            body.clone(),
        )
        .await;
        let expected = match rule {
            Rule::ClusterAdmin | Rule::Monitor | Rule::Join => st == 403,
            Rule::Project(_) | Rule::ProjectInPath(_) => st == 404,
            Rule::Authenticated => st != 401 && st != 403,
        };
        check("outsider in alpha", method, &path, st, expected, &b);

        // Alpha's viewer: reads, never writes.
        let viewer = tokens["viewer"].as_str();
        let (st, b) = call(
            &s.base,
            method,
            &path,
            Some(viewer),
            Some("alpha"),
            body.clone(),
        )
        .await;
        let expected = match rule {
            Rule::ClusterAdmin | Rule::Monitor | Rule::Join => st == 403,
            Rule::Project(Action::Read) | Rule::ProjectInPath(Action::Read) => {
                // The test image has no files: that 404 is about the file.
                let about_file = b["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("has no file"));
                ![401, 403].contains(&st) && (st != 404 || about_file)
            }
            Rule::Project(_) | Rule::ProjectInPath(_) => st == 403,
            Rule::Authenticated => st != 401 && st != 403,
        };
        check("viewer", method, &path, st, expected, &b);
        if st == 403 {
            let msg = b["error"]["message"].as_str().unwrap_or_default();
            check(
                "viewer 403 names the role",
                method,
                &path,
                st,
                msg.contains("role") || msg.contains("cluster admin"),
                &b,
            );
        }
    }
    // Then those that may change things: member, project admin, cluster
    // admin. Their calls may fail for the request's own reasons (an empty
    // body, a state), never for authorization.
    for who in ["member", "padmin", "admin"] {
        let token = if who == "admin" {
            admin.clone()
        } else {
            tokens[who].clone()
        };
        for (method, template, rule) in &routes {
            let path = concrete(template, &spare_id);
            let (st, b) = call(
                &s.base,
                method,
                &path,
                Some(&token),
                Some("alpha"),
                body_for(method),
            )
            .await;
            let expected = match (who, rule) {
                (_, Rule::Authenticated) => st != 401,
                ("admin", _) => st != 401 && st != 403,
                (_, Rule::ClusterAdmin | Rule::Monitor | Rule::Join) => st == 403,
                ("member", Rule::ProjectInPath(Action::Manage) | Rule::Project(Action::Manage)) => {
                    st == 403
                }
                _ => st != 401 && st != 403,
            };
            check(who, method, &path, st, expected, &b);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The trail names who created alpha's VM, and its project admin (not
    // a member) may read it; refusals go to the cluster-wide trail.
    let padmin = tokens["padmin"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (st, trail) = call(
            &s.base,
            "GET",
            "/v1/audit?limit=1000",
            Some(&padmin),
            Some("alpha"),
            None,
        )
        .await;
        assert_eq!(st, 200, "{trail}");
        let found = trail.as_array().into_iter().flatten().any(|r| {
            r["identity"] == "member"
                && r["method"] == "POST"
                && r["path"] == "/v1/instances"
                && r["status"] == 201
                && r["project"] == "alpha"
        });
        if found {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not audited: {trail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = call(
        &s.base,
        "GET",
        "/v1/audit",
        Some(&tokens["member"]),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, trail) = call(
        &s.base,
        "GET",
        "/v1/audit?cluster=true&limit=1000",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 200, "{trail}");
    assert!(
        trail
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["identity"] == "viewer" && r["status"] == 403),
        "refusals are audited: {trail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_on_every_server_at_once() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let a = server(store.clone(), "sa").await;
    let b = server(store.clone(), "sb").await;
    let admin = admin_token(&a);
    let (st, made) = call(
        &a.base,
        "POST",
        "/v1/tokens",
        Some(&admin),
        None,
        Some(json!({"description": "short-lived"})),
    )
    .await;
    assert_eq!(st, 201, "{made}");
    let token = made["token"].as_str().expect("token").to_string();
    let id = made["id"].as_str().expect("id").to_string();
    for s in [&a, &b] {
        let (st, me) = call(&s.base, "GET", "/v1/whoami", Some(&token), None, None).await;
        assert_eq!(st, 200, "{me}");
        assert_eq!(me["token_id"], id.as_str());
    }
    // The list shows it without secret or hash.
    let (_, list) = call(&a.base, "GET", "/v1/tokens", Some(&admin), None, None).await;
    let text = list.to_string();
    assert!(text.contains(&id) && !text.contains(&token[21..]), "{list}");
    assert!(!text.contains("sha256"), "{list}");

    let (st, _) = call(
        &a.base,
        "DELETE",
        &format!("/v1/tokens/{id}"),
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 204);
    for s in [&b, &a] {
        let (st, body) = call(&s.base, "GET", "/v1/whoami", Some(&token), None, None).await;
        assert_eq!(st, 401, "{body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("revoked"), "{body}");
    }
    // Expired tokens say so.
    let (_, short) = call(
        &a.base,
        "POST",
        "/v1/tokens",
        Some(&admin),
        None,
        Some(json!({"expires_in_secs": 1})),
    )
    .await;
    let short = short["token"].as_str().expect("token").to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (st, body) = call(&b.base, "GET", "/v1/whoami", Some(&short), None, None).await;
        if st == 401 {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("expired"),
                "{body}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Bad lifetimes are refused naming the field.
    let (st, body) = call(
        &a.base,
        "POST",
        "/v1/tokens",
        Some(&admin),
        None,
        Some(json!({"expires_in_secs": 0})),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(
        body["error"]["message"]
            .to_string()
            .contains("expires_in_secs")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_creates_on_two_servers_never_exceed_a_quota() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let a = server(store.clone(), "qa").await;
    let b = server(store.clone(), "qb").await;
    let admin = admin_token(&a);
    fake_host(store.as_ref(), "h1").await;
    fake_host(store.as_ref(), "h2").await;
    image(store.as_ref(), "img", "default", true).await;
    let (st, body) = call(
        &a.base,
        "POST",
        "/v1/projects",
        Some(&admin),
        None,
        Some(json!({"name": "q", "quota": {"instances": 3, "vcpus": 64}})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let member = identity(&a, &admin, "dev", json!({"q": "member"}), false).await;
    let creates = (0..20).map(|i| {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        let member = member.clone();
        tokio::spawn(async move {
            call(
                &base,
                "POST",
                "/v1/instances",
                Some(&member),
                Some("q"),
                Some(json!({"name": format!("vm-{i}"), "image": "img", "instance_type": "nano", "start": false})),
            )
            .await
        })
    });
    let results = futures::future::join_all(creates).await;
    let mut created = 0;
    for r in results {
        let (st, body) = r.expect("task");
        match st {
            201 => created += 1,
            403 => {
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    msg.contains("quota exceeded for instances") && msg.contains("limit 3"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 3, "the quota is 3 instances");
    let (st, view) = call(&a.base, "GET", "/v1/projects/q", Some(&member), None, None).await;
    assert_eq!(st, 200, "{view}");
    assert_eq!(view["usage"]["instances"], 3, "{view}");
    assert_eq!(view["quota"]["instances"], 3, "{view}");
    // A project that holds objects cannot be deleted; the refusal lists them.
    let (st, body) = call(
        &a.base,
        "DELETE",
        "/v1/projects/q",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 409, "{body}");
    assert!(body.to_string().contains("instance vm-"), "{body}");
    // Another project does not see q's instances, even by listing.
    let (_, list) = call(&a.base, "GET", "/v1/instances", Some(&admin), None, None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_and_filter_without_skipping_or_repeating() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "pages").await;
    let admin = admin_token(&s);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    for i in 0..25 {
        let (st, body) = call(
            &s.base,
            "POST",
            "/v1/instances",
            Some(&admin),
            None,
            Some(json!({"name": format!("vm-{i:02}"), "image": "img", "instance_type": "nano", "start": false})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("{}/v1/instances?limit=10", s.base);
        if let Some(a) = &after {
            url.push_str(&format!("&continue={a}"));
        }
        let r = http.get(url).bearer_auth(&admin).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 200);
        let next = r
            .headers()
            .get("x-skyvisor-continue")
            .map(|v| v.to_str().expect("text").to_string());
        let items: Vec<Value> = r.json().await.expect("json");
        assert!(items.len() <= 10);
        seen.extend(
            items
                .iter()
                .map(|i| i["spec"]["name"].as_str().expect("name").to_string()),
        );
        pages += 1;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let all: Vec<String> = (0..25).map(|i| format!("vm-{i:02}")).collect();
    assert_eq!(seen, all);
    assert_eq!(pages, 3);
    let (st, list) = call(
        &s.base,
        "GET",
        "/v1/instances?host=h1&state=pending",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(25), "{list}");
    let (_, none) = call(
        &s.base,
        "GET",
        "/v1/instances?host=h9",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let (st, body) = call(
        &s.base,
        "GET",
        "/v1/instances?limit=0",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("limit"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_serves_one_join_only_and_nothing_else() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server_with(store, "joins", vec!["http://192.0.2.1:2379".into()]).await;
    let admin = admin_token(&s);
    let join = format!("/v1/cluster/join?version={}", skyvisor_core::VERSION);
    // A join token and when it expires.
    let make = |ttl: u64| {
        let (base, admin) = (s.base.clone(), admin.clone());
        async move {
            let (st, body) = call(
                &base,
                "POST",
                "/v1/cluster/join-tokens",
                Some(&admin),
                None,
                Some(json!({ "ttl_secs": ttl })),
            )
            .await;
            assert_eq!(st, 201, "{body}");
            let expires: chrono::DateTime<chrono::Utc> =
                serde_json::from_value(body["expires_at"].clone()).expect("expires_at");
            (body["token"].as_str().expect("token").to_string(), expires)
        }
    };
    let message = |body: &Value| {
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Used for anything but joining: refused, and not spent.
    let (token, _) = make(3600).await;
    let (st, body) = call(&s.base, "GET", "/v1/instances", Some(&token), None, None).await;
    assert_eq!(st, 403, "{body}");
    assert!(message(&body).contains("only to join"), "{body}");
    // Two joins race with one token: exactly one gets in.
    let (a, b) = tokio::join!(
        call(&s.base, "GET", &join, Some(&token), None, None),
        call(&s.base, "GET", &join, Some(&token), None, None)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401], "{a:?} {b:?}");
    let ok = if a.0 == 200 { &a.1 } else { &b.1 };
    assert_eq!(ok["etcd_endpoints"][0], "http://192.0.2.1:2379", "{ok}");
    let (st, body) = call(&s.base, "GET", &join, Some(&token), None, None).await;
    assert_eq!(st, 401, "{body}");
    assert!(message(&body).contains("was used"), "{body}");
    // An expired one is refused as expired.
    let (short, expires) = make(1).await;
    while chrono::Utc::now() <= expires {
        // Waits for the clock to pass the expiry, a second at most.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, body) = call(&s.base, "GET", &join, Some(&short), None, None).await;
    assert_eq!(st, 401, "{body}");
    assert!(message(&body).contains("expired"), "{body}");
    // Out-of-range lifetimes are refused naming the field.
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/cluster/join-tokens",
        Some(&admin),
        None,
        Some(json!({ "ttl_secs": 0 })),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["field"], "ttl_secs", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_schedule_must_fit_the_snapshot_quota() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "sched").await;
    let admin = admin_token(&s);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/projects",
        Some(&admin),
        None,
        Some(json!({"name": "sq", "quota": {"snapshots": 3}})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances",
        Some(&admin),
        Some("sq"),
        Some(json!({"name": "vm-s", "image": "img", "instance_type": "nano", "start": false})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let schedule = |keep: u32| json!({"schedule": {"every_secs": 60, "keep": keep}});
    let path = "/v1/instances/vm-s/checkpoint-schedule";
    let (st, body) = call(
        &s.base,
        "PUT",
        path,
        Some(&admin),
        Some("sq"),
        Some(schedule(4)),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("snapshots") && msg.contains("limit 3"),
        "{body}"
    );
    let (st, body) = call(
        &s.base,
        "PUT",
        path,
        Some(&admin),
        Some("sq"),
        Some(schedule(3)),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["spec"]["checkpoint_schedule"]["keep"], 3, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_within_a_project_and_never_collide_across_projects() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "names").await;
    let admin = admin_token(&s);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    for p in ["alpha", "beta"] {
        let (st, body) = call(
            &s.base,
            "POST",
            "/v1/projects",
            Some(&admin),
            None,
            Some(json!({"name": p})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let dev = identity(
        &s,
        &admin,
        "dev",
        json!({"alpha": "member", "beta": "member"}),
        false,
    )
    .await;
    let create = |project: &'static str, vcpus: u32| {
        let (base, dev) = (s.base.clone(), dev.clone());
        async move {
            call(
                &base,
                "POST",
                "/v1/instances",
                Some(&dev),
                Some(project),
                Some(json!({"name": "web", "image": "img", "vcpus": vcpus, "memory_mib": 256, "start": false})),
            )
            .await
        }
    };
    // The same name in two projects: two instances.
    let (st, a) = create("alpha", 1).await;
    assert_eq!(st, 201, "{a}");
    let (st, b) = create("beta", 2).await;
    assert_eq!(st, 201, "{b}");
    assert_ne!(a["spec"]["id"], b["spec"]["id"]);
    // Within one project the name is taken.
    let (st, again) = create("alpha", 1).await;
    assert_eq!(st, 409, "{again}");
    // Each project sees its own.
    for (p, vcpus) in [("alpha", 1), ("beta", 2)] {
        let (st, one) = call(
            &s.base,
            "GET",
            "/v1/instances/web",
            Some(&dev),
            Some(p),
            None,
        )
        .await;
        assert_eq!(st, 200, "{one}");
        assert_eq!(one["spec"]["project"], p, "{one}");
        assert_eq!(one["spec"]["resources"]["vcpus"], vcpus, "{one}");
        let (_, list) = call(&s.base, "GET", "/v1/instances", Some(&dev), Some(p), None).await;
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    }
    // Deleting one leaves the other.
    let (st, body) = call(
        &s.base,
        "DELETE",
        "/v1/instances/web",
        Some(&dev),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let (_, left) = call(
        &s.base,
        "GET",
        "/v1/instances/web",
        Some(&dev),
        Some("beta"),
        None,
    )
    .await;
    assert_eq!(left["spec"]["deleting"], false, "{left}");

    // Volumes too: one name, two volumes, each project sees its own, and
    // a 404 names only the caller's project's volumes.
    volume(store.as_ref(), "data", "alpha").await;
    volume(store.as_ref(), "data", "beta").await;
    volume(store.as_ref(), "secret-name", "beta").await;
    let mut ids = Vec::new();
    for p in ["alpha", "beta"] {
        let (st, v) = call(
            &s.base,
            "GET",
            "/v1/volumes/data",
            Some(&dev),
            Some(p),
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["spec"]["project"], p, "{v}");
        ids.push(v["spec"]["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    let (st, missing) = call(
        &s.base,
        "POST",
        "/v1/volumes/nope/grow",
        Some(&dev),
        Some("alpha"),
        Some(json!({"size_bytes": 2u64 << 30})),
    )
    .await;
    assert_eq!(st, 404, "{missing}");
    assert!(!missing.to_string().contains("secret-name"), "{missing}");

    // Images: each project imports its own `tool`; each sees and serves
    // its own, by the same name.
    const BOUNDARY: &str = "skyvisor-names-boundary";
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    for p in ["alpha", "beta"] {
        let mut body = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"kernel\"; filename=\"k\"\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(format!("kernel of {p}").as_bytes());
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let r = http
            .post(format!("{}/v1/images/import?name=tool", s.base))
            .bearer_auth(&dev)
            .header("x-skyvisor-project", p)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await
            .expect("import");
        assert_eq!(
            r.status().as_u16(),
            201,
            "{p}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    for p in ["alpha", "beta"] {
        let (st, img) = call(&s.base, "GET", "/v1/images/tool", Some(&dev), Some(p), None).await;
        assert_eq!(st, 200, "{img}");
        assert_eq!(img["project"], p, "{img}");
        let file = img["files"][0]["file_name"]
            .as_str()
            .expect("file")
            .to_string();
        let got = http
            .get(format!("{}/v1/images/tool/files/{file}", s.base))
            .bearer_auth(&dev)
            .header("x-skyvisor-project", p)
            .send()
            .await
            .expect("download")
            .text()
            .await
            .expect("body");
        assert_eq!(got, format!("kernel of {p}"));
    }
    // A project's own image comes before a public one of its name.
    image(store.as_ref(), "img", "alpha", false).await;
    let (_, own) = call(
        &s.base,
        "GET",
        "/v1/images/img",
        Some(&dev),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(own["project"], "alpha", "{own}");
    let (_, public) = call(
        &s.base,
        "GET",
        "/v1/images/img",
        Some(&dev),
        Some("beta"),
        None,
    )
    .await;
    assert_eq!(public["project"], "default", "{public}");
}

/// Reads server-sent events from `resp` until `want` of them arrived or the
/// deadline passed; returns the events' JSON.
async fn read_sse(resp: reqwest::Response, want: usize, deadline: Duration) -> Vec<Value> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buffer = String::new();
    let mut out = Vec::new();
    let until = tokio::time::Instant::now() + deadline;
    while out.len() < want {
        let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await else {
            break;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            for line in message.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(serde_json::from_str(data.trim()).expect("event json"));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_who_did_what_in_order_per_project_and_stream_live() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "events").await;
    let admin = admin_token(&s);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    for (name, quota) in [("alpha", json!({"instances": 1})), ("beta", json!({}))] {
        let (st, body) = call(
            &s.base,
            "POST",
            "/v1/projects",
            Some(&admin),
            None,
            Some(json!({"name": name, "quota": quota})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let alice = identity(&s, &admin, "alice", json!({"alpha": "member"}), false).await;
    let bob = identity(&s, &admin, "bob", json!({"beta": "member"}), false).await;

    // A stream opened before anything happens gets each event as it comes.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let live = http
        .get(format!("{}/v1/events/stream", s.base))
        .bearer_auth(&alice)
        .header("x-skyvisor-project", "alpha")
        .send()
        .await
        .expect("stream");
    assert_eq!(live.status(), 200);

    let vm = json!({"name": "web", "image": "img", "instance_type": "nano", "start": false});
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances",
        Some(&alice),
        Some("alpha"),
        Some(vm.clone()),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances/web/start",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances/web/stop",
        Some(&alice),
        Some("alpha"),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    // Over the quota of one instance: refused, and recorded as refused.
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances",
        Some(&alice),
        Some("alpha"),
        Some(json!({"name": "two", "image": "img", "instance_type": "nano", "start": false})),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    let (st, body) = call(
        &s.base,
        "POST",
        "/v1/instances",
        Some(&bob),
        Some("beta"),
        Some(vm),
    )
    .await;
    assert_eq!(st, 201, "{body}");

    let streamed = read_sse(live, 4, Duration::from_secs(20)).await;
    let kinds: Vec<&str> = streamed.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "start-requested",
            "stop-requested",
            "quota-refused"
        ],
        "{streamed:?}"
    );

    // The record: in order, naming who asked, with the VM's size.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let (st, events) = call(
            &s.base,
            "GET",
            "/v1/events",
            Some(&alice),
            Some("alpha"),
            None,
        )
        .await;
        assert_eq!(st, 200, "{events}");
        let events = events.as_array().cloned().unwrap_or_default();
        if events.len() >= 4 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(events.len(), 4, "{events:?}");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert_eq!(events[0]["identity"], "alice");
    assert_eq!(events[0]["name"], "web");
    assert_eq!(events[0]["host"], "h1");
    assert_eq!(events[0]["size"]["instance_type"], "nano");
    assert_eq!(events[3]["result"], "refused");
    assert!(
        events[3]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("quota exceeded")
    );
    assert!(
        events.iter().all(|e| e["project"] == "alpha"),
        "only alpha's: {events:?}"
    );

    // Filters: one VM, after a seq; beta's member sees only beta's.
    let (_, only) = call(
        &s.base,
        "GET",
        &format!("/v1/events?instance=web&after={}", seqs[0]),
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    let only_kinds: Vec<&str> = only
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(only_kinds, ["start-requested", "stop-requested"], "{only}");
    let (_, theirs) = call(&s.base, "GET", "/v1/events", Some(&bob), Some("beta"), None).await;
    assert_eq!(theirs.as_array().map(Vec::len), Some(1), "{theirs}");
    assert_eq!(theirs[0]["identity"], "bob");

    // A reconnecting stream resumes after the last id it saw.
    let resumed = http
        .get(format!("{}/v1/events/stream", s.base))
        .bearer_auth(&alice)
        .header("x-skyvisor-project", "alpha")
        .header("last-event-id", seqs[1].to_string())
        .send()
        .await
        .expect("stream");
    let rest = read_sse(resumed, 2, Duration::from_secs(10)).await;
    let rest_seqs: Vec<u64> = rest.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(rest_seqs, seqs[2..].to_vec());

    // The cluster's record is for cluster admins; it holds every project's.
    let (st, body) = call(
        &s.base,
        "GET",
        "/v1/events?cluster=true",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 403, "{body}");
    let (st, all) = call(
        &s.base,
        "GET",
        "/v1/events?cluster=true&limit=1000",
        Some(&admin),
        None,
        None,
    )
    .await;
    assert_eq!(st, 200, "{all}");
    let all = all.as_array().cloned().unwrap_or_default();
    assert!(all.iter().any(|e| e["project"] == "beta"), "{all:?}");
    assert!(all.iter().any(|e| e["kind"] == "token-created"), "{all:?}");
    // Alice's token was used many times: one event, naming her.
    let used: Vec<&serde_json::Value> = all
        .iter()
        .filter(|e| e["kind"] == "token-used" && e["identity"] == "alice")
        .collect();
    assert_eq!(used.len(), 1, "{all:?}");

    // Bad input: a clear 400 naming the field.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("instance=Not_A_Name", "name"),
        ("bogus=1", "bogus"),
    ] {
        let (st, body) = call(
            &s.base,
            "GET",
            &format!("/v1/events?{query}"),
            Some(&alice),
            Some("alpha"),
            None,
        )
        .await;
        assert_eq!(st, 400, "{query}: {body}");
        assert!(body.to_string().contains(field), "{query}: {body}");
    }
}

/// Writes an instance event as an agent or server would (this test has no
/// agent: the lifecycle system test shows real ones being metered).
async fn record(store: &dyn Store, project: &str, kind: skyvisor_core::EventKind, at: &str) {
    let mut e = skyvisor_core::Event::new(
        kind,
        skyvisor_core::ObjectKind::Instance,
        Some(ProjectName::new(project).expect("p")),
        "old",
        "test",
    )
    .sized(
        Some("micro".into()),
        Resources {
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 2,
        },
    );
    e.at = at.parse().expect("time");
    store
        .put(&keys::event(&e), encode(&e))
        .await
        .expect("event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_invoices_come_from_the_record_and_a_closed_month_never_changes() {
    use skyvisor_core::EventKind::{Created, Started, Stopped};
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let s = server(store.clone(), "billing").await;
    let admin = admin_token(&s);
    for name in ["alpha", "beta"] {
        let (st, body) = call(
            &s.base,
            "POST",
            "/v1/projects",
            Some(&admin),
            None,
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }
    let alice = identity(&s, &admin, "alice", json!({"alpha": "member"}), false).await;
    // November 2026: created and started at midnight, stopped at 10:00, and
    // stopped for the rest of the month (720 hours in all).
    record(store.as_ref(), "alpha", Created, "2026-11-01T00:00:00Z").await;
    record(store.as_ref(), "alpha", Started, "2026-11-01T00:00:00Z").await;
    record(store.as_ref(), "alpha", Stopped, "2026-11-01T10:00:00Z").await;

    let (st, usage) = call(
        &s.base,
        "GET",
        "/v1/usage?from=2026-11-01&to=2026-12-01",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{usage}");
    let line = |meter: &str| {
        usage["lines"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|x| x["meter"] == meter && x["instance_type"] == "micro")
            })
            .map(|x| x["quantity"].clone())
    };
    assert_eq!(line("instance-running"), Some(json!("36000")), "{usage}");
    assert_eq!(line("instance-stopped"), Some(json!("2556000")), "{usage}");

    // The closed month's invoice: 10 h x 0.0100 + 710 h x 0.0010.
    let (st, nov) = call(
        &s.base,
        "GET",
        "/v1/invoices/2026-11",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{nov}");
    assert_eq!(nov["closed"], true);
    assert_eq!(nov["total"], "0.81", "{nov}");
    assert_eq!(nov["currency"], "USD");

    // New prices change open estimates, never a closed invoice.
    let (_, sheet) = call(&s.base, "GET", "/v1/price-sheet", Some(&alice), None, None).await;
    let doubled = sheet["toml"]
        .as_str()
        .expect("toml")
        .replace("micro = \"0.0100\"", "micro = \"0.0200\"");
    let (st, body) = call(
        &s.base,
        "PUT",
        "/v1/price-sheet",
        Some(&alice),
        None,
        Some(json!({"toml": doubled})),
    )
    .await;
    assert_eq!(st, 403, "a member does not set prices: {body}");
    let (st, body) = call(
        &s.base,
        "PUT",
        "/v1/price-sheet",
        Some(&admin),
        None,
        Some(json!({"toml": doubled})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (_, again) = call(
        &s.base,
        "GET",
        "/v1/invoices/2026-11",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(again, nov, "a closed invoice changed");
    let (st, dec) = call(
        &s.base,
        "GET",
        "/v1/invoices/2026-12",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{dec}");
    assert_eq!(dec["closed"], false, "{dec}");
    // Another project has used nothing.
    let (st, theirs) = call(
        &s.base,
        "GET",
        "/v1/usage?from=2026-11-01",
        Some(&admin),
        Some("beta"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{theirs}");
    assert_eq!(theirs["lines"], json!([]), "{theirs}");

    // Bad input: 400s that name what is wrong.
    for (path, says) in [
        ("/v1/invoices/2026-13", "YYYY-MM"),
        ("/v1/usage?from=yesterday", "RFC 3339"),
        ("/v1/usage?from=2026-12-02&to=2026-12-01", "empty"),
        ("/v1/usage?from=2099-01-01", "empty"),
    ] {
        let (st, body) = call(&s.base, "GET", path, Some(&alice), Some("alpha"), None).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert!(body.to_string().contains(says), "{path}: {body}");
    }
    // A month that has not begun has no invoice (yet).
    let (st, body) = call(
        &s.base,
        "GET",
        "/v1/invoices/2099-01",
        Some(&alice),
        Some("alpha"),
        None,
    )
    .await;
    assert_eq!(st, 404, "{body}");
    assert!(body.to_string().contains("has not begun"), "{body}");
    let broken = doubled.replace("nano = \"0.0050\"", "nano = \"-2\"");
    let (st, body) = call(
        &s.base,
        "PUT",
        "/v1/price-sheet",
        Some(&admin),
        None,
        Some(json!({"toml": broken})),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("negative"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_usage_and_invoices_survive_new_servers() {
    use skyvisor_core::EventKind::{Created, Started, Stopped};
    // The store outlives its servers, as etcd does: the second server
    // starts from nothing but the store.
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let first = server(store.clone(), "first").await;
    let admin = admin_token(&first);
    fake_host(store.as_ref(), "h1").await;
    image(store.as_ref(), "img", "default", true).await;
    let vm = json!({"name": "web", "image": "img", "instance_type": "nano", "start": false});
    let (st, body) = call(
        &first.base,
        "POST",
        "/v1/instances",
        Some(&admin),
        None,
        Some(vm),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    record(store.as_ref(), "default", Created, "2026-11-01T00:00:00Z").await;
    record(store.as_ref(), "default", Started, "2026-11-02T00:00:00Z").await;
    record(store.as_ref(), "default", Stopped, "2026-11-02T06:30:00Z").await;
    let read = |base: String, token: String| async move {
        let (_, events) = call(
            &base,
            "GET",
            "/v1/events?limit=1000",
            Some(&token),
            None,
            None,
        )
        .await;
        let (_, usage) = call(
            &base,
            "GET",
            "/v1/usage?from=2026-11-01&to=2026-12-01",
            Some(&token),
            None,
            None,
        )
        .await;
        let (_, invoice) = call(
            &base,
            "GET",
            "/v1/invoices/2026-11",
            Some(&token),
            None,
            None,
        )
        .await;
        (events, usage["lines"].clone(), invoice)
    };
    let before = read(first.base.clone(), admin.clone()).await;
    assert_eq!(before.0.as_array().map(Vec::len), Some(4), "{:?}", before.0);
    // 6.5 h running at 0.0100 (0.065, rounded half away from zero: 0.07)
    // and 713.5 h stopped at 0.0010 (0.7135: 0.71).
    assert_eq!(before.2["total"], "0.78", "{}", before.2);
    drop(first);
    let second = server(store.clone(), "second").await;
    let after = read(second.base.clone(), admin.clone()).await;
    assert_eq!(after, before, "a new server sees another record");
}

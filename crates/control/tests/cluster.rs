//! The control plane as a cluster: two servers on one store never
//! double-book a host, the per-host spec copies follow the specs, the API
//! answers 503 while etcd is down and recovers, servers of another version
//! or with a taken name are refused, leader election on etcd. On the
//! embedded store and on a real etcd (Debian's etcd-server).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use skyvisor_control::election::{CandidateConfig, Election};
use skyvisor_control::{ClusterError, ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::api::CreateInstanceRequest;
use skyvisor_core::cluster::{ClusterVersion, ServerRecord};
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::{
    Accel, Capacity, Host, HostName, Image, ImageName, InstanceSpec, Overcommit, Resources,
    ServerName, keys,
};
use skyvisor_store::testing::EtcdProcess;
use skyvisor_store::{
    EmbeddedStore, EtcdOptions, EtcdStore, Store, StoreExt, decode, encode, put_json,
};

/// Registers a live host with `vcpus` allocatable vCPUs, as an agent would.
async fn fake_host(store: &dyn Store, name: &str, vcpus: u32) {
    let host = Host {
        name: HostName::new(name).expect("name"),
        address: "127.0.0.1".into(),
        capacity: Capacity::new(
            Resources {
                vcpus,
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

fn config(dir: &std::path::Path, name: &str, weigher: Weigher) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join(name),
        cache_dir: dir.join("cache"),
        guest_binary: None,
        subnet: "10.99.0.0/16".parse().expect("subnet"),
        vni: 4213,
        private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
        audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
        event_retention: skyvisor_control::events::DEFAULT_RETENTION,
        mtu: 1450,
        weigher,
        cluster: ClusterSettings::single(
            ServerName::new(name).expect("name"),
            format!("http://{name}.invalid"),
        ),
        max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
        bootstrap_token_file: None,
    }
}

fn nano(name: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.into(),
        image: "img".into(),
        instance_type: Some("nano".into()),
        start: Some(false),
        ..Default::default()
    }
}

async fn etcd_store(etcd: &EtcdProcess, namespace: &str) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(&etcd.endpoints(), namespace, EtcdOptions::default())
            .await
            .expect("connect etcd"),
    )
}

/// Two servers with their own views create 30 VMs at once where 12 fit:
/// exactly 12 are created, no host gets more than it has, and no address
/// is handed out twice.
async fn no_double_booking(store: Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("tmp");
    for h in ["ha", "hb", "hc"] {
        fake_host(store.as_ref(), h, 4).await;
    }
    ready_image(store.as_ref()).await;
    let a = ControlPlane::start(store.clone(), config(dir.path(), "sa", Weigher::Spread))
        .await
        .expect("server a");
    let b = ControlPlane::start(store.clone(), config(dir.path(), "sb", Weigher::Pack))
        .await
        .expect("server b");
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let cp = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                cp.create_instance(
                    &skyvisor_core::auth::default_project(),
                    nano(&format!("vm-{i}")),
                )
                .await
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(e.code, "insufficient_capacity", "{}", e.message),
        }
    }
    assert_eq!(created, 12, "12 nano VMs fit on 3 hosts of 4 vCPUs");
    let (specs, _) = store
        .list_json::<InstanceSpec>(keys::INSTANCE_SPECS)
        .await
        .expect("list");
    let mut per_host: BTreeMap<String, u32> = BTreeMap::new();
    let mut ips = BTreeSet::new();
    for (s, _) in &specs {
        *per_host.entry(s.host.to_string()).or_default() += s.resources.vcpus;
        assert!(ips.insert(s.network.ip), "address {} twice", s.network.ip);
        // Each spec has its copy under its host.
        let kv = store
            .get(&keys::binding(&s.host, &s.instance_ref()))
            .await
            .expect("get")
            .expect("binding");
        assert_eq!(&decode::<InstanceSpec>(&kv).expect("decode"), s);
    }
    assert_eq!(specs.len(), 12);
    for (h, vcpus) in &per_host {
        assert!(*vcpus <= 4, "host {h} got {vcpus} vCPUs of 4");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_never_double_book_a_host_embedded() {
    no_double_booking(Arc::new(EmbeddedStore::in_memory().expect("store"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_never_double_book_a_host_etcd() {
    let etcd = EtcdProcess::start().await.expect("etcd");
    no_double_booking(etcd_store(&etcd, "/double-booking/").await).await;
}

#[tokio::test]
async fn per_host_spec_copies_follow_the_specs_and_are_repaired() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let dir = tempfile::tempdir().expect("tmp");
    fake_host(store.as_ref(), "ha", 4).await;
    ready_image(store.as_ref()).await;
    let cp = ControlPlane::start(store.clone(), config(dir.path(), "sa", Weigher::Spread))
        .await
        .expect("server");
    let vm = cp
        .create_instance(&skyvisor_core::auth::default_project(), nano("web"))
        .await
        .expect("create");
    let binding = keys::binding(&vm.spec.host, &vm.spec.instance_ref());
    let copy = |kv: Option<skyvisor_store::KeyValue>| decode::<InstanceSpec>(&kv.expect("copy"));
    // Every spec change is in the copy the agent watches.
    cp.start_instance(&skyvisor_core::auth::default_project(), "web")
        .await
        .expect("start");
    let spec: InstanceSpec = store
        .get_json(&keys::instance_spec(&vm.spec.instance_ref()))
        .await
        .expect("get")
        .expect("spec")
        .0;
    assert_eq!(
        copy(store.get(&binding).await.expect("get")).expect("decode"),
        spec
    );
    assert_eq!(spec.generation, 2);

    // Lost or stale copies (a writer that forgot them, data from before
    // copies existed) and orphans are repaired by the leader.
    store.delete(&binding).await.expect("delete");
    let orphan = keys::binding(&HostName::new("hb").expect("h"), &vm.spec.instance_ref());
    store.put(&orphan, encode(&spec)).await.expect("orphan");
    let repaired = skyvisor_control::cluster::repair_bindings(store.as_ref())
        .await
        .expect("repair");
    assert_eq!(repaired, 2);
    assert_eq!(
        copy(store.get(&binding).await.expect("get")).expect("decode"),
        spec
    );
    assert!(store.get(&orphan).await.expect("get").is_none());
    assert_eq!(
        skyvisor_control::cluster::repair_bindings(store.as_ref())
            .await
            .expect("repair"),
        0,
        "a second pass has nothing to do"
    );
}

#[tokio::test]
async fn servers_of_another_version_or_a_taken_name_are_refused() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let dir = tempfile::tempdir().expect("tmp");
    let old = ClusterVersion {
        version: "0.0.1".into(),
        set_at: Utc::now(),
    };
    store
        .put(keys::CLUSTER_VERSION, encode(&old))
        .await
        .expect("version");
    let lease = store
        .grant_lease(Duration::from_secs(30))
        .await
        .expect("lease");
    let live_old = ServerRecord {
        name: ServerName::new("old").expect("name"),
        url: "http://old.invalid".into(),
        version: "0.0.1".into(),
        started_at: Utc::now(),
    };
    store
        .txn(
            vec![],
            vec![skyvisor_store::Op::Put {
                key: keys::server(&live_old.name),
                value: encode(&live_old),
                lease: Some(lease),
            }],
        )
        .await
        .expect("old server");
    let cp = ControlPlane::start(store.clone(), config(dir.path(), "new", Weigher::Spread))
        .await
        .expect("control plane");
    match cp.join_cluster().await {
        Err(e @ ClusterError::VersionMismatch { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!(
                    "this server is version {} but the cluster runs version 0.0.1",
                    skyvisor_core::VERSION
                )) && text.contains("old 0.0.1"),
                "{text}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a server of another version joined"),
    }
    // Once no server of the old version is live, starting is an upgrade.
    store.revoke_lease(lease).await.expect("revoke");
    let membership = cp.join_cluster().await.expect("upgrade");
    let (now, _) = store
        .get_json::<ClusterVersion>(keys::CLUSTER_VERSION)
        .await
        .expect("get")
        .expect("version");
    assert_eq!(now.version, skyvisor_core::VERSION);

    // A second live server with the same name is refused.
    let twin = ControlPlane::start(store.clone(), config(dir.path(), "new", Weigher::Spread))
        .await
        .expect("control plane");
    match twin.join_cluster().await {
        Err(e @ ClusterError::NameTaken { .. }) => {
            assert!(
                e.to_string()
                    .contains("already used by a live server at http://new.invalid"),
                "{e}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("two live servers share a name"),
    }
    membership.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_election_on_etcd_hands_over_on_resign_and_on_crash() {
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store = etcd_store(&etcd, "/election/").await;
    let candidate = |name: &str| CandidateConfig {
        key: keys::LEADER.into(),
        name: ServerName::new(name).expect("name"),
        url: format!("http://{name}"),
        ttl: Duration::from_secs(2),
    };
    let wait = |e: &Election, what: &str| {
        let mut rx = e.subscribe();
        let what = what.to_string();
        async move {
            tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|l| l.is_leader))
                .await
                .unwrap_or_else(|_| panic!("{what} never led"))
                .expect("election running");
        }
    };
    let a = Election::start(store.clone(), candidate("a"));
    wait(&a, "a").await;
    let b = Election::start(store.clone(), candidate("b"));
    let c = Election::start(store.clone(), candidate("c"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.is_leader() && !c.is_leader());
    let started = Instant::now();
    a.resign().await;
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if b.is_leader() || c.is_leader() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(next.is_ok(), "nobody took over after a resign");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A crash of the leader: its lease runs out, then the other leads.
    let (leader, other) = if b.is_leader() { (b, c) } else { (c, b) };
    drop(leader);
    let started = Instant::now();
    wait(&other, "the survivor").await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_answers_503_at_once_while_etcd_is_down_and_recovers() {
    let mut etcd = EtcdProcess::start().await.expect("etcd");
    let store = etcd_store(&etcd, "/api-503/").await;
    let dir = tempfile::tempdir().expect("tmp");
    fake_host(store.as_ref(), "ha", 4).await;
    ready_image(store.as_ref()).await;
    let mut cfg = config(dir.path(), "sa", Weigher::Spread);
    cfg.cluster.etcd_endpoints = etcd.endpoints();
    cfg.cluster.etcd_namespace = "/api-503/".into();
    let cp = ControlPlane::start(store.clone(), cfg)
        .await
        .expect("server");
    let _membership = cp.join_cluster().await.expect("join");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, skyvisor_control::api::router(cp.clone())).into_future());
    let token = cp
        .directory
        .create_token(
            &skyvisor_core::IdentityName::new(skyvisor_core::auth::BOOTSTRAP_IDENTITY)
                .expect("name"),
            "test",
            None,
        )
        .await
        .expect("token")
        .bearer;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let get = |path: &str| {
        let url = format!("{base}{path}");
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("request");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    assert_eq!(get("/v1/instances").await.0, 200);
    let join = get(&format!(
        "/v1/cluster/join?version={}",
        skyvisor_core::VERSION
    ))
    .await;
    assert_eq!(join.0, 200, "{}", join.1);
    assert_eq!(join.1["etcd_endpoints"][0], etcd.endpoint());

    etcd.stop();
    let stopped = Instant::now();
    let body = loop {
        let (status, body) = get("/v1/instances").await;
        if status == 503 {
            break body;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "still {status} after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("state store is unreachable"), "{body}");
    assert!(message.contains(&etcd.endpoint()), "names etcd: {body}");
    // Writes too, without waiting for their own timeouts.
    let asked = Instant::now();
    let r = http
        .post(format!("{base}/v1/instances"))
        .json(&nano("during"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 503);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    let (status, info) = get("/v1/info").await;
    assert_eq!(
        (status, &info["store_ok"]),
        (200, &serde_json::json!(false))
    );
    assert_eq!(get("/healthz").await.0, 503);

    etcd.restart().await.expect("restart etcd");
    let restarted = Instant::now();
    while get("/v1/instances").await.0 != 200 {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "API did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = http
        .post(format!("{base}/v1/instances"))
        .json(&nano("after"))
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.status().as_u16(),
        201,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

/// An image record left `building` by `builder`.
async fn building_image(store: &dyn Store, name: &str, source: ImageSource, builder: &str) {
    let image = Image {
        project: skyvisor_core::auth::default_project(),
        public: true,
        name: ImageName::new(name).expect("name"),
        kind: ImageKind::KernelInitrd,
        description: "test".into(),
        files: vec![],
        cmdline: None,
        guest_service: true,
        ssh_user: None,
        cloud_init: false,
        process: None,
        source,
        state: ImageState::Building,
        message: Some("uploading".into()),
        builder: Some(ServerName::new(builder).expect("name")),
        created_at: Utc::now(),
    };
    store
        .put(&keys::image(&image.image_ref()), encode(&image))
        .await
        .expect("image");
}

async fn image(store: &dyn Store, name: &str) -> Image {
    store
        .get_json::<Image>(&keys::image(&skyvisor_core::ImageRef::new(
            skyvisor_core::auth::default_project(),
            ImageName::new(name).expect("name"),
        )))
        .await
        .expect("get")
        .expect("image")
        .0
}

#[tokio::test]
async fn builds_and_uploads_whose_server_died_are_resumed_or_failed_with_the_reason() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let dir = tempfile::tempdir().expect("tmp");
    let cp = ControlPlane::start(store.clone(), config(dir.path(), "sa", Weigher::Spread))
        .await
        .expect("server");
    let _membership = cp.join_cluster().await.expect("join");
    // This server's own upload is in progress as far as a running server
    // knows; only at its start is it known to be interrupted.
    building_image(store.as_ref(), "mine", ImageSource::Import, "sa").await;
    assert_eq!(
        cp.recover_interrupted_builds(false).await.expect("recover"),
        0
    );
    assert_eq!(
        image(store.as_ref(), "mine").await.state,
        ImageState::Building
    );
    assert_eq!(
        cp.recover_interrupted_builds(true).await.expect("recover"),
        1
    );
    assert_eq!(
        image(store.as_ref(), "mine").await.state,
        ImageState::Failed
    );

    // "gone" is no live server.
    building_image(store.as_ref(), "upload", ImageSource::Import, "gone").await;
    let recipe = ImageSource::Recipe {
        recipe: "debian-busybox".into(),
        packages: vec![],
    };
    building_image(store.as_ref(), "built", recipe, "gone").await;
    let settled = cp.recover_interrupted_builds(false).await.expect("recover");
    assert_eq!(settled, 2);
    let upload = image(store.as_ref(), "upload").await;
    assert_eq!(upload.state, ImageState::Failed);
    let why = upload.message.unwrap_or_default();
    assert!(
        why.contains("server gone") && why.contains("import it again"),
        "{why}"
    );
    let built = image(store.as_ref(), "built").await;
    assert_ne!(
        built.builder.as_ref().map(|b| b.as_str()),
        Some("gone"),
        "the build was not taken over"
    );
    // Taken over by this server: building here (its progress replaces the
    // "resumed" message at once), or already finished one way or the other.
    assert!(
        built.state != ImageState::Building
            || built.builder.as_ref().map(|b| b.as_str()) == Some("sa"),
        "the build was not taken over: {built:?}"
    );
    // Settled records are not touched again.
    assert_eq!(
        cp.recover_interrupted_builds(false).await.expect("recover"),
        0
    );
}

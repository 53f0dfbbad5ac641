//! Volumes through real agents (real replica stores and servers, real NBD
//! server, the store as membership store) with simulated VMs: two agents
//! in one process are two hosts. Creation by the controller, serving to a
//! VM, failover to the other host after the first one's lease expired
//! (the data written before is there), hot-plug and release of claims,
//! stopping frees the volume, deletion removes the replicas.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use skyvisor_agent::fake_hv::FakeHypervisor;
use skyvisor_agent::images::ImageCache;
use skyvisor_agent::{AgentConfig, AgentHandle};
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::{
    Accel, HostName, Image, ImageName, InstanceId, InstanceName, InstancePhase, InstanceSpec,
    InstanceStatus, InstanceVolume, MacAddr, MembershipView, Network, NetworkAttachment,
    Overcommit, PowerState, Resources, RestartPolicy, VolumeAttachment, VolumeId, VolumeName,
    VolumePhase, VolumeRuntime, VolumeSpec, VolumeStatus, keys,
};
use skyvisor_nbd::NbdClient;
use skyvisor_net::{FakeNetwork, HostNetwork};
use skyvisor_store::{EmbeddedStore, Store, StoreExt, encode};

struct Host {
    name: HostName,
    hv: FakeHypervisor,
    agent: Option<AgentHandle>,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

async fn start_host(store: &Arc<dyn Store>, name: &str) -> Host {
    let dir = tempfile::tempdir().expect("tmp");
    let hv = FakeHypervisor::new();
    let agent = skyvisor_agent::start(
        AgentConfig {
            host: HostName::new(name).expect("host"),
            data_dir: dir.path().to_path_buf(),
            address: "127.0.0.1".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            bridge: "br-test".into(),
            nat: false,
            overcommit: Overcommit::default(),
            reserved_memory_mib: 0,
            listen: ([127, 0, 0, 1], 0).into(),
            lease_ttl: Duration::from_secs(2),
            probe_guests: false,
            overlay: None,
            replica_listen: Some(([127, 0, 0, 1], 0).into()),
            fencing: None,
            guest_test_hooks: true,
            containers: None,
        },
        store.clone(),
        Arc::new(hv.clone()),
        Arc::new(FakeNetwork::new()) as Arc<dyn HostNetwork>,
        ImageCache::new(vec![], dir.path().join("cache"), None),
        (Accel::Tcg, "test".into()),
    )
    .await
    .expect("agent");
    Host {
        name: HostName::new(name).expect("host"),
        hv,
        agent: Some(agent),
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

async fn world() -> Arc<dyn Store> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let net = Network {
        name: "default".into(),
        project: skyvisor_core::auth::default_project(),
        subnet: "10.9.0.0/24".parse().expect("subnet"),
        vni: 1,
        mtu: 1500,
    };
    store
        .put(&keys::cluster_network(), encode(&net))
        .await
        .expect("network");
    let image = Image {
        project: skyvisor_core::auth::default_project(),
        public: true,
        name: ImageName::new("blank").expect("name"),
        kind: ImageKind::Disk,
        description: String::new(),
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
    store
}

async fn wait<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a volume spec as the API does.
async fn create_volume(store: &Arc<dyn Store>, name: &str, hosts: &[&HostName]) -> VolumeSpec {
    let spec = VolumeSpec {
        project: skyvisor_core::auth::default_project(),
        name: VolumeName::new(name).expect("name"),
        id: VolumeId::random(),
        size_bytes: 16 << 20,
        replicas: hosts.len() as u32,
        min_in_sync: 1,
        hosts: hosts.iter().map(|h| (*h).clone()).collect(),
        deleting: false,
        generation: 1,
        created_at: Utc::now(),
        owner: None,
    };
    store
        .put(&keys::volume_spec(&spec.volume_ref()), encode(&spec))
        .await
        .expect("spec");
    store
        .put(
            &keys::volume_status(&spec.volume_ref()),
            encode(&VolumeStatus::creating()),
        )
        .await
        .expect("status");
    wait("volume available", async || {
        store
            .get_json::<VolumeStatus>(&keys::volume_status(&spec.volume_ref()))
            .await
            .expect("get")
            .filter(|(s, _)| s.phase == VolumePhase::Available)
    })
    .await;
    spec
}

fn vm_spec(host: &HostName, volumes: Vec<InstanceVolume>) -> InstanceSpec {
    let id = InstanceId::random();
    InstanceSpec {
        security_groups: Vec::new(),
        labels: Default::default(),
        project: skyvisor_core::auth::default_project(),
        name: InstanceName::new("vm").expect("name"),
        id,
        kind: Default::default(),
        image: ImageName::new("blank").expect("image"),
        instance_type: None,
        resources: Resources {
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
        },
        power: PowerState::Running,
        restart_policy: RestartPolicy::Never,
        host: host.clone(),
        network: NetworkAttachment {
            vni: None,
            network: "default".into(),
            ip: "10.9.0.2".parse().expect("ip"),
            prefix_len: 24,
            gateway: "10.9.0.1".parse().expect("gw"),
            mac: MacAddr::derived_from(id.0.as_bytes()),
        },
        reboot_generation: 0,
        stop_timeout_secs: 5,
        force_stop: false,
        deleting: false,
        generation: 1,
        created_at: Utc::now(),
        restore: None,
        migration: None,
        clone_of: None,
        checkpoint_schedule: None,
        spread_group: None,
        group: None,
        accel: None,
        volumes,
        ha: Default::default(),
        ha_priority: 0,
        guest: Default::default(),
    }
}

fn claim(spec: &InstanceSpec) -> VolumeAttachment {
    VolumeAttachment {
        instance: spec.name.clone(),
        instance_id: spec.id,
        root: false,
        since: Utc::now(),
    }
}

async fn put_vm(store: &Arc<dyn Store>, spec: &InstanceSpec) {
    // As the API writes it: the spec and its copy under its host.
    store
        .txn(
            vec![],
            vec![
                skyvisor_store::put_json(keys::instance_spec(&spec.instance_ref()), spec),
                skyvisor_store::put_json(keys::binding(&spec.host, &spec.instance_ref()), spec),
            ],
        )
        .await
        .expect("spec");
}

async fn status(store: &Arc<dyn Store>, name: &InstanceName) -> Option<InstanceStatus> {
    store
        .get_json::<InstanceStatus>(&keys::instance_status(&skyvisor_core::InstanceRef::new(
            skyvisor_core::auth::default_project(),
            name.clone(),
        )))
        .await
        .expect("get")
        .map(|(s, _)| s)
}

async fn membership(store: &Arc<dyn Store>, v: &VolumeSpec) -> MembershipView {
    store
        .get_json::<MembershipView>(&keys::volume_membership(&v.id.data_id()))
        .await
        .expect("get")
        .expect("record")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fail_over_hot_plug_stop_and_delete() {
    let store = world().await;
    let mut h1 = start_host(&store, "h1").await;
    let h2 = start_host(&store, "h2").await;

    // The controller (h1, first live host) creates both replicas.
    let v = create_volume(&store, "data", &[&h1.name, &h2.name]).await;
    let m = membership(&store, &v).await;
    assert_eq!(m.replicas.len(), 2);
    assert!(m.replicas.iter().all(|r| r.in_sync), "{m:?}");
    assert_eq!(m.primary, None);
    for h in [&h1, &h2] {
        assert!(
            h.dir
                .join("replicas/volumes")
                .join(v.id.data_id())
                .join("data.img")
                .exists(),
            "replica on {}",
            h.name
        );
    }

    // A VM on h1 gets the volume over NBD; what it writes lands on both replicas.
    let iv = InstanceVolume {
        name: v.name.clone(),
        id: v.id,
        root: false,
    };
    let mut spec = vm_spec(&h1.name, vec![iv.clone()]);
    store
        .put(
            &keys::volume_attachment(&spec.volume_ref(&v.name)),
            encode(&claim(&spec)),
        )
        .await
        .expect("claim");
    put_vm(&store, &spec).await;
    wait("vm running on h1", async || {
        status(&store, &spec.name)
            .await
            .filter(|s| s.phase == InstancePhase::Running && !s.attached_volumes.is_empty())
    })
    .await;
    let launch = h1.hv.launches().pop().expect("launched");
    assert_eq!(launch.volumes.len(), 1);
    let lv = &launch.volumes[0];
    assert_eq!(lv.serial, "data");
    let nbd = NbdClient::connect_unix(&lv.socket, &lv.export)
        .await
        .expect("nbd");
    assert_eq!(nbd.size(), 16 << 20);
    nbd.write(1 << 20, &[0xab; 4096], true)
        .await
        .expect("write");
    nbd.flush().await.expect("flush");
    let rt = wait("runtime of the served volume", async || {
        store
            .get_json::<VolumeRuntime>(&keys::volume_runtime(&spec.volume_ref(&v.name)))
            .await
            .expect("get")
            .map(|(r, _)| r)
    })
    .await;
    assert_eq!(rt.host, h1.name);
    assert!(rt.writable);
    assert_eq!(membership(&store, &v).await.primary.as_deref(), Some("h1"));
    drop(nbd);

    // h1 dies (its lease expires); the VM is rebound to h2, as failover
    // will do. h2 takes the volume over only after h1's lease expired.
    h1.agent.take().expect("agent").crash().await;
    wait("h1's lease to expire", async || {
        store
            .get(&keys::host_alive(&h1.name))
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    spec.host = h2.name.clone();
    spec.generation += 1;
    put_vm(&store, &spec).await;
    wait("vm running on h2", async || {
        status(&store, &spec.name).await.filter(|s| {
            s.phase == InstancePhase::Running
                && s.host.as_ref() == Some(&h2.name)
                && !s.attached_volumes.is_empty()
        })
    })
    .await;
    let launch = h2.hv.launches().pop().expect("launched on h2");
    let lv = &launch.volumes[0];
    let nbd = NbdClient::connect_unix(&lv.socket, &lv.export)
        .await
        .expect("nbd on h2");
    assert_eq!(
        nbd.read(1 << 20, 4096).await.expect("read").as_ref(),
        &[0xab; 4096][..],
        "the acknowledged write survived the host"
    );
    let m2 = membership(&store, &v).await;
    assert_eq!(m2.primary.as_deref(), Some("h2"));
    assert!(m2.epoch > m.epoch);
    assert_eq!(
        m2.replicas
            .iter()
            .filter(|r| r.in_sync)
            .map(|r| r.node.as_str())
            .collect::<Vec<_>>(),
        vec!["h2"],
        "the unreachable replica left the in-sync set"
    );
    drop(nbd);

    // Hot-plug a second volume into the running VM, then unplug it: the
    // claim is released once the disk is out.
    let w = create_volume(&store, "extra", &[&h2.name]).await;
    let wv = InstanceVolume {
        name: w.name.clone(),
        id: w.id,
        root: false,
    };
    store
        .put(
            &keys::volume_attachment(&spec.volume_ref(&w.name)),
            encode(&claim(&spec)),
        )
        .await
        .expect("claim");
    spec.volumes.push(wv.clone());
    spec.generation += 1;
    put_vm(&store, &spec).await;
    let run_dir = launch.run_dir.clone();
    wait("extra plugged", async || {
        (h2.hv.disks(&run_dir).len() == 2).then_some(())
    })
    .await;
    spec.volumes.retain(|x| x.id != w.id);
    spec.generation += 1;
    put_vm(&store, &spec).await;
    wait("extra unplugged and released", async || {
        let gone = store
            .get(&keys::volume_attachment(&spec.volume_ref(&w.name)))
            .await
            .expect("get")
            .is_none();
        (gone && h2.hv.disks(&run_dir).len() == 1).then_some(())
    })
    .await;
    assert!(
        store
            .get(&keys::volume_attachment(&spec.volume_ref(&v.name)))
            .await
            .expect("get")
            .is_some(),
        "the volume still listed keeps its claim"
    );

    // Stopping the VM frees its volume for any host.
    spec.power = PowerState::Stopped;
    spec.generation += 1;
    put_vm(&store, &spec).await;
    wait("volume released on stop", async || {
        let m = membership(&store, &v).await;
        let rt = store
            .get(&keys::volume_runtime(&spec.volume_ref(&v.name)))
            .await
            .expect("get");
        (m.primary.is_none() && rt.is_none()).then_some(())
    })
    .await;

    // Deleting a volume removes its replicas and records.
    let mut doomed = w.clone();
    doomed.deleting = true;
    doomed.generation += 1;
    store
        .put(
            &keys::volume_spec(&spec.volume_ref(&w.name)),
            encode(&doomed),
        )
        .await
        .expect("delete");
    wait("volume deleted", async || {
        let spec_gone = store
            .get(&keys::volume_spec(&spec.volume_ref(&w.name)))
            .await
            .expect("get")
            .is_none();
        let files_gone = !h2
            .dir
            .join("replicas/volumes")
            .join(w.id.data_id())
            .exists();
        (spec_gone && files_gone).then_some(())
    })
    .await;
    assert!(
        store
            .get(&keys::volume_membership(&w.id.data_id()))
            .await
            .expect("get")
            .is_none()
    );
}

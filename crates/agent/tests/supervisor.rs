//! The supervisor's policies against the simulated hypervisor: start, stop,
//! restart by policy, failed launches that leave nothing behind, delete.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use skyvisor_agent::fake_hv::FakeHypervisor;
use skyvisor_agent::images::ImageCache;
use skyvisor_agent::{AgentConfig, AgentHandle};
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::{
    Accel, HostName, Image, ImageName, InstanceId, InstanceName, InstanceSpec, InstanceStatus,
    MacAddr, Network, NetworkAttachment, Overcommit, PowerState, Resources, RestartPolicy, keys,
};
use skyvisor_net::{FakeNetwork, HostNetwork};
use skyvisor_store::{EmbeddedStore, Store, StoreExt, encode};

struct World {
    store: Arc<dyn Store>,
    hv: FakeHypervisor,
    net: Arc<FakeNetwork>,
    _agent: AgentHandle,
    dir: tempfile::TempDir,
}

async fn world() -> World {
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
    let dir = tempfile::tempdir().expect("tmp");
    let hv = FakeHypervisor::new();
    let fake_net = Arc::new(FakeNetwork::new());
    let agent = skyvisor_agent::start(
        AgentConfig {
            host: HostName::new("h1").expect("host"),
            data_dir: dir.path().to_path_buf(),
            address: "127.0.0.1".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            bridge: "br-test".into(),
            nat: false,
            overcommit: Overcommit::default(),
            reserved_memory_mib: 0,
            listen: ([127, 0, 0, 1], 0).into(),
            lease_ttl: Duration::from_secs(10),
            probe_guests: false,
            overlay: None,
            replica_listen: None,
            fencing: None,
            guest_test_hooks: true,
            containers: None,
        },
        store.clone(),
        Arc::new(hv.clone()),
        fake_net.clone() as Arc<dyn HostNetwork>,
        ImageCache::new(vec![], dir.path().join("cache"), None),
        (Accel::Tcg, "test".into()),
    )
    .await
    .expect("agent");
    World {
        store,
        hv,
        net: fake_net,
        _agent: agent,
        dir,
    }
}

fn spec_ops(s: &InstanceSpec) -> Vec<skyvisor_store::Op> {
    vec![
        skyvisor_store::put_json(keys::instance_spec(&s.instance_ref()), s),
        skyvisor_store::put_json(keys::binding(&s.host, &s.instance_ref()), s),
    ]
}

fn spec(name: &str, policy: RestartPolicy) -> InstanceSpec {
    let id = InstanceId::random();
    InstanceSpec {
        kind: Default::default(),
        security_groups: Vec::new(),
        labels: Default::default(),
        project: skyvisor_core::auth::default_project(),
        name: InstanceName::new(name).expect("name"),
        id,
        image: ImageName::new("blank").expect("image"),
        instance_type: None,
        resources: Resources {
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
        },
        power: PowerState::Running,
        restart_policy: policy,
        host: HostName::new("h1").expect("host"),
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
        volumes: vec![],
        ha: Default::default(),
        ha_priority: 0,
        guest: Default::default(),
    }
}

impl World {
    async fn put(&self, s: &InstanceSpec) {
        // As the API writes it: the spec and its copy under the host.
        self.store.txn(vec![], spec_ops(s)).await.expect("put spec");
    }

    async fn status(&self, name: &str) -> Option<InstanceStatus> {
        let n = InstanceName::new(name).expect("name");
        self.store
            .get_json::<InstanceStatus>(&keys::instance_status(&skyvisor_core::InstanceRef::new(
                skyvisor_core::auth::default_project(),
                n,
            )))
            .await
            .expect("get")
            .map(|(s, _)| s)
    }

    async fn wait(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&InstanceStatus) -> bool,
    ) -> InstanceStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status(name).await
                && f(&s)
            {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn run_dir(&self, s: &InstanceSpec) -> std::path::PathBuf {
        self.dir
            .path()
            .join("vms")
            .join(s.id.0.simple().to_string())
    }
}

#[tokio::test]
async fn start_stop_start_keeps_the_disk() {
    let w = world().await;
    let mut s = spec("a", RestartPolicy::OnFailure);
    w.put(&s).await;
    let st = w
        .wait("a", "running", |s| {
            s.phase == skyvisor_core::InstancePhase::Running
        })
        .await;
    assert_eq!(st.boot_count, 1);
    assert!(w.run_dir(&s).join("root.qcow2").exists());
    assert_eq!(w.net.list_taps("svt").await.expect("taps").len(), 1);

    s.power = PowerState::Stopped;
    s.generation += 1;
    w.put(&s).await;
    let st = w
        .wait("a", "stopped", |s| {
            s.phase == skyvisor_core::InstancePhase::Stopped
        })
        .await;
    assert_eq!(
        st.last_exit.expect("exit").detail,
        "shut down gracefully (asked through the ACPI power button)"
    );
    assert_eq!(w.hv.running(), 0);

    s.power = PowerState::Running;
    s.generation += 1;
    w.put(&s).await;
    let st = w.wait("a", "running again", |s| s.boot_count == 2).await;
    assert_eq!(st.phase, skyvisor_core::InstancePhase::Running);
    assert_eq!(w.hv.launches().len(), 2);
}

#[tokio::test]
async fn crashes_follow_the_restart_policy() {
    let w = world().await;
    let always = spec("always", RestartPolicy::Always);
    let mut never = spec("never", RestartPolicy::Never);
    never.network.ip = "10.9.0.3".parse().expect("ip");
    w.put(&always).await;
    w.put(&never).await;
    w.wait("always", "running", |s| s.boot_count == 1).await;
    w.wait("never", "running", |s| s.boot_count == 1).await;

    assert!(w.hv.crash(&w.run_dir(&always)));
    let st = w.wait("always", "restarted", |s| s.boot_count == 2).await;
    assert_eq!(st.restart_count, 1);
    assert_eq!(
        st.last_exit.expect("exit").reason,
        skyvisor_core::ExitReason::Killed
    );

    assert!(w.hv.crash(&w.run_dir(&never)));
    let st = w
        .wait("never", "failed", |s| {
            s.phase == skyvisor_core::InstancePhase::Failed
        })
        .await;
    assert_eq!(st.restart_count, 0);
    // Held down: no relaunch without a new request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.status("never").await.expect("status").boot_count, 1);

    // A guest shutdown is not a failure for on-failure, but `always` restarts it.
    assert!(w.hv.guest_shutdown(&w.run_dir(&always)));
    let st = w
        .wait("always", "restarted after guest shutdown", |s| {
            s.boot_count == 3
        })
        .await;
    assert_eq!(
        st.last_exit.expect("exit").reason,
        skyvisor_core::ExitReason::GuestShutdown
    );
}

#[tokio::test]
async fn failed_launch_leaves_no_tap_or_disk() {
    let w = world().await;
    w.hv.fail_next_launch("qemu: could not open kernel file");
    let s = spec("bad", RestartPolicy::Always);
    w.put(&s).await;
    let st = w
        .wait("bad", "failed", |s| {
            s.phase == skyvisor_core::InstancePhase::Failed
        })
        .await;
    assert!(
        st.message
            .expect("message")
            .contains("could not open kernel file")
    );
    assert!(w.net.list_taps("svt").await.expect("taps").is_empty());
    assert!(!w.run_dir(&s).join("root.qcow2").exists());
}

#[tokio::test]
async fn delete_removes_records_files_and_tap() {
    let w = world().await;
    let mut s = spec("gone", RestartPolicy::OnFailure);
    w.put(&s).await;
    w.wait("gone", "running", |s| s.boot_count == 1).await;
    w.store
        .put(&keys::ipam_claim("default", s.network.ip), encode(&s.name))
        .await
        .expect("claim");
    s.deleting = true;
    s.generation += 1;
    w.put(&s).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while w
        .store
        .get(&keys::instance_spec(&s.instance_ref()))
        .await
        .expect("get")
        .is_some()
    {
        assert!(tokio::time::Instant::now() < deadline, "spec not deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(w.status("gone").await.is_none());
    assert!(
        w.store
            .get(&keys::binding(&s.host, &s.instance_ref()))
            .await
            .expect("get")
            .is_none(),
        "the host's copy of the spec was left"
    );
    assert!(
        w.store
            .get(&keys::ipam_claim("default", s.network.ip))
            .await
            .expect("get")
            .is_none()
    );
    assert!(!w.run_dir(&s).exists());
    assert!(w.net.list_taps("svt").await.expect("taps").is_empty());
    assert_eq!(w.hv.running(), 0);
}

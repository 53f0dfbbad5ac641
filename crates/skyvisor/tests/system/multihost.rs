//! A several-host cloud in this test process: one embedded store, one
//! control plane with its API, and N host agents with distinct names,
//! data directories and replica servers, all running real QEMU guests on
//! one shared bridge (standing in for the VXLAN overlay of a real cluster).
//!
//! A host can die (its agent stops without releasing its lease and its
//! QEMUs are killed) and come back on the same data directory and replica
//! address. [`MultiHost::rebind`] moves a stopped or dead host's VM to
//! another host by writing its spec, standing in for the failover
//! controller of the cluster work. Everything is torn down on drop.
//!
//! Porting to the cluster test bed: replace `start_host`/`kill_host` with
//! that bed's `skyvisor agent` processes in network namespaces; the tests
//! only use the CLI, the store and these two calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use skyvisor_agent::images::ImageCache;
use skyvisor_agent::qemu_hv::QemuHypervisor;
use skyvisor_agent::{AgentConfig, AgentHandle};
use skyvisor_control::images::{DEFAULT_IMAGE, DEFAULT_RECIPE};
use skyvisor_control::{ControlPlane, ServerConfig, Weigher};
use skyvisor_core::{Accel, HostName, InstanceName, InstanceSpec, Overcommit, keys};
use skyvisor_net::LinuxNetwork;
use skyvisor_store::{Compare, EmbeddedStore, Op, Store, StoreExt};

use crate::harness::{Slot, acquire_slot, cache_dir, free_port, wait_until};

struct HostSlot {
    name: HostName,
    data_dir: PathBuf,
    replica_listen: SocketAddr,
    agent: Option<AgentHandle>,
}

/// Several hosts, one control plane.
pub struct MultiHost {
    /// API base URL.
    pub url: String,
    /// The store (for checks and for rebinding VMs).
    pub store: Arc<dyn Store>,
    rt: tokio::runtime::Runtime,
    hosts: Vec<HostSlot>,
    data_dir: PathBuf,
    bridge: String,
    api_url: String,
    /// A cluster admin's API token.
    token: String,
    _cp: ControlPlane,
    _slot: Slot,
}

impl MultiHost {
    /// Starts the control plane and `n` hosts; builds (or reuses) the
    /// default image.
    pub fn start(n: usize) -> Self {
        let slot = acquire_slot();
        let data_dir = PathBuf::from(format!("/tmp/svt-{}", slot.n));
        let bridge = format!("svtb{}", slot.n);
        let subnet = format!("10.215.{}.0/24", slot.n);
        cleanup(&data_dir, &bridge);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let (cp, api_url) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("listen");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let cp = ControlPlane::start(
                store.clone(),
                ServerConfig {
                    data_dir: data_dir.clone(),
                    cache_dir: cache_dir(),
                    guest_binary: None,
                    subnet: subnet.parse().expect("subnet"),
                    vni: 4213,
                    private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
                    audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
                    event_retention: skyvisor_control::events::DEFAULT_RETENTION,
                    mtu: 1500,
                    weigher: Weigher::Spread,
                    cluster: skyvisor_control::cluster::ClusterSettings::single(
                        skyvisor_core::ServerName::new("server-1").expect("name"),
                        url.clone(),
                    ),
                    max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
                    bootstrap_token_file: None,
                },
            )
            .await
            .expect("control plane");
            let router = skyvisor_control::api::router(cp.clone());
            tokio::spawn(async move { axum::serve(listener, router).await });
            cp.ensure_image(DEFAULT_IMAGE, DEFAULT_RECIPE, |_| {})
                .await
                .expect("default image");
            (cp, url)
        });
        let token = rt
            .block_on(
                cp.directory.create_token(
                    &skyvisor_core::IdentityName::new(skyvisor_core::auth::BOOTSTRAP_IDENTITY)
                        .expect("name"),
                    "multihost test",
                    None,
                ),
            )
            .expect("token")
            .bearer;
        let mut mh = MultiHost {
            url: api_url.clone(),
            store,
            rt,
            hosts: vec![],
            data_dir: data_dir.clone(),
            bridge,
            api_url,
            token,
            _cp: cp,
            _slot: slot,
        };
        for i in 1..=n {
            mh.hosts.push(HostSlot {
                name: HostName::new(format!("host-{i}")).expect("name"),
                data_dir: data_dir.join("hosts").join(format!("h{i}")),
                replica_listen: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
                agent: None,
            });
            mh.start_host(i);
        }
        mh
    }

    /// The name of host `i` (1-based).
    pub fn host(&self, i: usize) -> String {
        self.hosts[i - 1].name.to_string()
    }

    /// The data directory of host `i`.
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.hosts[i - 1].data_dir.clone()
    }

    /// Starts (or restarts) host `i`'s agent on its data directory.
    pub fn start_host(&mut self, i: usize) {
        let h = &self.hosts[i - 1];
        let cfg = AgentConfig {
            overlay: None,
            host: h.name.clone(),
            data_dir: h.data_dir.clone(),
            address: "127.0.0.1".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            bridge: self.bridge.clone(),
            nat: false,
            overcommit: Overcommit::default(),
            reserved_memory_mib: 0,
            listen: ([127, 0, 0, 1], 0).into(),
            lease_ttl: Duration::from_secs(3),
            probe_guests: true,
            replica_listen: Some(h.replica_listen),
            fencing: None,
            guest_test_hooks: true,
            containers: None,
        };
        let images = ImageCache::new(
            vec![self.data_dir.join("images")],
            h.data_dir.join("image-cache"),
            Some(self.api_url.clone()),
        );
        images.set_token(self.token.clone());
        let store = self.store.clone();
        let agent = self.rt.block_on(async move {
            skyvisor_agent::start(
                cfg,
                store,
                Arc::new(QemuHypervisor {
                    binary: "qemu-system-x86_64".into(),
                }),
                Arc::new(LinuxNetwork::new()),
                images,
                (Accel::Tcg, "tests run under TCG".into()),
            )
            .await
            .expect("agent")
        });
        self.hosts[i - 1].agent = Some(agent);
    }

    /// Host `i` dies: its agent stops without releasing its lease, its
    /// QEMUs are killed; returns once its lease expired.
    pub fn kill_host(&mut self, i: usize) {
        if let Some(agent) = self.hosts[i - 1].agent.take() {
            self.rt.block_on(agent.crash());
        }
        kill_qemus(&self.hosts[i - 1].data_dir);
        let key = keys::host_alive(&self.hosts[i - 1].name);
        let store = self.store.clone();
        wait_until(
            "the dead host's lease to expire",
            Duration::from_secs(30),
            || {
                self.rt
                    .block_on(store.get(&key))
                    .expect("store")
                    .is_none()
                    .then_some(())
            },
        );
    }

    /// Binds VM `name` to host `i` (as failover will), keeping its power state.
    pub fn rebind(&self, name: &str, i: usize) {
        let key = keys::instance_spec(&skyvisor_core::InstanceRef::new(
            skyvisor_core::auth::default_project(),
            InstanceName::new(name).expect("name"),
        ));
        let host = self.hosts[i - 1].name.clone();
        let store = self.store.clone();
        self.rt.block_on(async move {
            let (mut spec, rev) = store
                .get_json::<InstanceSpec>(&key)
                .await
                .expect("get")
                .expect("instance");
            let old_host = std::mem::replace(&mut spec.host, host);
            spec.generation += 1;
            // Agents watch their bindings: the copy moves with the spec.
            let mut ops = skyvisor_control::instances::spec_ops(&spec);
            ops.push(Op::Delete(keys::binding(&old_host, &spec.instance_ref())));
            let out = store
                .txn(vec![Compare::ModRevision(key, rev)], ops)
                .await
                .expect("txn");
            assert!(out.succeeded, "rebind raced");
        });
    }

    /// Runs the CLI; asserts success; returns stdout.
    pub fn sv_ok(&self, args: &[&str]) -> String {
        let out = Command::new(crate::harness::skyvisor_bin())
            .args(args)
            .env("SKYVISOR_URL", &self.url)
            .env("SKYVISOR_TOKEN", &self.token)
            .output()
            .expect("run skyvisor");
        assert!(
            out.status.success(),
            "skyvisor {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json`.
    pub fn sv_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.sv_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {out}"))
    }
}

fn kill_qemus(data_dir: &std::path::Path) {
    if let Ok(dir) = std::fs::read_dir(data_dir.join("vms")) {
        for e in dir.flatten() {
            if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid"))
                && let Ok(pid) = p.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn cleanup(data_dir: &std::path::Path, bridge: &str) {
    if let Ok(hosts) = std::fs::read_dir(data_dir.join("hosts")) {
        for h in hosts.flatten() {
            kill_qemus(&h.path());
            if let Ok(vms) = std::fs::read_dir(h.path().join("vms")) {
                for e in vms.flatten() {
                    if let Ok(l) = std::fs::read_to_string(e.path().join("launch.json"))
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&l)
                        && let Some(tap) = v["tap"].as_str()
                    {
                        let _ = Command::new("ip").args(["link", "del", tap]).output();
                    }
                }
            }
        }
    }
    let _ = Command::new("ip").args(["link", "del", bridge]).output();
    let _ = Command::new("nft")
        .args(["delete", "table", "ip", &format!("skyvisor-{bridge}")])
        .output();
    let _ = std::fs::remove_dir_all(data_dir);
}

impl Drop for MultiHost {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(agent) = h.agent.take() {
                self.rt.block_on(agent.shutdown());
            }
        }
        cleanup(&self.data_dir, &self.bridge);
    }
}

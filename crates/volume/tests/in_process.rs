//! Replication logic with replica servers in this process (real TCP, real
//! files): dropping, dirty-region resync, minimum in-sync count, fencing,
//! snapshots and adding replicas.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use skyvisor_nbd::BlockDevice;
use skyvisor_volume::{
    DeviceOptions, IoKind, MembershipStore, MemoryMembershipStore, NodeId, ReplicaServer,
    ReplicaStore, ReplicaStoreOptions, ReplicaSyncState, ReplicatedDevice, VolumeId, VolumeSpec,
    create_volume,
};

const SIZE: u64 = 32 << 20;

struct Node {
    id: NodeId,
    dir: tempfile::TempDir,
    store: Arc<ReplicaStore>,
    server: Option<ReplicaServer>,
    addr: SocketAddr,
}

impl Node {
    async fn start(name: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = NodeId::new(name).expect("id");
        let store = ReplicaStore::open(dir.path(), id.clone(), ReplicaStoreOptions::default())
            .expect("store");
        let server = ReplicaServer::start(store.clone(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("server");
        let addr = server.local_addr();
        Node {
            id,
            dir,
            store,
            server: Some(server),
            addr,
        }
    }

    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    async fn restart(&mut self) {
        self.server = Some(
            ReplicaServer::start(self.store.clone(), self.addr)
                .await
                .expect("restart"),
        );
    }

    fn data(&self, v: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("volumes").join(v).join("data.img")).expect("data")
    }
}

fn opts() -> DeviceOptions {
    DeviceOptions {
        request_timeout: Duration::from_millis(1500),
        connect_timeout: Duration::from_millis(500),
        reconnect_interval: Duration::from_millis(100),
        checkpoint_interval: Duration::from_millis(200),
        membership_check_interval: Duration::from_millis(200),
        takeover: false,
        known_down: Vec::new(),
    }
}

async fn setup(n: usize, min: u32) -> (Vec<Node>, Arc<MemoryMembershipStore>, VolumeId) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let mut nodes = vec![];
    for i in 0..n {
        nodes.push(Node::start(&format!("n{}", i + 1)).await);
    }
    let store = Arc::new(MemoryMembershipStore::new());
    let v = VolumeId::new("vol").expect("id");
    let mut spec = VolumeSpec::new(
        v.clone(),
        SIZE,
        nodes
            .iter()
            .map(|x| (x.id.clone(), x.addr.to_string()))
            .collect(),
    );
    spec.min_in_sync = min;
    create_volume(
        &*store,
        &spec,
        Some(&nodes[0].store),
        Duration::from_secs(5),
    )
    .await
    .expect("create");
    (nodes, store, v)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn all_in_sync(dev: &ReplicatedDevice) -> bool {
    dev.status()
        .replicas
        .iter()
        .all(|r| r.state == ReplicaSyncState::InSync)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_and_resync_only_dirty_regions() {
    let (mut nodes, store, v) = setup(3, 1).await;
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    dev.write(0, Bytes::from(vec![1u8; 1 << 20]), false)
        .await
        .expect("write");
    assert_eq!(dev.read(0, 4096).await.expect("read"), vec![1u8; 4096]);

    // n3 goes away; writes go on and are acknowledged by n1 and n2.
    nodes[2].stop().await;
    for i in 0..4u64 {
        dev.write(
            (8 << 20) + i * (1 << 20),
            Bytes::from(vec![2u8; 1 << 20]),
            i == 3,
        )
        .await
        .expect("degraded write");
    }
    let st = dev.status();
    assert!(
        !matches!(st.replicas[2].state, ReplicaSyncState::InSync),
        "{st:?}"
    );
    let m = store.load(&v).await.expect("load").expect("record");
    assert_eq!(
        m.value.in_sync(),
        vec![nodes[0].id.clone(), nodes[1].id.clone()]
    );
    assert!(m.value.epoch > 2);

    nodes[2].restart().await;
    wait_for("n3 back in sync", || all_in_sync(&dev)).await;
    let resynced = dev.status().resynced_bytes;
    assert!(
        ((4 << 20)..=(6 << 20)).contains(&resynced),
        "resynced {resynced} bytes"
    );
    dev.flush().await.expect("flush");
    let d1 = nodes[0].data("vol");
    assert!(
        d1 == nodes[1].data("vol") && d1 == nodes[2].data("vol"),
        "replicas differ"
    );
    assert!(d1[(8 << 20)..(12 << 20)].iter().all(|b| *b == 2));

    // The primary counted what it served: 5 writes of 1 MiB, 1 read of
    // 4 KiB, 1 flush, and the epoch changes of n3 leaving and rejoining.
    let io = dev.io_stats();
    let kind = |k: IoKind| io.kinds.iter().find(|s| s.kind == k).expect("kind");
    let w = kind(IoKind::Write);
    assert_eq!((w.ops, w.bytes, w.errors), (5, 5 << 20, 0), "{io:?}");
    assert_eq!(w.buckets.iter().sum::<u64>(), 5);
    assert!(w.seconds > 0.0);
    let r = kind(IoKind::Read);
    assert_eq!((r.ops, r.bytes), (1, 4096));
    assert_eq!(kind(IoKind::Flush).ops, 1);
    assert!(io.epoch_changes >= 2, "{io:?}");
    dev.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_minimum_writes_fail_and_reads_go_on() {
    let (mut nodes, store, v) = setup(2, 2).await;
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    dev.write(0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");
    nodes[1].stop().await;
    let e = dev
        .write(4096, Bytes::from(vec![8u8; 4096]), false)
        .await
        .expect_err("must fail below minimum");
    assert_eq!(e.nbd_errno(), skyvisor_nbd::proto::errno::EIO);
    assert!(!dev.status().writable);
    assert_eq!(dev.read(0, 4096).await.expect("read"), vec![7u8; 4096]);
    nodes[1].restart().await;
    wait_for("n2 back", || all_in_sync(&dev)).await;
    dev.write(4096, Bytes::from(vec![9u8; 4096]), true)
        .await
        .expect("write after recovery");
    dev.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_fences_the_old_primary() {
    let (nodes, store, v) = setup(3, 1).await;
    let old = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    old.write(0, Bytes::from(vec![3u8; 4096]), false)
        .await
        .expect("write");
    // Without takeover a second primary is refused.
    assert!(
        ReplicatedDevice::open(
            v.clone(),
            nodes[1].id.clone(),
            store.clone(),
            Some(nodes[1].store.clone()),
            opts()
        )
        .await
        .is_err()
    );
    let new = ReplicatedDevice::open(
        v.clone(),
        nodes[1].id.clone(),
        store.clone(),
        Some(nodes[1].store.clone()),
        DeviceOptions {
            takeover: true,
            ..opts()
        },
    )
    .await
    .expect("takeover");
    assert_eq!(new.read(0, 4096).await.expect("read"), vec![3u8; 4096]);
    // The old primary can no longer write, on any replica.
    assert!(
        old.write(0, Bytes::from(vec![4u8; 4096]), false)
            .await
            .is_err()
    );
    assert!(old.status().fenced.is_some());
    new.write(4096, Bytes::from(vec![5u8; 4096]), false)
        .await
        .expect("new primary writes");
    assert_eq!(new.read(0, 4096).await.expect("read"), vec![3u8; 4096]);
    new.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_names_the_next_primary_which_opens_without_a_takeover() {
    let (nodes, store, v) = setup(2, 1).await;
    let old = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    old.write(0, Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write");
    let epoch = old.status().epoch;
    old.close_to(Some(&nodes[1].id)).await.expect("hand over");
    let m = store.load(&v).await.expect("load").expect("record");
    assert_eq!(m.value.primary.as_ref(), Some(&nodes[1].id));
    // Nobody else may open it without a takeover: it is n2's now.
    assert!(
        ReplicatedDevice::open(
            v.clone(),
            nodes[0].id.clone(),
            store.clone(),
            Some(nodes[0].store.clone()),
            opts()
        )
        .await
        .is_err()
    );
    // n2 opens it as it is, with a newer epoch, and reads what n1 wrote.
    let new = ReplicatedDevice::open(
        v.clone(),
        nodes[1].id.clone(),
        store.clone(),
        Some(nodes[1].store.clone()),
        opts(),
    )
    .await
    .expect("open after the handover");
    assert!(new.status().epoch > epoch);
    assert_eq!(new.read(0, 4096).await.expect("read"), vec![7u8; 4096]);
    // The old device is closed for good.
    assert!(
        old.write(0, Bytes::from(vec![8u8; 4096]), false)
            .await
            .is_err()
    );
    new.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_replica_is_never_promoted() {
    let (mut nodes, store, v) = setup(2, 1).await;
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    nodes[1].stop().await;
    dev.write(0, Bytes::from(vec![6u8; 4096]), false)
        .await
        .expect("write without n2");
    // The primary host dies (its replica with it): n2 is stale, so nobody may serve.
    drop(dev);
    nodes[0].stop().await;
    nodes[1].restart().await;
    let r = ReplicatedDevice::open(
        v.clone(),
        nodes[1].id.clone(),
        store.clone(),
        Some(nodes[1].store.clone()),
        DeviceOptions {
            takeover: true,
            ..opts()
        },
    )
    .await;
    assert!(
        matches!(r, Err(skyvisor_volume::VolumeError::NoInSyncReplica { .. })),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_add_replica() {
    let (nodes, store, v) = setup(2, 1).await;
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    dev.write(1 << 20, Bytes::from(vec![0x42u8; 65536]), false)
        .await
        .expect("write");
    let holders = dev.snapshot("snap1").await.expect("snapshot");
    assert_eq!(holders.len(), 2);
    dev.write(1 << 20, Bytes::from(vec![0x43u8; 65536]), false)
        .await
        .expect("write after");
    for n in &nodes {
        let p = n.store.get(&v).expect("replica").snapshot_path("snap1");
        let s = std::fs::read(p).expect("snapshot file");
        assert!(s[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0x42));
    }
    let third = Node::start("n3").await;
    dev.add_replica(&third.id, &third.addr.to_string())
        .await
        .expect("add");
    wait_for("n3 in sync", || all_in_sync(&dev)).await;
    assert_eq!(third.data("vol"), nodes[0].data("vol"));
    dev.remove_replica(&nodes[1].id).await.expect("remove");
    assert!(
        nodes[1].store.get(&v).is_none(),
        "removed replica is deleted"
    );
    assert_eq!(dev.status().replicas.len(), 2);
    dev.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_keeps_data_and_refuses_while_served() {
    let (nodes, store, v) = setup(2, 1).await;
    let open = || {
        ReplicatedDevice::open(
            v.clone(),
            nodes[0].id.clone(),
            store.clone(),
            Some(nodes[0].store.clone()),
            opts(),
        )
    };
    let dev = open().await.expect("open");
    dev.write(SIZE - 4096, Bytes::from(vec![9u8; 4096]), true)
        .await
        .expect("write");
    // While n1 serves it, nobody else may grow it.
    let e = skyvisor_volume::grow_volume(
        &*store,
        &v,
        &nodes[1].id,
        2 * SIZE,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect_err("served elsewhere");
    assert!(
        matches!(e, skyvisor_volume::VolumeError::PrimaryElsewhere { .. }),
        "{e}"
    );
    dev.close().await.expect("close");

    let grown = skyvisor_volume::grow_volume(
        &*store,
        &v,
        &nodes[1].id,
        2 * SIZE,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("grow");
    assert_eq!(grown.size, 2 * SIZE);
    assert_eq!(grown.primary, None, "the grower's claim is released");
    for n in &nodes {
        assert_eq!(n.data("vol").len() as u64, 2 * SIZE);
    }
    // Shrinking is refused; growing to the same size is a no-op.
    assert!(
        skyvisor_volume::grow_volume(
            &*store,
            &v,
            &nodes[1].id,
            SIZE,
            None,
            Duration::from_secs(5)
        )
        .await
        .is_err()
    );
    let dev = open().await.expect("reopen");
    assert_eq!(skyvisor_nbd::BlockDevice::size(&*dev), 2 * SIZE);
    assert_eq!(
        dev.read(SIZE - 4096, 4096).await.expect("read"),
        vec![9u8; 4096]
    );
    assert_eq!(dev.read(SIZE, 4096).await.expect("read"), vec![0u8; 4096]);
    dev.write(2 * SIZE - 4096, Bytes::from(vec![3u8; 4096]), true)
        .await
        .expect("write in the new space");
    assert!(all_in_sync(&dev));
    let m = dev.membership();
    dev.close().await.expect("close");

    // Deleting removes every replica's files.
    let failed =
        skyvisor_volume::delete_replicas(&m, Some(&nodes[0].store), Duration::from_secs(5)).await;
    assert!(failed.is_empty(), "{failed:?}");
    for n in &nodes {
        assert!(!n.dir.path().join("volumes").join("vol").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_does_not_contact_replicas_known_down() {
    let (mut nodes, store, v) = setup(2, 1).await;
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].id.clone(),
        store.clone(),
        Some(nodes[0].store.clone()),
        opts(),
    )
    .await
    .expect("open");
    dev.write(0, Bytes::from(vec![9u8; 4096]), false)
        .await
        .expect("write");
    // n1's host dies: in its place, something that accepts connections and
    // never answers (what a hung host looks like).
    drop(dev);
    nodes[0].stop().await;
    let silent = tokio::net::TcpListener::bind(nodes[0].addr)
        .await
        .expect("bind");
    let holder = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    // Timeouts so long that waiting for n1 would never end within the
    // test's deadline: the open must not wait for it at all.
    let patient = DeviceOptions {
        request_timeout: Duration::from_secs(600),
        connect_timeout: Duration::from_secs(600),
        ..opts()
    };
    let open = ReplicatedDevice::open(
        v.clone(),
        nodes[1].id.clone(),
        store.clone(),
        Some(nodes[1].store.clone()),
        DeviceOptions {
            takeover: true,
            known_down: vec![nodes[0].id.clone()],
            ..patient
        },
    );
    let dev = tokio::time::timeout(Duration::from_secs(60), open)
        .await
        .expect("the takeover waited for a replica known to be down")
        .expect("takeover");
    assert_eq!(dev.membership().in_sync(), vec![nodes[1].id.clone()]);
    assert_eq!(
        dev.read(0, 4096).await.expect("read").as_ref(),
        &[9u8; 4096][..]
    );
    holder.abort();
}

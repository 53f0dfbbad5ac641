//! Replicated volumes with every host a separate process, served over NBD to
//! qemu-io and qemu-img: SIGKILLed replicas, dirty-region resync, failover
//! with fencing, and a full disk under one replica.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

async fn hosts(root: &std::path::Path, n: usize, timeout_ms: u64) -> Vec<Host> {
    let mut v = vec![];
    for i in 1..=n {
        v.push(Host::start(root, &format!("n{i}"), timeout_ms).await);
    }
    v
}

async fn create_and_open(h: &[Host], size: u64, min: u32) -> String {
    let replicas: Vec<String> = h.iter().map(|x| format!("{}={}", x.node, x.addr)).collect();
    h[0].control(&format!("create vol {size} {min} {}", replicas.join(" ")))
        .await
        .expect("create");
    let port = free_port();
    let v = h[0]
        .control(&format!("open vol 127.0.0.1:{port} 0"))
        .await
        .expect("open");
    format!("nbd://{}/vol", v["nbd"].as_str().expect("nbd addr"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_kill_one_resync_dirty_only() {
    init_tracing();
    let root = tempfile::tempdir().expect("tempdir");
    let mut h = hosts(root.path(), 3, 1000).await;
    let url = create_and_open(&h, 64 * MIB, 1).await;
    run_ok(
        "qemu-io",
        &["-f", "raw", &url, "-c", "write -P 0xaa 0 4M", "-c", "flush"],
    )
    .await;

    h[2].sigkill();
    // Writes go on and are acknowledged while n3 is dead.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0xbb 16M 8M",
            "-c",
            "write -f -P 0xcc 32M 1M",
            "-c",
            "flush",
        ],
    )
    .await;
    let st = wait_status(&h[0], "vol", "n3 out of sync", 10, |s| {
        states(s).iter().any(|(n, st)| n == "n3" && st != "in_sync")
    })
    .await;
    assert!(st["writable"].as_bool().expect("writable"), "{st}");

    h[2].restart().await;
    let st = wait_status(&h[0], "vol", "all in sync", 60, all_in_sync).await;
    let resynced = st["resynced_bytes"].as_u64().expect("bytes");
    assert!(
        (9 * MIB..=11 * MIB).contains(&resynced),
        "resynced {resynced} bytes for 9 MiB written while down"
    );

    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "read -P 0xaa 0 4M",
            "-c",
            "read -P 0xbb 16M 8M",
            "-c",
            "read -P 0xcc 32M 1M",
            "-c",
            "flush",
        ],
    )
    .await;
    let (a, b, c) = (
        file_bytes(&h[0].data_file("vol")),
        file_bytes(&h[1].data_file("vol")),
        file_bytes(&h[2].data_file("vol")),
    );
    assert!(a == b && a == c, "replicas are not byte-identical");
    assert!(
        c[(16 * MIB) as usize..(24 * MIB) as usize]
            .iter()
            .all(|x| *x == 0xbb)
    );
    // qemu-img agrees the replica files are identical.
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            h[0].data_file("vol").to_str().expect("utf8"),
            h[2].data_file("vol").to_str().expect("utf8"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_qemu_img_convert_compare_and_stop_cont() {
    init_tracing();
    let root = tempfile::tempdir().expect("tempdir");
    let h = hosts(root.path(), 2, 800).await;
    let url = create_and_open(&h, 32 * MIB, 1).await;
    let src = root.path().join("src.img");
    let data: Vec<u8> = (0..32 * MIB as usize)
        .map(|i| {
            if (i >> 20) % 2 == 0 {
                (i >> 12) as u8
            } else {
                0
            }
        })
        .collect();
    std::fs::write(&src, &data).expect("src");
    let src_s = src.to_str().expect("utf8");
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &url],
    )
    .await;
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &url],
    )
    .await;

    // A frozen replica (SIGSTOP) is dropped after the timeout; writes go on.
    h[1].sigstop();
    run_ok("qemu-io", &["-f", "raw", &url, "-c", "write -P 0x77 0 2M"]).await;
    wait_status(&h[0], "vol", "n2 dropped", 10, |s| {
        states(s).iter().any(|(n, st)| n == "n2" && st != "in_sync")
    })
    .await;
    h[1].sigcont();
    wait_status(&h[0], "vol", "n2 back", 60, all_in_sync).await;
    run_ok("qemu-io", &["-f", "raw", &url, "-c", "flush"]).await;
    let a = file_bytes(&h[0].data_file("vol"));
    assert!(
        a == file_bytes(&h[1].data_file("vol")),
        "replicas differ after resync"
    );
    assert!(a[..(2 * MIB) as usize].iter().all(|x| *x == 0x77));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failover_fences_the_old_primary() {
    init_tracing();
    let root = tempfile::tempdir().expect("tempdir");
    let h = hosts(root.path(), 3, 1000).await;
    let url = create_and_open(&h, 32 * MIB, 1).await;
    let addr = url
        .trim_start_matches("nbd://")
        .trim_end_matches("/vol")
        .to_owned();
    let client = skyvisor_nbd::NbdClient::connect_tcp(addr.as_str(), "vol")
        .await
        .expect("connect");
    let mut acked = vec![];
    for i in 0..200u64 {
        let block = vec![(i % 251) as u8 + 1; 4096];
        client.write(i * 4096, &block, false).await.expect("write");
        acked.push(i);
    }
    // The primary host freezes; another host takes over.
    h[0].sigstop();
    let v = h[1]
        .control(&format!("open vol 127.0.0.1:{} 1", free_port()))
        .await
        .expect("takeover");
    let new_addr = v["nbd"].as_str().expect("addr").to_owned();
    let c2 = skyvisor_nbd::NbdClient::connect_tcp(new_addr.as_str(), "vol")
        .await
        .expect("connect new");
    for i in &acked {
        assert_eq!(
            c2.read(i * 4096, 4096).await.expect("read")[..],
            vec![(i % 251) as u8 + 1; 4096][..],
            "acknowledged write {i} lost"
        );
    }
    c2.write(0, &[0xeeu8; 4096], true)
        .await
        .expect("new primary writes");
    // The old primary wakes up: its writes must fail, it is fenced.
    h[0].sigcont();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        client.write(4096, &[0xddu8; 4096], false),
    )
    .await
    .expect("answer");
    assert!(r.is_err(), "the old primary must not acknowledge writes");
    let st = h[0].status("vol").await;
    assert!(st["fenced"].is_string(), "{st}");
    assert_eq!(
        c2.read(4096, 4096).await.expect("read")[..],
        vec![2u8; 4096][..]
    );
    assert_eq!(
        c2.read(0, 4096).await.expect("read")[..],
        [0xeeu8; 4096][..]
    );
    let st = h[1].status("vol").await;
    assert_eq!(st["primary"], "n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_only_that_replica() {
    init_tracing();
    let root = tempfile::tempdir().expect("tempdir");
    let small = root.path().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6M", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(mount.success(), "need root to mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(small.clone());
    let h1 = Host::start(root.path(), "n1", 1000).await;
    let h2 = Host::start(root.path(), "n2", 1000).await;
    let h3 = Host::start_with_data_dir(root.path(), "n3", 1000, small.join("data")).await;
    let h = [h1, h2, h3];
    let url = create_and_open(&h, 64 * MIB, 2).await;
    // 16 MiB do not fit in n3's 6 MiB: n3 fails, the volume does not.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x5c 0 16M",
            "-c",
            "flush",
            "-c",
            "read -P 0x5c 0 16M",
        ],
    )
    .await;
    let st = h[0].status("vol").await;
    assert!(st["writable"].as_bool().expect("writable"));
    let s = states(&st);
    assert!(s.iter().any(|(n, st)| n == "n3" && st != "in_sync"), "{st}");
    assert!(
        s.iter().filter(|(_, st)| st == "in_sync").count() == 2,
        "{st}"
    );
    drop(h);
}

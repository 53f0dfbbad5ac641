//! The server against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

mod common;

use common::{SIZE, TestServer, run, run_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_zero_discard_fua() {
    let t = TestServer::start().await;
    let url = t.url("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "read -P 0xcd 1M 64k",
            "-c",
            "write -z 0 512k",
            "-c",
            "read -P 0 0 512k",
            "-c",
            "read -P 0xab 512k 512k",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -P 0x11 63M 1M",
            "-c",
            "aio_write -P 0x22 4M 64k",
            "-c",
            "aio_write -P 0x33 5M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x22 4M 64k",
            "-c",
            "read -P 0x33 5M 64k",
        ],
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // What the clients wrote is in the file, at the right places.
    let data = std::fs::read(t.path("disk.img")).expect("read image");
    assert_eq!(data.len() as u64, SIZE);
    assert!(data[..512 << 10].iter().all(|b| *b == 0));
    assert!(data[512 << 10..1 << 20].iter().all(|b| *b == 0xab));
    assert!(
        data[1 << 20..(1 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0xcd)
    );
    assert!(data[63 << 20..].iter().all(|b| *b == 0x11));
    assert!(
        data[4 << 20..(4 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0x22)
    );

    // Out of range through qemu-io fails cleanly and the server lives on.
    let out = run("qemu-io", &["-f", "raw", &url, "-c", "read 64M 4k"]).await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
    run_ok("qemu-io", &["-f", "raw", &url, "-c", "read -P 0x11 63M 1M"]).await;
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_compare() {
    let t = TestServer::start().await;
    let url = t.url("disk");
    let info = run_ok("qemu-img", &["info", "-f", "raw", "--output=json", &url]).await;
    assert!(
        info.contains(&format!("\"virtual-size\": {SIZE}")),
        "{info}"
    );

    // A source image with data in a few places and holes elsewhere.
    let src = t.path("src.img");
    let mut data = vec![0u8; SIZE as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 0 {
            chunk.fill(i as u8 + 1);
        }
    }
    std::fs::write(&src, &data).expect("write src");
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
    let on_disk = std::fs::read(t.path("disk.img")).expect("read image");
    assert!(on_disk == data, "converted image differs from the source");

    // And back out again.
    let back = t.path("back.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            back.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(std::fs::read(&back).expect("read back") == data);

    // A difference is detected (the server does not just say yes).
    std::fs::write(&src, vec![9u8; SIZE as usize]).expect("rewrite src");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &url],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must report a difference"
    );
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_and_details() {
    let t = TestServer::start().await;
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", t.addr)]).await;
    assert!(
        list.contains("export=\"disk\"") || list.contains("disk"),
        "{list}"
    );
    let out = run_ok("nbdinfo", &[&t.url("disk")]).await;
    assert!(out.contains(&format!("export-size: {SIZE}")), "{out}");
    assert!(out.contains("block_size_minimum: 512"), "{out}");
    assert!(out.contains("block_size_preferred: 4096"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");
    assert!(out.contains("can_flush: true"), "{out}");
    assert!(out.contains("can_fua: true"), "{out}");
    assert!(out.contains("can_trim: true"), "{out}");
    assert!(out.contains("can_zero: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("is_read_only: false"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("description: test disk"), "{out}");

    // An unknown export is reported as such.
    let bad = run("nbdinfo", &[&t.url("nope")]).await;
    assert!(!bad.status.success());
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out_and_map() {
    let t = TestServer::start().await;
    let src = t.path("src.img");
    let data: Vec<u8> = (0..SIZE as usize / 2)
        .map(|i| (i / 4096 % 251) as u8)
        .collect();
    let mut full = data.clone();
    full.resize(SIZE as usize, 0);
    std::fs::write(&src, &full).expect("write src");
    run_ok("nbdcopy", &[src.to_str().expect("utf8"), &t.url("disk")]).await;
    let out = t.path("out.img");
    run_ok("nbdcopy", &[&t.url("disk"), out.to_str().expect("utf8")]).await;
    assert!(std::fs::read(&out).expect("read out") == full);
    // The allocation map of a sparse tail is reported as a hole.
    let map = run_ok("nbdinfo", &["--map", &t.url("disk")]).await;
    assert!(map.contains("data"), "{map}");
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_export_changes_at_run_time() {
    let t = TestServer::start().await;
    let sock = t.path("nbd.sock");
    t.server.listen_unix(&sock).await.expect("listen unix");
    let url = format!("nbd+unix:///disk?socket={}", sock.display());
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    )
    .await;

    // A second export added while running, then removed.
    let dev2 = skyvisor_nbd::MemoryDevice::new(1 << 20);
    t.server
        .add_export(skyvisor_nbd::Export::new(
            "second",
            std::sync::Arc::new(dev2),
        ))
        .expect("add");
    assert!(
        t.server
            .add_export(skyvisor_nbd::Export::new(
                "second",
                std::sync::Arc::new(skyvisor_nbd::MemoryDevice::new(512))
            ))
            .is_err()
    );
    let out = run_ok("nbdinfo", &[&t.url("second")]).await;
    assert!(out.contains("export-size: 1048576"), "{out}");
    // A client connected to the export is disconnected when it is removed.
    let client = skyvisor_nbd::NbdClient::connect_tcp(t.addr, "second")
        .await
        .expect("connect");
    client.write(0, &[1u8; 4096], false).await.expect("write");
    assert!(t.server.remove_export("second").await);
    assert!(
        client.read(0, 4096).await.is_err(),
        "connection must be closed after removal"
    );
    let bad = run("nbdinfo", &[&t.url("second")]).await;
    assert!(!bad.status.success(), "removed export must be gone");
    assert!(!t.server.remove_export("second").await);
    t.server.shutdown().await;
    // After shutdown nobody can connect.
    assert!(
        skyvisor_nbd::NbdClient::connect_tcp(t.addr, "disk")
            .await
            .is_err()
    );
}

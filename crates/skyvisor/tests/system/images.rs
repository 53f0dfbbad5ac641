//! Images: import a kernel+initrd and a disk, boot them; refuse deleting
//! an image in use; a full data disk refuses new VMs before creating anything.

use std::time::Duration;

use crate::harness::{Cloud, CloudOptions, guest_json, wait_until};

#[test]
fn imported_kernel_and_disk_images_boot_and_console_shows_output() {
    let cloud = Cloud::start();
    // Import the built image's kernel and initrd as a new image.
    let built = cloud.sv_json(&["image", "show", "debian-busybox"]);
    let dir = cloud.data_dir.join("images/default/debian-busybox");
    let file = |role: &str| {
        let f = built["files"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["role"] == role))
            .unwrap_or_else(|| panic!("no {role} in {built}"));
        dir.join(f["file_name"].as_str().expect("file name"))
    };
    let cmdline = built["cmdline"].as_str().expect("cmdline").to_string();
    let kernel = file("kernel");
    let initrd = file("initrd");
    let imported = cloud.sv_json(&[
        "image",
        "import",
        "mykernel",
        "--kernel",
        kernel.to_str().expect("path"),
        "--initrd",
        initrd.to_str().expect("path"),
        "--cmdline",
        &cmdline,
        "--guest-service",
    ]);
    assert_eq!(imported["state"], "ready");
    assert_eq!(imported["kind"], "kernel-initrd");
    let ip = cloud.create_vm("fromkernel", &["--image", "mykernel", "--type", "nano"]);
    assert_eq!(guest_json(ip, "/identity")["name"], "fromkernel");

    // The console shows the guest's boot output.
    let console = cloud.sv_ok(&["vm", "console", "fromkernel"]);
    assert!(
        console.contains("SKYVISOR-GUEST-READY name=fromkernel"),
        "{console}"
    );
    let tail = cloud.sv_ok(&["vm", "logs", "fromkernel", "--tail", "300"]);
    // 300 bytes of log; invalid UTF-8 cut at the edge may widen a little.
    assert!(!tail.is_empty() && tail.len() < 400, "{} bytes", tail.len());

    // An image in use cannot be deleted.
    let err = cloud.sv_err(&["image", "delete", "mykernel"]);
    assert!(err.contains("used by instances fromkernel"), "{err}");

    // A disk image (qcow2) boots by firmware; it has no guest service, so
    // "ready" means QEMU runs it.
    let tmp = tempfile::tempdir().expect("tmp");
    let disk = tmp.path().join("blank.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let img = cloud.sv_json(&[
        "image",
        "import",
        "blank",
        "--disk",
        disk.to_str().expect("path"),
    ]);
    assert_eq!(img["kind"], "disk");
    assert_eq!(img["files"][0]["format"], "qcow2");
    let vm = cloud.sv_json(&[
        "vm", "create", "fw", "--image", "blank", "--type", "nano", "--wait",
    ]);
    assert_eq!(vm["status"]["phase"], "running");
    assert_eq!(vm["status"]["guest_service"], false);

    // Bad imports are refused and leave nothing.
    let junk = tmp.path().join("junk.img");
    std::fs::write(&junk, b"").expect("write");
    let err = cloud.sv_err(&[
        "image",
        "import",
        "junk",
        "--disk",
        junk.to_str().expect("path"),
    ]);
    assert!(err.contains("empty"), "{err}");
    let err = cloud.sv_err(&[
        "image",
        "import",
        "blank",
        "--disk",
        disk.to_str().expect("path"),
    ]);
    assert!(err.contains("already exists"), "{err}");
    let (status, _) = cloud.api("GET", "/v1/images/junk", None);
    assert_eq!(status, 404);
    let leftovers: Vec<_> = std::fs::read_dir(cloud.data_dir.join("images"))
        .expect("images dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary upload files left: {leftovers:?}"
    );

    // Unused images can be deleted.
    cloud.sv_ok(&["vm", "delete", "fw", "--force"]);
    cloud.sv_ok(&["image", "delete", "blank"]);
    assert!(!cloud.data_dir.join("images/blank").exists());
}

#[test]
fn full_data_disk_refuses_new_vms_and_creates_nothing() {
    let cloud = Cloud::start_with(CloudOptions {
        tmpfs_mib: Some(2600),
        ..Default::default()
    });
    let filler = cloud.data_dir.join("filler");
    let (_, host) = cloud.api("GET", "/v1/hosts", None);
    let free = host[0]["host"]["disk_free_bytes"].as_u64().expect("free");
    // Leave 64 MiB: under the 256 MiB a host needs to take new VMs.
    let fill = free.saturating_sub(64 << 20);
    let out = std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&filler)
        .output()
        .expect("fallocate");
    assert!(
        out.status.success(),
        "fallocate {fill} (free {free}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = wait_until(
        "the full disk to refuse VMs",
        Duration::from_secs(30),
        || {
            let out = cloud.sv(&["vm", "create", "nospace", "--type", "nano"]);
            (!out.status.success())
                .then(|| String::from_utf8_lossy(&out.stderr).into_owned())
                .or_else(|| {
                    // Created before the agent saw the disk fill: remove and retry.
                    let _ = cloud.sv(&["vm", "delete", "nospace", "--force"]);
                    None
                })
        },
    );
    assert!(
        err.contains("MiB free on its data disk, needs at least 256 MiB"),
        "{err}"
    );
    let (status, _) = cloud.api("GET", "/v1/instances/nospace", None);
    assert_eq!(status, 404, "a refused VM left a record");
    assert!(cloud.qemu_pids().is_empty());

    std::fs::remove_file(&filler).expect("rm filler");
    wait_until("room again", Duration::from_secs(30), || {
        cloud
            .sv(&["vm", "create", "space", "--type", "nano", "--no-start"])
            .status
            .success()
            .then_some(())
    });
}

//! The runtime configuration, as the runtime will read it (JSON).

use serde_json::Value;

use super::*;

fn config() -> ContainerConfig {
    ContainerConfig {
        rootfs: PathBuf::from("/var/lib/skyvisor/containers/c1/rootfs"),
        hostname: "web".into(),
        args: vec!["/usr/bin/skyvisor-guest".into(), "serve".into()],
        env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
        cwd: None,
        resolv_conf: None,
        host_id_base: 1_000_000,
        limits: Limits {
            vcpus: 2,
            memory_mib: 256,
            pids: 512,
            io_weight: Some(100),
        },
        cgroup: "skyvisor/c1".into(),
        network_hook: None,
    }
}

fn json(config: &ContainerConfig) -> Value {
    let dir = tempfile::tempdir().expect("tmp");
    let path = write_bundle(dir.path(), config).expect("bundle");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

#[test]
fn every_namespace_is_the_containers_own_and_root_inside_is_an_unprivileged_range_outside() {
    let v = json(&config());
    let mut types: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .map(|n| {
            assert!(n.get("path").is_none(), "no namespace is joined: {n}");
            n["type"].as_str().expect("type")
        })
        .collect();
    types.sort_unstable();
    assert_eq!(
        types,
        ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"]
    );
    for key in ["uidMappings", "gidMappings"] {
        let m = &v["linux"][key];
        assert_eq!(m.as_array().map(Vec::len), Some(1), "{key}: {m}");
        assert_eq!(m[0]["containerID"], 0);
        assert_eq!(m[0]["hostID"], 1_000_000);
        assert_eq!(m[0]["size"], ID_RANGE);
    }
    assert_eq!(v["hostname"], "web");
    assert_eq!(v["root"]["path"], "/var/lib/skyvisor/containers/c1/rootfs");
}

#[test]
fn the_type_becomes_cgroup_limits() {
    let v = json(&config());
    let r = &v["linux"]["resources"];
    assert_eq!(r["cpu"]["quota"], 200_000, "2 vCPUs: {r}");
    assert_eq!(r["cpu"]["period"], 100_000);
    assert_eq!(r["memory"]["limit"], 256 * 1024 * 1024);
    assert_eq!(
        r["memory"]["swap"],
        256 * 1024 * 1024,
        "no swap beyond memory"
    );
    assert_eq!(r["pids"]["limit"], 512);
    assert_eq!(r["blockIO"]["weight"], 100);
    assert_eq!(v["linux"]["cgroupsPath"], "/skyvisor/c1");
    // Without a weight the runtime is told nothing about block I/O.
    let mut c = config();
    c.limits.io_weight = None;
    assert!(json(&c)["linux"]["resources"].get("blockIO").is_none());
}

#[test]
fn no_new_privileges_few_capabilities_and_the_kernel_masked() {
    let v = json(&config());
    let p = &v["process"];
    assert_eq!(p["noNewPrivileges"], true);
    assert_eq!(p["args"][0], "/usr/bin/skyvisor-guest");
    let bounding: Vec<&str> = p["capabilities"]["bounding"]
        .as_array()
        .expect("bounding")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(bounding.contains(&"CAP_NET_BIND_SERVICE"), "{bounding:?}");
    for never in [
        "CAP_SYS_ADMIN",
        "CAP_SYS_MODULE",
        "CAP_NET_ADMIN",
        "CAP_SYS_PTRACE",
    ] {
        assert!(!bounding.contains(&never), "{never} in {bounding:?}");
    }
    assert!(
        p["capabilities"]["ambient"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    let masked = v["linux"]["maskedPaths"].as_array().expect("masked");
    assert!(masked.iter().any(|m| m == "/proc/kcore"), "{masked:?}");
    let readonly = v["linux"]["readonlyPaths"].as_array().expect("readonly");
    assert!(readonly.iter().any(|m| m == "/proc/sys"), "{readonly:?}");
    let sys = v["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["destination"] == "/sys")
        .expect("a /sys mount");
    assert_eq!(sys["type"], "sysfs", "the container's own sysfs: {sys}");
    assert!(
        sys["options"]
            .as_array()
            .expect("options")
            .iter()
            .any(|o| o == "ro"),
        "{sys}"
    );
}

#[test]
fn seccomp_refuses_what_administers_the_kernel_on_every_x86_abi() {
    let v = json(&config());
    let s = &v["linux"]["seccomp"];
    assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
    let arches: Vec<&str> = s["architectures"]
        .as_array()
        .expect("architectures")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        arches,
        ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    );
    let rule = &s["syscalls"][0];
    assert_eq!(rule["action"], "SCMP_ACT_ERRNO");
    assert_eq!(rule["errnoRet"], 1);
    let names: Vec<&str> = rule["names"]
        .as_array()
        .expect("names")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for call in [
        "mount",
        "init_module",
        "kexec_load",
        "reboot",
        "bpf",
        "setns",
        "ptrace",
    ] {
        assert!(names.contains(&call), "{call} not refused");
    }
    for call in ["read", "write", "clone", "execve", "socket"] {
        assert!(!names.contains(&call), "{call} refused");
    }
}

#[test]
fn bad_limits_and_no_command_are_refused_naming_what() {
    for (change, what) in [
        (
            (|c: &mut ContainerConfig| c.limits.vcpus = 0) as fn(&mut ContainerConfig),
            "vcpus",
        ),
        (|c| c.limits.memory_mib = 1, "memory_mib"),
        (|c| c.limits.pids = 0, "pids"),
        (|c| c.limits.io_weight = Some(5000), "io_weight"),
        (|c| c.args.clear(), "args"),
    ] {
        let mut c = config();
        change(&mut c);
        let e = runtime_spec(&c).expect_err(what);
        assert!(
            matches!(&e, ContainerError::Invalid { what: w, .. } if *w == what),
            "{what}: {e}"
        );
        assert!(e.to_string().contains("allowed"), "{e}");
    }
}

#[test]
fn the_network_hook_runs_at_create_runtime_and_limits_update_live() {
    let mut c = config();
    c.network_hook = Some(Hook {
        path: PathBuf::from("/usr/bin/skyvisor"),
        args: vec![
            "skyvisor".into(),
            "container-net-hook".into(),
            "svp1".into(),
        ],
        timeout_secs: 20,
    });
    c.resolv_conf = Some(PathBuf::from("/var/lib/x/resolv.conf"));
    c.cwd = Some("/srv".into());
    let v = json(&c);
    let hooks = &v["hooks"]["createRuntime"];
    assert_eq!(hooks[0]["path"], "/usr/bin/skyvisor", "{v}");
    assert_eq!(hooks[0]["args"][1], "container-net-hook");
    assert_eq!(v["process"]["cwd"], "/srv");
    let mounts = v["mounts"].as_array().expect("mounts");
    let resolv = mounts
        .iter()
        .find(|m| m["destination"] == "/etc/resolv.conf")
        .expect("resolv.conf bound");
    assert!(
        resolv["options"]
            .as_array()
            .expect("options")
            .iter()
            .any(|o| o == "ro")
    );
    assert!(
        mounts
            .iter()
            .any(|m| m["destination"] == "/run" && m["type"] == "tmpfs")
    );
    let r: Value =
        serde_json::from_str(&resources_json(&c.limits).expect("resources")).expect("json");
    assert_eq!(r["memory"]["limit"], 256 * 1024 * 1024);
    assert_eq!(r["cpu"]["quota"], 200_000);
    assert_eq!(r["pids"]["limit"], 512);
    let mut bad = c.limits;
    bad.vcpus = 0;
    assert!(resources_json(&bad).is_err());
}

//! A container's network device: a veth pair whose host end sits on the
//! instance's bridge, and whose other end the runtime's `createRuntime`
//! hook moves into the container's own network namespace.

use tokio::process::Command;

/// The runtime's `createRuntime` hook (`skyvisor container-net-hook PEER
/// MAC ADDRESS/PREFIX GATEWAY MTU`, the container's state on stdin): moves
/// the container's end of its veth pair into its network namespace and
/// sets it up there as `eth0`. Runs as the host's root, in the host's
/// namespaces, before the container's process starts.
pub fn run_net_hook(args: &[String], state: &str) -> Result<(), String> {
    let [peer, mac, address, gateway, mtu] = args else {
        return Err(format!(
            "usage: container-net-hook PEER MAC ADDRESS/PREFIX GATEWAY MTU (got {} arguments)",
            args.len()
        ));
    };
    let v: serde_json::Value =
        serde_json::from_str(state).map_err(|e| format!("the runtime's state is not JSON: {e}"))?;
    let pid = v["pid"]
        .as_i64()
        .filter(|p| *p > 0)
        .ok_or("the runtime's state has no pid")?
        .to_string();
    run("ip", &["link", "set", peer, "netns", &pid], "")?;
    // In the container's namespace, from here: `nsenter` enters it for
    // each command.
    let inside = |args: &[&str]| {
        let mut all = vec!["--target", pid.as_str(), "--net", "ip"];
        all.extend_from_slice(args);
        run("nsenter", &all, "in the container")
    };
    inside(&["link", "set", peer, "name", "eth0"])?;
    inside(&["link", "set", "eth0", "address", mac, "mtu", mtu])?;
    inside(&["addr", "add", address, "dev", "eth0"])?;
    inside(&["link", "set", "eth0", "up"])?;
    inside(&["link", "set", "lo", "up"])?;
    inside(&["route", "add", "default", "via", gateway, "dev", "eth0"])?;
    Ok(())
}

/// Runs `program` with `args` to its end; its error names the command
/// (and `place`, where it ran).
fn run(program: &str, args: &[&str], place: &str) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} {place}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes the host's end of a container's veth pair on `bridge` (replacing
/// one left by an earlier start) and gives the container's end's name.
pub(crate) async fn make_veth(host_end: &str, bridge: &str, mtu: u32) -> Result<String, String> {
    let peer = format!("svp{}", host_end.trim_start_matches("svt"));
    let ip = |args: Vec<String>| async move {
        let out = Command::new("ip")
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    // An earlier pair goes with its container's namespace, asynchronously:
    // remove what is left of it first.
    let _ = ip(vec!["link".into(), "del".into(), host_end.into()]).await;
    let _ = ip(vec!["link".into(), "del".into(), peer.clone()]).await;
    let mtu = mtu.to_string();
    ip([
        "link", "add", host_end, "mtu", &mtu, "type", "veth", "peer", "name", &peer, "mtu", &mtu,
    ]
    .map(String::from)
    .to_vec())
    .await?;
    let attached = ip(["link", "set", host_end, "master", bridge, "up"]
        .map(String::from)
        .to_vec())
    .await;
    if let Err(e) = attached {
        let _ = ip(vec!["link".into(), "del".into(), host_end.into()]).await;
        return Err(e);
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_refuses_what_it_cannot_use() {
        let e = run_net_hook(&["a".into()], "{}").expect_err("usage");
        assert!(e.contains("usage"), "{e}");
        let args: Vec<String> = [
            "svp1",
            "02:00:00:00:00:01",
            "10.0.0.2/24",
            "10.0.0.1",
            "1450",
        ]
        .map(String::from)
        .to_vec();
        assert!(
            run_net_hook(&args, "not json")
                .expect_err("json")
                .contains("not JSON")
        );
        assert!(
            run_net_hook(&args, r#"{"pid":0}"#)
                .expect_err("pid")
                .contains("no pid")
        );
    }
}

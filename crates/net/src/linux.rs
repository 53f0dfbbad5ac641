//! [`HostNetwork`] on Linux through iproute2 and nftables.
//!
//! Commands rather than netlink: they are stable across kernel and crate
//! versions, idempotent when used as below, and their errors read well.

use std::path::Path;

use async_trait::async_trait;
use tokio::process::Command;
use tracing::debug;

use crate::{BridgeConfig, HostNetwork, NetError, OverlayConfig, validate_ifname};

/// The host's real network.
#[derive(Debug, Clone, Default)]
pub struct LinuxNetwork;

impl LinuxNetwork {
    /// A handle on the host's network.
    pub fn new() -> Self {
        Self
    }
}

/// Runs `program args...`, feeding `stdin` if given; fails with its stderr.
async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use tokio::io::AsyncWriteExt;
    let command = format!("{program} {}", args.join(" "));
    debug!(%command, "net command");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::ToolMissing {
                tool: program.to_string(),
            }
        } else {
            NetError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            }
        }
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| NetError::Command {
                command: command.clone(),
                stderr: e.to_string(),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether link `name` is already up and a port of `bridge` (a VM restarted
/// on its tap, e.g. for a restore): then there is nothing to run.
fn attached_and_up(name: &str, bridge: &str) -> bool {
    let dir = Path::new("/sys/class/net").join(name);
    let master = std::fs::read_link(dir.join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let up = std::fs::read_to_string(dir.join("flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 0x1 != 0);
    up && master.as_deref() == Some(bridge)
}

/// The nftables table name for a bridge's NAT rules.
fn nat_table(bridge: &str) -> String {
    format!("skyvisor-{bridge}")
}

#[async_trait]
impl HostNetwork for LinuxNetwork {
    async fn ensure_bridge(&self, bridge: &BridgeConfig) -> Result<(), NetError> {
        validate_ifname(&bridge.name)?;
        if !link_exists(&bridge.name) {
            // A concurrent creator may win the race; "exists" is fine then.
            if let Err(e) = run("ip", &["link", "add", &bridge.name, "type", "bridge"], None).await
                && !link_exists(&bridge.name)
            {
                return Err(e);
            }
        }
        let gw = format!("{}/{}", bridge.subnet.gateway(), bridge.subnet.prefix_len);
        run("ip", &["addr", "replace", &gw, "dev", &bridge.name], None).await?;
        run("ip", &["link", "set", &bridge.name, "up"], None).await?;
        if bridge.nat {
            tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
                .await
                .map_err(|e| NetError::Command {
                    command: "sysctl net.ipv4.ip_forward=1".into(),
                    stderr: e.to_string(),
                })?;
            let table = nat_table(&bridge.name);
            let subnet = bridge.subnet.to_string();
            let name = &bridge.name;
            // Add-then-delete-then-define is one atomic nft transaction that
            // works whether or not the table existed.
            let script = format!(
                "table ip {table} {{}}\n\
                 delete table ip {table}\n\
                 table ip {table} {{\n\
                   chain postrouting {{\n\
                     type nat hook postrouting priority srcnat; policy accept;\n\
                     ip saddr {subnet} ip daddr != {subnet} masquerade\n\
                   }}\n\
                   chain forward {{\n\
                     type filter hook forward priority filter; policy accept;\n\
                     iifname \"{name}\" accept\n\
                     oifname \"{name}\" ct state established,related accept\n\
                   }}\n\
                 }}\n"
            );
            run("nft", &["-f", "-"], Some(&script)).await?;
        }
        Ok(())
    }

    async fn ensure_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        if attached_and_up(name, bridge) {
            return Ok(());
        }
        if !link_exists(name) {
            run("ip", &["tuntap", "add", "dev", name, "mode", "tap"], None).await?;
        }
        run("ip", &["link", "set", name, "master", bridge], None).await?;
        run("ip", &["link", "set", name, "up"], None).await?;
        Ok(())
    }

    async fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        if link_exists(name)
            && let Err(e) = run("ip", &["link", "del", name], None).await
            && link_exists(name)
        {
            return Err(e);
        }
        Ok(())
    }

    async fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let mut out = Vec::new();
        let mut dir =
            tokio::fs::read_dir("/sys/class/net")
                .await
                .map_err(|e| NetError::Command {
                    command: "read /sys/class/net".into(),
                    stderr: e.to_string(),
                })?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && entry.path().join("tun_flags").exists() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn ensure_overlay(&self, bridge: &str, overlay: &OverlayConfig) -> Result<(), NetError> {
        validate_ifname(&overlay.name)?;
        if !link_exists(&overlay.name) {
            let vni = overlay.vni.to_string();
            let local = overlay.local.to_string();
            let port = overlay.port.to_string();
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &overlay.name,
                    "type",
                    "vxlan",
                    "id",
                    &vni,
                    "local",
                    &local,
                    "dstport",
                    &port,
                ],
                None,
            )
            .await?;
        }
        run(
            "ip",
            &["link", "set", &overlay.name, "master", bridge],
            None,
        )
        .await?;
        run("ip", &["link", "set", &overlay.name, "up"], None).await?;
        // Head-end replication: broadcast and unknown unicast go to every
        // peer; the bridge then learns where each MAC lives.
        let fdb = run("bridge", &["fdb", "show", "dev", &overlay.name], None).await?;
        for peer in &overlay.peers {
            let peer = peer.to_string();
            if !fdb
                .lines()
                .any(|l| l.starts_with("00:00:00:00:00:00") && l.contains(&format!("dst {peer} ")))
            {
                run(
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        "00:00:00:00:00:00",
                        "dev",
                        &overlay.name,
                        "dst",
                        &peer,
                    ],
                    None,
                )
                .await?;
            }
        }
        Ok(())
    }
}

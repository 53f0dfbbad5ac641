//! The guest control channel: a virtio-serial port named `org.skyvisor.guest.0`
//! carrying line-delimited JSON requests from the host agent, one JSON response
//! line each.
//!
//! It must tolerate a host that is not connected yet, disconnects and reconnects
//! (reads return EOF meanwhile: back off and retry), and any garbage on the line
//! (answer an error, never panic, cap line length).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::cmdline::{self, Identity, Ipv4Cidr};
use crate::json::{self, Value, quote, quote_opt};
use crate::service::{Guest, PowerAction};

/// The virtio-serial port name the host creates.
pub const PORT_NAME: &str = "org.skyvisor.guest.0";
/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// A parsed control request.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlRequest {
    /// Liveness check.
    Ping,
    /// Take a new identity (fields that are absent stay unchanged).
    SetIdentity(IdentityUpdate),
    /// Flush filesystems.
    Sync,
    /// Graceful power off.
    PowerOff,
    /// Graceful reboot.
    Reboot,
}

/// The fields of a set-identity request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityUpdate {
    /// New name.
    pub name: Option<String>,
    /// New instance id.
    pub id: Option<String>,
    /// New eth0 address.
    pub ip: Option<Ipv4Cidr>,
    /// New default gateway.
    pub gw: Option<Ipv4Addr>,
    /// New MAC of eth0 (a clone continues with its parent's MAC in RAM).
    pub mac: Option<String>,
}

/// Whether `s` is a MAC like `52:54:00:12:34:56`.
pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl IdentityUpdate {
    /// `current` with this update applied.
    pub fn apply_to(&self, current: &Identity) -> Identity {
        Identity {
            name: self.name.clone().or_else(|| current.name.clone()),
            id: self.id.clone().or_else(|| current.id.clone()),
            ip: self.ip.or(current.ip),
            gw: self.gw.or(current.gw),
            dns: current.dns,
        }
    }
}

fn opt_string(v: &Value, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<ControlRequest, String> {
    let v = json::parse(line)?;
    if !matches!(v, Value::Object(_)) {
        return Err("request must be a JSON object".to_string());
    }
    let op = v
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing \"op\"".to_string())?;
    match op {
        "ping" => Ok(ControlRequest::Ping),
        "sync" => Ok(ControlRequest::Sync),
        "poweroff" => Ok(ControlRequest::PowerOff),
        "reboot" => Ok(ControlRequest::Reboot),
        "set-identity" => {
            let name = opt_string(&v, "name")?;
            let id = opt_string(&v, "id")?;
            for (key, val) in [("name", &name), ("id", &id)] {
                if let Some(s) = val
                    && !cmdline::valid_token(s)
                {
                    return Err(format!("{key} {s:?} is not a simple token"));
                }
            }
            let ip = opt_string(&v, "ip")?
                .map(|s| s.parse::<Ipv4Cidr>())
                .transpose()?;
            let gw = opt_string(&v, "gw")?
                .map(|s| {
                    s.parse::<Ipv4Addr>()
                        .map_err(|_| format!("gw {s:?} is not an IPv4 address"))
                })
                .transpose()?;
            let mac = opt_string(&v, "mac")?;
            if let Some(m) = &mac
                && !valid_mac(m)
            {
                return Err(format!("mac {m:?} is not a MAC like 52:54:00:12:34:56"));
            }
            Ok(ControlRequest::SetIdentity(IdentityUpdate {
                name,
                id,
                ip,
                gw,
                mac,
            }))
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

/// The busybox `ip` invocations that move eth0 to the update's address and route.
pub fn net_commands(update: &IdentityUpdate) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    if let Some(mac) = &update.mac {
        cmds.push(s(&["ip", "link", "set", "eth0", "address", mac]));
    }
    if let Some(ip) = update.ip {
        cmds.push(s(&["ip", "addr", "flush", "dev", "eth0"]));
        cmds.push(s(&["ip", "addr", "add", &ip.to_string(), "dev", "eth0"]));
        cmds.push(s(&["ip", "link", "set", "eth0", "up"]));
    }
    if let Some(gw) = update.gw {
        cmds.push(s(&[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &gw.to_string(),
            "dev",
            "eth0",
        ]));
    }
    cmds
}

fn run(cmd: &[String]) -> Result<(), String> {
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| "empty command".to_string())?;
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("`{}` could not start: {e}", cmd.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Applies an identity update: network and hostname (inside a VM), reported
/// identity.
pub fn apply_identity(guest: &Guest, update: &IdentityUpdate) -> Result<Identity, String> {
    let next = update.apply_to(&guest.identity());
    if guest.config().place.owns_machine() {
        for cmd in net_commands(update) {
            run(&cmd)?;
        }
        if let Some(h) = update.name.as_deref().and_then(cmdline::hostname_for) {
            fs::write("/proc/sys/kernel/hostname", h)
                .map_err(|e| format!("setting hostname {h:?}: {e}"))?;
        }
        if let Some(ip) = update.ip {
            // Tell neighbours (and switches) where the new address lives; a clone
            // may take over an address another MAC held a moment ago.
            let ip = ip.addr.to_string();
            thread::spawn(move || {
                let _ = Command::new("arping")
                    .args(["-U", "-c", "1", "-I", "eth0", &ip])
                    .output();
            });
        }
    }
    guest.set_identity(next.clone());
    Ok(next)
}

/// Handles one request line; returns the response line and any power action to
/// perform after it has been written.
pub fn handle_line(guest: &Guest, line: &str) -> (String, Option<PowerAction>) {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return (format!(r#"{{"ok":false,"error":{}}}"#, quote(&e)), None),
    };
    let boot_id = crate::service::boot_id();
    match req {
        ControlRequest::Ping => (
            format!(
                r#"{{"ok":true,"boot_id":{},"identity":{}}}"#,
                quote_opt(boot_id.as_deref()),
                guest.identity_json()
            ),
            None,
        ),
        ControlRequest::Sync => {
            crate::power::sync();
            (r#"{"ok":true}"#.to_string(), None)
        }
        ControlRequest::SetIdentity(update) => match apply_identity(guest, &update) {
            Ok(_) => (
                format!(r#"{{"ok":true,"identity":{}}}"#, guest.identity_json()),
                None,
            ),
            Err(e) => (format!(r#"{{"ok":false,"error":{}}}"#, quote(&e)), None),
        },
        ControlRequest::PowerOff | ControlRequest::Reboot
            if !guest.config().place.acts_on_power() =>
        {
            (
                r#"{"ok":false,"error":"power actions are disabled in host mode"}"#.to_string(),
                None,
            )
        }
        ControlRequest::PowerOff => (r#"{"ok":true}"#.to_string(), Some(PowerAction::PowerOff)),
        ControlRequest::Reboot => (r#"{"ok":true}"#.to_string(), Some(PowerAction::Reboot)),
    }
}

/// The `/dev` node of the port named `name`, found through sysfs (there is no udev
/// in the guest to make by-name links).
pub fn find_port(sys_class_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(sys_class_dir).ok()?;
    for e in entries.flatten() {
        let port_name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Splits complete lines off `buf`; an over-long partial line is dropped and
/// reported as `None` so the caller can answer an error.
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<Option<String>> {
    let mut out = Vec::new();
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line).trim().to_string();
        if !text.is_empty() {
            out.push(if line.len() > MAX_LINE {
                None
            } else {
                Some(text)
            });
        }
    }
    if buf.len() > MAX_LINE {
        buf.clear();
        out.push(None);
    }
    out
}

/// Serves the channel forever (returns at once if the port does not exist).
pub fn serve(guest: Arc<Guest>) {
    let Some(dev) = find_port(Path::new("/sys/class/virtio-ports"), PORT_NAME) else {
        eprintln!("skyvisor-guest: no virtio-serial port {PORT_NAME}; control channel disabled");
        return;
    };
    let mut backoff = MIN_BACKOFF;
    // Report a failure once, not every retry (the console is the serial log).
    let mut last_error = String::new();
    loop {
        match OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(port) => {
                last_error.clear();
                serve_port(&guest, port, &mut backoff);
            }
            Err(e) => {
                let msg = format!("skyvisor-guest: opening {}: {e}", dev.display());
                if msg != last_error {
                    eprintln!("{msg}");
                    last_error = msg;
                }
            }
        }
        thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads requests from an open port until a read error; EOF (host not connected)
/// is retried with backoff on the same descriptor.
fn serve_port(guest: &Guest, mut port: File, backoff: &mut Duration) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match port.read(&mut chunk) {
            Ok(0) => {
                // The host side is not connected: reads return EOF until it is.
                thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            }
            Ok(n) => {
                *backoff = MIN_BACKOFF;
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                for line in take_lines(&mut buf) {
                    let (resp, after) = match line {
                        Some(l) => handle_line(guest, &l),
                        None => (
                            r#"{"ok":false,"error":"request line too long"}"#.to_string(),
                            None,
                        ),
                    };
                    let written = port
                        .write_all(format!("{resp}\n").as_bytes())
                        .and_then(|()| port.flush());
                    if let Err(e) = written {
                        eprintln!("skyvisor-guest: control channel write: {e}");
                    }
                    if let Some(action) = after {
                        crate::power::graceful(guest, action);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("skyvisor-guest: control channel read: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Config;

    #[test]
    fn parses_every_op() {
        assert_eq!(parse_request(r#"{"op":"ping"}"#), Ok(ControlRequest::Ping));
        assert_eq!(parse_request(r#"{"op":"sync"}"#), Ok(ControlRequest::Sync));
        assert_eq!(
            parse_request(r#"{"op":"poweroff"}"#),
            Ok(ControlRequest::PowerOff)
        );
        assert_eq!(
            parse_request(r#"{"op":"reboot"}"#),
            Ok(ControlRequest::Reboot)
        );
        let r = parse_request(
            r#"{"op":"set-identity","name":"web-2","id":"u-1","ip":"10.0.0.7/24","gw":"10.0.0.1"}"#,
        )
        .expect("valid");
        let ControlRequest::SetIdentity(u) = r else {
            panic!("wrong op: {r:?}")
        };
        assert_eq!(u.name.as_deref(), Some("web-2"));
        assert_eq!(u.ip.map(|c| c.to_string()).as_deref(), Some("10.0.0.7/24"));
        assert_eq!(u.gw, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn rejects_bad_requests() {
        for bad in [
            "",
            "[]",
            r#"{"op":1}"#,
            r#"{"nop":"ping"}"#,
            r#"{"op":"dance"}"#,
            r#"{"op":"set-identity","ip":"10.0.0.7"}"#,
            r#"{"op":"set-identity","gw":"x"}"#,
            r#"{"op":"set-identity","name":"a b"}"#,
            r#"{"op":"set-identity","name":5}"#,
            r#"{"op":"set-identity","mac":"52:54:00:zz:00:01"}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_ip_commands() {
        let u = IdentityUpdate {
            ip: "10.0.0.7/24".parse().ok(),
            gw: Some(Ipv4Addr::new(10, 0, 0, 1)),
            mac: Some("52:54:00:01:02:03".into()),
            ..Default::default()
        };
        let cmds: Vec<String> = net_commands(&u).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "ip link set eth0 address 52:54:00:01:02:03",
                "ip addr flush dev eth0",
                "ip addr add 10.0.0.7/24 dev eth0",
                "ip link set eth0 up",
                "ip route replace default via 10.0.0.1 dev eth0",
            ]
        );
        assert!(net_commands(&IdentityUpdate::default()).is_empty());
    }

    #[test]
    fn handles_lines_and_updates_identity_in_host_mode() {
        let g = Guest::new(
            Config {
                port: 0,
                data_dir: std::env::temp_dir(),
                place: crate::service::Place::Host,
                test_hooks: false,
            },
            cmdline::parse("sv.name=a sv.ip=10.0.0.2/24").identity,
        );
        let (resp, after) = handle_line(&g, r#"{"op":"ping"}"#);
        assert!(resp.starts_with(r#"{"ok":true,"boot_id":""#), "{resp}");
        assert_eq!(after, None);
        let (resp, _) = handle_line(&g, r#"{"op":"set-identity","name":"b","id":"x-1"}"#);
        let v = json::parse(&resp).expect("json");
        assert_eq!(v.get("ok"), Some(&Value::Bool(true)));
        let id = g.identity();
        assert_eq!(id.name.as_deref(), Some("b"));
        assert_eq!(id.id.as_deref(), Some("x-1"));
        assert_eq!(id.ip.map(|c| c.to_string()).as_deref(), Some("10.0.0.2/24"));
        let (resp, after) = handle_line(&g, "not json");
        assert!(resp.starts_with(r#"{"ok":false"#), "{resp}");
        assert_eq!(after, None);
        let (_, after) = handle_line(&g, r#"{"op":"poweroff"}"#);
        assert_eq!(after, None, "host mode never powers off");
    }

    #[test]
    fn splits_lines_and_caps_length() {
        let mut buf = b"{\"op\":\"ping\"}\r\n\n{\"op\"".to_vec();
        let lines = take_lines(&mut buf);
        assert_eq!(lines, vec![Some("{\"op\":\"ping\"}".to_string())]);
        assert_eq!(buf, b"{\"op\"");
        let mut big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(take_lines(&mut big), vec![None]);
        assert!(big.is_empty());
    }

    #[test]
    fn finds_port_by_name_in_sysfs() {
        let dir = std::env::temp_dir().join(format!("skyvisor-vports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "other"),
            ("vport0p2", PORT_NAME),
        ] {
            fs::create_dir_all(dir.join(port)).expect("mkdir");
            fs::write(dir.join(port).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(
            find_port(&dir, PORT_NAME),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(find_port(&dir, "missing"), None);
        assert_eq!(find_port(&dir.join("nope"), PORT_NAME), None);
        let _ = fs::remove_dir_all(dir);
    }
}

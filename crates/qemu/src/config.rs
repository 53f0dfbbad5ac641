//! What a VM is made of, and the QEMU command line that makes it.
//!
//! [`VmConfig`] is plain data; [`VmConfig::to_args`] turns it into QEMU's
//! arguments. This module is pure: it must never touch the file system, spawn
//! anything or look at the host (whether `/dev/vhost-net` exists, whether the
//! binary supports `-sandbox`): the caller decides and sets the fields.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use skyvisor_core::image::DiskFormat;
use skyvisor_core::{Accel, MacAddr};
use uuid::Uuid;

use crate::error::ConfigError;

/// The files QEMU keeps in a VM's run directory.
pub mod files {
    /// The QMP control socket.
    pub const QMP_SOCKET: &str = "qmp.sock";
    /// QEMU's pidfile.
    pub const PIDFILE: &str = "qemu.pid";
    /// The serial console socket (connect to interact with the console).
    pub const CONSOLE_SOCKET: &str = "console.sock";
    /// Everything the guest wrote to its serial console, appended across runs.
    pub const SERIAL_LOG: &str = "serial.log";
    /// The guest channel socket (virtio-serial port `org.skyvisor.guest.0`).
    pub const GUEST_SOCKET: &str = "guest.sock";
    /// The QEMU guest agent's socket (virtio-serial port
    /// `org.qemu.guest_agent.0`).
    pub const GUEST_AGENT_SOCKET: &str = "qga.sock";
    /// QEMU's own stdout and stderr, appended across runs.
    pub const QEMU_LOG: &str = "qemu.log";
}

/// The name of the guest channel's virtio-serial port, as the guest sees it
/// in `/dev/virtio-ports/`.
pub const GUEST_CHANNEL_NAME: &str = "org.skyvisor.guest.0";

/// Longest path a unix socket address can hold (`sun_path` is 108 bytes with
/// the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Longest QEMU block node name.
const MAX_NODE_NAME: usize = 31;
/// Suffix of the protocol node under a disk's format node.
const FILE_NODE_SUFFIX: &str = "-file";

/// Device and chardev ids this module uses itself; disks and NICs may not
/// take them.
const RESERVED_IDS: &[&str] = &["qmp", "console", "guestchan", "vserial0", "rng0"];

/// Everything needed to start one QEMU process.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// The VM's name, shown in `ps` and QMP (`-name guest=`).
    pub name: String,
    /// The VM's SMBIOS UUID (`-uuid`), stable across restarts and migrations.
    pub uuid: Uuid,
    /// The QEMU binary: an absolute path, or a name looked up in `PATH`.
    pub qemu_binary: PathBuf,
    /// The accelerator (`-accel kvm|tcg`).
    pub accel: Accel,
    /// The machine type (`-M`). Both ends of a migration must use the same.
    pub machine: String,
    /// The CPU model (`-cpu`). Both ends of a migration must use the same;
    /// see [`default_cpu_model`].
    pub cpu: String,
    /// Number of virtual CPUs (`-smp`).
    pub vcpus: u32,
    /// Guest memory in MiB (`-m`).
    pub memory_mib: u64,
    /// How the guest boots.
    pub boot: Boot,
    /// Block devices, in guest order (virtio-blk).
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in guest order (virtio-net on a tap).
    pub nics: Vec<NicConfig>,
    /// Add the virtio-serial guest channel on `<run_dir>/guest.sock`.
    pub guest_channel: bool,
    /// Add the QEMU guest agent's virtio-serial port on `<run_dir>/qga.sock`.
    pub guest_agent: bool,
    /// A cloud-init seed (a raw file system image), attached read-only as
    /// an IDE CD-ROM so that the guest's virtio disks keep their names.
    pub seed: Option<PathBuf>,
    /// Add a `virtio-rng-pci` device so the guest has entropy early.
    pub rng: bool,
    /// Where QEMU's sockets, pidfile and logs live (see [`files`]). Must be
    /// absolute: [`crate::attach`] finds the process by this path.
    pub run_dir: PathBuf,
    /// Start waiting for an incoming migration instead of booting.
    pub incoming: Option<Incoming>,
    /// Let the disks' guest devices share write access, so that QEMU's own
    /// NBD server can export them writable while the guest device exists:
    /// the destination of a live migration, whose disks the source mirrors
    /// into. Not migrated state; the source need not match.
    pub export_disks: bool,
    /// Turn on QEMU's seccomp filter (`-sandbox on`). Only if the binary was
    /// built with seccomp support.
    pub sandbox: bool,
    /// How long [`crate::launch`] waits for QEMU's QMP socket.
    pub start_timeout: Duration,
    /// How long a QMP command may take before it fails with a timeout.
    pub qmp_command_timeout: Duration,
}

/// The default CPU model for an accelerator: `host` for KVM (fast; migrates
/// only between identical hosts), `qemu64` for TCG (a stable model that any
/// QEMU can migrate; `max` would change with the QEMU version).
pub fn default_cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "qemu64",
    }
}

impl VmConfig {
    /// A config with the defaults: machine `pc`, the accelerator's default
    /// CPU model, 1 vCPU, 512 MiB, firmware boot, no devices but an RNG,
    /// 30 s to start and 30 s per QMP command.
    pub fn new(
        name: impl Into<String>,
        uuid: Uuid,
        run_dir: impl Into<PathBuf>,
        accel: Accel,
    ) -> Self {
        Self {
            name: name.into(),
            uuid,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel,
            machine: "pc".to_owned(),
            cpu: default_cpu_model(accel).to_owned(),
            vcpus: 1,
            memory_mib: 512,
            boot: Boot::Firmware,
            disks: Vec::new(),
            nics: Vec::new(),
            guest_channel: false,
            guest_agent: false,
            seed: None,
            rng: true,
            run_dir: run_dir.into(),
            incoming: None,
            export_disks: false,
            sandbox: false,
            start_timeout: Duration::from_secs(30),
            qmp_command_timeout: Duration::from_secs(30),
        }
    }

    /// The QMP socket's path.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join(files::QMP_SOCKET)
    }

    /// QEMU's arguments (without the binary), or what is wrong with the
    /// config.
    pub fn to_args(&self) -> Result<Vec<String>, ConfigError> {
        self.validate()?;
        let run = |file: &str| path_str("run_dir", &self.run_dir.join(file));
        let mut a = Args::default();

        a.push2(
            "-name",
            format!("guest={},debug-threads=on", esc(&self.name)),
        );
        a.push2("-uuid", self.uuid.to_string());
        a.push("-nodefaults");
        a.push("-no-user-config");
        a.push2("-display", "none");
        a.push2("-msg", "timestamp=on");
        a.push2("-accel", self.accel.qemu_name());
        a.push2("-machine", esc(&self.machine));
        a.push2("-cpu", esc(&self.cpu));
        a.push2("-smp", self.vcpus.to_string());
        a.push2("-m", format!("{}M", self.memory_mib));
        a.push2("-rtc", "base=utc");
        // A guest poweroff pauses instead of exiting: the owner decides
        // whether that means stop, restart or nothing.
        a.push2("-action", "shutdown=pause");
        // Paused until the owner has subscribed to events and says `cont`.
        a.push("-S");
        a.push2("-pidfile", run(files::PIDFILE)?);
        a.push2(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                esc(&run(files::QMP_SOCKET)?)
            ),
        );
        a.push2("-mon", "chardev=qmp,mode=control");
        // The console is a socket for interactive use; its logfile captures
        // everything whether or not anyone is connected.
        a.push2(
            "-chardev",
            format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                esc(&run(files::CONSOLE_SOCKET)?),
                esc(&run(files::SERIAL_LOG)?)
            ),
        );
        a.push2("-serial", "chardev:console");
        if self.sandbox {
            // QEMU never needs to gain privileges or run programs: taps are
            // opened with script=no.
            a.push2("-sandbox", "on,elevateprivileges=deny,spawn=deny");
        }

        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                a.push2("-kernel", path_str("kernel", kernel)?);
                if let Some(initrd) = initrd {
                    a.push2("-initrd", path_str("initrd", initrd)?);
                }
                a.push2("-append", cmdline.clone());
            }
            Boot::Firmware => {}
        }

        for (i, disk) in self.disks.iter().enumerate() {
            // SeaBIOS boots the first disk when there is no kernel.
            let boot_first = i == 0 && matches!(self.boot, Boot::Firmware);
            a.push2("-blockdev", disk.blockdev_json()?.to_string());
            let mut device = disk.device_arg(boot_first);
            if self.export_disks {
                device.push_str(",share-rw=on");
            }
            a.push2("-device", device);
        }

        for nic in &self.nics {
            a.push2("-netdev", nic.netdev_arg());
            a.push2("-device", nic.device_arg());
        }

        if let Some(seed) = &self.seed {
            let node = serde_json::json!({
                "driver": "raw",
                "node-name": "seed",
                "read-only": true,
                "file": {"driver": "file", "filename": path_str("seed", seed)?, "read-only": true},
            });
            a.push2("-blockdev", node.to_string());
            a.push2("-device", "ide-cd,drive=seed,id=seed0,bus=ide.1,unit=0");
        }

        if self.guest_channel {
            a.push2(
                "-chardev",
                format!(
                    "socket,id=guestchan,path={},server=on,wait=off",
                    esc(&run(files::GUEST_SOCKET)?)
                ),
            );
        }
        if self.guest_channel || self.guest_agent {
            a.push2("-device", "virtio-serial-pci,id=vserial0");
        }
        if self.guest_channel {
            a.push2(
                "-device",
                format!(
                    "virtserialport,bus=vserial0.0,chardev=guestchan,name={GUEST_CHANNEL_NAME}"
                ),
            );
        }
        if self.guest_agent {
            a.push2(
                "-chardev",
                format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    esc(&run(files::GUEST_AGENT_SOCKET)?)
                ),
            );
            a.push2(
                "-device",
                "virtserialport,bus=vserial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            );
        }

        if self.rng {
            a.push2("-device", "virtio-rng-pci,id=rng0");
        }

        match &self.incoming {
            None => {}
            Some(Incoming::Defer) => a.push2("-incoming", "defer"),
            Some(Incoming::Uri(uri)) => a.push2("-incoming", uri.clone()),
        }
        Ok(a.0)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::invalid("name", "", "must not be empty"));
        }
        if self.name.chars().any(char::is_control) {
            return Err(ConfigError::invalid(
                "name",
                &self.name,
                "must not contain control characters",
            ));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::invalid("vcpus", "0", "must be at least 1"));
        }
        if self.memory_mib < 16 {
            return Err(ConfigError::invalid(
                "memory_mib",
                self.memory_mib.to_string(),
                "must be at least 16",
            ));
        }
        for (field, value) in [("machine", &self.machine), ("cpu", &self.cpu)] {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::invalid(
                    field,
                    value,
                    "must be a non-empty word",
                ));
            }
        }
        if !self.run_dir.is_absolute() {
            return Err(ConfigError::invalid(
                "run_dir",
                self.run_dir.display().to_string(),
                "must be an absolute path",
            ));
        }
        // The longest socket name decides whether the run dir is short enough.
        let longest = self.run_dir.join(files::CONSOLE_SOCKET);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ConfigError::invalid(
                "run_dir",
                self.run_dir.display().to_string(),
                format!(
                    "is too long for unix sockets: {} must be at most {MAX_SOCKET_PATH} bytes",
                    longest.display()
                ),
            ));
        }
        if let Boot::Kernel { cmdline, .. } = &self.boot
            && cmdline.chars().any(char::is_control)
        {
            return Err(ConfigError::invalid(
                "cmdline",
                cmdline,
                "must not contain control characters",
            ));
        }
        if let Some(Incoming::Uri(uri)) = &self.incoming
            && (uri.is_empty() || uri.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::invalid(
                "incoming",
                uri,
                "must be a migration URI like tcp:0.0.0.0:4444",
            ));
        }

        let mut ids: HashSet<&str> = RESERVED_IDS.iter().copied().collect();
        for disk in &self.disks {
            validate_id("disk id", &disk.id, MAX_NODE_NAME - FILE_NODE_SUFFIX.len())?;
            if !ids.insert(&disk.id) {
                return Err(ConfigError::invalid(
                    "disk id",
                    &disk.id,
                    "is used twice or reserved",
                ));
            }
            if let DiskSource::Nbd { export, .. } = &disk.source
                && (export.is_empty() || export.len() > 4096)
            {
                return Err(ConfigError::invalid(
                    "nbd export",
                    export,
                    "must be 1 to 4096 bytes",
                ));
            }
        }
        for nic in &self.nics {
            validate_id("nic id", &nic.id, MAX_NODE_NAME)?;
            if !ids.insert(&nic.id) {
                return Err(ConfigError::invalid(
                    "nic id",
                    &nic.id,
                    "is used twice or reserved",
                ));
            }
            validate_ifname(&nic.ifname)?;
        }
        Ok(())
    }
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot (`-kernel`, `-initrd`, `-append`).
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initial RAM disk, if any.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// SeaBIOS boots the first disk.
    Firmware,
}

/// How a VM waits for its state instead of booting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming defer`: the caller then sends QMP `migrate-incoming` with
    /// the URI, after setting migration capabilities. The usual choice.
    Defer,
    /// `-incoming URI`: listen (or read) right away, e.g. `tcp:0.0.0.0:4444`
    /// or `file:/path/state`.
    Uri(String),
}

/// Host page cache use of a disk, as QEMU's `-drive cache=` modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Bypass the host page cache (O_DIRECT), guest sees a write cache that
    /// it must flush. Safe and the usual choice for VMs.
    #[default]
    None,
    /// Use the host page cache; guest flushes reach the disk.
    Writeback,
    /// Host page cache, and every write is flushed before it completes.
    Writethrough,
    /// O_DIRECT and every write is flushed before it completes.
    Directsync,
    /// Ignore guest flushes: fast, loses data on a host crash. Tests only.
    Unsafe,
}

impl CacheMode {
    /// `cache.direct` of the block nodes.
    fn direct(self) -> bool {
        matches!(self, Self::None | Self::Directsync)
    }
    /// `cache.no-flush` of the block nodes.
    fn no_flush(self) -> bool {
        matches!(self, Self::Unsafe)
    }
    /// `write-cache` of the guest device.
    fn write_cache(self) -> bool {
        !matches!(self, Self::Writethrough | Self::Directsync)
    }
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The block node name and device id: a letter then letters, digits,
    /// `-`, `.` or `_`; at most 26 characters.
    pub id: String,
    /// Where the data is.
    pub source: DiskSource,
    /// The guest cannot write.
    pub read_only: bool,
    /// Host caching.
    pub cache: CacheMode,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A local image file.
    File {
        /// The image.
        path: PathBuf,
        /// Its format.
        format: DiskFormat,
    },
    /// An export of an NBD server (raw data).
    Nbd {
        /// Where the server listens.
        server: NbdServer,
        /// The export's name.
        export: String,
        /// Seconds QEMU keeps retrying a lost connection before failing
        /// requests; `None` fails at once.
        reconnect_delay_secs: Option<u32>,
    },
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    /// TCP.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl NbdServer {
    /// QMP's `SocketAddress` for this server.
    pub fn socket_address(&self) -> Result<Value, ConfigError> {
        Ok(match self {
            Self::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
            Self::Unix { path } => json!({"type": "unix", "path": path_str("nbd socket", path)?}),
        })
    }
}

impl DiskConfig {
    /// The `-blockdev` / QMP `blockdev-add` description of this disk's
    /// nodes; the top node's name is [`DiskConfig::id`].
    pub fn blockdev_json(&self) -> Result<Value, ConfigError> {
        let cache = json!({"direct": self.cache.direct(), "no-flush": self.cache.no_flush()});
        Ok(match &self.source {
            DiskSource::File { path, format } => json!({
                "driver": format.as_str(),
                "node-name": self.id,
                "read-only": self.read_only,
                "cache": cache,
                "file": {
                    "driver": "file",
                    "node-name": format!("{}{FILE_NODE_SUFFIX}", self.id),
                    "filename": path_str("disk path", path)?,
                    "read-only": self.read_only,
                    "cache": cache,
                },
            }),
            DiskSource::Nbd {
                server,
                export,
                reconnect_delay_secs,
            } => {
                let mut v = json!({
                    "driver": "nbd",
                    "node-name": self.id,
                    "read-only": self.read_only,
                    "cache": cache,
                    "server": server.socket_address()?,
                    "export": export,
                });
                if let (Some(delay), Some(obj)) = (reconnect_delay_secs, v.as_object_mut()) {
                    obj.insert("reconnect-delay".to_owned(), json!(delay));
                }
                v
            }
        })
    }

    /// The QMP `device_add` arguments of this disk's guest device.
    pub fn device_json(&self, boot_first: bool) -> Value {
        let mut v = json!({
            "driver": "virtio-blk-pci",
            "id": self.id,
            "drive": self.id,
            "write-cache": if self.cache.write_cache() { "on" } else { "off" },
        });
        if let (true, Some(obj)) = (boot_first, v.as_object_mut()) {
            obj.insert("bootindex".to_owned(), json!(0));
        }
        v
    }

    fn device_arg(&self, boot_first: bool) -> String {
        let wc = if self.cache.write_cache() {
            "on"
        } else {
            "off"
        };
        let mut s = format!("virtio-blk-pci,id={0},drive={0},write-cache={wc}", self.id);
        if boot_first {
            s.push_str(",bootindex=0");
        }
        s
    }
}

/// A virtio-net NIC on a tap device that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// The netdev and device id (same rules as a disk id, at most 31).
    pub id: String,
    /// The tap interface's name on the host.
    pub ifname: String,
    /// The guest's MAC.
    pub mac: MacAddr,
    /// Use the in-kernel vhost-net backend. Only with KVM and when
    /// `/dev/vhost-net` exists.
    pub vhost: bool,
    /// An open file of the tap `ifname` that QEMU inherits and uses instead
    /// of opening the tap itself (`fd=`). The caller keeps the file open
    /// until QEMU has started. Passing the file along keeps the tap
    /// attached between two QEMUs, so frames queue instead of being dropped.
    pub fd: Option<i32>,
}

impl NicConfig {
    fn netdev_arg(&self) -> String {
        // QEMU refuses `ifname` and the scripts next to `fd`.
        let mut s = match self.fd {
            Some(fd) => format!("tap,id={},fd={fd}", self.id),
            None => format!(
                "tap,id={},ifname={},script=no,downscript=no",
                self.id, self.ifname
            ),
        };
        if self.vhost {
            s.push_str(",vhost=on");
        }
        s
    }

    fn device_arg(&self) -> String {
        format!(
            "virtio-net-pci,id={0},netdev={0},mac={1}",
            self.id, self.mac
        )
    }

    /// The QMP `netdev_add` arguments of this NIC's backend.
    pub fn netdev_json(&self) -> Value {
        let mut v = json!({
            "type": "tap", "id": self.id, "ifname": self.ifname,
            "script": "no", "downscript": "no",
        });
        if let (true, Some(obj)) = (self.vhost, v.as_object_mut()) {
            obj.insert("vhost".to_owned(), json!(true));
        }
        v
    }

    /// The QMP `device_add` arguments of this NIC's guest device.
    pub fn device_json(&self) -> Value {
        json!({"driver": "virtio-net-pci", "id": self.id, "netdev": self.id, "mac": self.mac.to_string()})
    }
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push(&mut self, a: impl Into<String>) {
        self.0.push(a.into());
    }
    fn push2(&mut self, opt: &str, value: impl Into<String>) {
        self.0.push(opt.to_owned());
        self.0.push(value.into());
    }
}

/// Escapes a value inside QEMU's `key=value,...` option syntax, where a
/// comma is written as two.
pub(crate) fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str(field: &'static str, p: &Path) -> Result<String, ConfigError> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| ConfigError::invalid(field, p.display().to_string(), "is not valid UTF-8"))
}

/// QEMU's id rule: a letter, then letters, digits, `-`, `.`, `_`.
fn validate_id(field: &'static str, id: &str, max: usize) -> Result<(), ConfigError> {
    let mut chars = id.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok_first || !ok_rest {
        return Err(ConfigError::invalid(
            field,
            id,
            "must be a letter followed by letters, digits, '-', '.' or '_'",
        ));
    }
    if id.len() > max {
        return Err(ConfigError::invalid(
            field,
            id,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:`, `,`, `=` or whitespace.
fn validate_ifname(name: &str) -> Result<(), ConfigError> {
    let bad = |c: char| {
        c == '/' || c == ':' || c == ',' || c == '=' || c.is_whitespace() || c.is_control()
    };
    if name.is_empty() || name.len() > 15 || name.chars().any(bad) || name == "." || name == ".." {
        return Err(ConfigError::invalid(
            "tap ifname",
            name,
            "must be a Linux interface name of 1 to 15 characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(accel: Accel) -> VmConfig {
        let uuid = Uuid::parse_str("6f1c2a52-8a6e-4b8f-9f57-2d3b1b0c9e01").expect("uuid");
        let mut c = VmConfig::new("web-1", uuid, "/run/skyvisor/vms/web-1", accel);
        c.qemu_binary = PathBuf::from("/usr/bin/qemu-system-x86_64");
        c
    }

    fn lines(c: &VmConfig) -> String {
        c.to_args().expect("valid config").join("\n")
    }

    #[test]
    fn kernel_boot_with_disk_nic_and_channel() {
        let mut c = base(Accel::Kvm);
        c.vcpus = 2;
        c.memory_mib = 2048;
        c.boot = Boot::Kernel {
            kernel: "/var/lib/skyvisor/images/debian/vmlinuz".into(),
            initrd: Some("/var/lib/skyvisor/images/debian/initrd.img".into()),
            cmdline: "console=ttyS0 root=/dev/vda rw quiet".into(),
        };
        c.disks.push(DiskConfig {
            id: "root".into(),
            source: DiskSource::File {
                path: "/var/lib/skyvisor/vms/web-1/root.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
            read_only: false,
            cache: CacheMode::None,
        });
        c.disks.push(DiskConfig {
            id: "seed".into(),
            source: DiskSource::File {
                path: "/var/lib/skyvisor/vms/web-1/seed,1.img".into(),
                format: DiskFormat::Raw,
            },
            read_only: true,
            cache: CacheMode::Writethrough,
        });
        c.nics.push(NicConfig {
            id: "net0".into(),
            ifname: "sv-tap-web1".into(),
            mac: "52:54:00:12:34:56".parse().expect("mac"),
            vhost: true,
            fd: None,
        });
        c.guest_channel = true;
        c.sandbox = true;
        insta::assert_snapshot!("kernel_boot_with_disk_nic_and_channel", lines(&c));
    }

    #[test]
    fn firmware_boot_boots_first_disk() {
        let mut c = base(Accel::Tcg);
        c.rng = false;
        c.disks.push(DiskConfig {
            id: "root".into(),
            source: DiskSource::File {
                path: "/data/root.raw".into(),
                format: DiskFormat::Raw,
            },
            read_only: false,
            cache: CacheMode::Writeback,
        });
        insta::assert_snapshot!("firmware_boot", lines(&c));
    }

    #[test]
    fn incoming_migration() {
        let mut c = base(Accel::Tcg);
        c.incoming = Some(Incoming::Defer);
        insta::assert_snapshot!("incoming_defer", lines(&c));
        c.incoming = Some(Incoming::Uri("tcp:0.0.0.0:4444".into()));
        let args = c.to_args().expect("valid");
        assert_eq!(
            args[args.len() - 2..],
            ["-incoming".to_owned(), "tcp:0.0.0.0:4444".to_owned()]
        );
    }

    #[test]
    fn nbd_disks() {
        let mut c = base(Accel::Tcg);
        c.disks.push(DiskConfig {
            id: "vol-a".into(),
            source: DiskSource::Nbd {
                server: NbdServer::Inet {
                    host: "10.0.0.7".into(),
                    port: 10809,
                },
                export: "vol-a".into(),
                reconnect_delay_secs: Some(10),
            },
            read_only: false,
            cache: CacheMode::None,
        });
        c.disks.push(DiskConfig {
            id: "vol-b".into(),
            source: DiskSource::Nbd {
                server: NbdServer::Unix {
                    path: "/run/skyvisor/nbd.sock".into(),
                },
                export: "vol-b".into(),
                reconnect_delay_secs: None,
            },
            read_only: true,
            cache: CacheMode::Unsafe,
        });
        insta::assert_snapshot!("nbd_disks", lines(&c));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut c = base(Accel::Tcg);
        c.run_dir = "/run/a,b".into();
        let args = c.to_args().expect("valid");
        assert!(
            args.contains(&"socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off".to_owned())
        );
        assert!(
            args.contains(&"/run/a,b/qemu.pid".to_owned()),
            "the pidfile is a plain argument"
        );
    }

    #[test]
    fn bad_configs_are_rejected_with_the_field() {
        type Mutation = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|c| c.name.clear())),
            ("vcpus", Box::new(|c| c.vcpus = 0)),
            ("memory_mib", Box::new(|c| c.memory_mib = 1)),
            ("cpu", Box::new(|c| c.cpu = "host x".into())),
            ("run_dir", Box::new(|c| c.run_dir = "relative/dir".into())),
            (
                "run_dir",
                Box::new(|c| c.run_dir = PathBuf::from(format!("/{}", "x".repeat(100)))),
            ),
            (
                "incoming",
                Box::new(|c| c.incoming = Some(Incoming::Uri(String::new()))),
            ),
            (
                "disk id",
                Box::new(|c| {
                    c.disks.push(DiskConfig {
                        id: "9bad".into(),
                        source: DiskSource::File {
                            path: "/x".into(),
                            format: DiskFormat::Raw,
                        },
                        read_only: false,
                        cache: CacheMode::None,
                    })
                }),
            ),
            (
                "disk id",
                Box::new(|c| {
                    c.disks.push(DiskConfig {
                        id: "qmp".into(),
                        source: DiskSource::File {
                            path: "/x".into(),
                            format: DiskFormat::Raw,
                        },
                        read_only: false,
                        cache: CacheMode::None,
                    })
                }),
            ),
            (
                "disk id",
                Box::new(|c| {
                    c.disks.push(DiskConfig {
                        id: "a".repeat(27),
                        source: DiskSource::File {
                            path: "/x".into(),
                            format: DiskFormat::Raw,
                        },
                        read_only: false,
                        cache: CacheMode::None,
                    })
                }),
            ),
            (
                "tap ifname",
                Box::new(|c| {
                    c.nics.push(NicConfig {
                        id: "net0".into(),
                        ifname: "a-very-long-tap-name".into(),
                        mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
                        vhost: false,
                        fd: None,
                    })
                }),
            ),
            (
                "nic id",
                Box::new(|c| {
                    let nic = NicConfig {
                        id: "net0".into(),
                        ifname: "tap0".into(),
                        mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
                        vhost: false,
                        fd: None,
                    };
                    c.nics.push(nic.clone());
                    c.nics.push(nic);
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = base(Accel::Tcg);
            mutate(&mut c);
            match c.to_args() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                Ok(args) => panic!("expected {field} to be rejected, got {args:?}"),
            }
        }
    }

    #[test]
    fn hotplug_json_matches_the_command_line() {
        let disk = DiskConfig {
            id: "data".into(),
            source: DiskSource::File {
                path: "/d.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
            read_only: false,
            cache: CacheMode::Directsync,
        };
        let bd = disk.blockdev_json().expect("json");
        assert_eq!(bd["node-name"], "data");
        assert_eq!(bd["file"]["node-name"], "data-file");
        assert_eq!(bd["cache"]["direct"], true);
        let dev = disk.device_json(false);
        assert_eq!(dev["drive"], "data");
        assert_eq!(dev["write-cache"], "off");
        assert!(dev.get("bootindex").is_none());

        let nic = NicConfig {
            id: "net1".into(),
            ifname: "tap1".into(),
            mac: MacAddr([0x52, 0x54, 0, 1, 2, 3]),
            vhost: false,
            fd: None,
        };
        assert_eq!(nic.netdev_json()["ifname"], "tap1");
        assert_eq!(
            nic.netdev_arg(),
            "tap,id=net1,ifname=tap1,script=no,downscript=no"
        );
        let inherited = NicConfig {
            fd: Some(7),
            ..nic.clone()
        };
        assert_eq!(inherited.netdev_arg(), "tap,id=net1,fd=7");
        assert_eq!(nic.device_json()["mac"], "52:54:00:01:02:03");
    }
}

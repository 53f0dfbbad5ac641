//! Power handling inside the guest: graceful poweroff/reboot (sync, unmount `/data`,
//! `reboot(2)`; in a container, sync and SIGTERM to PID 1), the ACPI power button
//! (KEY_POWER on `/dev/input/event*`), and the accelerator probe.
//!
//! It must never cut a durable disk write in half: shutdown takes the disk's writer
//! lock before unmounting.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::service::{Guest, Place, PowerAction};

/// How long a container's service waits for `/init` to stop it after asking.
const CONTAINER_STOP_WAIT: Duration = Duration::from_secs(60);

/// Size of `struct input_event` on 64-bit Linux.
pub const INPUT_EVENT_BYTES: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// The type, code and value of one input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    /// Event type (`EV_KEY` = 1).
    pub kind: u16,
    /// Key or axis code.
    pub code: u16,
    /// 1 = press, 0 = release, 2 = autorepeat.
    pub value: i32,
}

impl InputEvent {
    /// Decodes a raw `struct input_event` (timeval, u16 type, u16 code, i32 value).
    pub fn parse(raw: &[u8; INPUT_EVENT_BYTES]) -> Self {
        InputEvent {
            kind: u16::from_ne_bytes([raw[16], raw[17]]),
            code: u16::from_ne_bytes([raw[18], raw[19]]),
            value: i32::from_ne_bytes([raw[20], raw[21], raw[22], raw[23]]),
        }
    }

    /// Whether this is the power button being pressed.
    pub fn is_power_press(&self) -> bool {
        self.kind == EV_KEY && self.code == KEY_POWER && self.value == 1
    }
}

/// Flushes all filesystems.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn unmount(path: &Path) {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        eprintln!(
            "skyvisor-guest: unmounting {}: {err}; remounting read-only",
            path.display()
        );
        // SAFETY: valid path and null fs type/data pointers, as remount allows.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            eprintln!(
                "skyvisor-guest: remounting {} read-only: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

fn reboot_syscall(cmd: libc::c_int) -> ! {
    // SAFETY: reboot(2) with a valid command; on success it does not return.
    unsafe { libc::reboot(cmd) };
    eprintln!(
        "skyvisor-guest: reboot(2) failed: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1)
}

/// Syncs, unmounts the data disk and powers off or reboots. Never returns.
/// In a container, see [`stop_container`].
pub fn graceful(guest: &Guest, action: PowerAction) -> ! {
    if guest.config().place == Place::Container {
        stop_container(guest, action)
    }
    println!("skyvisor-guest: {action:?}: syncing and unmounting /data");
    // Hold the writer lock for good: no durable write may start or be cut short.
    let guard = guest.disk().lock();
    sync();
    unmount(guest.disk().root());
    sync();
    let _ = std::io::stdout().flush();
    let cmd = match action {
        PowerAction::PowerOff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    let _keep = guard;
    reboot_syscall(cmd)
}

/// A container cannot reboot(2) (and must not: that is the host's kernel).
/// Syncs and sends SIGTERM to PID 1 (`/init`), which stops this service, syncs
/// and exits, ending the container. A reboot is the same: the host's restart
/// policy starts the container again. Never returns: `/init`'s SIGTERM ends
/// this process.
fn stop_container(guest: &Guest, action: PowerAction) -> ! {
    println!("skyvisor-guest: {action:?} in a container: syncing and stopping PID 1");
    // Held until the end: no durable write may start or be cut short.
    let _guard = guest.disk().lock();
    sync();
    let _ = std::io::stdout().flush();
    // SAFETY: kill(2) with a constant pid and signal.
    if unsafe { libc::kill(1, libc::SIGTERM) } != 0 {
        eprintln!(
            "skyvisor-guest: cannot signal PID 1: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    thread::sleep(CONTAINER_STOP_WAIT);
    // Still here: /init did not stop us. Let its loop start a fresh service
    // rather than keep the disk lock forever.
    eprintln!("skyvisor-guest: PID 1 did not stop the container; exiting");
    std::process::exit(1)
}

/// The accelerator probe: prints `SKYVISOR-PROBE-OK` on the console, waits until the
/// serial line has actually sent it, and powers off.
pub fn probe() -> ! {
    // Leading newline: firmware escape sequences may precede us on the same line.
    let line = b"\nSKYVISOR-PROBE-OK\n";
    match fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut console) => {
            let _ = console.write_all(line);
            // SAFETY: the descriptor is open for the duration of the call.
            unsafe { libc::tcdrain(console.as_raw_fd()) };
        }
        Err(_) => {
            let _ = std::io::stdout().write_all(line);
            let _ = std::io::stdout().flush();
        }
    }
    sync();
    reboot_syscall(libc::RB_POWER_OFF)
}

fn watch_device(path: PathBuf, on_press: Arc<dyn Fn() + Send + Sync>) {
    let Ok(mut f) = File::open(&path) else {
        return;
    };
    let mut raw = [0u8; INPUT_EVENT_BYTES];
    while f.read_exact(&mut raw).is_ok() {
        if InputEvent::parse(&raw).is_power_press() {
            println!("skyvisor-guest: power button pressed ({})", path.display());
            on_press();
        }
    }
}

/// Watches every `/dev/input/event*` (now and as they appear) for KEY_POWER.
pub fn watch_power_button(on_press: Arc<dyn Fn() + Send + Sync>) {
    let mut watched: HashSet<PathBuf> = HashSet::new();
    loop {
        if let Ok(entries) = fs::read_dir("/dev/input") {
            for e in entries.flatten() {
                let path = e.path();
                let is_event = e.file_name().to_string_lossy().starts_with("event");
                if is_event && watched.insert(path.clone()) {
                    let cb = Arc::clone(&on_press);
                    let _ = thread::Builder::new()
                        .name("power-button".to_string())
                        .spawn(move || watch_device(path, cb));
                }
            }
        }
        thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u16, code: u16, value: i32) -> [u8; INPUT_EVENT_BYTES] {
        let mut r = [0u8; INPUT_EVENT_BYTES];
        r[..8].copy_from_slice(&12345u64.to_ne_bytes());
        r[16..18].copy_from_slice(&kind.to_ne_bytes());
        r[18..20].copy_from_slice(&code.to_ne_bytes());
        r[20..24].copy_from_slice(&value.to_ne_bytes());
        r
    }

    #[test]
    fn recognises_only_power_presses() {
        assert!(InputEvent::parse(&raw(1, 116, 1)).is_power_press());
        assert!(!InputEvent::parse(&raw(1, 116, 0)).is_power_press());
        assert!(!InputEvent::parse(&raw(1, 116, 2)).is_power_press());
        assert!(!InputEvent::parse(&raw(1, 30, 1)).is_power_press());
        assert!(!InputEvent::parse(&raw(0, 116, 1)).is_power_press());
        assert_eq!(
            InputEvent::parse(&raw(4, 3, -7)),
            InputEvent {
                kind: 4,
                code: 3,
                value: -7
            }
        );
    }
}

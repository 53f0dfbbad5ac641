//! Frames queued in a tap whose reader stopped (a migrating guest's paused
//! QEMU) are sent on out of another device, on the real Linux datapath: a
//! real tap with virtio-net headers (as QEMU opens it), a veth pair
//! standing in for the overlay, packet sockets on both ends. The test runs
//! in a network namespace of its own.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use skyvisor_core::MacAddr;
use skyvisor_net::forward_queued_frames;

const TAP: &str = "svq-tap";
/// An EtherType for local experiments: nothing else on the veth uses it.
const ETHERTYPE: &str = "88b5";

mod common;
use common::sh;

/// Opens tap [`TAP`] as QEMU does for a virtio-net NIC: no packet info,
/// 12-byte virtio-net headers.
fn open_tap() -> OwnedFd {
    let path = c"/dev/net/tun";
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero `ifreq` is a valid value of the C struct.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(TAP.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads one `ifreq`, which the pointer points at.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let len: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which the pointer points at.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
    assert!(
        r >= 0,
        "TUNSETVNETHDRSZ: {}",
        std::io::Error::last_os_error()
    );
    tap
}

/// A frame of our EtherType from 52:54:00:99:00:01 to `dst`, carrying `tag`.
fn frame(dst: [u8; 6], tag: &str) -> String {
    let mut f = dst.iter().map(|b| format!("{b:02x}")).collect::<String>();
    f.push_str("525400990001");
    f.push_str(ETHERTYPE);
    f.push_str(&hex(tag.as_bytes()));
    // Padded to Ethernet's minimum (60 bytes without the FCS).
    while f.len() < 120 {
        f.push_str("00");
    }
    f
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn frames_queued_in_a_tap_for_the_guest_are_sent_out_of_the_overlay_and_the_rest_dropped() {
    // SAFETY: unshare(2) on this thread only; everything below (the tap,
    // the sockets, the child processes) lives in the new namespace.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare: {} (needs root)",
        std::io::Error::last_os_error()
    );
    sh("ip link set lo up");
    let tap = open_tap();
    sh(&format!(
        "ip link set {TAP} up && ip link add svq-a type veth peer name svq-b && \
         ip link set svq-a up && ip link set svq-b up"
    ));

    // What arrives on the far end of the "overlay", in order.
    let mut receiver = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket,sys\n\
             s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(0x{ETHERTYPE}))\n\
             s.bind(('svq-b',0)); s.settimeout(20)\n\
             print('ready',flush=True)\n\
             for _ in range(2): print(s.recv(70000).hex(),flush=True)\n"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut lines = BufReader::new(receiver.stdout.take().expect("stdout")).lines();
    let ready = lines.next().expect("receiver output").expect("read");
    assert_eq!(ready, "ready");

    // The guest's MAC, and frames for it, for someone else and for all,
    // queued in the tap (sent out of its device: nobody reads the file).
    let guest = MacAddr([0x52, 0x54, 0x00, 0x99, 0x00, 0x02]);
    let queued = [
        frame([0x52, 0x54, 0x00, 0x99, 0x00, 0x03], "someone else"),
        frame([0xff; 6], "everyone"),
        frame(guest.0, "first"),
        frame(guest.0, "second"),
    ];
    let sends = queued
        .iter()
        .map(|f| format!("s.send(bytes.fromhex('{f}'))\n"))
        .collect::<String>();
    sh(&format!(
        "python3 -c \"import socket\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
         s.bind(('{TAP}',0))\n{sends}\""
    ));

    let sent = forward_queued_frames(tap.as_fd(), guest, "svq-a").expect("forward");
    assert_eq!(sent, 2, "only the guest's two frames go on");
    let got: Vec<String> = (0..2)
        .map(|_| lines.next().expect("a frame").expect("read"))
        .collect();
    assert_eq!(
        got,
        [queued[2].clone(), queued[3].clone()],
        "in order, whole"
    );
    assert!(receiver.wait().expect("receiver").success());
    // Everything was read: the queue is empty now.
    assert_eq!(
        forward_queued_frames(tap.as_fd(), guest, "svq-a").expect("forward again"),
        0
    );
    // A device that does not exist is named in the error.
    let err = forward_queued_frames(tap.as_fd(), guest, "svq-none").expect_err("no device");
    assert!(err.to_string().contains("svq-none"), "{err}");
}

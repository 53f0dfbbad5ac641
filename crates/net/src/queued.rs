//! Frames a tap holds for a guest that stopped reading them (a live
//! migration's paused source), sent on to where the guest runs now.
//!
//! QEMU stops reading a paused guest's tap (after at most one frame, which
//! it keeps in its own queue), so frames that reach the tap during a
//! migration's pause wait in the tap's queue. The queue lives as
//! long as some process holds the tap's open file: the source agent takes
//! a reference to QEMU's before the migration, and after the handover it
//! reads the queue and sends the guest's frames out of the overlay, whose
//! entry for the guest's MAC points at the destination by then. Plain QEMU
//! loses these frames with its process, and each lost SYN costs its client
//! TCP's one-second retransmission.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use skyvisor_core::MacAddr;

use crate::NetError;

/// The largest frame a tap hands over (a GSO frame of 64 KiB) with its
/// virtio-net header.
const MAX_FRAME: usize = 65_536 + 128;

/// The virtio-net header an `AF_PACKET` socket takes with
/// `PACKET_VNET_HDR` (`struct virtio_net_hdr`); a tap's may be longer (12
/// bytes with `num_buffers`), and starts with the same fields.
const PACKET_VNET_HDR_LEN: usize = 10;

/// At most this many frames per call: a tap's queue holds 500 by default,
/// and nothing should keep refilling it once traffic goes elsewhere.
const MAX_FRAMES: usize = 4096;

/// Destination MAC, source MAC, EtherType.
const ETHERNET_HEADER: usize = 14;

/// Reads every frame queued in `tap` (an open file of a tap; the caller's
/// reference to the one a paused guest's QEMU opened) and sends the ones
/// addressed to `mac` out of `device` (the overlay device towards the
/// guest's new host), in the order they queued. Frames for anyone else are
/// dropped: they are floods the bridge already sent everywhere. Returns how
/// many frames were sent. Never waits: it stops at the first empty read.
pub fn forward_queued_frames(
    tap: BorrowedFd<'_>,
    mac: MacAddr,
    device: &str,
) -> Result<usize, NetError> {
    let header = vnet_header_len(tap)?;
    let ifindex = interface_index(device)?;
    let socket = packet_socket(header > 0)?;
    let mut buf = vec![0u8; MAX_FRAME];
    let mut sent = 0;
    let mut first_error = None;
    for _ in 0..MAX_FRAMES {
        let Some(len) = read_queued(tap, &mut buf)? else {
            break;
        };
        if len < header + ETHERNET_HEADER || buf[header..header + 6] != mac.0 {
            continue;
        }
        // The socket wants the 10-byte header right before the frame: move
        // the tap's first 10 bytes (the same fields) up to meet it.
        let start = header.saturating_sub(PACKET_VNET_HDR_LEN);
        if header > 0 {
            buf.copy_within(..PACKET_VNET_HDR_LEN, start);
        }
        let frame = &buf[header..len];
        let ethertype = u16::from_ne_bytes([frame[12], frame[13]]);
        match send_frame(&socket, ifindex, ethertype, &mac, &buf[start..len]) {
            Ok(()) => sent += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if sent == 0 => Err(system("send a queued frame on", device, e)),
        Some(e) => {
            tracing::warn!(device, error = %e, sent, "some queued frames could not be sent on");
            Ok(sent)
        }
        None => Ok(sent),
    }
}

fn system(action: &str, what: &str, source: io::Error) -> NetError {
    NetError::System {
        action: format!("{action} {what}"),
        source,
    }
}

/// The length of the virtio-net header the tap puts before each frame (0
/// when it puts none).
fn vnet_header_len(tap: BorrowedFd<'_>) -> Result<usize, NetError> {
    // SAFETY: an all-zero `ifreq` is a valid value of the C struct.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `ifreq` to the pointer, which points at
    // one; `tap` is an open file for the duration of the call.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETIFF, &mut ifr) } < 0 {
        return Err(system(
            "read the flags of",
            "the tap file",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    if flags & libc::IFF_VNET_HDR == 0 {
        return Ok(0);
    }
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int to the pointer, which points
    // at one.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len) } < 0 {
        return Err(system(
            "read the header size of",
            "the tap file",
            io::Error::last_os_error(),
        ));
    }
    usize::try_from(len)
        .ok()
        .filter(|l| (PACKET_VNET_HDR_LEN..=MAX_FRAME / 2).contains(l))
        .ok_or_else(|| {
            system(
                "use the header size of",
                "the tap file",
                io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes")),
            )
        })
}

fn interface_index(device: &str) -> Result<u32, NetError> {
    let name = CString::new(device).map_err(|_| NetError::InvalidName {
        name: device.to_string(),
        reason: "it contains a NUL byte".into(),
    })?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(system("find", device, io::Error::last_os_error())),
        index => Ok(index),
    }
}

/// A packet socket that sends whole frames (and receives none: protocol 0),
/// taking a virtio-net header before each when `vnet_header`.
fn packet_socket(vnet_header: bool) -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(system(
            "open",
            "a packet socket",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if vnet_header {
        let on: libc::c_int = 1;
        // SAFETY: the option value is one int, of the size passed.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(system(
                "turn on virtio-net headers of",
                "a packet socket",
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(socket)
}

/// Reads one queued frame into `buf`: its length, or None when the queue
/// is empty.
fn read_queued(tap: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
    let mut poll = libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // The file's blocking mode is QEMU's to set: look before reading.
    // SAFETY: one pollfd, of the count passed; timeout 0 never waits.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    if ready < 0 {
        return Err(system("poll", "the tap file", io::Error::last_os_error()));
    }
    if ready == 0 || poll.revents & libc::POLLIN == 0 {
        return Ok(None);
    }
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(system("read", "the tap file", e)),
        };
    }
    Ok(Some(n as usize))
}

fn send_frame(
    socket: &OwnedFd,
    ifindex: u32,
    ethertype_be: u16,
    dst: &MacAddr,
    bytes: &[u8],
) -> io::Result<()> {
    // SAFETY: an all-zero `sockaddr_ll` is a valid value of the C struct.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ethertype_be;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst.0);
    // SAFETY: `bytes` is readable for its length and `addr` is a
    // `sockaddr_ll` of the size passed.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

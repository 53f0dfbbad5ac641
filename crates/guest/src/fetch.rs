//! `GET /fetch?url=http://IP[:PORT]/PATH`: the guest fetches a page from
//! another machine and reports what it got, so that tests (and people) can
//! check what a VM itself reaches over the network: another VM, a host.
//!
//! Only plain HTTP to an IPv4 address or a name the guest's resolver
//! knows (`GET /resolve?name=NAME` shows what it answers), with a short
//! timeout and a bounded answer; this must never hang a connection thread
//! for long.
//! `&from=IP` sends from that source address, owned or not (tests of the
//! host's address guards).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

/// How long connecting, sending and reading may each take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (head and body).
const MAX_ANSWER: u64 = 1 << 20;

/// What a fetch got.
#[derive(Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The HTTP status.
    pub status: u16,
    /// The body, as text (lossy).
    pub body: String,
}

/// Splits `http://1.2.3.4:8080/a?b` into the address and the request target.
pub fn parse_url(url: &str) -> Result<(SocketAddrV4, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs can be fetched"))?;
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: invalid port {p:?}"))?,
        ),
        None => (authority, 80),
    };
    let ip: Ipv4Addr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => *resolve(host)
            .map_err(|e| format!("{url:?}: {e}"))?
            .first()
            .ok_or_else(|| format!("{url:?}: {host:?} has no IPv4 address"))?,
    };
    if target.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(format!("{url:?}: invalid characters in the path"));
    }
    Ok((SocketAddrV4::new(ip, port), target.to_string()))
}

/// The IPv4 addresses of `name` by the guest's resolver (the C library's,
/// configured by `/etc/resolv.conf`), sorted.
pub fn resolve(name: &str) -> Result<Vec<Ipv4Addr>, String> {
    use std::net::ToSocketAddrs;
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_ascii_control() || c == ' ')
    {
        return Err(format!("{name:?} is not a host name"));
    }
    let mut found: Vec<Ipv4Addr> = (name, 0)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {name:?}: {e}"))?
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(*v4.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        return Err(format!("{name:?} has no IPv4 address"));
    }
    Ok(found)
}

/// Connects to `addr` from source address `from`, even one this guest
/// does not own (`IP_FREEBIND`): how a test plays a guest that forges
/// another's address, which its host must stop.
fn connect_from(from: Ipv4Addr, addr: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket; the stream takes sole ownership of it at once.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is open and owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // Linux bounds a blocking connect by the send timeout.
    stream.set_write_timeout(Some(TIMEOUT))?;
    // SAFETY: valid fd, option value and lengths.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    let local = sockaddr(SocketAddrV4::new(from, 0));
    // SAFETY: valid fd and address of the stated length.
    check(unsafe { libc::bind(fd, std::ptr::addr_of!(local).cast(), len) })?;
    let remote = sockaddr(addr);
    // SAFETY: valid fd and address of the stated length.
    check(unsafe { libc::connect(fd, std::ptr::addr_of!(remote).cast(), len) })?;
    Ok(stream)
}

/// GETs `url` with HTTP/1.0, from source address `from` if given.
pub fn fetch(url: &str, from: Option<Ipv4Addr>) -> Result<Fetched, String> {
    let (addr, target) = parse_url(url)?;
    let connected = match from {
        Some(from) => connect_from(from, addr),
        None => TcpStream::connect_timeout(&SocketAddr::V4(addr), TIMEOUT),
    };
    let mut s = connected.map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("{addr}: {e}"))?;
    // One write: a server may answer and close once it has the head.
    let request = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr} answered no HTTP status"))?;
    let body = text
        .find("\r\n\r\n")
        .map(|i| text[i + 4..].to_string())
        .unwrap_or_default();
    Ok(Fetched { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls_are_checked() {
        let (a, t) = parse_url("http://10.0.0.2/identity").expect("ok");
        assert_eq!(a.to_string(), "10.0.0.2:80");
        assert_eq!(t, "/identity");
        let (a, t) = parse_url("http://10.0.0.2:8080").expect("ok");
        assert_eq!((a.port(), t.as_str()), (8080, "/"));
        assert!(parse_url("https://10.0.0.2/").is_err());
        // .invalid never resolves (RFC 6761).
        assert!(parse_url("http://nothing.invalid/").is_err());
        assert_eq!(
            parse_url("http://localhost:81/")
                .expect("a name")
                .0
                .to_string(),
            "127.0.0.1:81"
        );
        assert!(parse_url("http://10.0.0.2:99999/").is_err());
        assert!(parse_url("http://10.0.0.2/a b").is_err());
    }

    #[test]
    fn fetches_from_a_server_and_reports_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).expect("read");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /x HTTP/1.0"));
            c.write_all(b"HTTP/1.0 201 Created\r\nContent-Length: 2\r\n\r\nhi")
                .expect("write");
        });
        let got = fetch(&format!("http://127.0.0.1:{port}/x"), None).expect("fetch");
        assert_eq!(
            got,
            Fetched {
                status: 201,
                body: "hi".into()
            }
        );
        server.join().expect("server");
        // Nothing listens there any more.
        let err = fetch(&format!("http://127.0.0.1:{port}/x"), None).expect_err("refused");
        assert!(err.contains("connecting to"), "{err}");
    }

    #[test]
    fn fetches_from_a_given_source_address() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut c, peer) = l.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).expect("read");
            let body = peer.ip().to_string();
            let answer = format!("HTTP/1.0 200 OK\r\n\r\n{body}");
            c.write_all(answer.as_bytes()).expect("write");
        });
        let from = Ipv4Addr::new(127, 0, 0, 77);
        let got = fetch(&format!("http://127.0.0.1:{port}/"), Some(from)).expect("fetch");
        assert_eq!(got.body, "127.0.0.77");
        server.join().expect("server");
    }
}

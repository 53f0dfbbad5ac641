//! Carries a live migration's streams (QEMU's memory stream and the disk
//! mirror's NBD connection) between two agents over mutual TLS with the
//! cluster's certificates.
//!
//! QEMU talks to a unix socket of its own agent on both sides; the agents
//! join those sockets with one rustls connection each. Not QEMU's own TLS:
//! it makes one TLS record, and one system call, of every 4 KiB page (its
//! TLS channel writes each element of an I/O vector on its own, and GnuTLS
//! reads each record in two calls), which doubled a migration's time here.
//! The tunnel reads QEMU's socket 256 KiB at a time and sends full 16 KiB
//! records.
//!
//! The destination's listener admits only a peer with a certificate of
//! the cluster's CA; the source checks that the destination's certificate
//! names the destination's address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use skyvisor_volume::link_tls::LinkTls;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Bytes read from one side before they are written to the other.
const BUFFER: usize = 256 * 1024;
/// The kernel buffers of a tunnel's TCP connection, each way. Left to
/// autotuning they grow to many MiB, and the destination, which loads what
/// it receives more slowly than the source sends, fell tens of
/// milliseconds behind: the source's QEMU reported the last copy done
/// while the guest still waited for it at the destination, inside the
/// pause. 1 MiB still carries gigabytes a second at a data centre's
/// round-trip times.
const SOCKET_BUFFER: usize = 1 << 20;
/// How long connecting and a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running tunnel end: stops, and breaks its connections, when dropped.
#[derive(Debug)]
pub struct Tunnel {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The destination's end: listens for TLS on `host` (a free port) and joins
/// each authenticated connection to QEMU's unix socket `qemu`. Returns the
/// port.
pub async fn listen(tls: LinkTls, host: &str, qemu: PathBuf) -> std::io::Result<(u16, Tunnel)> {
    let listener = TcpListener::bind((host, 0)).await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        // Dropped with the task: aborts the connections too.
        let mut conns = JoinSet::new();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "migration tunnel: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tls, qemu) = (tls.clone(), qemu.clone());
            conns.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let _ = socket2::SockRef::from(&tcp).set_recv_buffer_size(SOCKET_BUFFER);
                let mut remote = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(%peer, error = %e, "migration tunnel: refused a peer");
                        return;
                    }
                    Err(_) => {
                        warn!(%peer, "migration tunnel: handshake timed out");
                        return;
                    }
                };
                let mut local = match UnixStream::connect(&qemu).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(socket = %qemu.display(), error = %e, "migration tunnel: QEMU's socket");
                        return;
                    }
                };
                carry(&mut remote, &mut local).await;
            });
            // Reap finished connections as they go.
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((port, Tunnel { task }))
}

/// The source's end: a unix socket at `at` for QEMU; each connection QEMU
/// makes is carried to `addr` (`host:port`) over TLS.
pub async fn forward(tls: LinkTls, at: &Path, addr: String) -> std::io::Result<Tunnel> {
    match tokio::fs::remove_file(at).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(at)?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let mut local = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "migration tunnel: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tls, addr) = (tls.clone(), addr.clone());
            conns.spawn(async move {
                let connected = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    let tcp = TcpStream::connect(&addr).await?;
                    let _ = tcp.set_nodelay(true);
                    let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(SOCKET_BUFFER);
                    tls.connect(&addr, tcp).await
                })
                .await;
                let mut remote = match connected {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(%addr, error = %e, "migration tunnel: cannot reach the destination");
                        return;
                    }
                    Err(_) => {
                        warn!(%addr, "migration tunnel: connecting timed out");
                        return;
                    }
                };
                carry(&mut remote, &mut local).await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok(Tunnel { task })
}

/// Copies both ways until both sides are done (each side's end of stream
/// is passed on as a shutdown of the other's writing half).
async fn carry<A, B>(a: &mut A, b: &mut B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await {
        Ok((sent, received)) => debug!(sent, received, "migration tunnel: stream done"),
        Err(e) => debug!(error = %e, "migration tunnel: stream broken"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn member(ca: &skyvisor_auth::pki::ClusterCa) -> LinkTls {
        let m = ca.issue_member(&["127.0.0.1".into()]).expect("member");
        LinkTls::from_pem(&m.chain_pem, &m.key_pem, &ca.cert_pem).expect("tls")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_crosses_whole_and_a_stranger_gets_nothing_through() {
        let store = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let ca = skyvisor_auth::pki::ClusterCa::load_or_create(&store)
            .await
            .expect("ca");
        let dir = tempfile::tempdir().expect("dir");
        // "QEMU" on the destination: reads everything, answers with its length.
        let qemu_sock = dir.path().join("qemu.sock");
        let qemu = UnixListener::bind(&qemu_sock).expect("bind");
        let sink = tokio::spawn(async move {
            let mut total = Vec::new();
            loop {
                let (mut s, _) = qemu.accept().await.expect("accept");
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("read");
                s.write_all(&(got.len() as u64).to_be_bytes())
                    .await
                    .expect("answer");
                s.shutdown().await.expect("shutdown");
                total.push(got);
                if total.len() == 1 {
                    return total;
                }
            }
        });
        let (port, _dest) = listen(member(&ca), "127.0.0.1", qemu_sock)
            .await
            .expect("listen");

        // A stranger with a certificate of another CA: nothing reaches QEMU.
        let other = skyvisor_store::EmbeddedStore::in_memory().expect("store");
        let other_ca = skyvisor_auth::pki::ClusterCa::load_or_create(&other)
            .await
            .expect("ca");
        let stranger_sock = dir.path().join("stranger.sock");
        // It trusts our CA, so only the destination's check can stop it.
        let theirs = other_ca
            .issue_member(&["127.0.0.1".into()])
            .expect("member");
        let stranger_tls =
            LinkTls::from_pem(&theirs.chain_pem, &theirs.key_pem, &ca.cert_pem).expect("tls");
        let _stranger = forward(stranger_tls, &stranger_sock, format!("127.0.0.1:{port}"))
            .await
            .expect("forward");
        let mut s = UnixStream::connect(&stranger_sock).await.expect("connect");
        let _ = s.write_all(b"not for you").await;
        let _ = s.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
        assert!(answer.is_empty(), "a stranger got an answer: {answer:?}");

        // The source's QEMU sends 8 MiB through the tunnel.
        let src_sock = dir.path().join("src.sock");
        let _src = forward(member(&ca), &src_sock, format!("127.0.0.1:{port}"))
            .await
            .expect("forward");
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let mut s = UnixStream::connect(&src_sock).await.expect("connect");
        s.write_all(&data).await.expect("send");
        s.shutdown().await.expect("end");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("answer");
        assert_eq!(answer, (data.len() as u64).to_be_bytes());
        let got = tokio::time::timeout(Duration::from_secs(20), sink)
            .await
            .expect("sink done")
            .expect("sink");
        assert_eq!(got.len(), 1, "only the member's stream reached QEMU");
        assert!(got[0] == data, "the stream arrived whole");
    }
}

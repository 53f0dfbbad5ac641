//! Mutual authentication of replica connections with the cluster's link
//! key: before any frame, each side proves it holds the key by an
//! HMAC-SHA256 over both sides' fresh nonces, so a peer without the key
//! can neither write replica data nor pose as a replica, and a recorded
//! handshake cannot be replayed. (It authenticates; it does not encrypt.)
//!
//! ```text
//! server → client: "SVREPL01" | server nonce (32)
//! client → server: client nonce (32) | HMAC(key, "client" | ns | nc)
//! server → client: HMAC(key, "server" | ns | nc)
//! ```

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 8] = b"SVREPL01";
const NONCE: usize = 32;
const PROOF: usize = 32;

/// The key of this process's cluster, set once at start by the host agent
/// (from the store) before it serves or opens any volume. Every replica
/// server and client in the process uses it; without it (tests, the
/// stand-alone node binary) links are not authenticated. Process-wide
/// rather than threaded through every call that may open a link: it is
/// configuration, written once, like a trust root.
static PROCESS_KEY: std::sync::OnceLock<LinkKey> = std::sync::OnceLock::new();

/// Sets this process's link key; later calls keep the first (one process
/// belongs to one cluster).
pub fn set_process_key(key: LinkKey) {
    let _ = PROCESS_KEY.set(key);
}

/// This process's link key, if set.
pub fn process_key() -> Option<&'static LinkKey> {
    PROCESS_KEY.get()
}

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The cluster's shared secret for replica links.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(<secret>)")
    }
}

impl LinkKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn proof(&self, role: &[u8], ns: &[u8], nc: &[u8]) -> [u8; PROOF] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(role);
        mac.update(ns);
        mac.update(nc);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, role: &[u8], ns: &[u8], nc: &[u8], proof: &[u8]) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(role);
        mac.update(ns);
        mac.update(nc);
        mac.verify_slice(proof).is_ok()
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other side does not hold the cluster's key.
    #[error("the peer did not prove it holds the cluster's link key")]
    BadProof,
    /// The other side does not speak this handshake.
    #[error("the peer is not a Skyvisor replica endpoint with link authentication")]
    BadMagic,
    /// The handshake took too long.
    #[error("link handshake timed out")]
    Timeout,
    /// The connection failed.
    #[error("link handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// The server's side, run on each accepted connection.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    key: &LinkKey,
    stream: &mut S,
) -> Result<(), HandshakeError> {
    accept_within(key, stream, HANDSHAKE_TIMEOUT).await
}

async fn accept_within<S: AsyncRead + AsyncWrite + Unpin>(
    key: &LinkKey,
    stream: &mut S,
    deadline: Duration,
) -> Result<(), HandshakeError> {
    tokio::time::timeout(deadline, async {
        let ns: [u8; NONCE] = rand::random();
        let mut hello = Vec::with_capacity(MAGIC.len() + NONCE);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&ns);
        stream.write_all(&hello).await?;
        let mut reply = [0u8; NONCE + PROOF];
        stream.read_exact(&mut reply).await?;
        let (nc, proof) = reply.split_at(NONCE);
        if !key.verify(b"client", &ns, nc, proof) {
            return Err(HandshakeError::BadProof);
        }
        stream.write_all(&key.proof(b"server", &ns, nc)).await?;
        Ok(())
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

/// The client's side, run right after connecting.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    key: &LinkKey,
    stream: &mut S,
) -> Result<(), HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut hello = [0u8; 8 + NONCE];
        stream.read_exact(&mut hello).await?;
        if &hello[..8] != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        let ns = &hello[8..];
        let nc: [u8; NONCE] = rand::random();
        let mut reply = Vec::with_capacity(NONCE + PROOF);
        reply.extend_from_slice(&nc);
        reply.extend_from_slice(&key.proof(b"client", ns, &nc));
        stream.write_all(&reply).await?;
        let mut proof = [0u8; PROOF];
        stream.read_exact(&mut proof).await?;
        if !key.verify(b"server", ns, &nc, &proof) {
            return Err(HandshakeError::BadProof);
        }
        Ok(())
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(server_key: LinkKey, client_key: LinkKey) -> (bool, bool) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { accept(&server_key, &mut a).await.is_ok() });
        let client = connect(&client_key, &mut b).await.is_ok();
        (server.await.unwrap_or(false), client)
    }

    #[tokio::test]
    async fn the_same_key_on_both_sides_is_accepted_a_different_one_is_not() {
        assert_eq!(
            pair(LinkKey::new([7; 32]), LinkKey::new([7; 32])).await,
            (true, true)
        );
        let (server_ok, client_ok) = pair(LinkKey::new([7; 32]), LinkKey::new([8; 32])).await;
        assert!(!server_ok && !client_ok);
    }

    #[tokio::test]
    async fn a_client_that_never_answers_times_out() {
        let (mut a, _b) = tokio::io::duplex(1024);
        let r = accept_within(&LinkKey::new([1; 32]), &mut a, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
    }
}

//! A small NBD client (fixed newstyle, NBD_OPT_GO, simple or structured
//! replies, many requests in flight) for tests, tools and health checks.
//!
//! It trusts nothing from the server: malformed replies end the connection
//! with an error; it must never panic on server input.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{Mutex, oneshot};

use crate::device::BlockSizeConstraints;
use crate::proto::{
    self, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, RequestHeader, client_flags, cmd, cmd_flags,
    info, opt, rep, reply_flags, reply_type,
};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake.
    #[error("option {option} refused with reply {reply:#x}: {message}")]
    Refused {
        /// The option.
        option: u32,
        /// The NBD_REP_ERR_* value.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("request failed with NBD error {errno}: {message}")]
    Server {
        /// The NBD error value.
        errno: u32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export name.
    pub export: String,
    /// Negotiate structured replies.
    pub structured: bool,
    /// Ask for block size constraints (then the server enforces them).
    pub request_block_size: bool,
}

impl ConnectOptions {
    /// Structured replies and block sizes, for `export`.
    pub fn new(export: impl Into<String>) -> Self {
        Self {
            export: export.into(),
            structured: true,
            request_block_size: true,
        }
    }
}

struct Pending {
    offset: u64,
    read_len: Option<u32>,
    buf: Option<BytesMut>,
    error: Option<ClientError>,
    done: oneshot::Sender<Result<Option<Bytes>, ClientError>>,
}

type PendingMap = Arc<std::sync::Mutex<Option<HashMap<u64, Pending>>>>;

/// A connected NBD client; requests may be issued concurrently.
pub struct NbdClient {
    writer: Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: PendingMap,
    next_cookie: AtomicU64,
    size: u64,
    flags: u16,
    block_size: Option<BlockSizeConstraints>,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NbdClient {
    /// Connects over TCP with default options.
    pub async fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Self, ClientError> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Self::connect_stream(s, ConnectOptions::new(export)).await
    }

    /// Connects over a unix socket with default options.
    pub async fn connect_unix(path: &Path, export: &str) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path).await?;
        Self::connect_stream(s, ConnectOptions::new(export)).await
    }

    /// Runs the handshake on an established stream.
    pub async fn connect_stream<S>(stream: S, options: ConnectOptions) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        if r.read_u64().await? != NBD_MAGIC || r.read_u64().await? != IHAVEOPT {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let _hs_flags = r.read_u16().await?;
        w.write_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
            .await?;
        if options.structured {
            send_option(&mut w, opt::STRUCTURED_REPLY, &[]).await?;
            let (kind, payload) = read_option_reply(&mut r, opt::STRUCTURED_REPLY).await?;
            if kind != rep::ACK {
                return Err(refused(opt::STRUCTURED_REPLY, kind, &payload));
            }
        }
        let mut wanted = vec![];
        if options.request_block_size {
            wanted.push(info::BLOCK_SIZE);
        }
        send_option(
            &mut w,
            opt::GO,
            &proto::encode_info_request(&options.export, &wanted),
        )
        .await?;
        let mut size = None;
        let mut flags = 0;
        let mut block_size = None;
        loop {
            let (kind, payload) = read_option_reply(&mut r, opt::GO).await?;
            match kind {
                rep::ACK => break,
                rep::INFO => {
                    let mut rd = proto::Reader::new(&payload);
                    match rd.u16() {
                        Some(info::EXPORT) => {
                            size = rd.u64();
                            flags = rd.u16().unwrap_or(0);
                        }
                        Some(info::BLOCK_SIZE) => {
                            if let (Some(minimum), Some(preferred), Some(maximum)) =
                                (rd.u32(), rd.u32(), rd.u32())
                            {
                                block_size = Some(BlockSizeConstraints {
                                    minimum,
                                    preferred,
                                    maximum,
                                });
                            }
                        }
                        _ => {}
                    }
                }
                k if k & (1 << 31) != 0 => return Err(refused(opt::GO, k, &payload)),
                _ => {}
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT".into()))?;
        let pending: PendingMap = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_replies(r, pending.clone()));
        Ok(Self {
            writer: Mutex::new(Box::new(w)),
            pending,
            next_cookie: AtomicU64::new(1),
            size,
            flags,
            block_size,
            reader,
        })
    }

    /// The export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// The block size constraints, if asked for and sent.
    pub fn block_size(&self) -> Option<BlockSizeConstraints> {
        self.block_size
    }

    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Option<Bytes>, ClientError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let Some(map) = p.as_mut() else {
                return Err(ClientError::Closed);
            };
            map.insert(
                cookie,
                Pending {
                    offset,
                    read_len: (kind == cmd::READ).then_some(length),
                    buf: None,
                    error: None,
                    done: tx,
                },
            );
        }
        let hdr = proto::encode_request(&RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        });
        {
            let mut w = self.writer.lock().await;
            w.write_all(&hdr).await?;
            if let Some(p) = payload {
                w.write_all(p).await?;
            }
            w.flush().await?;
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        Ok(self
            .request(cmd::READ, 0, offset, len, None)
            .await?
            .unwrap_or_default())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("payload too large".into()))?;
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.request(cmd::WRITE, flags, offset, len, Some(data))
            .await
            .map(drop)
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(cmd::FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(cmd::TRIM, 0, offset, len, None)
            .await
            .map(drop)
    }

    /// Zeroes a range; `no_hole` forbids punching a hole.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let flags = if no_hole { cmd_flags::NO_HOLE } else { 0 };
        self.request(cmd::WRITE_ZEROES, flags, offset, len, None)
            .await
            .map(drop)
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        let hdr = proto::encode_request(&RequestHeader {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        });
        let mut w = self.writer.lock().await;
        w.write_all(&hdr).await?;
        w.shutdown().await?;
        Ok(())
    }
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> ClientError {
    ClientError::Refused {
        option,
        reply,
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

async fn send_option<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

async fn read_option_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    option: u32,
) -> Result<(u32, Vec<u8>), ClientError> {
    if r.read_u64().await? != OPTION_REPLY_MAGIC {
        return Err(ClientError::Protocol("bad option reply magic".into()));
    }
    if r.read_u32().await? != option {
        return Err(ClientError::Protocol("reply for another option".into()));
    }
    let kind = r.read_u32().await?;
    let len = r.read_u32().await?;
    if len > 1 << 20 {
        return Err(ClientError::Protocol("option reply too large".into()));
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

async fn read_replies<R: AsyncRead + Unpin>(mut r: BufReader<R>, pending: PendingMap) {
    let err = read_replies_inner(&mut r, &pending).await;
    let map = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (_, p) in map.into_iter().flatten() {
        let e = match &err {
            ClientError::Protocol(m) => ClientError::Protocol(m.clone()),
            _ => ClientError::Closed,
        };
        let _ = p.done.send(Err(e));
    }
}

fn take_pending(pending: &PendingMap, cookie: u64) -> Result<Pending, ClientError> {
    pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|m| m.remove(&cookie))
        .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
}

async fn read_replies_inner<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    pending: &PendingMap,
) -> ClientError {
    loop {
        let magic = match r.read_u32().await {
            Ok(m) => m,
            Err(e) => return e.into(),
        };
        let res: Result<(), ClientError> = async {
            match magic {
                proto::SIMPLE_REPLY_MAGIC => {
                    let error = r.read_u32().await?;
                    let cookie = r.read_u64().await?;
                    let p = take_pending(pending, cookie)?;
                    if error != 0 {
                        let _ = p.done.send(Err(ClientError::Server {
                            errno: error,
                            message: String::new(),
                        }));
                    } else if let Some(len) = p.read_len {
                        let mut buf = BytesMut::zeroed(len as usize);
                        r.read_exact(&mut buf).await?;
                        let _ = p.done.send(Ok(Some(buf.freeze())));
                    } else {
                        let _ = p.done.send(Ok(None));
                    }
                    Ok(())
                }
                proto::STRUCTURED_REPLY_MAGIC => {
                    let flags = r.read_u16().await?;
                    let kind = r.read_u16().await?;
                    let cookie = r.read_u64().await?;
                    let len = r.read_u32().await?;
                    if len > 64 << 20 {
                        return Err(ClientError::Protocol("chunk too large".into()));
                    }
                    let mut payload = BytesMut::zeroed(len as usize);
                    r.read_exact(&mut payload).await?;
                    let mut p = take_pending(pending, cookie)?;
                    apply_chunk(&mut p, kind, &payload)?;
                    if flags & reply_flags::DONE != 0 {
                        let result = match p.error.take() {
                            Some(e) => Err(e),
                            None => Ok(match p.read_len {
                                Some(l) => Some(
                                    p.buf
                                        .take()
                                        .unwrap_or_else(|| BytesMut::zeroed(l as usize))
                                        .freeze(),
                                ),
                                None => None,
                            }),
                        };
                        let _ = p.done.send(result);
                    } else if let Some(map) =
                        pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    {
                        map.insert(cookie, p);
                    }
                    Ok(())
                }
                _ => Err(ClientError::Protocol(format!("bad reply magic {magic:#x}"))),
            }
        }
        .await;
        if let Err(e) = res {
            return e;
        }
    }
}

fn apply_chunk(p: &mut Pending, kind: u16, payload: &[u8]) -> Result<(), ClientError> {
    let mut rd = proto::Reader::new(payload);
    match kind {
        reply_type::NONE | reply_type::BLOCK_STATUS => Ok(()),
        reply_type::OFFSET_DATA | reply_type::OFFSET_HOLE => {
            let len = p
                .read_len
                .ok_or_else(|| ClientError::Protocol("data chunk for a non-read".into()))?;
            let off = rd
                .u64()
                .ok_or_else(|| ClientError::Protocol("short chunk".into()))?;
            let start = off
                .checked_sub(p.offset)
                .ok_or_else(|| ClientError::Protocol("chunk before the request".into()))?
                as usize;
            let buf = p.buf.get_or_insert_with(|| BytesMut::zeroed(len as usize));
            let (n, data) = if kind == reply_type::OFFSET_DATA {
                let d = &payload[8..];
                (d.len(), Some(d))
            } else {
                let n = rd
                    .u32()
                    .ok_or_else(|| ClientError::Protocol("short hole chunk".into()))?;
                (n as usize, None)
            };
            let end = start
                .checked_add(n)
                .filter(|e| *e <= buf.len())
                .ok_or_else(|| ClientError::Protocol("chunk beyond the request".into()))?;
            match data {
                Some(d) => buf[start..end].copy_from_slice(d),
                None => buf[start..end].fill(0),
            }
            Ok(())
        }
        reply_type::ERROR | reply_type::ERROR_OFFSET => {
            let errno = rd
                .u32()
                .ok_or_else(|| ClientError::Protocol("short error chunk".into()))?;
            let mlen = rd.u16().unwrap_or(0) as usize;
            let message = rd
                .bytes(mlen)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            p.error = Some(ClientError::Server { errno, message });
            Ok(())
        }
        _ => Err(ClientError::Protocol(format!("unknown chunk type {kind}"))),
    }
}

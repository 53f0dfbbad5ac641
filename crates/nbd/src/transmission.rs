//! The transmission phase: read requests, run them concurrently against the
//! device, and write replies (out of order) to the shared stream.
//!
//! Every request is validated (flags, range, alignment, size) before the
//! device sees it. Requests in flight are bounded in count and in payload
//! bytes. A request with a bad magic closes the connection after the
//! requests in flight are answered. This module must never panic on client
//! input nor buffer an unbounded amount of it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, trace};

use crate::device::{BlockDevice, DeviceError, MAX_PAYLOAD};
use crate::handshake::{BASE_ALLOCATION_ID, Session};
use crate::io::{SharedWriter, run_now_or_spawn};
use crate::proto::{
    self, REQUEST_HEADER_LEN, RequestHeader, cmd, cmd_flags, errno, reply_flags, reply_type,
    state_flags,
};
use crate::server::ServerConfig;

/// One reply, as the byte segments to write in order.
type Reply = Vec<Bytes>;

/// Bytes of payload one memory permit stands for.
const PERMIT_UNIT: usize = 4096;

/// The most block status descriptors in one reply.
const MAX_EXTENTS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransmissionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad request magic")]
    BadMagic,
}

/// How the connection's reader ended.
enum End {
    Disconnect,
    Cancelled,
}

pub(crate) async fn transmission<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session,
    config: &ServerConfig,
    cancel: CancellationToken,
) -> Result<(), TransmissionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let writer = Arc::new(SharedWriter::new(writer));
    let in_flight = TaskTracker::new();
    let ctx = Arc::new(Ctx {
        device: session.export.export.device.clone(),
        session,
    });
    let result = read_requests(&mut reader, &writer, &ctx, config, &cancel, &in_flight).await;
    // Answer what is in flight, then close.
    in_flight.close();
    in_flight.wait().await;
    let write_result = writer.shutdown().await;
    match result {
        Ok(End::Disconnect) | Ok(End::Cancelled) => {}
        Err(e) => return Err(e),
    }
    write_result.map_err(TransmissionError::Io)
}

struct Ctx {
    device: Arc<dyn BlockDevice>,
    session: Session,
}

impl Ctx {
    fn structured(&self) -> bool {
        self.session.structured
    }

    fn error_reply(&self, cookie: u64, error: u32, msg: &str) -> Reply {
        if self.structured() {
            let msg = &msg.as_bytes()[..msg.len().min(256)];
            let mut b = BytesMut::with_capacity(proto::STRUCTURED_HEADER_LEN + 6 + msg.len());
            b.extend_from_slice(&proto::encode_structured_header(
                reply_flags::DONE,
                reply_type::ERROR,
                cookie,
                (6 + msg.len()) as u32,
            ));
            b.extend_from_slice(&error.to_be_bytes());
            b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            b.extend_from_slice(msg);
            vec![b.freeze()]
        } else {
            vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                error, cookie,
            ))]
        }
    }

    fn ok_reply(&self, cookie: u64) -> Reply {
        if self.structured() {
            vec![Bytes::copy_from_slice(&proto::encode_structured_header(
                reply_flags::DONE,
                reply_type::NONE,
                cookie,
                0,
            ))]
        } else {
            vec![Bytes::copy_from_slice(&proto::encode_simple_reply(
                0, cookie,
            ))]
        }
    }

    fn read_reply(&self, cookie: u64, offset: u64, data: Bytes) -> Reply {
        if self.structured() {
            let mut b = BytesMut::with_capacity(proto::STRUCTURED_HEADER_LEN + 8);
            b.extend_from_slice(&proto::encode_structured_header(
                reply_flags::DONE,
                reply_type::OFFSET_DATA,
                cookie,
                (8 + data.len()) as u32,
            ));
            b.extend_from_slice(&offset.to_be_bytes());
            vec![b.freeze(), data]
        } else {
            vec![
                Bytes::copy_from_slice(&proto::encode_simple_reply(0, cookie)),
                data,
            ]
        }
    }

    /// Checks a request against the negotiated session. `Err` is the NBD
    /// error value to answer with.
    fn validate(&self, h: &RequestHeader) -> Result<(), (u32, &'static str)> {
        let dev = &self.device;
        let allowed = match h.kind {
            cmd::READ if self.structured() => cmd_flags::DF,
            cmd::READ => 0,
            cmd::WRITE | cmd::TRIM => cmd_flags::FUA,
            cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
            cmd::FLUSH => 0,
            cmd::BLOCK_STATUS => cmd_flags::REQ_ONE,
            _ => return Err((errno::EINVAL, "unknown command")),
        };
        if h.flags & !allowed != 0 {
            return Err((errno::EINVAL, "unsupported command flags"));
        }
        if h.kind == cmd::FLUSH {
            return Ok(());
        }
        let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && dev.read_only() {
            return Err((errno::EPERM, "export is read-only"));
        }
        if h.kind == cmd::TRIM && !dev.can_trim() {
            return Err((errno::EINVAL, "trim not supported"));
        }
        if h.kind == cmd::BLOCK_STATUS && !self.session.base_allocation {
            return Err((errno::EINVAL, "no metadata context negotiated"));
        }
        if h.length == 0 {
            return Err((errno::EINVAL, "zero-length request"));
        }
        let size = dev.size();
        let end = h.offset.checked_add(u64::from(h.length));
        if end.is_none_or(|e| e > size) {
            let e = if matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err((e, "request beyond the end of the export"));
        }
        let max = self
            .session
            .block_size
            .map(|c| c.maximum)
            .unwrap_or(MAX_PAYLOAD);
        if matches!(h.kind, cmd::READ | cmd::WRITE) && h.length > max {
            return Err((errno::EINVAL, "request larger than the maximum block size"));
        }
        if let Some(c) = self.session.block_size {
            let min = u64::from(c.minimum);
            let end = h.offset + u64::from(h.length);
            if !h.offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != size) {
                return Err((
                    errno::EINVAL,
                    "request not aligned to the minimum block size",
                ));
            }
        }
        Ok(())
    }

    async fn execute(&self, h: RequestHeader, payload: Option<Bytes>) -> Reply {
        let fua = h.flags & cmd_flags::FUA != 0;
        let len = u64::from(h.length);
        let result: Result<Reply, DeviceError> = match h.kind {
            cmd::READ => self
                .device
                .read(h.offset, h.length as usize)
                .await
                .map(|data| self.read_reply(h.cookie, h.offset, data)),
            cmd::WRITE => {
                let data = payload.unwrap_or_default();
                self.device
                    .write(h.offset, data, fua)
                    .await
                    .map(|()| self.ok_reply(h.cookie))
            }
            cmd::FLUSH => self.device.flush().await.map(|()| self.ok_reply(h.cookie)),
            cmd::TRIM => self
                .device
                .trim(h.offset, len, fua)
                .await
                .map(|()| self.ok_reply(h.cookie)),
            cmd::WRITE_ZEROES => {
                let may_trim = h.flags & cmd_flags::NO_HOLE == 0;
                self.device
                    .write_zeroes(h.offset, len, may_trim, fua)
                    .await
                    .map(|()| self.ok_reply(h.cookie))
            }
            cmd::BLOCK_STATUS => self
                .device
                .block_status(h.offset, len)
                .await
                .map(|ext| self.block_status_reply(&h, ext)),
            _ => return self.error_reply(h.cookie, errno::EINVAL, "unknown command"),
        };
        match result {
            Ok(r) => r,
            Err(e) => {
                debug!(
                    kind = h.kind,
                    offset = h.offset,
                    len = h.length,
                    "request failed: {e}"
                );
                self.error_reply(h.cookie, e.nbd_errno(), &e.to_string())
            }
        }
    }

    fn block_status_reply(&self, h: &RequestHeader, extents: Vec<crate::device::Extent>) -> Reply {
        let min = self.session.block_size.map(|c| c.minimum).unwrap_or(1) as u64;
        let mut remaining = u64::from(h.length);
        let limit = if h.flags & cmd_flags::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut descs: Vec<(u32, u32)> = Vec::new();
        for e in extents {
            if remaining == 0 || descs.len() >= limit {
                break;
            }
            let mut l = e.length.min(remaining);
            if l > u64::from(u32::MAX) {
                l = u64::from(u32::MAX) - u64::from(u32::MAX) % min;
            }
            if l == 0 {
                break;
            }
            let mut flags = 0;
            if e.hole {
                flags |= state_flags::HOLE;
            }
            if e.zero {
                flags |= state_flags::ZERO;
            }
            // Merge with the previous descriptor when the status is equal.
            match descs.last_mut() {
                Some((pl, pf)) if *pf == flags && u64::from(*pl) + l <= u64::from(u32::MAX) => {
                    *pl += l as u32;
                }
                _ => descs.push((l as u32, flags)),
            }
            remaining -= l;
        }
        if descs.is_empty() {
            descs.push((h.length, 0));
        }
        let payload_len = 4 + 8 * descs.len();
        let mut b = BytesMut::with_capacity(proto::STRUCTURED_HEADER_LEN + payload_len);
        b.extend_from_slice(&proto::encode_structured_header(
            reply_flags::DONE,
            reply_type::BLOCK_STATUS,
            h.cookie,
            payload_len as u32,
        ));
        b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (l, f) in descs {
            b.extend_from_slice(&l.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
        }
        vec![b.freeze()]
    }
}

async fn read_requests<R, W>(
    reader: &mut BufReader<R>,
    writer: &Arc<SharedWriter<W>>,
    ctx: &Arc<Ctx>,
    config: &ServerConfig,
    cancel: &CancellationToken,
    in_flight: &TaskTracker,
) -> Result<End, TransmissionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let requests = Arc::new(Semaphore::new(config.max_requests_in_flight.max(1)));
    let budget_units = (config.max_bytes_in_flight.max(MAX_PAYLOAD as usize) / PERMIT_UNIT) as u32;
    let memory = Arc::new(Semaphore::new(budget_units as usize));
    loop {
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(End::Cancelled),
            r = reader.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                // A client that just goes away: normal end.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(End::Disconnect),
                Err(e) => return Err(e.into()),
            },
        }
        let Some(h) = proto::decode_request(&hdr) else {
            return Err(TransmissionError::BadMagic);
        };
        trace!(kind = h.kind, offset = h.offset, len = h.length, "request");
        if h.kind == cmd::DISC {
            return Ok(End::Disconnect);
        }
        let validation = ctx.validate(&h);
        if h.kind == cmd::WRITE && validation.is_err() {
            // The payload follows regardless; skip it to stay in sync, but
            // give up on absurd lengths rather than read gigabytes.
            if h.length > 2 * MAX_PAYLOAD {
                return Err(TransmissionError::Io(std::io::Error::other(
                    "write payload far beyond the maximum",
                )));
            }
            let mut limited = (&mut *reader).take(u64::from(h.length));
            let n = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if n < u64::from(h.length) {
                return Ok(End::Disconnect);
            }
        }
        if let Err((code, msg)) = validation {
            debug!(
                kind = h.kind,
                offset = h.offset,
                len = h.length,
                "refused: {msg}"
            );
            if writer
                .send(ctx.error_reply(h.cookie, code, msg))
                .await
                .is_err()
            {
                return Ok(End::Disconnect);
            }
            continue;
        }
        let request_permit = requests
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("semaphore closed"))?;
        let payload_len = match h.kind {
            cmd::READ | cmd::WRITE => h.length as usize,
            _ => 0,
        };
        let units = payload_len
            .div_ceil(PERMIT_UNIT)
            .clamp(1, budget_units as usize) as u32;
        let memory_permit = memory
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| std::io::Error::other("semaphore closed"))?;
        let payload = if h.kind == cmd::WRITE {
            let mut buf = BytesMut::zeroed(h.length as usize);
            match reader.read_exact(&mut buf).await {
                Ok(_) => Some(buf.freeze()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(End::Disconnect);
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let (ctx, writer) = (ctx.clone(), writer.clone());
        run_now_or_spawn(in_flight, async move {
            let reply = ctx.execute(h, payload).await;
            // The client may be gone; nothing to do then.
            let _ = writer.send(reply).await;
            drop(memory_permit);
            drop(request_permit);
        })
        .await;
    }
}

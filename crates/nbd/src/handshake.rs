//! The fixed-newstyle handshake: greeting, client flags and option haggling
//! until NBD_OPT_GO or NBD_OPT_EXPORT_NAME selects an export.
//!
//! Every option payload is bounded before it is buffered; anything
//! malformed gets an NBD_REP_ERR_* reply or closes the connection. This
//! module must never panic on client input.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::device::BlockSizeConstraints;
use crate::proto::{
    self, IHAVEOPT, NBD_MAGIC, client_flags, handshake_flags, info, opt, rep, tflags,
};
use crate::server::{ExportEntry, ServerInner};

/// Largest option payload buffered; larger ones are drained and refused.
const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The id this server gives the `base:allocation` context.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on.
pub(crate) struct Session {
    pub(crate) export: ExportEntry,
    pub(crate) structured: bool,
    /// The client asked for NBD_INFO_BLOCK_SIZE, so the constraints bind it.
    pub(crate) block_size: Option<BlockSizeConstraints>,
    pub(crate) base_allocation: bool,
}

pub(crate) enum HandshakeOutcome {
    Transmission(Session),
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Meta context state: which export it was negotiated for.
#[derive(Default)]
struct MetaState {
    export: Option<String>,
    base_allocation: bool,
}

pub(crate) async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    server: &ServerInner,
) -> Result<HandshakeOutcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    w.write_all(&greeting).await?;
    w.flush().await?;

    let cflags = r.read_u32().await?;
    if cflags & !client_flags::KNOWN != 0 {
        // The protocol says to close on unknown client flags.
        return Err(HandshakeError::Protocol("unknown client flags"));
    }
    let no_zeroes = cflags & client_flags::NO_ZEROES != 0;
    let mut structured = false;
    let mut meta = MetaState::default();

    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol("bad option magic"));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if option == opt::EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: close.
                return Err(HandshakeError::Protocol("export name too long"));
            }
            drain(r, len).await?;
            reply(w, option, rep::ERR_TOO_BIG, b"option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        if server.shutting_down() {
            if option == opt::EXPORT_NAME {
                return Ok(HandshakeOutcome::Closed);
            }
            reply(w, option, rep::ERR_SHUTDOWN, b"server shutting down").await?;
            continue;
        }

        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(entry) = server.export(&name) else {
                    // The old style has no way to report an error: close.
                    return Err(HandshakeError::Protocol("unknown export in EXPORT_NAME"));
                };
                let flags = transmission_flags(&entry, structured);
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&entry.export.device.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out).await?;
                w.flush().await?;
                let base_allocation = meta.base_allocation
                    && meta.export.as_deref() == Some(entry.export.name.as_str());
                return Ok(HandshakeOutcome::Transmission(Session {
                    export: entry,
                    structured,
                    block_size: None,
                    base_allocation: base_allocation && structured,
                }));
            }
            opt::ABORT => {
                // Best effort: the client may already have gone.
                let _ = reply(w, option, rep::ACK, &[]).await;
                return Ok(HandshakeOutcome::Closed);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(w, option, rep::ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for (name, _) in server.export_list() {
                    let mut p = Vec::with_capacity(4 + name.len());
                    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    p.extend_from_slice(name.as_bytes());
                    reply(w, option, rep::SERVER, &p).await?;
                }
                reply(w, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let req = match proto::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(w, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let Some(entry) = server.export(&req.name) else {
                    reply(w, option, rep::ERR_UNKNOWN, b"no such export").await?;
                    continue;
                };
                let flags = transmission_flags(&entry, structured);
                let dev = &entry.export.device;
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&info::EXPORT.to_be_bytes());
                p.extend_from_slice(&dev.size().to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
                reply(w, option, rep::INFO, &p).await?;
                let wants_block_size = req.requests.contains(&info::BLOCK_SIZE);
                let constraints = dev.block_size().sanitized();
                if wants_block_size {
                    let mut p = Vec::with_capacity(14);
                    p.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                    p.extend_from_slice(&constraints.minimum.to_be_bytes());
                    p.extend_from_slice(&constraints.preferred.to_be_bytes());
                    p.extend_from_slice(&constraints.maximum.to_be_bytes());
                    reply(w, option, rep::INFO, &p).await?;
                }
                if req.requests.contains(&info::NAME) {
                    let mut p = info::NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(entry.export.name.as_bytes());
                    reply(w, option, rep::INFO, &p).await?;
                }
                if req.requests.contains(&info::DESCRIPTION)
                    && let Some(d) = &entry.export.description
                {
                    let mut p = info::DESCRIPTION.to_be_bytes().to_vec();
                    p.extend_from_slice(d.as_bytes());
                    reply(w, option, rep::INFO, &p).await?;
                }
                reply(w, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    let base_allocation = structured
                        && meta.base_allocation
                        && meta.export.as_deref() == Some(entry.export.name.as_str());
                    return Ok(HandshakeOutcome::Transmission(Session {
                        export: entry,
                        structured,
                        block_size: wants_block_size.then_some(constraints),
                        base_allocation,
                    }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if structured {
                    reply(
                        w,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies already on",
                    )
                    .await?;
                } else {
                    structured = true;
                    reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let setting = option == opt::SET_META_CONTEXT;
                if setting && !structured {
                    reply(
                        w,
                        option,
                        rep::ERR_INVALID,
                        b"structured replies needed first",
                    )
                    .await?;
                    continue;
                }
                let req = match proto::parse_meta_context_request(&data) {
                    Ok(r) => r,
                    Err(proto::OptionParseError::TooLong(what)) => {
                        reply(w, option, rep::ERR_TOO_BIG, what.as_bytes()).await?;
                        continue;
                    }
                    Err(e) => {
                        reply(w, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if server.export(&req.export).is_none() {
                    reply(w, option, rep::ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let selected = if req.queries.is_empty() {
                    // An empty LIST asks for everything; an empty SET selects nothing.
                    !setting
                } else {
                    req.queries
                        .iter()
                        .any(|q| proto::query_matches_base_allocation(q, !setting))
                };
                if selected {
                    let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    p.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    reply(w, option, rep::META_CONTEXT, &p).await?;
                }
                if setting {
                    meta = MetaState {
                        export: Some(
                            server
                                .export(&req.export)
                                .map(|e| e.export.name)
                                .unwrap_or_default(),
                        ),
                        base_allocation: selected,
                    };
                }
                reply(w, option, rep::ACK, &[]).await?;
            }
            opt::STARTTLS | opt::EXTENDED_HEADERS => {
                reply(w, option, rep::ERR_UNSUP, b"not supported by this server").await?;
            }
            _ => {
                reply(w, option, rep::ERR_UNSUP, b"unknown option").await?;
            }
        }
    }
}

/// The transmission flags for an export.
pub(crate) fn transmission_flags(entry: &ExportEntry, structured: bool) -> u16 {
    let dev = &entry.export.device;
    let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA;
    if dev.read_only() {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_WRITE_ZEROES;
        if dev.can_trim() {
            f |= tflags::SEND_TRIM;
        }
    }
    if structured {
        // Reads are always answered in one chunk, so DF holds trivially.
        f |= tflags::SEND_DF;
    }
    if entry.export.multi_conn {
        f |= tflags::CAN_MULTI_CONN;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    kind: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&proto::encode_option_reply(option, kind, payload))
        .await?;
    w.flush().await
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> std::io::Result<()> {
    let mut limited = r.take(u64::from(len));
    let n = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
    if n < u64::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

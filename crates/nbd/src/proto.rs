//! The NBD wire format: magic numbers, codes and pure encode/decode
//! functions for the handshake and the transmission phase.
//!
//! Everything here is a pure function over bytes so that it can be fuzzed
//! without sockets. Nothing here may panic on any input, allocate without a
//! bound taken from the caller, or do I/O.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after [`NBD_MAGIC`] and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Size of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Flags sent by the client right after the server's greeting.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Old-style selection of an export; ends the handshake.
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (not supported).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Ask for structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List the metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Ask for extended headers (not supported).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success, end of the reply.
    pub const ACK: u32 = 1;
    /// One export in an NBD_OPT_LIST reply.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// One selected metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option was malformed.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not possible on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// The export is unknown.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types in NBD_REP_INFO (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*` of an export).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch (not supported).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Do not punch a hole for write zeroes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Return one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail write zeroes that would not be fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// The last chunk of the reply.
    pub const DONE: u16 = 1 << 0;
}

/// Error values on the wire (`NBD_E*`).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Flags of a base:allocation extent.
pub mod state_flags {
    /// The range is a hole (unallocated).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The only metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length of the request (payload length for writes).
    pub length: u32,
}

/// Decodes a request header. `None` means the magic is wrong, which per the
/// protocol leaves no way to resynchronise: the connection must be closed.
pub fn decode_request(buf: &[u8; REQUEST_HEADER_LEN]) -> Option<RequestHeader> {
    let magic = be_u32(buf, 0)?;
    if magic != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: be_u16(buf, 4)?,
        kind: be_u16(buf, 6)?,
        cookie: be_u64(buf, 8)?,
        offset: be_u64(buf, 16)?,
        length: be_u32(buf, 24)?,
    })
}

/// Encodes a request header (used by the client).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_HEADER_LEN] {
    let mut b = [0u8; SIMPLE_HEADER_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header.
pub fn encode_structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes an option reply: header plus payload.
pub fn encode_option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    // Payloads are built by this server from bounded data, so they fit.
    b.extend_from_slice(&(u32::try_from(payload.len()).unwrap_or(u32::MAX)).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Why an option's payload could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionParseError {
    /// The payload is shorter or longer than its own fields say.
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
    /// A string field is longer than the server accepts.
    #[error("option field too long: {0}")]
    TooLong(&'static str),
}

/// The longest export name or context query this server accepts, as the
/// protocol recommends (4096 bytes).
pub const MAX_STRING: usize = 4096;

/// A parsed NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The requested export name.
    pub name: String,
    /// The information types the client asked for.
    pub requests: Vec<u16>,
}

/// Parses the payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionParseError> {
    let mut r = Reader::new(data);
    let name_len = r.u32().ok_or(OptionParseError::Malformed("name length"))? as usize;
    if name_len > MAX_STRING {
        return Err(OptionParseError::TooLong("export name"));
    }
    let name = r
        .bytes(name_len)
        .ok_or(OptionParseError::Malformed("name"))?;
    let count = r
        .u16()
        .ok_or(OptionParseError::Malformed("request count"))? as usize;
    if r.remaining() != count * 2 {
        return Err(OptionParseError::Malformed("information requests"));
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(r.u16().ok_or(OptionParseError::Malformed("request"))?);
    }
    Ok(InfoRequest {
        name: String::from_utf8_lossy(name).into_owned(),
        requests,
    })
}

/// Encodes the payload of NBD_OPT_INFO / NBD_OPT_GO (used by the client).
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// A parsed NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries.
    pub queries: Vec<String>,
}

/// The most context queries accepted in one option.
pub const MAX_QUERIES: usize = 128;

/// Parses the payload of the meta-context options.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, OptionParseError> {
    let mut r = Reader::new(data);
    let name_len = r.u32().ok_or(OptionParseError::Malformed("name length"))? as usize;
    if name_len > MAX_STRING {
        return Err(OptionParseError::TooLong("export name"));
    }
    let export = r
        .bytes(name_len)
        .ok_or(OptionParseError::Malformed("export name"))?;
    let count = r.u32().ok_or(OptionParseError::Malformed("query count"))? as usize;
    if count > MAX_QUERIES {
        return Err(OptionParseError::TooLong("query count"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32().ok_or(OptionParseError::Malformed("query length"))? as usize;
        if len > MAX_STRING {
            return Err(OptionParseError::TooLong("query"));
        }
        let q = r.bytes(len).ok_or(OptionParseError::Malformed("query"))?;
        queries.push(String::from_utf8_lossy(q).into_owned());
    }
    if r.remaining() != 0 {
        return Err(OptionParseError::Malformed("trailing bytes"));
    }
    Ok(MetaContextRequest {
        export: String::from_utf8_lossy(export).into_owned(),
        queries,
    })
}

/// Encodes the payload of the meta-context options (used by the client).
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Whether a context query selects `base:allocation`. A query naming only
/// the namespace (`base:`) selects every context in it in LIST, but in SET a
/// query must name a context exactly.
pub fn query_matches_base_allocation(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A bounds-checked big-endian cursor.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_roundtrip() {
        let h = RequestHeader {
            flags: cmd_flags::FUA,
            kind: cmd::WRITE,
            cookie: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        assert_eq!(decode_request(&encode_request(&h)), Some(h));
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = encode_request(&RequestHeader {
            flags: 0,
            kind: 0,
            cookie: 1,
            offset: 0,
            length: 1,
        });
        b[0] ^= 0xff;
        assert_eq!(decode_request(&b), None);
    }

    #[test]
    fn info_request_roundtrip_and_length_checks() {
        let enc = encode_info_request("disk", &[info::BLOCK_SIZE, info::NAME]);
        let p = parse_info_request(&enc).expect("parses");
        assert_eq!(p.name, "disk");
        assert_eq!(p.requests, vec![info::BLOCK_SIZE, info::NAME]);
        assert!(parse_info_request(&enc[..enc.len() - 1]).is_err());
        let mut longer = enc.clone();
        longer.push(0);
        assert!(parse_info_request(&longer).is_err());
    }

    #[test]
    fn meta_context_roundtrip() {
        let enc = encode_meta_context_request("disk", &["base:allocation", "qemu:x"]);
        let p = parse_meta_context_request(&enc).expect("parses");
        assert_eq!(p.export, "disk");
        assert_eq!(p.queries, vec!["base:allocation", "qemu:x"]);
        assert!(query_matches_base_allocation("base:", true));
        assert!(!query_matches_base_allocation("base:", false));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            if data.len() >= REQUEST_HEADER_LEN {
                let mut h = [0u8; REQUEST_HEADER_LEN];
                h.copy_from_slice(&data[..REQUEST_HEADER_LEN]);
                let _ = decode_request(&h);
            }
        }

        #[test]
        fn info_roundtrip(name in "[a-z0-9/._-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..8)) {
            let p = parse_info_request(&encode_info_request(&name, &reqs)).expect("parses");
            prop_assert_eq!(p.name, name);
            prop_assert_eq!(p.requests, reqs);
        }
    }
}

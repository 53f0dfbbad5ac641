//! Protocol conformance at the byte level: a raw client checks the exact
//! option replies and error values, and that bad input closes or is refused
//! without harming the server.

mod common;

use std::time::Duration;

use common::{SIZE, TestServer};
use skyvisor_nbd::proto::{
    self, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, RequestHeader, client_flags, cmd, cmd_flags,
    errno, handshake_flags, info, opt, rep, reply_type,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(t: &TestServer) -> Self {
        let mut s = TcpStream::connect(t.addr).await.expect("connect");
        assert_eq!(s.read_u64().await.expect("magic"), NBD_MAGIC);
        assert_eq!(s.read_u64().await.expect("ihaveopt"), IHAVEOPT);
        let flags = s.read_u16().await.expect("flags");
        assert_eq!(
            flags,
            handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES
        );
        s.write_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
            .await
            .expect("client flags");
        Self { s }
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.expect("send option");
    }

    async fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(
            self.s.read_u64().await.expect("reply magic"),
            OPTION_REPLY_MAGIC
        );
        assert_eq!(self.s.read_u32().await.expect("option"), option);
        let kind = self.s.read_u32().await.expect("kind");
        let len = self.s.read_u32().await.expect("len");
        let mut p = vec![0; len as usize];
        self.s.read_exact(&mut p).await.expect("payload");
        (kind, p)
    }

    /// NBD_OPT_GO with block sizes; returns the transmission flags.
    async fn go(&mut self, export: &str) -> u16 {
        self.option(
            opt::GO,
            &proto::encode_info_request(export, &[info::BLOCK_SIZE]),
        )
        .await;
        let mut flags = 0;
        loop {
            let (kind, p) = self.option_reply(opt::GO).await;
            match kind {
                rep::ACK => return flags,
                rep::INFO if p[..2] == info::EXPORT.to_be_bytes() => {
                    assert_eq!(u64::from_be_bytes(p[2..10].try_into().expect("8")), SIZE);
                    flags = u16::from_be_bytes(p[10..12].try_into().expect("2"));
                }
                rep::INFO => {}
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = proto::encode_request(&RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        })
        .to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.expect("send request");
    }

    /// Reads a simple reply; returns (error, cookie).
    async fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(
            self.s.read_u32().await.expect("magic"),
            proto::SIMPLE_REPLY_MAGIC
        );
        (
            self.s.read_u32().await.expect("error"),
            self.s.read_u64().await.expect("cookie"),
        )
    }

    async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b))
            .await
            .expect("server must close");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "connection must be closed, got {r:?}"
        );
    }
}

#[tokio::test]
async fn options_unknown_invalid_list_meta_abort() {
    let t = TestServer::start().await;
    let mut c = Raw::connect(&t).await;
    c.option(999, b"whatever").await;
    assert_eq!(c.option_reply(999).await.0, rep::ERR_UNSUP);
    c.option(opt::STARTTLS, &[]).await;
    assert_eq!(c.option_reply(opt::STARTTLS).await.0, rep::ERR_UNSUP);
    c.option(opt::LIST, b"x").await;
    assert_eq!(c.option_reply(opt::LIST).await.0, rep::ERR_INVALID);
    c.option(opt::LIST, &[]).await;
    let (k, p) = c.option_reply(opt::LIST).await;
    assert_eq!(k, rep::SERVER);
    assert_eq!(&p[4..], b"disk");
    assert_eq!(c.option_reply(opt::LIST).await.0, rep::ACK);
    // INFO with a truncated payload.
    c.option(opt::INFO, &[0, 0, 0, 9, b'd']).await;
    assert_eq!(c.option_reply(opt::INFO).await.0, rep::ERR_INVALID);
    c.option(opt::INFO, &proto::encode_info_request("missing", &[]))
        .await;
    assert_eq!(c.option_reply(opt::INFO).await.0, rep::ERR_UNKNOWN);
    // Meta contexts: SET needs structured replies first.
    let q = proto::encode_meta_context_request("disk", &["base:allocation"]);
    c.option(opt::SET_META_CONTEXT, &q).await;
    assert_eq!(
        c.option_reply(opt::SET_META_CONTEXT).await.0,
        rep::ERR_INVALID
    );
    c.option(
        opt::LIST_META_CONTEXT,
        &proto::encode_meta_context_request("disk", &[]),
    )
    .await;
    let (k, p) = c.option_reply(opt::LIST_META_CONTEXT).await;
    assert_eq!(k, rep::META_CONTEXT);
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(c.option_reply(opt::LIST_META_CONTEXT).await.0, rep::ACK);
    c.option(
        opt::LIST_META_CONTEXT,
        &proto::encode_meta_context_request("disk", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    assert_eq!(c.option_reply(opt::LIST_META_CONTEXT).await.0, rep::ACK);
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply(opt::STRUCTURED_REPLY).await.0, rep::ACK);
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(
        c.option_reply(opt::STRUCTURED_REPLY).await.0,
        rep::ERR_INVALID
    );
    c.option(opt::SET_META_CONTEXT, &q).await;
    let (k, p) = c.option_reply(opt::SET_META_CONTEXT).await;
    assert_eq!(k, rep::META_CONTEXT);
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).await.0, rep::ACK);
    // An oversized option is drained and refused, and the session goes on.
    c.option(77, &vec![0u8; 100_000]).await;
    assert_eq!(c.option_reply(77).await.0, rep::ERR_TOO_BIG);
    c.option(opt::ABORT, &[]).await;
    assert_eq!(c.option_reply(opt::ABORT).await.0, rep::ACK);
    c.expect_closed().await;

    // Bad option magic closes the connection.
    let mut c = Raw::connect(&t).await;
    c.s.write_all(&[0x55u8; 16]).await.expect("write");
    c.expect_closed().await;

    // Unknown client flags close the connection.
    let mut s = TcpStream::connect(t.addr).await.expect("connect");
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.expect("greeting");
    s.write_u32(0x8000_0000).await.expect("flags");
    let mut c = Raw { s };
    c.expect_closed().await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn old_style_export_name() {
    let t = TestServer::start().await;
    let mut c = Raw::connect(&t).await;
    c.option(opt::EXPORT_NAME, b"disk").await;
    assert_eq!(c.s.read_u64().await.expect("size"), SIZE);
    let flags = c.s.read_u16().await.expect("flags");
    assert_ne!(flags & proto::tflags::SEND_FLUSH, 0);
    // NO_ZEROES was negotiated: the next bytes are replies, not padding.
    c.request(cmd::WRITE, 0, 7, 1, 3, &[3, 4, 5]).await; // unaligned is fine without block sizes
    assert_eq!(c.simple_reply().await, (0, 7));
    c.request(cmd::READ, 0, 8, 1, 3, &[]).await;
    c.request(cmd::DISC, 0, 9, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 8));
    let mut b = [0u8; 3];
    c.s.read_exact(&mut b).await.expect("data");
    assert_eq!(b, [3, 4, 5]);
    c.expect_closed().await;

    let mut c = Raw::connect(&t).await;
    c.option(opt::EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn transmission_errors_have_exact_codes() {
    let t = TestServer::start().await;
    let mut c = Raw::connect(&t).await;
    let flags = c.go("disk").await;
    assert_ne!(flags & proto::tflags::SEND_TRIM, 0);
    assert_ne!(flags & proto::tflags::CAN_MULTI_CONN, 0);

    // Out of range read: EINVAL; write: ENOSPC (payload consumed).
    c.request(cmd::READ, 0, 1, SIZE, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 1));
    c.request(cmd::WRITE, 0, 2, SIZE - 512, 1024, &[1u8; 1024])
        .await;
    assert_eq!(c.simple_reply().await, (errno::ENOSPC, 2));
    c.request(cmd::WRITE_ZEROES, 0, 3, SIZE, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::ENOSPC, 3));
    c.request(cmd::TRIM, 0, 4, u64::MAX - 10, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 4));
    // Misaligned against the advertised 512-byte minimum: EINVAL, payload drained.
    c.request(cmd::WRITE, 0, 5, 100, 512, &[9u8; 512]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 5));
    c.request(cmd::READ, 0, 6, 0, 100, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 6));
    // Oversized (> 32 MiB advertised maximum).
    c.request(cmd::READ, 0, 7, 0, 64 << 20, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 7));
    c.request(
        cmd::WRITE,
        0,
        17,
        0,
        (32 << 20) + 512,
        &vec![0u8; (32 << 20) + 512],
    )
    .await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 17));
    // Unknown command, unknown flags, zero length, block status without a context.
    c.request(42, 0, 8, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 8));
    c.request(cmd::READ, 0x4000, 9, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 9));
    c.request(cmd::READ, cmd_flags::FUA, 19, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 19));
    c.request(cmd::READ, 0, 10, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 10));
    c.request(cmd::BLOCK_STATUS, 0, 11, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (errno::EINVAL, 11));
    // After all that the connection still works, and the refused writes left no trace.
    c.request(cmd::READ, 0, 12, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 12));
    let mut b = vec![0u8; 512];
    c.s.read_exact(&mut b).await.expect("data");
    assert!(b.iter().all(|x| *x == 0));

    // Many requests in flight: every cookie is answered once.
    for i in 0..200u64 {
        c.request(
            cmd::WRITE,
            cmd_flags::FUA * (i % 2) as u16,
            1000 + i,
            i * 4096,
            4096,
            &[i as u8; 4096],
        )
        .await;
    }
    c.request(cmd::FLUSH, 0, 5000, 0, 0, &[]).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..201 {
        let (e, cookie) = c.simple_reply().await;
        assert_eq!(e, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen.len(), 201);

    // Bad request magic: the connection is closed.
    c.s.write_all(&[0xffu8; 28]).await.expect("write");
    c.expect_closed().await;
    // The server is still fine for others.
    let client = skyvisor_nbd::NbdClient::connect_tcp(t.addr, "disk")
        .await
        .expect("connect");
    assert_eq!(
        client.read(4096 * 5, 4096).await.expect("read")[..],
        [5u8; 4096]
    );
    t.server.shutdown().await;
}

#[tokio::test]
async fn structured_errors_and_block_status() {
    let t = TestServer::start().await;
    let mut c = Raw::connect(&t).await;
    c.option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply(opt::STRUCTURED_REPLY).await.0, rep::ACK);
    c.option(
        opt::SET_META_CONTEXT,
        &proto::encode_meta_context_request("disk", &["base:allocation"]),
    )
    .await;
    let (k, p) = c.option_reply(opt::SET_META_CONTEXT).await;
    assert_eq!(k, rep::META_CONTEXT);
    let ctx_id = u32::from_be_bytes(p[..4].try_into().expect("4"));
    assert_eq!(c.option_reply(opt::SET_META_CONTEXT).await.0, rep::ACK);
    let flags = c.go("disk").await;
    assert_ne!(flags & proto::tflags::SEND_DF, 0);

    c.request(cmd::READ, 0, 1, SIZE, 512, &[]).await;
    assert_eq!(
        c.s.read_u32().await.expect("magic"),
        proto::STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(
        c.s.read_u16().await.expect("flags"),
        proto::reply_flags::DONE
    );
    assert_eq!(c.s.read_u16().await.expect("type"), reply_type::ERROR);
    assert_eq!(c.s.read_u64().await.expect("cookie"), 1);
    let len = c.s.read_u32().await.expect("len");
    let mut p = vec![0; len as usize];
    c.s.read_exact(&mut p).await.expect("payload");
    assert_eq!(
        u32::from_be_bytes(p[..4].try_into().expect("4")),
        errno::EINVAL
    );

    c.request(cmd::WRITE, 0, 2, 1 << 20, 4096, &[1u8; 4096])
        .await;
    assert_eq!(
        c.s.read_u32().await.expect("magic"),
        proto::STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(
        c.s.read_u16().await.expect("flags"),
        proto::reply_flags::DONE
    );
    assert_eq!(c.s.read_u16().await.expect("type"), reply_type::NONE);
    assert_eq!(c.s.read_u64().await.expect("cookie"), 2);
    assert_eq!(c.s.read_u32().await.expect("len"), 0);

    c.request(cmd::BLOCK_STATUS, 0, 3, 0, 2 << 20, &[]).await;
    assert_eq!(
        c.s.read_u32().await.expect("magic"),
        proto::STRUCTURED_REPLY_MAGIC
    );
    assert_eq!(
        c.s.read_u16().await.expect("flags"),
        proto::reply_flags::DONE
    );
    assert_eq!(
        c.s.read_u16().await.expect("type"),
        reply_type::BLOCK_STATUS
    );
    assert_eq!(c.s.read_u64().await.expect("cookie"), 3);
    let len = c.s.read_u32().await.expect("len");
    let mut p = vec![0; len as usize];
    c.s.read_exact(&mut p).await.expect("payload");
    assert_eq!(u32::from_be_bytes(p[..4].try_into().expect("4")), ctx_id);
    let mut total = 0u64;
    let mut saw_data = false;
    for d in p[4..].chunks(8) {
        total += u64::from(u32::from_be_bytes(d[..4].try_into().expect("4")));
        saw_data |= u32::from_be_bytes(d[4..].try_into().expect("4")) == 0;
    }
    assert_eq!(total, 2 << 20, "extents cover exactly the request");
    assert!(saw_data, "the written block is reported as data");
    t.server.shutdown().await;
}

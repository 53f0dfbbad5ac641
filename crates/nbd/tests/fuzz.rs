//! Random bytes at the handshake and at the transmission phase: the server
//! must answer or close, never panic or hang.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use skyvisor_nbd::proto::{self, IHAVEOPT, info, opt};
use skyvisor_nbd::{Export, MemoryDevice, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server() -> NbdServer {
    let s = NbdServer::new(ServerConfig::default());
    s.add_export(Export::new("d", Arc::new(MemoryDevice::new(1 << 20))))
        .expect("export");
    s
}

/// Feeds `input` to a fresh connection, closes our side, and requires the
/// server to finish the connection promptly.
fn feed(input: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let server = server();
        let (client, srv) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn({
            let server = server.clone();
            async move { server.serve_stream(srv).await }
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server connection must end")
            .expect("server task must not panic");
        writer.abort();
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("output ends")
            .expect("reader")
    })
}

fn go_prefix(structured: bool) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    let mut option = |o: u32, data: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    if structured {
        option(opt::STRUCTURED_REPLY, &[]);
        option(
            opt::SET_META_CONTEXT,
            &proto::encode_meta_context_request("d", &["base:allocation"]),
        );
    }
    option(
        opt::GO,
        &proto::encode_info_request("d", &[info::BLOCK_SIZE]),
    );
    b
}

/// A request header with the right magic and arbitrary fields, so the
/// validation paths (not just the magic check) are exercised.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        prop_oneof![Just(0u64), 0u64..(2 << 20), any::<u64>()],
        prop_oneof![Just(512u32), 0u32..70_000, any::<u32>()],
    )
        .prop_map(|(flags, kind, cookie, offset, length)| {
            let mut b = proto::encode_request(&proto::RequestHeader {
                flags,
                kind,
                cookie,
                offset,
                length,
            })
            .to_vec();
            if kind == proto::cmd::WRITE && length <= 70_000 {
                b.extend(std::iter::repeat_n(0xa5u8, length as usize));
            }
            b
        })
}

#[test]
fn a_valid_request_after_the_prefix_is_answered() {
    for structured in [false, true] {
        let mut b = go_prefix(structured);
        b.extend(proto::encode_request(&proto::RequestHeader {
            flags: 0,
            kind: proto::cmd::READ,
            cookie: 77,
            offset: 0,
            length: 512,
        }));
        let out = feed(b);
        let magic = if structured {
            proto::STRUCTURED_REPLY_MAGIC
        } else {
            proto::SIMPLE_REPLY_MAGIC
        };
        let pos = out
            .windows(4)
            .position(|w| w == magic.to_be_bytes())
            .expect("a reply");
        assert_eq!(&out[pos + 8..][..8], &77u64.to_be_bytes(), "cookie echoed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_handshake_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        feed(data);
    }

    #[test]
    fn random_options_after_flags(opts in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
        let mut b = 3u32.to_be_bytes().to_vec();
        for (o, d) in opts {
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&(o % 16).to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(&d);
        }
        feed(b);
    }

    #[test]
    fn random_transmission_bytes(structured in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut b = go_prefix(structured);
        b.extend(data);
        feed(b);
    }

    #[test]
    fn random_requests(structured in any::<bool>(), reqs in proptest::collection::vec(request_bytes(), 1..32)) {
        let mut b = go_prefix(structured);
        for r in reqs { b.extend(r); }
        feed(b);
    }
}

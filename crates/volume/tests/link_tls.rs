//! Replica links over mutual TLS: with the cluster's certificates set, a
//! replicated volume writes its remote replica through TLS, and a peer
//! without a certificate of the cluster's CA (no TLS, no certificate, or
//! one of another CA) cannot get a single frame to the replica server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use skyvisor_nbd::BlockDevice;
use skyvisor_volume::link_tls::{LinkTls, set_process_tls};
use skyvisor_volume::wire::{Request, RequestFrame};
use skyvisor_volume::{
    DeviceOptions, MemoryMembershipStore, NodeId, ReplicaServer, ReplicaStore, ReplicaStoreOptions,
    ReplicatedDevice, VolumeId, VolumeSpec, create_volume,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and a member certificate of it for 127.0.0.1: (chain, key, ca).
fn member_of_new_ca() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.clone().self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().expect("ip"))];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (
        format!("{}{}", cert.pem(), ca_cert.pem()),
        key.serialize_pem(),
        ca_cert.pem(),
    )
}

/// Sends a valid `Hello` request on `stream` and says whether the server
/// ended the connection instead of answering it.
async fn refused<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    node: &NodeId,
    plain: bool,
) -> bool {
    let (head, body) = RequestFrame {
        id: 1,
        epoch: 0,
        volume: VolumeId::new("vol").expect("id"),
        request: Request::Hello { node: node.clone() },
    }
    .encode();
    let _ = stream.write_all(&head).await;
    if let Some(b) = body {
        let _ = stream.write_all(&b).await;
    }
    let _ = stream.flush().await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                // A plain peer sees only the server's TLS records, never
                // an answer; a TLS peer's first bytes are the answer.
                if !plain && got.len() >= 4 {
                    return false;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_talk_mutual_tls_and_refuse_peers_without_a_cluster_certificate() {
    let (chain, key, ca) = member_of_new_ca();
    set_process_tls(LinkTls::from_pem(&chain, &key, &ca).expect("link tls"));

    let mut nodes = vec![];
    for name in ["n1", "n2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = NodeId::new(name).expect("id");
        let store = ReplicaStore::open(dir.path(), id.clone(), ReplicaStoreOptions::default())
            .expect("store");
        let server = ReplicaServer::start(store.clone(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("server");
        nodes.push((id, dir, store, server));
    }
    let membership = Arc::new(MemoryMembershipStore::new());
    let v = VolumeId::new("vol").expect("id");
    let spec = VolumeSpec::new(
        v.clone(),
        8 << 20,
        nodes
            .iter()
            .map(|(id, _, _, s)| (id.clone(), s.local_addr().to_string()))
            .collect(),
    );
    create_volume(
        &*membership,
        &spec,
        Some(&nodes[0].2),
        Duration::from_secs(5),
    )
    .await
    .expect("create over TLS");
    let dev = ReplicatedDevice::open(
        v.clone(),
        nodes[0].0.clone(),
        membership.clone(),
        Some(nodes[0].2.clone()),
        DeviceOptions::default(),
    )
    .await
    .expect("open");
    dev.write(4096, Bytes::from(vec![0xAB; 8192]), true)
        .await
        .expect("a write both replicas acknowledge");
    dev.flush().await.expect("flush");
    let remote = std::fs::read(nodes[1].1.path().join("volumes/vol/data.img")).expect("data");
    assert!(
        remote[4096..12288].iter().all(|b| *b == 0xAB),
        "the remote replica got the write through the TLS link"
    );

    let addr = nodes[1].3.local_addr();
    let n2 = nodes[1].0.clone();
    // The control: a member's own TLS gets its request answered.
    let member = LinkTls::from_pem(&chain, &key, &ca)
        .expect("member")
        .connect(
            &addr.to_string(),
            TcpStream::connect(addr).await.expect("connect"),
        )
        .await
        .expect("a member's handshake");
    assert!(!refused(member, &n2, false).await, "a member is answered");
    // No TLS at all.
    let plain = TcpStream::connect(addr).await.expect("connect");
    assert!(
        refused(plain, &n2, true).await,
        "a plain TCP peer is refused"
    );
    // TLS that trusts the server, but without a client certificate.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        r.add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("ca der"))
            .expect("root");
        Arc::new(r)
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let anonymous = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = tokio_rustls::TlsConnector::from(Arc::new(anonymous))
        .connect(
            name.clone(),
            TcpStream::connect(addr).await.expect("connect"),
        )
        .await;
    // Refused during the handshake (Err), or right after it.
    if let Ok(s) = conn {
        assert!(
            refused(s, &n2, false).await,
            "a peer without a certificate is refused"
        );
    }
    // A certificate of another CA.
    let (other_chain, other_key, _) = member_of_new_ca();
    let stranger = LinkTls::from_pem(&other_chain, &other_key, &ca).expect("stranger");
    if let Ok(s) = stranger
        .connect(
            &addr.to_string(),
            TcpStream::connect(addr).await.expect("connect"),
        )
        .await
    {
        assert!(
            refused(s, &n2, false).await,
            "a peer of another CA is refused"
        );
    }
    // The replica is untouched by all of that, and still serves the volume.
    dev.write(0, Bytes::from(vec![0xCD; 4096]), true)
        .await
        .expect("the link still works");
    assert_eq!(dev.read(0, 4096).await.expect("read"), vec![0xCD; 4096]);
    dev.close().await.expect("close");
}

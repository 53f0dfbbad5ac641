//! The etcd store against a real etcd (Debian's etcd-server, started by the
//! test on free loopback ports): the conformance suite, and what happens
//! when etcd dies and comes back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use skyvisor_store::testing::EtcdProcess;
use skyvisor_store::{EtcdOptions, EtcdStore, Store, StoreError, StoreExt, conformance};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The bound the brief sets for "etcd is down" answers.
const UNAVAILABLE_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_etcd() {
    init_tracing();
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let endpoints = etcd.endpoints();
    let n = AtomicUsize::new(0);
    conformance::run_all(|| {
        let namespace = format!("/conformance-{}/", n.fetch_add(1, Ordering::SeqCst));
        let endpoints = endpoints.clone();
        async move {
            EtcdStore::connect(&endpoints, &namespace, EtcdOptions::default())
                .await
                .expect("connect")
        }
    })
    .await;
}

/// Asserts `result` is `Unavailable` naming the endpoint, reached in time.
fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StoreError>,
    started: Instant,
    endpoint: &str,
) {
    let elapsed = started.elapsed();
    match result {
        Err(StoreError::Unavailable(message)) => {
            assert!(
                message.contains(endpoint),
                "{what}: message names the endpoint: {message}"
            );
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(
        elapsed < UNAVAILABLE_WITHIN,
        "{what} took {elapsed:?} to fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_unavailable_and_restart_is_survived() {
    init_tracing();
    let mut etcd = EtcdProcess::start().await.expect("start etcd");
    let endpoint = etcd.endpoint();
    let store = EtcdStore::connect(&etcd.endpoints(), "/restart/", EtcdOptions::default())
        .await
        .expect("connect");
    let before = store.put("kept", b"before".to_vec()).await.expect("put");
    let mut watch = store.watch("", 0).await.expect("watch");

    etcd.stop();

    // The open watch reports the loss, then ends.
    let started = Instant::now();
    let item = tokio::time::timeout(UNAVAILABLE_WITHIN, watch.next())
        .await
        .expect("watch reports etcd's death in time");
    match item {
        Some(Err(StoreError::Unavailable(message))) => {
            assert!(message.contains(&endpoint), "{message}");
        }
        other => panic!("expected Unavailable from the watch, got {other:?}"),
    }
    assert!(
        watch.next().await.is_none(),
        "the watch ends after Unavailable"
    );
    tracing::info!(after = ?started.elapsed(), "watch saw etcd die");

    // Every kind of request fails fast while etcd is down.
    let t = Instant::now();
    assert_unavailable("get", store.get("kept").await, t, &endpoint);
    let t = Instant::now();
    assert_unavailable("put", store.put("k", b"v".to_vec()).await, t, &endpoint);
    let t = Instant::now();
    assert_unavailable("list", store.list("").await, t, &endpoint);
    let t = Instant::now();
    assert_unavailable("watch", store.watch("", 0).await.map(|_| ()), t, &endpoint);
    let t = Instant::now();
    assert_unavailable(
        "grant",
        store.grant_lease(Duration::from_secs(5)).await,
        t,
        &endpoint,
    );
    let t = Instant::now();
    assert_unavailable(
        "connect",
        EtcdStore::connect(&etcd.endpoints(), "/restart/", EtcdOptions::default()).await,
        t,
        &endpoint,
    );

    etcd.restart().await.expect("restart etcd");

    // The same store object works again, without reconnecting by hand.
    let deadline = Instant::now() + Duration::from_secs(30);
    let kv = loop {
        match store.get("kept").await {
            Ok(kv) => break kv,
            Err(e) => {
                assert!(Instant::now() < deadline, "store never came back: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let kv = kv.expect("data written before the restart is kept");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"before"[..], before)
    );
    let mut watch = store.watch("", 0).await.expect("watch after restart");
    let rev = store
        .put("after", b"x".to_vec())
        .await
        .expect("put after restart");
    assert!(rev > before);
    let event = tokio::time::timeout(UNAVAILABLE_WITHIN, watch.next())
        .await
        .expect("event in time")
        .expect("event")
        .expect("ok");
    assert_eq!((event.key(), event.revision()), ("after", rev));
    let lease = store
        .grant_lease(Duration::from_secs(5))
        .await
        .expect("grant after restart");
    store
        .keep_alive(lease)
        .await
        .expect("keep-alive after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_etcd_times_out_and_recovers() {
    init_tracing();
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let endpoint = etcd.endpoint();
    let options = EtcdOptions::default();
    let store = EtcdStore::connect(&etcd.endpoints(), "/hung/", options)
        .await
        .expect("connect");
    store.put("k", b"v".to_vec()).await.expect("put");
    let mut watch = store.watch("", 0).await.expect("watch");

    etcd.pause().expect("SIGSTOP etcd");
    // Connections stay open but nothing answers: only timeouts can tell.
    let t = Instant::now();
    assert_unavailable("get", store.get("k").await, t, &endpoint);
    assert!(
        t.elapsed() >= options.request_timeout,
        "failed by timeout, not by refusal"
    );
    let t = Instant::now();
    assert_unavailable("put", store.put("k", b"w".to_vec()).await, t, &endpoint);
    // The open watch notices through HTTP/2 keep-alive pings.
    let bound = options.keep_alive_interval + options.request_timeout + Duration::from_secs(5);
    let item = tokio::time::timeout(bound, watch.next())
        .await
        .expect("watch notices a hung etcd within the keep-alive bound");
    assert!(
        matches!(item, Some(Err(StoreError::Unavailable(_)))),
        "expected Unavailable, got {item:?}"
    );

    etcd.resume().expect("SIGCONT etcd");
    let deadline = Instant::now() + Duration::from_secs(30);
    let kv = loop {
        match store.get("k").await {
            Ok(kv) => break kv,
            Err(e) => {
                assert!(Instant::now() < deadline, "store never came back: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The put sent while etcd was frozen may or may not have been applied
    // (that is what Unavailable means for a write); either value is valid.
    let value = kv.expect("k exists").value;
    assert!(value == b"v" || value == b"w", "{value:?}");
}

/// A CA, and certificates it signed for etcd (127.0.0.1) and for a client.
struct TestPki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn test_pki() -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |purpose: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        p.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    TestPki {
        ca_pem: ca_cert.pem(),
        server: leaf(ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf(ExtendedKeyUsagePurpose::ClientAuth),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_ca_and_a_client_certificate() {
    init_tracing();
    let pki = test_pki();
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p
    };
    let files = skyvisor_store::testing::ServerTlsFiles {
        ca: write("ca.pem", &pki.ca_pem),
        cert: write("etcd.pem", &pki.server.0),
        key: write("etcd-key.pem", &pki.server.1),
    };
    let etcd = EtcdProcess::start_tls(files)
        .await
        .expect("start etcd with TLS");
    let endpoints = etcd.endpoints();
    assert!(endpoints[0].starts_with("https://"), "{endpoints:?}");
    let tls = skyvisor_store::EtcdTls {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity: Some((
            pki.client.0.clone().into_bytes(),
            pki.client.1.clone().into_bytes(),
        )),
    };
    let store =
        EtcdStore::connect_with_tls(&endpoints, "/tls/", EtcdOptions::default(), Some(&tls))
            .await
            .expect("connect over TLS with a client certificate");
    store.put("k", b"v".to_vec()).await.expect("put");
    assert_eq!(
        store.get("k").await.expect("get").map(|kv| kv.value),
        Some(b"v".to_vec())
    );
    // Without a client certificate, or without TLS, etcd lets nothing through.
    let anonymous = skyvisor_store::EtcdTls {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity: None,
    };
    let refused = match EtcdStore::connect_with_tls(
        &endpoints,
        "/tls/",
        EtcdOptions::default(),
        Some(&anonymous),
    )
    .await
    {
        Err(_) => true,
        Ok(s) => s.get("k").await.is_err(),
    };
    assert!(refused, "etcd answered a client without a certificate");
    let plain: Vec<String> = endpoints
        .iter()
        .map(|e| e.replace("https://", "http://"))
        .collect();
    let refused = match EtcdStore::connect(&plain, "/tls/", EtcdOptions::default()).await {
        Err(_) => true,
        Ok(s) => s.get("k").await.is_err(),
    };
    assert!(refused, "etcd answered plain HTTP");
}

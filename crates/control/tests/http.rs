//! What the API's HTTP layer does for every route, over real HTTP: JSON
//! answers gzipped for clients that ask (never the event stream), and
//! cross-origin calls allowed (the web console fails over to another
//! server) without credentials.

use std::io::Read;
use std::time::Duration;

mod common;

/// A plain HTTP client: no compression of its own, so each test says what
/// it accepts.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_gzipped_when_asked_and_the_event_stream_never_is() {
    let dir = tempfile::tempdir().expect("tmp");
    let (base, token, _membership) = common::server(dir.path(), 1 << 20).await;
    let http = client();

    let packed = http
        .get(format!("{base}/v1/openapi.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("request");
    assert_eq!(packed.headers()["content-encoding"], "gzip");
    let bytes = packed.bytes().await.expect("body");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .expect("gzip");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(doc["paths"]["/v1/instances"].is_object());
    assert!(
        bytes.len() * 4 < text.len(),
        "{} of {}",
        bytes.len(),
        text.len()
    );

    let plain = http
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .expect("request");
    assert!(plain.headers().get("content-encoding").is_none());

    let stream = http
        .get(format!("{base}/v1/events/stream"))
        .header("accept-encoding", "gzip")
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(stream.status(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .expect("text")
            .starts_with("text/event-stream")
    );
    assert!(
        stream.headers().get("content-encoding").is_none(),
        "the event stream was compressed: a client would wait for a block"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_may_call_with_a_token_and_no_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    let (base, token, _membership) = common::server(dir.path(), 1 << 20).await;
    let http = client();
    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{base}/v1/instances"))
        .header("origin", "http://10.0.0.7:7780")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-skyvisor-project",
        )
        .send()
        .await
        .expect("request");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .expect("text")
        .to_ascii_lowercase();
    for header in ["authorization", "content-type", "x-skyvisor-project"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    assert!(h.get("access-control-allow-credentials").is_none());

    // The call itself: answered, with the origin allowed; a missing token
    // is still 401.
    let call = http
        .get(format!("{base}/v1/instances"))
        .header("origin", "http://10.0.0.7:7780")
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(call.status(), 200);
    assert_eq!(call.headers()["access-control-allow-origin"], "*");
    let anonymous = http
        .get(format!("{base}/v1/instances"))
        .header("origin", "http://10.0.0.7:7780")
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
}

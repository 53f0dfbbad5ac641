//! Image uploads over real HTTP: one larger than the server accepts is
//! refused (413, saying the limit) and leaves no record and no files; one
//! within the limit is imported.

use std::time::Duration;

mod common;

const BOUNDARY: &str = "skyvisor-test-boundary";

/// A multipart body with one part `disk` holding `data`.
fn disk_part(data: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"disk\"; filename=\"d.img\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let limit = 1u64 << 20;
    let (base, token, _membership) = common::server(dir.path(), limit).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let import = |name: &'static str, body: Vec<u8>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/images/import?name={name}"))
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(body)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };

    // Over the limit: 413, naming the limit; no image, no files.
    let (status, body) = import("big", disk_part(&vec![7u8; (limit + 4096) as usize])).await;
    assert_eq!(status, 413, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&limit.to_string()) && message.contains("--max-upload"),
        "{body}"
    );
    let (status, _) = {
        let r = http
            .get(format!("{base}/v1/images/big"))
            .send()
            .await
            .expect("get");
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 404, "the refused upload left an image record");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path().join("server/images"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("big"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "files left: {leftovers:?}");

    // Within the limit (a raw disk of 64 KiB): imported.
    let (status, body) = import("small", disk_part(&vec![1u8; 64 << 10])).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["state"], "ready", "{body}");
}

//! The web console: the browser app built from `ui/` at compile time and
//! embedded in the binary, served at `/ui/` by every server and by
//! `skyvisor up`. It is a client of the REST API like the CLI; it needs no
//! route of its own beyond its files.
//!
//! Files are served gzipped to clients that accept it (they were
//! compressed once, at build time), with ETags; content-hashed chunks are
//! cached for good, everything else is revalidated.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

/// One embedded file.
struct Asset {
    /// Its path under `/ui/`.
    path: &'static str,
    body: &'static [u8],
    gzip: &'static [u8],
    etag: &'static str,
}

static ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Serves files from this directory instead of the embedded ones (for
/// working on the console: rebuild it and reload the page).
pub const DEV_DIR_ENV: &str = "SKYVISOR_UI_DIR";

/// The console's routes: `/ui/...`, and `/` sends browsers there.
pub fn router() -> Router {
    // Read once: the files come from one place for the server's life.
    let dev_dir: Option<Arc<Path>> = std::env::var_os(DEV_DIR_ENV).map(|d| Path::new(&d).into());
    let index_dir = dev_dir.clone();
    Router::new()
        .route("/", axum::routing::get(|| async { Redirect::to("/ui/") }))
        .route("/ui", axum::routing::get(|| async { Redirect::to("/ui/") }))
        .route(
            "/ui/",
            axum::routing::get(move |h: HeaderMap| async move {
                serve(index_dir.as_deref(), "index.html", &h)
            }),
        )
        .route(
            "/ui/{*path}",
            axum::routing::get(
                move |axum::extract::Path(path): axum::extract::Path<String>, h: HeaderMap| async move {
                    serve(dev_dir.as_deref(), &path, &h)
                },
            ),
        )
}

/// The paths of the embedded files, for tests and diagnostics.
pub fn files() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.path)
}

/// `path` from `dev_dir` if set, else from the embedded files.
fn serve(dev_dir: Option<&Path>, path: &str, headers: &HeaderMap) -> Response {
    if let Some(dir) = dev_dir {
        return serve_from_disk(dir, path);
    }
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return not_found(path);
    };
    let revalidated = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == asset.etag));
    let mut resp = if revalidated {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(headers) {
        let mut r = asset.gzip.into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.body.into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control(path)),
    );
    secure(h);
    resp
}

fn serve_from_disk(dir: &Path, path: &str) -> Response {
    if path.split('/').any(|part| part == ".." || part.is_empty()) {
        return not_found(path);
    }
    // A blocking read of a small file: the development path only.
    match std::fs::read(dir.join(path)).ok() {
        Some(body) => {
            let mut resp = body.into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(path)),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            secure(h);
            resp
        }
        None => not_found(path),
    }
}

fn not_found(path: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("no file /ui/{path} in the web console; open /ui/"),
    )
        .into_response()
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            (name == "gzip" || name == "*") && !refused
        })
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Chunks are named by their content: cached for good. The entry points
/// keep their names across builds: revalidated (by ETag) every time.
fn cache_control(path: &str) -> &'static str {
    if path.starts_with("assets/chunks/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

/// The page runs only its own scripts, may not be framed, and may call
/// any server of the cluster (it fails over to them) over HTTP and
/// WebSocket.
fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self' http: https: ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        router()
            .oneshot(req.body(Body::empty()).expect("test value"))
            .await
            .expect("test value")
    }

    #[tokio::test]
    async fn the_index_is_served_gzipped_with_an_etag_and_revalidates() {
        let r = get("/ui/", &[("accept-encoding", "gzip, br")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let etag = r.headers()[header::ETAG]
            .to_str()
            .expect("test value")
            .to_string();
        let again = get("/ui/", &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        let plain = get("/ui/", &[]).await;
        assert!(!plain.headers().contains_key(header::CONTENT_ENCODING));
        let body = axum::body::to_bytes(plain.into_body(), 1 << 20)
            .await
            .expect("test value");
        assert!(body.starts_with(b"<!doctype html>"));
    }

    #[tokio::test]
    async fn every_file_the_index_names_is_embedded() {
        let index = ASSETS
            .iter()
            .find(|a| a.path == "index.html")
            .expect("test value");
        let html = std::str::from_utf8(index.body).expect("test value");
        for reference in html
            .split("\"./")
            .skip(1)
            .filter_map(|s| s.split('"').next())
        {
            assert!(
                files().any(|f| f == reference),
                "index.html names {reference}, which is not embedded"
            );
        }
        assert!(files().any(|f| f == "assets/app.js"));
    }

    #[tokio::test]
    async fn unknown_files_and_escapes_are_404_and_the_root_redirects() {
        assert_eq!(
            get("/ui/nope.js", &[]).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get("/ui/../Cargo.toml", &[]).await.status(),
            StatusCode::NOT_FOUND
        );
        let r = get("/", &[]).await;
        assert!(r.status().is_redirection());
        assert_eq!(r.headers()[header::LOCATION], "/ui/");
    }

    #[test]
    fn gzip_is_chosen_only_when_accepted() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(v).expect("test value"),
            );
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate, br")));
        assert!(accepts_gzip(&h("br;q=1.0, gzip;q=0.8")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("br")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}

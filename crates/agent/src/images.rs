//! The agent's image cache: finds an image's files on this host, or
//! downloads them from the server and verifies their checksums.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use skyvisor_core::{Image, ImageFile};
use tokio::io::AsyncWriteExt;
use tracing::info;

/// Where an agent finds image files.
pub struct ImageCache {
    /// Directories laid out as `<dir>/<image>/<file>` (the server's image
    /// store when server and agent share a host).
    pub shared_dirs: Vec<PathBuf>,
    /// The agent's own cache for downloaded files.
    pub cache_dir: PathBuf,
    /// The server to download from.
    pub server_url: Option<String>,
    /// Other servers of the cluster, tried when `server_url` fails.
    servers: Mutex<Vec<String>>,
    http: reqwest::Client,
    verified: Mutex<HashSet<PathBuf>>,
}

impl ImageCache {
    /// A cache over `shared_dirs`, downloading into `cache_dir` from `server_url`.
    pub fn new(shared_dirs: Vec<PathBuf>, cache_dir: PathBuf, server_url: Option<String>) -> Self {
        Self {
            shared_dirs,
            cache_dir,
            server_url,
            servers: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// The local path of `file` of `image`, fetching it if needed.
    pub async fn file(&self, image: &Image, file: &ImageFile) -> Result<PathBuf, String> {
        for dir in &self.shared_dirs {
            let p = dir.join(image.name.as_str()).join(&file.file_name);
            if self.is_verified(&p, file).await {
                return Ok(p);
            }
        }
        let dir = self.cache_dir.join(format!(
            "{}-{}",
            image.name,
            &file.sha256[..file.sha256.len().min(12)]
        ));
        let p = dir.join(&file.file_name);
        if self.is_verified(&p, file).await {
            return Ok(p);
        }
        let servers = self.candidates();
        if servers.is_empty() {
            return Err(format!(
                "image {} file {} is not on this host and no server is known to fetch it from",
                image.name, file.file_name
            ));
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut errors = Vec::new();
        for server in servers {
            let url = format!(
                "{}/v1/images/{}/files/{}",
                server.trim_end_matches('/'),
                image.name,
                file.file_name
            );
            info!(%url, "downloading image file");
            let tmp = dir.join(format!(
                ".{}.part-{}",
                file.file_name,
                uuid::Uuid::new_v4().simple()
            ));
            match download(&self.http, &url, &tmp, &file.sha256).await {
                Ok(()) => {
                    tokio::fs::rename(&tmp, &p)
                        .await
                        .map_err(|e| format!("{}: {e}", p.display()))?;
                    self.mark_verified(&p);
                    return Ok(p);
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    errors.push(e);
                }
            }
        }
        Err(errors.join("; "))
    }

    /// Sets the cluster's other servers, tried after `server_url`.
    pub fn set_servers(&self, urls: Vec<String>) {
        *self.servers.lock().unwrap_or_else(|e| e.into_inner()) = urls;
    }

    /// The servers to download from, in order.
    fn candidates(&self) -> Vec<String> {
        let mut all: Vec<String> = self.server_url.iter().cloned().collect();
        for s in self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        all
    }

    fn mark_verified(&self, p: &Path) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.to_path_buf());
    }

    /// Whether `p` holds `file`: size always, checksum once per process.
    async fn is_verified(&self, p: &Path, file: &ImageFile) -> bool {
        match tokio::fs::metadata(p).await {
            Ok(m) if m.len() == file.size_bytes => {}
            _ => return false,
        }
        if self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(p)
        {
            return true;
        }
        match hash_file(p).await {
            Ok(h) if h == file.sha256 => {
                self.mark_verified(p);
                true
            }
            _ => false,
        }
    }
}

async fn hash_file(p: &Path) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(p).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

async fn download(
    http: &reqwest::Client,
    url: &str,
    to: &Path,
    sha256: &str,
) -> Result<(), String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("downloading {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "downloading {url}: server answered {}",
            resp.status()
        ));
    }
    let mut f = tokio::fs::File::create(to)
        .await
        .map_err(|e| format!("{}: {e}", to.display()))?;
    let mut h = Sha256::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("downloading {url}: {e}"))?;
        h.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| format!("{}: {e}", to.display()))?;
    }
    f.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", to.display()))?;
    let got = hex::encode(h.finalize());
    if got != sha256 {
        return Err(format!(
            "downloaded {url} has checksum {got}, expected {sha256}"
        ));
    }
    Ok(())
}

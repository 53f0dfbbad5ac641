//! The agent's image cache: finds an image's files on this host, or fetches
//! them from any live server, or from a peer host that holds a verified
//! copy, and verifies their checksums before use.
//!
//! Files are content-addressed by their SHA-256: a copy from anywhere is
//! used only once its checksum matches the image record's, so a peer host
//! can serve what it holds without being trusted. A fetch tries every source
//! it knows, again and again with backoff, for a bounded time; when it
//! gives up, its error names every source's last reason.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use skyvisor_core::{Image, ImageFile};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// How long a fetch keeps trying before the VM's start fails.
const FETCH_DEADLINE: Duration = Duration::from_secs(120);
/// The longest pause between two rounds of attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where an agent finds image files.
pub struct ImageCache {
    /// Directories laid out as `<dir>/<image>/<file>` (the server's image
    /// store when server and agent share a host).
    pub shared_dirs: Vec<PathBuf>,
    /// The agent's own cache for downloaded files.
    pub cache_dir: PathBuf,
    /// The server the agent was started with; tried after the live servers.
    pub server_url: Option<String>,
    /// The cluster's live servers' API URLs (kept current from the store).
    servers: Mutex<Vec<String>>,
    /// Other hosts' agent URLs by host name (kept current from the store).
    peers: Mutex<BTreeMap<String, String>>,
    http: Mutex<reqwest::Client>,
    /// The API token for downloads from servers.
    token: Mutex<Option<String>>,
    /// The `Authorization` value peer agents admit (the cluster's key).
    peer_auth: Mutex<Option<String>>,
    /// Paths whose content was verified in this process, with its checksum.
    verified: Mutex<HashMap<PathBuf, String>>,
}

/// One place a file can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A server's API.
    Server(String),
    /// Another host's agent (by name, at its URL).
    Peer(String, String),
}

impl Source {
    fn url(&self, image: &Image, file: &ImageFile) -> String {
        match self {
            Source::Server(base) => format!(
                "{}/v1/images/{}/files/{}",
                base.trim_end_matches('/'),
                image.name,
                file.file_name
            ),
            Source::Peer(_, base) => {
                format!(
                    "{}/agent/v1/image-files/{}",
                    base.trim_end_matches('/'),
                    file.sha256
                )
            }
        }
    }

    fn label(&self) -> String {
        match self {
            Source::Server(base) => format!("server {base}"),
            Source::Peer(name, _) => format!("host {name}"),
        }
    }
}

/// The download client, trusting `ca_pem` (the cluster's CA) as well as
/// the system's roots.
fn client_trusting(ca_pem: Option<&str>, identity_pem: Option<&str>) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .no_proxy();
    crate::credentials::cluster_client(b, ca_pem, identity_pem)
        .build()
        .unwrap_or_default()
}

impl ImageCache {
    /// A cache over `shared_dirs`, downloading into `cache_dir` from `server_url`.
    pub fn new(shared_dirs: Vec<PathBuf>, cache_dir: PathBuf, server_url: Option<String>) -> Self {
        Self {
            shared_dirs,
            cache_dir,
            server_url,
            servers: Mutex::new(Vec::new()),
            peers: Mutex::new(BTreeMap::new()),
            http: Mutex::new(client_trusting(None, None)),
            verified: Mutex::new(HashMap::new()),
            token: Mutex::new(None),
            peer_auth: Mutex::new(None),
        }
    }

    /// Trusts the cluster's CA too (servers that serve TLS, peer agents)
    /// and presents this member's certificate (`identity_pem`: key and
    /// chain) to peers.
    pub fn trust_cluster(&self, ca_pem: &str, identity_pem: &str) {
        if let Ok(mut h) = self.http.lock() {
            *h = client_trusting(Some(ca_pem), Some(identity_pem));
        }
    }

    /// Sets the `Authorization` value sent to peer agents.
    pub fn set_peer_auth(&self, header: String) {
        if let Ok(mut a) = self.peer_auth.lock() {
            *a = Some(header);
        }
    }

    /// Sets the API token sent to servers with each download.
    pub fn set_token(&self, token: String) {
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token);
        }
    }

    /// The local path of `file` of `image`, fetching it if needed.
    pub async fn file(&self, image: &Image, file: &ImageFile) -> Result<PathBuf, String> {
        self.fetch(image, file, &|_| {}).await
    }

    /// The local path of `file` of `image` if this host has a verified copy.
    pub async fn local(&self, image: &Image, file: &ImageFile) -> Option<PathBuf> {
        for dir in &self.shared_dirs {
            let p = dir
                .join(image.project.as_str())
                .join(image.name.as_str())
                .join(&file.file_name);
            if self.is_verified(&p, file).await {
                return Some(p);
            }
        }
        let p = self.cache_path(image, file);
        self.is_verified(&p, file).await.then_some(p)
    }

    /// Like [`ImageCache::file`], telling `progress` what it is doing (which
    /// source, which attempt) while it fetches.
    pub async fn fetch(
        &self,
        image: &Image,
        file: &ImageFile,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, String> {
        if let Some(p) = self.local(image, file).await {
            return Ok(p);
        }
        let p = self.cache_path(image, file);
        let dir = p
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cache_dir.clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let started = Instant::now();
        let mut last_error: BTreeMap<String, String> = BTreeMap::new();
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(250);
        loop {
            let sources = self.sources();
            if sources.is_empty() {
                last_error.insert(
                    "sources".into(),
                    "no server or peer host is known to fetch it from".into(),
                );
            }
            for source in sources {
                attempts += 1;
                let url = source.url(image, file);
                progress(format!(
                    "fetching image {} file {} from {} (attempt {attempts})",
                    image.name,
                    file.file_name,
                    source.label()
                ));
                info!(%url, attempt = attempts, "downloading image file");
                let tmp = dir.join(format!(
                    ".{}.part-{}",
                    file.file_name,
                    uuid::Uuid::new_v4().simple()
                ));
                let auth = match source {
                    Source::Server(_) => self
                        .token
                        .lock()
                        .ok()
                        .and_then(|t| t.clone())
                        .map(|t| format!("Bearer {t}")),
                    Source::Peer(..) => self.peer_auth.lock().ok().and_then(|a| a.clone()),
                };
                let http = self.http.lock().map(|h| h.clone()).unwrap_or_default();
                let project = matches!(source, Source::Server(_)).then_some(&image.project);
                match download(&http, auth.as_deref(), project, &url, &tmp, &file.sha256).await {
                    Ok(()) => {
                        tokio::fs::rename(&tmp, &p)
                            .await
                            .map_err(|e| format!("{}: {e}", p.display()))?;
                        self.mark_verified(&p, &file.sha256);
                        return Ok(p);
                    }
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        warn!(%url, error = %e, "image file download failed");
                        last_error.insert(source.label(), e);
                    }
                }
            }
            if started.elapsed() + backoff > FETCH_DEADLINE {
                let reasons: Vec<String> = last_error
                    .iter()
                    .map(|(source, e)| format!("{source}: {e}"))
                    .collect();
                return Err(format!(
                    "could not fetch image {} file {} in {}s ({attempts} attempts): {}",
                    image.name,
                    file.file_name,
                    started.elapsed().as_secs(),
                    reasons.join("; ")
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A verified local copy of the file whose SHA-256 is `sha256`, for a
    /// peer host that asks for it.
    pub async fn by_checksum(&self, sha256: &str) -> Option<PathBuf> {
        let known: Vec<PathBuf> = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, h)| h.as_str() == sha256)
            .map(|(p, _)| p.clone())
            .collect();
        for p in known {
            if tokio::fs::try_exists(&p).await.unwrap_or(false) {
                return Some(p);
            }
        }
        // Downloaded before this process started: the cache directory's
        // name carries the checksum's prefix; verify the whole of it.
        let prefix = sha256.get(..12)?;
        let mut dirs = tokio::fs::read_dir(&self.cache_dir).await.ok()?;
        while let Ok(Some(d)) = dirs.next_entry().await {
            if !d
                .file_name()
                .to_string_lossy()
                .ends_with(&format!("-{prefix}"))
            {
                continue;
            }
            let Ok(mut files) = tokio::fs::read_dir(d.path()).await else {
                continue;
            };
            while let Ok(Some(f)) = files.next_entry().await {
                let p = f.path();
                if f.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if hash_file(&p).await.is_ok_and(|h| h == sha256) {
                    self.mark_verified(&p, sha256);
                    return Some(p);
                }
            }
        }
        None
    }

    /// Sets the cluster's live servers, tried first.
    pub fn set_servers(&self, urls: Vec<String>) {
        *self.servers.lock().unwrap_or_else(|e| e.into_inner()) = urls;
    }

    /// Sets the other hosts' agent URLs by host name, tried after the servers.
    pub fn set_peers(&self, peers: BTreeMap<String, String>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Where this cache keeps its own copy of `file`.
    fn cache_path(&self, image: &Image, file: &ImageFile) -> PathBuf {
        self.cache_dir
            .join(format!(
                "{}-{}-{}",
                image.project,
                image.name,
                &file.sha256[..file.sha256.len().min(12)]
            ))
            .join(&file.file_name)
    }

    /// The sources to try, in order: the live servers, the server the agent
    /// was started with, then peer hosts.
    fn sources(&self) -> Vec<Source> {
        let mut all: Vec<Source> = self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .map(Source::Server)
            .collect();
        if let Some(s) = &self.server_url
            && !all.contains(&Source::Server(s.clone()))
        {
            all.push(Source::Server(s.clone()));
        }
        all.extend(
            self.peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(name, url)| Source::Peer(name.clone(), url.clone())),
        );
        all
    }

    fn mark_verified(&self, p: &Path, sha256: &str) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.to_path_buf(), sha256.to_string());
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
            .get(p)
            .is_some_and(|h| *h == file.sha256)
        {
            return true;
        }
        match hash_file(p).await {
            Ok(h) if h == file.sha256 => {
                self.mark_verified(p, &file.sha256);
                true
            }
            _ => false,
        }
    }
}

/// The SHA-256 of a file's content, hex.
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
    authorization: Option<&str>,
    project: Option<&skyvisor_core::ProjectName>,
    url: &str,
    to: &Path,
    sha256: &str,
) -> Result<(), String> {
    let mut req = http.get(url);
    if let Some(a) = authorization {
        req = req.header(reqwest::header::AUTHORIZATION, a);
    }
    // A server finds an image by the name its project knows it by.
    if let Some(p) = project {
        req = req.header(skyvisor_core::auth::PROJECT_HEADER, p.as_str());
    }
    let resp = req
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

//! Image replication between the servers of a cluster: an image is built
//! or imported on one server, and every other server copies its files
//! (verifying their checksums), so agents can fetch them from any server
//! and losing the server that made it loses no image.
//!
//! This module must never serve or keep a file whose checksum it has not
//! verified, and never ask a peer that would in turn ask its peers (the
//! request carries [`NO_PEER_FETCH_HEADER`]).

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use skyvisor_core::cluster::ServerRecord;
use skyvisor_core::image::ImageState;
use skyvisor_core::{Image, ImageFile, keys};
use skyvisor_store::StoreExt;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::ControlPlane;

/// A request for an image file with this header is answered from the
/// server's own copy only (404 if it has none), never from its peers.
pub const NO_PEER_FETCH_HEADER: &str = "x-skyvisor-no-peer-fetch";

/// How often every server checks that it has every ready image.
const SYNC_EVERY: Duration = Duration::from_secs(2);
/// An image directory without an image record is removed only after this
/// long, so an import being published is never taken for an orphan.
const ORPHAN_AGE: Duration = Duration::from_secs(120);

/// Keeps this server's copies of all ready images, forever.
pub async fn run(cp: ControlPlane) {
    loop {
        if let Err(e) = sync_once(&cp).await {
            debug!(error = %e, "image sync pass failed");
        }
        tokio::time::sleep(SYNC_EVERY).await;
    }
}

/// One pass: fetch missing files of ready images, remove orphaned copies.
pub async fn sync_once(cp: &ControlPlane) -> Result<(), String> {
    let (images, _) = cp
        .store
        .list_json::<Image>(keys::IMAGES)
        .await
        .map_err(|e| e.to_string())?;
    for (image, _) in &images {
        if image.state != ImageState::Ready {
            continue;
        }
        if let Err(e) = ensure_local(cp, image).await {
            debug!(image = %image.name, error = %e, "cannot copy image yet");
        }
    }
    remove_orphans(
        cp,
        &images
            .iter()
            .map(|(i, _)| i.image_ref().to_string())
            .collect::<Vec<_>>(),
    )
    .await;
    Ok(())
}

/// Makes sure every file of `image` is in this server's image store,
/// copying missing ones from another server.
pub async fn ensure_local(cp: &ControlPlane, image: &Image) -> Result<(), String> {
    let _one_at_a_time = cp.image_sync_lock.lock().await;
    let dir = cp.image_dir(&image.image_ref());
    for file in &image.files {
        let path = dir.join(&file.file_name);
        if tokio::fs::metadata(&path)
            .await
            .is_ok_and(|m| m.len() == file.size_bytes)
        {
            continue;
        }
        fetch_from_peers(cp, image, file, &dir).await?;
    }
    Ok(())
}

async fn fetch_from_peers(
    cp: &ControlPlane,
    image: &Image,
    file: &ImageFile,
    dir: &Path,
) -> Result<(), String> {
    let me = cp.cluster_view().map(|v| v.me.name.clone());
    let (servers, _) = cp
        .store
        .list_json::<ServerRecord>(keys::SERVERS)
        .await
        .map_err(|e| e.to_string())?;
    let peers: Vec<ServerRecord> = servers
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| Some(&s.name) != me.as_ref())
        .collect();
    if peers.is_empty() {
        return Err(format!(
            "file {} of image {} is missing and no other server is live to copy it from",
            file.file_name, image.name
        ));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut errors = Vec::new();
    for peer in &peers {
        let url = format!(
            "{}/v1/images/{}/files/{}",
            peer.url.trim_end_matches('/'),
            image.name,
            file.file_name
        );
        let tmp = dir.join(format!(
            ".{}.sync-{}",
            file.file_name,
            uuid::Uuid::new_v4().simple()
        ));
        match download(
            &cp.http,
            &cp.service_token,
            &image.project,
            &url,
            &tmp,
            &file.sha256,
        )
        .await
        {
            Ok(()) => {
                let path = dir.join(&file.file_name);
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                info!(image = %image.name, file = %file.file_name, from = %peer.name, "copied image file");
                return Ok(());
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                errors.push(format!("{}: {e}", peer.name));
            }
        }
    }
    Err(format!(
        "no server could provide file {} of image {}: {}",
        file.file_name,
        image.name,
        errors.join("; ")
    ))
}

async fn download(
    http: &reqwest::Client,
    token: &str,
    project: &skyvisor_core::ProjectName,
    url: &str,
    to: &Path,
    sha256: &str,
) -> Result<(), String> {
    let resp = http
        .get(url)
        .header(NO_PEER_FETCH_HEADER, "1")
        .header(skyvisor_core::auth::PROJECT_HEADER, project.as_str())
        .bearer_auth(token)
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    let mut f = tokio::fs::File::create(to)
        .await
        .map_err(|e| format!("{}: {e}", to.display()))?;
    let mut h = Sha256::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("GET {url}: {e}"))?;
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
        return Err(format!("checksum {got}, expected {sha256}"));
    }
    Ok(())
}

/// The image directories of this server's store (`<project>/<name>`),
/// with their `project/name`.
async fn image_dirs(root: &Path) -> Vec<(String, std::fs::DirEntry)> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let Ok(projects) = std::fs::read_dir(&root) else {
            return out;
        };
        for p in projects.flatten() {
            let project = p.file_name().to_string_lossy().into_owned();
            if project.starts_with('.') || !p.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(images) = std::fs::read_dir(p.path()) else {
                continue;
            };
            for i in images.flatten() {
                let name = i.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && i.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push((format!("{project}/{name}"), i));
                }
            }
        }
        out
    })
    .await
    .unwrap_or_default()
}

/// Removes copies of images that no longer exist (deleted through another
/// server), once they are old enough not to be an import in progress.
async fn remove_orphans(cp: &ControlPlane, names: &[String]) {
    let root = cp.config.data_dir.join("images");
    for (name, entry) in image_dirs(&root).await {
        if names.contains(&name) {
            continue;
        }
        let old = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= ORPHAN_AGE);
        if !old {
            continue;
        }
        // Re-check: the record may have been created since the listing.
        let Ok(image_name) = name.parse::<skyvisor_core::ImageRef>() else {
            continue;
        };
        if matches!(cp.store.get(&keys::image(&image_name)).await, Ok(None)) {
            match tokio::fs::remove_dir_all(entry.path()).await {
                Ok(()) => info!(image = %name, "removed the copy of a deleted image"),
                Err(e) => warn!(image = %name, error = %e, "cannot remove a deleted image's copy"),
            }
        }
    }
}

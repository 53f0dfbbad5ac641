//! Flattening image layers into one tree: applying each layer's entries in
//! order with OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`), resolving parents
//! through the image's own symlinks, and writing the result as a gzip tar.
//!
//! It must never let a path leave the image's root: names are normalised
//! lexically and refused if they climb above it, and symlinks are resolved as
//! inside a chroot (an absolute target starts at the image's root).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use crate::ImageError;
use crate::error::OciError;
use crate::tarball::{Meta, TarGzWriter};

/// Largest flattened image (sum of file sizes) the in-memory importer accepts.
pub const MAX_FLATTENED_BYTES: u64 = 2 << 30;
/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Lexically normalised relative path: no `.`, no empty components, `..`
/// resolved; `None` if it is absolute or climbs above the root.
pub fn normalize(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// One path of the flattened tree.
#[derive(Debug, Clone)]
enum Node {
    Dir(Meta),
    File(Meta, Arc<Vec<u8>>),
    Symlink(Meta, String),
    /// A hard link: shares the content of the file it was linked to. Written as
    /// a link if that content is still somewhere in the tree, else as a copy
    /// (a later layer replaced or deleted the original).
    Link(Meta, Arc<Vec<u8>>),
}

/// The flattened root filesystem, path by path.
#[derive(Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Sum of file sizes added so far (an upper bound of the final size).
    added_bytes: u64,
}

/// A path's directory and last component.
fn split_last(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Tree {
    /// Applies layer `number` (an uncompressed tar) in order. Parents resolve through
    /// symlinks as the tree stands, earlier entries of this layer included;
    /// whiteouts remove only what lower layers put there.
    pub fn apply(&mut self, r: &mut impl Read, number: usize, name: &str) -> Result<(), OciError> {
        let read_err = |e: io::Error| OciError::Read {
            what: format!("layer {number} ({name})"),
            source: e,
        };
        let mut archive = tar::Archive::new(r);
        // Paths this layer made (and their parents), which its whiteouts spare.
        let mut added: HashSet<String> = HashSet::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let unsafe_entry = |reason: &str| OciError::UnsafeEntry {
                layer: number,
                path: raw_path.clone(),
                reason: reason.to_string(),
            };
            let path_str = std::str::from_utf8(&entry.path_bytes())
                .map(str::to_string)
                .map_err(|_| unsafe_entry("has a name that is not UTF-8"))?;
            let path = normalize(&path_str).ok_or_else(|| unsafe_entry("escapes the root"))?;
            if path.is_empty() {
                // The root itself: its owner and mode come from the unpacker.
                continue;
            }
            let (dir, base) = split_last(&path);
            let dir = self.resolve_dir(dir).map_err(|r| unsafe_entry(&r))?;
            if base == ".wh..wh..opq" {
                self.remove_tree(&dir, false, &added);
                continue;
            }
            if let Some(hidden) = base.strip_prefix(".wh.") {
                // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts.
                if !hidden.starts_with(".wh.") {
                    self.remove_tree(&join(&dir, hidden), true, &added);
                }
                continue;
            }
            let full = join(&dir, base);
            let h = entry.header();
            let kind = h.entry_type();
            let mut meta = Meta {
                mode: h.mode().map_err(read_err)? & 0o7777,
                uid: h.uid().map_err(read_err)?,
                gid: h.gid().map_err(read_err)?,
                mtime: h.mtime().unwrap_or(0),
            };
            if let Ok(Some(pax)) = entry.pax_extensions() {
                for ext in pax.flatten() {
                    let value = ext.value().ok().and_then(|v| v.trim().parse::<u64>().ok());
                    match (ext.key(), value) {
                        (Ok("uid"), Some(v)) => meta.uid = v,
                        (Ok("gid"), Some(v)) => meta.gid = v,
                        _ => {}
                    }
                }
            }
            let node = if kind.is_dir() {
                Node::Dir(meta)
            } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
                self.added_bytes = self.added_bytes.saturating_add(entry.size());
                if self.added_bytes > MAX_FLATTENED_BYTES {
                    return Err(OciError::TooLarge {
                        limit_bytes: MAX_FLATTENED_BYTES,
                    });
                }
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(read_err)?;
                Node::File(meta, Arc::new(data))
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .and_then(|t| String::from_utf8(t.into_owned()).ok())
                    .ok_or_else(|| unsafe_entry("is a symlink without a UTF-8 target"))?;
                Node::Symlink(meta, target)
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .and_then(|t| String::from_utf8(t.into_owned()).ok())
                    .ok_or_else(|| unsafe_entry("is a hard link without a UTF-8 target"))?;
                let target = normalize(&target)
                    .ok_or_else(|| unsafe_entry("is a hard link to outside the root"))?;
                let (tdir, tbase) = split_last(&target);
                let tdir = self.resolve_dir(tdir).map_err(|r| unsafe_entry(&r))?;
                let target = join(&tdir, tbase);
                match self.nodes.get(&target) {
                    Some(Node::File(m, data) | Node::Link(m, data)) => {
                        Node::Link(*m, Arc::clone(data))
                    }
                    Some(Node::Symlink(m, t)) => Node::Symlink(*m, t.clone()),
                    Some(Node::Dir(_)) | None => {
                        return Err(unsafe_entry(&format!(
                            "is a hard link to {target:?}, which is not a file in the image"
                        )));
                    }
                }
            } else {
                // Device nodes and FIFOs: the runtime makes /dev. Anything else
                // (tar bookkeeping) carries no file.
                tracing::debug!(layer = number, path = %path, ?kind, "skipping entry");
                continue;
            };
            let mut parent = full.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                added.insert(p.to_string());
                parent = p;
            }
            added.insert(full.clone());
            self.insert(full, node);
        }
        Ok(())
    }

    /// Resolves a directory path through the tree's symlinks, inside the root
    /// (an absolute target starts at the image's root; `..` stops there).
    fn resolve_dir(&self, dir: &str) -> Result<String, String> {
        let mut pending: VecDeque<String> = dir.split('/').map(str::to_string).collect();
        let mut current: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = join(&current.join("/"), &c);
            match self.nodes.get(&candidate) {
                Some(Node::Symlink(_, target)) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!("passes through too many symlinks at {candidate}"));
                    }
                    if target.starts_with('/') {
                        current.clear();
                    }
                    for (i, t) in target.split('/').enumerate() {
                        pending.insert(i, t.to_string());
                    }
                }
                Some(Node::File(..) | Node::Link(..)) => {
                    return Err(format!("has {candidate}, a file, as a parent directory"));
                }
                Some(Node::Dir(_)) | None => current.push(c),
            }
        }
        Ok(current.join("/"))
    }

    /// Removes `path` (if `itself`) and everything below it, except what is in
    /// `spare`.
    fn remove_tree(&mut self, path: &str, itself: bool, spare: &HashSet<String>) {
        if itself && !spare.contains(path) {
            self.nodes.remove(path);
        }
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let below: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .filter(|k| !spare.contains(*k))
            .cloned()
            .collect();
        for k in below {
            self.nodes.remove(&k);
        }
    }

    fn insert(&mut self, path: String, node: Node) {
        match (self.nodes.get(&path), &node) {
            // A directory over a directory keeps what is below it.
            (Some(Node::Dir(_)), Node::Dir(_)) => {}
            (Some(Node::Dir(_)), _) => self.remove_tree(&path, false, &HashSet::new()),
            _ => {}
        }
        // Parents a layer leaves out are made as plain directories.
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            parent = join(&parent, p);
            self.nodes
                .entry(parent.clone())
                .or_insert(Node::Dir(Meta::root(0o755)));
        }
        self.nodes.insert(path, node);
    }

    /// Writes the tree as a gzip tar; returns the bytes of file content.
    pub fn write(&self, path: &Path) -> Result<u64, ImageError> {
        let mut w = TarGzWriter::create(path)?;
        let mut written: HashMap<*const Vec<u8>, &str> = HashMap::new();
        let mut size = 0u64;
        // Parents sort before their children; hard links come last, after
        // every file they might point at.
        for (name, node) in &self.nodes {
            match node {
                Node::Dir(m) => w.dir(name, m)?,
                Node::File(m, data) => {
                    w.file(name, m, data.len() as u64, data.as_slice())?;
                    written.insert(Arc::as_ptr(data), name);
                    size += data.len() as u64;
                }
                Node::Symlink(m, target) => w.symlink(name, m, target)?,
                Node::Link(..) => {}
            }
        }
        for (name, node) in &self.nodes {
            if let Node::Link(m, data) = node {
                match written.get(&Arc::as_ptr(data)) {
                    Some(target) => w.hard_link(name, m, target)?,
                    None => {
                        w.file(name, m, data.len() as u64, data.as_slice())?;
                        written.insert(Arc::as_ptr(data), name);
                        size += data.len() as u64;
                    }
                }
            }
        }
        w.finish()?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths_lexically() {
        assert_eq!(normalize("./a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("./").as_deref(), Some(""));
        assert_eq!(normalize("../a"), None);
        assert_eq!(normalize("/a"), None);
    }
}

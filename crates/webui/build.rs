//! Builds the web console from `ui/` (npm's lockfile, esbuild) into
//! `OUT_DIR`, gzips every file, and writes the table that embeds them.
//!
//! `SKYVISOR_UI_DIST=DIR` embeds an already built `DIR` instead (for
//! packagers that build the front end separately).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let ui = manifest.join("../../ui");
    let out = PathBuf::from(env("OUT_DIR"));
    println!("cargo:rerun-if-env-changed=SKYVISOR_UI_DIST");
    let dist = match std::env::var_os("SKYVISOR_UI_DIST") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            println!("cargo:rerun-if-changed={}", dir.display());
            dir
        }
        None => {
            for watched in ["src", "build.mjs", "package.json", "package-lock.json"] {
                println!("cargo:rerun-if-changed={}", ui.join(watched).display());
            }
            let dist = out.join("ui");
            build(&ui, &dist);
            dist
        }
    };
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    files.sort();
    if !files.iter().any(|f| f == "index.html") {
        fail(&format!("{} has no index.html", dist.display()));
    }
    let gz = out.join("gz");
    let mut table = String::from("&[\n");
    for f in &files {
        let body = std::fs::read(dist.join(f)).unwrap_or_else(|e| fail(&format!("{f}: {e}")));
        let packed = gz.join(format!("{f}.gz"));
        if let Some(parent) = packed.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| fail(&e.to_string()));
        }
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&body)
            .unwrap_or_else(|e| fail(&format!("gzip {f}: {e}")));
        let zipped = enc
            .finish()
            .unwrap_or_else(|e| fail(&format!("gzip {f}: {e}")));
        std::fs::write(&packed, zipped).unwrap_or_else(|e| fail(&e.to_string()));
        table.push_str(&format!(
            "    Asset {{ path: {f:?}, body: include_bytes!({body:?}), gzip: include_bytes!({gz:?}), etag: \"\\\"{etag:016x}\\\"\" }},\n",
            body = dist.join(f).display().to_string(),
            gz = packed.display().to_string(),
            etag = fnv1a(&body),
        ));
    }
    table.push(']');
    std::fs::write(out.join("assets.rs"), table).unwrap_or_else(|e| fail(&e.to_string()));
}

/// Installs the locked packages when the lockfile changed, then builds.
fn build(ui: &Path, dist: &Path) {
    let lock = std::fs::read(ui.join("package-lock.json"))
        .unwrap_or_else(|e| fail(&format!("reading ui/package-lock.json: {e}")));
    // npm keeps its own copy of the lockfile it installed from.
    let stamp = ui.join("node_modules/.skyvisor-installed-lock.json");
    if std::fs::read(&stamp).ok().as_deref() != Some(&lock[..]) {
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(ui),
            "npm ci (installs the web console's locked packages from the npm registry)",
        );
        std::fs::write(&stamp, &lock).unwrap_or_else(|e| fail(&e.to_string()));
    }
    let _ = std::fs::remove_dir_all(dist);
    run(
        Command::new("node")
            .arg("build.mjs")
            .arg("--outdir")
            .arg(dist)
            .current_dir(ui),
        "node build.mjs (bundles the web console)",
    );
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("{what} failed: {s}")),
        Err(e) => fail(&format!(
            "{what} could not start: {e}. The web console is built with Node.js and npm: run scripts/install-deps.sh (or apt-get install nodejs npm), or set SKYVISOR_UI_DIST to a built ui/dist"
        )),
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// A content hash for ETags (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(&format!("{name} is not set")))
}

fn fail(msg: &str) -> ! {
    eprintln!("skyvisor-webui: {msg}");
    std::process::exit(1)
}

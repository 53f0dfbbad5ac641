//! Finding the shared libraries a dynamically linked executable needs (through
//! `ldd`), so they can be copied into the initramfs at the same paths, dynamic
//! loader included (what initramfs-tools' `copy_exec` does).
//!
//! It must never return a library it could not locate: a `not found` line is an
//! error, since the guest service would then fail to start inside the VM.

use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::command;

/// Parses `ldd` output into the absolute paths of the libraries and the loader.
/// The vDSO (provided by the kernel) is skipped.
pub fn parse_ldd(binary: &Path, output: &str) -> Result<Vec<PathBuf>, ImageError> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") || line.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        let (name, rest) = match line.split_once("=>") {
            Some((n, r)) => (n.trim(), r.trim()),
            None => ("", line),
        };
        if rest.starts_with("not found") {
            return Err(ImageError::SharedLibraries {
                binary: binary.to_path_buf(),
                detail: format!("library {name} not found"),
            });
        }
        // "path (0xaddr)" or, for the vDSO, "linux-vdso.so.1 (0xaddr)".
        let path = rest.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso")
            && !path.starts_with("linux-gate")
            && !path.is_empty()
        {
            return Err(ImageError::SharedLibraries {
                binary: binary.to_path_buf(),
                detail: format!("unexpected ldd line {line:?}"),
            });
        }
    }
    libs.dedup();
    Ok(libs)
}

/// The shared libraries `binary` needs, by running `ldd` on it.
pub async fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    match command::run("ldd", &[binary], None).await {
        Ok(out) => parse_ldd(binary, &out.stdout),
        // ldd exits 1 for static binaries, saying so.
        Err(ImageError::CommandFailed { stderr, .. })
            if stderr.contains("not a dynamic executable")
                || stderr.contains("statically linked") =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_typical_rust_binary() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd1a9f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c2b5e0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c2b3ff000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c2b62c000)\n";
        let libs = parse_ldd(Path::new("/x"), out).expect("parse");
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn static_binaries_need_nothing_and_missing_libraries_fail() {
        assert!(
            parse_ldd(Path::new("/x"), "\tstatically linked\n")
                .expect("ok")
                .is_empty()
        );
        let err = parse_ldd(Path::new("/x"), "\tlibfoo.so.1 => not found\n").expect_err("missing");
        assert!(err.to_string().contains("libfoo.so.1"), "{err}");
    }

    #[tokio::test]
    async fn finds_the_loader_and_libc_of_a_host_binary() {
        let libs = shared_libraries(Path::new("/bin/ls"))
            .await
            .expect("ldd works");
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(
            libs.iter().all(|l| l.is_absolute() && l.exists()),
            "{libs:?}"
        );
    }
}

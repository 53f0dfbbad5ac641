//! Running the external tools the builder relies on (apt, dpkg-deb, ldd, mkfs.ext4,
//! qemu-img). Every failure names the exact command line that failed.
//! This module must never run a command through a shell (no quoting surprises).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::ImageError;

/// Output of a successful command.
pub(crate) struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error (e.g. version banners go there).
    pub stderr: String,
}

/// The command line as a person would type it.
pub(crate) fn display<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Which Debian package provides `program` (for error hints).
fn package_hint(program: &str) -> &'static str {
    match program {
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" => "dpkg",
        "ldd" => "libc-bin",
        "mkfs.ext4" | "dumpe2fs" => "e2fsprogs",
        "qemu-img" => "qemu-utils",
        "mmdebstrap" => "mmdebstrap",
        _ => "see the setup script",
    }
}

/// The last `max` characters of `s`, trimmed.
fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    let start = s
        .char_indices()
        .rev()
        .nth(max.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    s.get(start..).unwrap_or(s).to_string()
}

/// Runs `program args` in `cwd` (if given), failing unless it exits 0.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    cwd: Option<&Path>,
) -> Result<Output, ImageError> {
    let command = display(program, args);
    tracing::debug!(%command, "running");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .await
        .map_err(|source| ImageError::CommandSpawn {
            command: command.clone(),
            hint: format!("it is in the Debian package {}", package_hint(program)),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: tail(&stderr, 2000),
        });
    }
    Ok(Output { stdout, stderr })
}

/// Like [`run`], but calls `on_line` with each line of standard error as
/// it comes (long steps report progress that way).
pub(crate) async fn run_streaming<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    on_line: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), ImageError> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let command = display(program, args);
    tracing::debug!(%command, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ImageError::CommandSpawn {
            command: command.clone(),
            hint: format!("it is in the Debian package {}", package_hint(program)),
            source,
        })?;
    let mut stderr = String::new();
    if let Some(err) = child.stderr.take() {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            on_line(&line);
            stderr.push_str(&line);
            stderr.push('\n');
            // Only the tail is ever shown.
            if stderr.len() > 64 * 1024 {
                stderr = tail(&stderr, 4000);
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|source| ImageError::CommandSpawn {
            command: command.clone(),
            hint: "waiting for it failed".to_string(),
            source,
        })?;
    if !status.success() {
        return Err(ImageError::CommandFailed {
            command,
            status: status.to_string(),
            stderr: tail(&stderr, 2000),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_program_is_named_in_the_error() {
        let err = run("skyvisor-no-such-program", &["--x"], None)
            .await
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("`skyvisor-no-such-program --x`"), "{msg}");
        assert!(matches!(err, ImageError::CommandSpawn { .. }));
    }

    #[tokio::test]
    async fn failing_program_reports_status_and_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], None)
            .await
            .err()
            .expect("must fail");
        let ImageError::CommandFailed {
            command,
            status,
            stderr,
        } = err
        else {
            panic!("wrong error: {err:?}");
        };
        assert!(command.starts_with("sh -c"), "{command}");
        assert!(status.contains('3'), "{status}");
        assert_eq!(stderr, "boom");
    }

    #[tokio::test]
    async fn successful_program_returns_output() {
        let out = run("sh", &["-c", "echo hi; echo err >&2"], None)
            .await
            .expect("runs");
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("  abcdef  ", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
    }
}

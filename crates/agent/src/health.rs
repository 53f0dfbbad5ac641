//! Health checks of instance-group members, run by the agent of the host
//! a member runs on (it alone reaches a private network's instances,
//! through that network's router namespace).
//!
//! One task per running member checks it every interval: an HTTP `GET`
//! that must answer 2xx or 3xx, or a TCP connection that must be accepted.
//! `healthy_threshold` passes in a row make it healthy and
//! `unhealthy_threshold` failures in a row unhealthy; failures in the
//! grace period after a start do not count. Each change of judgement is
//! sent to the member's supervisor, which writes it in the status.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use chrono::Utc;
use skyvisor_core::group::{HealthCheck, HealthProtocol, HealthReport, HealthState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// A running health check: its latest judgement, and its task.
pub(crate) struct HealthChecker {
    /// The latest report; changes when the judgement does.
    pub(crate) reports: watch::Receiver<HealthReport>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthChecker {
    /// Starts checking the member at `ip` (inside network namespace
    /// `router` for a private network): anew after a boot, or going on
    /// from the judgement `from` (no grace period then).
    pub(crate) fn start(
        check: HealthCheck,
        ip: Ipv4Addr,
        router: Option<String>,
        from: Option<HealthReport>,
    ) -> Self {
        let mut check = check;
        if from.is_some() {
            check.grace_secs = 0;
        }
        let first = from.unwrap_or_else(|| HealthReport {
            state: HealthState::Unknown,
            since: Utc::now(),
            last_failure: None,
        });
        let (tx, reports) = watch::channel(first);
        let task = tokio::spawn(run(check, ip, router, tx));
        Self { reports, task }
    }
}

/// What the next judgement is after one more check result.
#[derive(Debug, Default)]
pub(crate) struct Streak {
    passes: u32,
    failures: u32,
}

impl Streak {
    /// Counts a check; returns the new judgement if it changes from
    /// `now`. Failures in the grace period are not counted.
    pub(crate) fn count(
        &mut self,
        check: &HealthCheck,
        passed: bool,
        in_grace: bool,
        now: HealthState,
    ) -> Option<HealthState> {
        if passed {
            self.passes += 1;
            self.failures = 0;
            (self.passes >= check.healthy_threshold && now != HealthState::Healthy)
                .then_some(HealthState::Healthy)
        } else {
            self.passes = 0;
            if in_grace {
                return None;
            }
            self.failures += 1;
            (self.failures >= check.unhealthy_threshold && now != HealthState::Unhealthy)
                .then_some(HealthState::Unhealthy)
        }
    }
}

async fn run(
    check: HealthCheck,
    ip: Ipv4Addr,
    router: Option<String>,
    tx: watch::Sender<HealthReport>,
) {
    let started = Instant::now();
    let grace = Duration::from_secs(u64::from(check.grace_secs));
    let interval = Duration::from_secs(u64::from(check.interval_secs));
    let mut streak = Streak::default();
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        next += interval;
        let result = probe(&check, ip, router.as_deref()).await;
        let now = tx.borrow().state;
        let in_grace = started.elapsed() < grace && now != HealthState::Healthy;
        let passed = result.is_ok();
        if let Some(state) = streak.count(&check, passed, in_grace, now) {
            tracing::info!(%ip, from = %now, to = %state, failure = ?result.as_ref().err(), "member health changed");
            let report = HealthReport {
                state,
                since: Utc::now(),
                last_failure: result.err(),
            };
            if tx.send(report).is_err() {
                return;
            }
        }
    }
}

/// One check: Ok, or why it failed.
async fn probe(check: &HealthCheck, ip: Ipv4Addr, router: Option<&str>) -> Result<(), String> {
    let addr = SocketAddr::from((ip, check.port));
    let timeout = Duration::from_secs(u64::from(check.effective_timeout_secs()));
    let attempt = async {
        let mut stream: TcpStream = match router {
            None => TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?,
            Some(ns) => skyvisor_net::connect_in_namespace(ns, addr, timeout)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?,
        };
        if check.protocol == HealthProtocol::Tcp {
            return Ok(());
        }
        let path = check.http_path();
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: skyvisor-health\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = [0u8; 12];
        let mut n = 0;
        while n < head.len() {
            let got = stream
                .read(&mut head[n..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        status_ok(&head[..n])
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer in {} s", check.effective_timeout_secs())),
    }
}

/// Whether an HTTP status line's start says 2xx or 3xx.
fn status_ok(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    match code.as_bytes().first() {
        Some(b'2') | Some(b'3') => Ok(()),
        _ => Err(format!("HTTP {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> HealthCheck {
        let mut c = HealthCheck::new(HealthProtocol::Http, 80, None);
        c.healthy_threshold = 2;
        c.unhealthy_threshold = 3;
        c
    }

    #[test]
    fn thresholds_and_grace_decide_the_judgement() {
        let c = check();
        let mut s = Streak::default();
        let mut state = HealthState::Unknown;
        let mut feed = |passed: bool, grace: bool, state: &mut HealthState| {
            if let Some(n) = s.count(&c, passed, grace, *state) {
                *state = n;
            }
            *state
        };
        // Failing while it boots counts for nothing.
        for _ in 0..10 {
            assert_eq!(feed(false, true, &mut state), HealthState::Unknown);
        }
        assert_eq!(feed(true, true, &mut state), HealthState::Unknown);
        assert_eq!(feed(true, true, &mut state), HealthState::Healthy);
        // Two failures are not enough; a pass resets the count.
        feed(false, false, &mut state);
        feed(false, false, &mut state);
        assert_eq!(feed(true, false, &mut state), HealthState::Healthy);
        feed(false, false, &mut state);
        feed(false, false, &mut state);
        assert_eq!(feed(false, false, &mut state), HealthState::Unhealthy);
        assert_eq!(feed(true, false, &mut state), HealthState::Unhealthy);
        assert_eq!(feed(true, false, &mut state), HealthState::Healthy);
    }

    #[test]
    fn status_lines_are_judged_by_their_code() {
        assert!(status_ok(b"HTTP/1.1 200 ").is_ok());
        assert!(status_ok(b"HTTP/1.0 302 ").is_ok());
        assert_eq!(status_ok(b"HTTP/1.1 503 ").expect_err("503"), "HTTP 503");
        assert!(status_ok(b"SSH-2.0-Open").is_err());
        assert!(status_ok(b"").is_err());
    }

    #[tokio::test]
    async fn a_real_server_passes_and_a_closed_port_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer: &[u8] = if req.starts_with("GET /health ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            }
        });
        let ip = Ipv4Addr::LOCALHOST;
        let good = HealthCheck::new(HealthProtocol::Http, port, Some("/health".into()));
        probe(&good, ip, None).await.expect("healthy");
        let missing = HealthCheck::new(HealthProtocol::Http, port, Some("/nope".into()));
        assert_eq!(
            probe(&missing, ip, None).await.expect_err("404"),
            "HTTP 404"
        );
        let tcp = HealthCheck::new(HealthProtocol::Tcp, port, None);
        probe(&tcp, ip, None).await.expect("tcp");
        // A port nobody listens on (bound, then closed).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = closed.local_addr().expect("addr").port();
        drop(closed);
        let e = probe(&HealthCheck::new(HealthProtocol::Tcp, dead, None), ip, None)
            .await
            .expect_err("closed");
        assert!(e.contains("connect"), "{e}");
    }
}

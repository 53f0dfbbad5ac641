//! Self-fencing: a host that may have been declared dead stops its
//! HA-protected VMs before anyone else may start them, so a VM never runs
//! twice, even in a network partition.
//!
//! The rule is decided on the host's own isolation, not on the store's
//! health alone, so that an etcd outage with every host alive fences
//! nothing. Voters are the registered hosts plus the store itself (a
//! witness, so that two-host clusters work):
//!
//! - The host keeps running its protected VMs while it renewed its lease
//!   within `ttl - margin`, or while it reaches a strict majority of the
//!   voters (itself plus the peers whose agents answered its probes sent
//!   within that same `ttl - margin`; the peers report hearing it for a
//!   whole TTL, so the leader never sees it unheard before it fenced). Otherwise it is *isolated*: it kills their QEMUs and starts
//!   none until it holds its lease again.
//! - The leader declares a host dead only once its lease is gone for a
//!   safety margin, no live host reports hearing it, and the hosts that
//!   report (plus the store) are at least half the voters
//!   (see `skyvisor_control::ha`).
//!
//! A probe that reaches a peer is, by construction, a probe that peer
//! heard and reports; so a host that is not isolated is always heard by a
//! reporting peer or is on the side without a quorum, and the two rules
//! never both let a VM run. Timings are conservative: the lease is counted
//! from when its renewal was *sent*.
//!
//! A hung agent (SIGSTOP) cannot fence, so the same rule is enforced by a
//! watchdog: a separate process the agent feeds a heartbeat file while the
//! rule says "not isolated". When the heartbeat is older than the fence
//! deadline, the watchdog kills every protected QEMU on the host.
//!
//! This module must never kill a VM that is not HA-protected (those cannot
//! run elsewhere, so killing them protects nothing), and never let a
//! protected VM start while the host is isolated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use skyvisor_core::{HearingReport, HostName, keys};
use skyvisor_store::{LeaseId, Op, Store, encode};
use tracing::{debug, error, info, warn};

/// The marker file in a VM's directory that says its QEMU is fenced with
/// the host (the VM is HA-protected).
pub const PROTECTED_MARKER: &str = "ha-protected";
/// The heartbeat file the watchdog reads (monotonic nanoseconds of the
/// last moment the host was known not to be isolated).
pub const HEARTBEAT_FILE: &str = "fence-heartbeat";
/// The watchdog's pidfile.
pub const WATCHDOG_PIDFILE: &str = "fence-watchdog.pid";

/// How often the agent decides, feeds the watchdog and probes its peers.
const TICK: Duration = Duration::from_millis(200);

/// The host's fencing state, shared by the agent's tasks.
pub struct Fence {
    ttl: Duration,
    /// When the last successful lease renewal was sent.
    renewed: Mutex<Option<Instant>>,
    /// Peers whose agents answered this host's probes, and when.
    reached: Mutex<HashMap<HostName, Instant>>,
    /// Peers whose probes reached this host, and when.
    heard: Mutex<HashMap<HostName, Instant>>,
    /// The other registered hosts' agent URLs.
    peers: Mutex<Vec<(HostName, String)>>,
    /// Isolated: protected VMs were killed and none may start.
    fenced: AtomicBool,
}

impl Fence {
    /// A fence for a lease of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            renewed: Mutex::new(Some(Instant::now())),
            reached: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            peers: Mutex::new(Vec::new()),
            fenced: AtomicBool::new(false),
        }
    }

    /// How long after the last renewal was sent the host fences: a quarter
    /// of the TTL before the lease can have expired.
    pub fn deadline(&self) -> Duration {
        self.ttl - self.ttl / 4
    }

    /// How long ago the last successful renewal was sent.
    pub fn renewal_age(&self) -> Option<Duration> {
        lock(&self.renewed).map(|at| at.elapsed())
    }

    /// Records a renewal that succeeded, sent at `sent`.
    pub fn renewed(&self, sent: Instant) {
        *lock(&self.renewed) = Some(sent);
    }

    /// Records that a probe from `peer` reached this host.
    pub fn heard_from(&self, peer: HostName) {
        lock(&self.heard).insert(peer, Instant::now());
    }

    /// Sets the other registered hosts (name, agent URL).
    pub fn set_peers(&self, peers: Vec<(HostName, String)>) {
        *lock(&self.peers) = peers;
    }

    /// Whether a protected VM may start here now: only while the lease is
    /// fresh (a quorum of peers keeps running VMs running, but starts
    /// nothing), and never while fenced. Decided on the spot, not by the
    /// periodic task: an agent waking from a hang must not start anything
    /// before it knows where it stands.
    pub fn may_start(&self) -> bool {
        !self.fenced.load(Ordering::SeqCst) && self.lease_fresh()
    }

    /// Whether the host fenced itself (and has not held its lease since).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// The peers heard within the TTL, sorted.
    pub fn heard_recently(&self) -> Vec<HostName> {
        let mut v: Vec<HostName> = lock(&self.heard)
            .iter()
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(h, _)| h.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether the lease was renewed recently enough.
    fn lease_fresh(&self) -> bool {
        lock(&self.renewed).is_some_and(|at| at.elapsed() < self.deadline())
    }

    /// Whether this host reaches a strict majority of the voters (the
    /// registered hosts and the store as a witness) without the store.
    fn has_quorum(&self) -> bool {
        let peers = lock(&self.peers).len();
        // Shorter than the TTL for which the peers report hearing this
        // host: the leader cannot see it unheard before it fenced.
        let reached = lock(&self.reached)
            .values()
            .filter(|at| at.elapsed() < self.deadline())
            .count();
        let voters = peers + 2;
        (1 + reached) * 2 > voters
    }

    /// The decision: not isolated while the lease is fresh or a quorum is
    /// reached. Updates the fenced flag: set when isolated; cleared only
    /// when the lease is fresh again (quorum alone keeps what is).
    fn decide(&self) -> bool {
        if self.lease_fresh() {
            if self.fenced.swap(false, Ordering::SeqCst) {
                info!("the host holds its lease again; protected VMs may run");
            }
            return true;
        }
        if self.has_quorum() {
            return true;
        }
        if !self.fenced.swap(true, Ordering::SeqCst) {
            error!(
                "the host is isolated: no lease renewal for {:?} and too few peers reached; fencing its HA-protected VMs",
                self.deadline()
            );
        }
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The monotonic clock, in nanoseconds (the same clock in every process of
/// the host, unaffected by wall-clock changes).
pub fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Kills the QEMU of every protected VM under `vms_dir`; returns the pids
/// it signalled.
pub fn kill_protected(vms_dir: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    let Ok(dirs) = std::fs::read_dir(vms_dir) else {
        return killed;
    };
    for d in dirs.flatten() {
        let dir = d.path();
        if !dir.join(PROTECTED_MARKER).is_file() {
            continue;
        }
        // A container: its init (killing it ends its pid namespace), if the
        // pid is still that container's.
        if let Ok(text) = std::fs::read_to_string(dir.join(crate::containers::PIDFILE))
            && let Ok(pid) = text.trim().parse::<i32>()
            && let Some(id) = dir.file_name().and_then(|n| n.to_str())
            && crate::containers::is_container_init(pid, id)
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed.push(pid);
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(skyvisor_qemu::files::PIDFILE)) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            continue;
        };
        // Only a QEMU of this VM: its command line names the VM directory.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let dir_text = dir.to_string_lossy();
        if !String::from_utf8_lossy(&cmdline).contains(dir_text.as_ref()) {
            continue;
        }
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

/// Marks (or unmarks) a VM directory as protected.
pub async fn mark_protected(vm_dir: &Path, protected: bool) -> std::io::Result<()> {
    let marker = vm_dir.join(PROTECTED_MARKER);
    if protected {
        tokio::fs::write(&marker, b"").await
    } else {
        match tokio::fs::remove_file(&marker).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The agent's side, forever: decides every tick, kills protected QEMUs
/// when isolated and feeds the watchdog's heartbeat while not; beside it,
/// probes the peers and writes the hearing report under the current lease
/// (a slow peer never delays a decision).
pub async fn run(
    fence: std::sync::Arc<Fence>,
    store: std::sync::Arc<dyn Store>,
    me: HostName,
    data_dir: PathBuf,
    lease: std::sync::Arc<std::sync::Mutex<LeaseId>>,
    http: reqwest::Client,
) {
    let probing = tokio::spawn(probe_and_report(fence.clone(), store, me, lease, http));
    // Ends the prober with this task (an aborted agent stops both).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _probing = AbortOnDrop(probing);
    let heartbeat = data_dir.join(HEARTBEAT_FILE);
    let tmp = data_dir.join(format!("{HEARTBEAT_FILE}.tmp"));
    let vms = data_dir.join("vms");
    loop {
        if fence.decide() {
            // Written aside and renamed: the watchdog never reads half.
            if tokio::fs::write(&tmp, monotonic_nanos().to_string())
                .await
                .is_ok()
            {
                let _ = tokio::fs::rename(&tmp, &heartbeat).await;
            }
        } else {
            let killed = kill_protected(&vms);
            if !killed.is_empty() {
                warn!(pids = ?killed, "fenced: killed the QEMUs of HA-protected VMs");
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Probes the peers every quarter of the TTL and writes the hearing report
/// when it changed, or every half TTL.
async fn probe_and_report(
    fence: std::sync::Arc<Fence>,
    store: std::sync::Arc<dyn Store>,
    me: HostName,
    lease: std::sync::Arc<std::sync::Mutex<LeaseId>>,
    // The agent's client to its peers: the cluster's key, its CA and
    // this member's certificate.
    http: reqwest::Client,
) {
    let mut last_report: Option<(Instant, Vec<HostName>)> = None;
    loop {
        probe_peers(&fence, &http, &me).await;
        let heard = fence.heard_recently();
        let due = last_report
            .as_ref()
            .is_none_or(|(at, h)| *h != heard || at.elapsed() >= fence.ttl / 2);
        if due {
            let report = HearingReport {
                host: me.clone(),
                at: Utc::now(),
                heard: heard.clone(),
            };
            let lease = *lock(&lease);
            let put = store
                .txn(
                    vec![],
                    vec![Op::Put {
                        key: keys::host_hearing(&me),
                        value: encode(&report),
                        lease: Some(lease),
                    }],
                )
                .await;
            match put {
                Ok(_) => last_report = Some((Instant::now(), heard)),
                Err(e) => debug!(error = %e, "cannot write the hearing report"),
            }
        }
        tokio::time::sleep(fence.ttl / 4).await;
    }
}

/// How long one probe of a peer may take (connecting included).
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Probes every peer's agent at once; records those that answered.
async fn probe_peers(fence: &Fence, http: &reqwest::Client, me: &HostName) {
    let peers = lock(&fence.peers).clone();
    let probes = peers.into_iter().map(|(name, url)| {
        let http = http.clone();
        let url = format!(
            "{}/agent/v1/peer-probe?from={me}",
            url.trim_end_matches('/')
        );
        async move {
            let ok = matches!(
                http.get(&url).timeout(PROBE_TIMEOUT).send().await,
                Ok(r) if r.status().is_success()
            );
            (name, ok)
        }
    });
    // Counted from when the probes were sent: the peer heard it no earlier.
    let sent = Instant::now();
    let results = futures::future::join_all(probes).await;
    let mut reached = lock(&fence.reached);
    for (name, ok) in results {
        if ok {
            reached.insert(name, sent);
        }
    }
}

/// Starts the watchdog process (`exe` with `args`) unless one runs for this
/// data directory already (it outlives the agent, so a restarted agent
/// feeds the same one).
pub fn ensure_watchdog(exe: &Path, args: &[String], data_dir: &Path) -> std::io::Result<()> {
    let pidfile = data_dir.join(WATCHDOG_PIDFILE);
    if let Ok(text) = std::fs::read_to_string(&pidfile)
        && let Ok(pid) = text.trim().parse::<i32>()
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("fence-watchdog") {
            debug!(pid, "the fence watchdog runs already");
            return Ok(());
        }
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // Its own session: a signal to the agent's group does not reach it.
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn()?;
    std::fs::write(&pidfile, child.id().to_string())?;
    info!(pid = child.id(), "started the fence watchdog");
    Ok(())
}

/// The watchdog's loop (its own process, `skyvisor fence-watchdog`): kills
/// the protected QEMUs under `data_dir/vms` whenever the heartbeat is older
/// than `deadline`. Ends when the heartbeat file is removed.
pub fn run_watchdog(data_dir: &Path, deadline: Duration) {
    let heartbeat = data_dir.join(HEARTBEAT_FILE);
    let vms = data_dir.join("vms");
    let deadline_nanos = deadline.as_nanos() as u64;
    let mut seen_once = false;
    loop {
        match std::fs::read_to_string(&heartbeat) {
            Ok(text) => {
                seen_once = true;
                let last: u64 = text.trim().parse().unwrap_or(0);
                let age = monotonic_nanos().saturating_sub(last);
                if age > deadline_nanos {
                    let killed = kill_protected(&vms);
                    if !killed.is_empty() {
                        eprintln!(
                            "fence-watchdog: no heartbeat for {} ms; killed the QEMUs of protected VMs: {killed:?}",
                            age / 1_000_000
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && seen_once => return,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence_with(peers: usize, reached: usize) -> Fence {
        let f = Fence::new(Duration::from_secs(4));
        *lock(&f.renewed) = None;
        let hosts: Vec<(HostName, String)> = (0..peers)
            .map(|i| (HostName::new(format!("p{i}")).expect("name"), String::new()))
            .collect();
        for (h, _) in hosts.iter().take(reached) {
            lock(&f.reached).insert(h.clone(), Instant::now());
        }
        f.set_peers(hosts);
        f
    }

    #[test]
    fn quorum_counts_the_store_as_a_witness() {
        // Three hosts (voters: 3 + store = 4): alone is isolated; with both
        // peers (an etcd outage) it is not; with one peer, 2 of 4 is no
        // strict majority.
        assert!(!fence_with(2, 0).has_quorum());
        assert!(fence_with(2, 2).has_quorum());
        assert!(!fence_with(2, 1).has_quorum());
        // Two hosts (voters 3): the peer alone makes a majority.
        assert!(fence_with(1, 1).has_quorum());
        assert!(!fence_with(1, 0).has_quorum());
    }

    #[test]
    fn isolation_fences_until_the_lease_is_fresh_again() {
        let f = fence_with(2, 0);
        assert!(!f.decide(), "isolated");
        assert!(f.is_fenced());
        // A quorum alone does not unfence: VMs may have moved meanwhile.
        for (h, _) in lock(&f.peers).clone() {
            lock(&f.reached).insert(h, Instant::now());
        }
        assert!(f.decide());
        assert!(f.is_fenced());
        f.renewed(Instant::now());
        assert!(f.decide());
        assert!(!f.is_fenced());
    }

    #[test]
    fn only_protected_vms_of_their_own_directory_are_killed() {
        let dir = tempfile::tempdir().expect("tmp");
        let vm = dir.path().join("vm1");
        std::fs::create_dir_all(&vm).expect("dir");
        // A pidfile naming a process that is not this VM's QEMU (this test
        // itself): never killed.
        std::fs::write(
            vm.join(skyvisor_qemu::files::PIDFILE),
            std::process::id().to_string(),
        )
        .expect("pidfile");
        std::fs::write(vm.join(PROTECTED_MARKER), b"").expect("marker");
        assert!(kill_protected(dir.path()).is_empty());
        // A real child whose command line names the directory: killed.
        // It blocks on its own stdin: no grandchild outlives it.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x; true"])
            .arg(&vm)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        std::fs::write(
            vm.join(skyvisor_qemu::files::PIDFILE),
            child.id().to_string(),
        )
        .expect("pidfile");
        // Until its exec is done, /proc shows the forking test's command
        // line (a QEMU writes its pidfile only after that).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default(),
        )
        .contains(vm.to_string_lossy().as_ref())
        {
            assert!(Instant::now() < deadline, "the child never exec'd");
            std::thread::sleep(Duration::from_millis(5));
        }
        let killed = kill_protected(dir.path());
        let status = child.wait().expect("wait");
        assert_eq!(killed, vec![child.id() as i32]);
        assert!(!status.success());
        // Without the marker: left alone.
        std::fs::remove_file(vm.join(PROTECTED_MARKER)).expect("rm");
        assert!(kill_protected(dir.path()).is_empty());
    }
}

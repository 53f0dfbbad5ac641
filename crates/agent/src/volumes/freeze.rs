//! Freezing a guest's file systems around a volume snapshot, through the
//! QEMU guest agent of the VM that uses the volume (when it runs here and
//! its image has one). Best effort: a guest that cannot be frozen gets a
//! crash-consistent snapshot, never a failed one; a guest that was frozen
//! is always thawed.

use std::path::Path;
use std::time::Duration;

use skyvisor_core::VolumeRef;
use skyvisor_qemu::GuestAgent;
use tracing::{info, warn};

/// How long reaching the guest agent may take (none answers quickly on
/// a VM without one: its socket is absent).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a freeze (the guest flushing its file systems) may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at thawing: a guest left frozen would hang its writes.
const THAW_ATTEMPTS: u32 = 5;

/// A guest whose file systems are frozen until [`FrozenGuest::thaw`].
pub(super) struct FrozenGuest {
    socket: std::path::PathBuf,
    volume: VolumeRef,
}

impl FrozenGuest {
    /// Freezes the file systems of the VM whose run directory is
    /// `vm_dir`; None (nothing frozen) if it has no guest agent here or
    /// the freeze failed.
    pub(super) async fn freeze(vm_dir: &Path, volume: &VolumeRef) -> Option<Self> {
        let socket = vm_dir.join(skyvisor_qemu::files::GUEST_AGENT_SOCKET);
        if !tokio::fs::try_exists(&socket).await.unwrap_or(false) {
            return None;
        }
        let frozen = FrozenGuest {
            socket,
            volume: volume.clone(),
        };
        let mut agent = match GuestAgent::connect(&frozen.socket, CONNECT_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => {
                info!(volume = %volume, error = %e, "no guest agent to freeze file systems; the snapshot is crash-consistent");
                return None;
            }
        };
        agent.set_timeout(FREEZE_TIMEOUT);
        match agent.freeze().await {
            Ok(n) => {
                info!(volume = %volume, file_systems = n, "guest file systems frozen for a snapshot");
                Some(frozen)
            }
            Err(e) => {
                warn!(volume = %volume, error = %e, "the guest's file systems could not be frozen; the snapshot is crash-consistent");
                // A freeze that timed out may have frozen some of them.
                frozen.thaw().await;
                None
            }
        }
    }

    /// Thaws the guest, retrying on a fresh connection.
    pub(super) async fn thaw(self) {
        for attempt in 1..=THAW_ATTEMPTS {
            let thawed = async {
                let mut agent = GuestAgent::connect(&self.socket, CONNECT_TIMEOUT).await?;
                agent.set_timeout(FREEZE_TIMEOUT);
                agent.thaw().await
            };
            match thawed.await {
                Ok(n) => {
                    info!(volume = %self.volume, file_systems = n, "guest file systems thawed");
                    return;
                }
                Err(e) => {
                    warn!(volume = %self.volume, attempt, error = %e, "cannot thaw the guest's file systems; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        warn!(volume = %self.volume, "the guest's file systems may still be frozen: thaw failed {THAW_ATTEMPTS} times");
    }
}

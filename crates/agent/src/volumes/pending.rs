//! A volume exported to a live migration's destination VM before this host
//! may be its primary.
//!
//! The destination QEMU must open its disks when it starts, long before
//! the handover; the source is still the volume's primary then. So the
//! destination's export starts out as a [`PendingDevice`]: QEMU connects
//! and learns the size, and any request it sends waits until the handover
//! is committed and the agent [activates](PendingDevice::activate) it with
//! the opened [`ReplicatedDevice`].
//!
//! One kind of request cannot wait: QEMU reads the first sector while it
//! starts (before its monitor even answers). Reads before the handover are
//! served straight from an in-sync replica at the current epoch: QEMU
//! keeps nothing it reads then (the guest is not running and the NBD node
//! has no cache), so a read racing with the source's last writes is
//! harmless. Writes wait; QEMU sends none before `cont` (the migration
//! uses late block activation).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use skyvisor_nbd::device::{BlockDevice, BlockSizeConstraints, DeviceError, Extent};
use skyvisor_volume::wire::{Request, Response};
use skyvisor_volume::{MembershipStore, NodeId, ReplicaStore, ReplicatedDevice, VolumeId};
use tokio::sync::watch;

/// Deadline of one read from a replica before the handover.
const EARLY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where reads before the handover go.
pub struct EarlyReads {
    /// The volume.
    pub volume: VolumeId,
    /// Its membership records.
    pub membership: Arc<dyn MembershipStore>,
    /// This host's replicas (read in process when one is in sync).
    pub local: Arc<ReplicaStore>,
    /// This host's node.
    pub node: NodeId,
}

impl EarlyReads {
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        let unavailable = |m: String| DeviceError::Unavailable(m);
        let record = self
            .membership
            .load(&self.volume)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(|| unavailable("the volume has no membership record".into()))?
            .value;
        // This host's replica first, then the others in sync.
        let mut members: Vec<_> = record.replicas.iter().filter(|r| r.in_sync).collect();
        members.sort_by_key(|r| r.node != self.node);
        let mut last = String::from("no in-sync replica");
        for m in members {
            let local = (m.node == self.node).then_some(&self.local);
            match skyvisor_volume::call_replica(
                &self.volume,
                &m.node,
                &m.addr,
                record.epoch,
                Request::Read {
                    offset,
                    len: len as u32,
                },
                local,
                EARLY_READ_TIMEOUT,
            )
            .await
            {
                Ok(Response::Data(d)) => return Ok(d),
                Ok(other) => last = format!("{}: unexpected answer {other:?}", m.node),
                Err(e) => last = format!("{}: {e}", m.node),
            }
        }
        Err(unavailable(format!(
            "cannot read before the handover: {last}"
        )))
    }
}

/// How long a request waits for the activation before it fails.
const ACTIVATION_WAIT: Duration = Duration::from_secs(120);

/// The state of a pending export.
#[derive(Clone)]
enum Phase {
    /// Waiting for the handover.
    Waiting,
    /// Serving through the volume's device.
    Active(Arc<ReplicatedDevice>),
    /// Given up (the migration was aborted): requests fail.
    Closed,
}

/// An export whose device arrives later; see the module docs.
pub struct PendingDevice {
    size: u64,
    phase: watch::Sender<Phase>,
    early: EarlyReads,
}

impl PendingDevice {
    /// A pending export of a volume of `size` bytes.
    pub fn new(size: u64, early: EarlyReads) -> Arc<Self> {
        Arc::new(Self {
            size,
            phase: watch::Sender::new(Phase::Waiting),
            early,
        })
    }

    /// Serves requests through `device` from now on (and those waiting).
    pub fn activate(&self, device: Arc<ReplicatedDevice>) {
        self.phase.send_replace(Phase::Active(device));
    }

    /// Fails every waiting and later request.
    pub fn close(&self) {
        self.phase.send_replace(Phase::Closed);
    }

    async fn device(&self) -> Result<Arc<ReplicatedDevice>, DeviceError> {
        let mut rx = self.phase.subscribe();
        let waited = tokio::time::timeout(
            ACTIVATION_WAIT,
            rx.wait_for(|p| !matches!(p, Phase::Waiting)),
        )
        .await;
        match waited {
            Ok(Ok(p)) => match &*p {
                Phase::Active(d) => Ok(d.clone()),
                _ => Err(DeviceError::Unavailable(
                    "the migration this export was prepared for was aborted".into(),
                )),
            },
            Ok(Err(_)) => Err(DeviceError::ShuttingDown),
            Err(_) => Err(DeviceError::Unavailable(format!(
                "the volume was not handed over to this host within {ACTIVATION_WAIT:?}"
            ))),
        }
    }
}

#[async_trait]
impl BlockDevice for PendingDevice {
    fn size(&self) -> u64 {
        self.size
    }

    // The same answers as `ReplicatedDevice` gives: QEMU learns them at
    // the handshake, before the device exists.
    fn block_size(&self) -> BlockSizeConstraints {
        BlockSizeConstraints::default()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        skyvisor_nbd::device::check_range(offset, len as u64, self.size)?;
        let active = match &*self.phase.borrow() {
            Phase::Active(d) => Some(d.clone()),
            _ => None,
        };
        match active {
            Some(d) => d.read(offset, len).await,
            None => self.early.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.device().await?.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.device().await?.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.device().await?.trim(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.device()
            .await?
            .write_zeroes(offset, len, may_trim, fua)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.device().await?.block_status(offset, len).await
    }
}

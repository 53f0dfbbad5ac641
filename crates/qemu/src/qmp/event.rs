//! QMP's asynchronous events and the stream that delivers them.
//!
//! Every event is delivered raw ([`QmpEvent`]: name, data, timestamp) and can
//! be read typed with [`QmpEvent::kind`]. The end of the stream means QEMU
//! closed the connection; it comes after every event QEMU sent before it.
//! This module never blocks the connection's reader: a slow subscriber
//! misses events (and is told how many) rather than stalling QMP.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::broadcast;

use super::types::{JobStatus, MigrationStatus, ShutdownCause};

/// One event as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event's name, e.g. `SHUTDOWN`.
    pub name: String,
    /// Its data (`{}` when it has none).
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: SystemTime,
}

/// `SHUTDOWN` and `RESET` data.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ShutdownInfo {
    /// The guest asked (rather than the host).
    pub guest: bool,
    /// Why.
    pub reason: ShutdownCause,
}

/// Data of the `BLOCK_JOB_*` events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobEvent {
    /// The job id.
    pub device: String,
    /// Work to do (bytes).
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// The error, for a failed completion.
    #[serde(default)]
    pub error: Option<String>,
}

/// An event, typed. Events whose data do not have the expected shape, and
/// events not listed here, are [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// The guest's CPUs stopped.
    Stop,
    /// The guest's CPUs run again.
    Resume,
    /// The guest or the host shut the VM down (QEMU exits after this
    /// unless `-action shutdown=pause`, where it pauses).
    Shutdown(ShutdownInfo),
    /// The VM was reset.
    Reset(ShutdownInfo),
    /// An ACPI power button press was sent to the guest.
    Powerdown,
    /// A migration changed state (needs the `events` capability).
    Migration {
        /// The new state.
        status: MigrationStatus,
    },
    /// A migration started another pass over dirty RAM.
    MigrationPass {
        /// The pass number.
        pass: u64,
    },
    /// A block job is ready to complete.
    BlockJobReady(BlockJobEvent),
    /// A block job completed (successfully unless `error` is set).
    BlockJobCompleted(BlockJobEvent),
    /// A block job was cancelled.
    BlockJobCancelled(BlockJobEvent),
    /// A job changed state.
    JobStatusChange {
        /// The job id.
        id: String,
        /// The new state.
        status: JobStatus,
    },
    /// The guest released an unplugged device.
    DeviceDeleted {
        /// Its id, if it had one.
        device: Option<String>,
        /// Its QOM path.
        path: String,
    },
    /// A block export was removed.
    BlockExportDeleted {
        /// Its id.
        id: String,
    },
    /// Anything else.
    Other,
}

impl QmpEvent {
    /// The event, typed.
    pub fn kind(&self) -> EventKind {
        fn data<T: for<'de> Deserialize<'de>>(v: &Value) -> Option<T> {
            T::deserialize(v).ok()
        }
        #[derive(Deserialize)]
        struct Status<S> {
            status: S,
        }
        #[derive(Deserialize)]
        struct Pass {
            pass: u64,
        }
        #[derive(Deserialize)]
        struct JobChange {
            id: String,
            status: JobStatus,
        }
        #[derive(Deserialize)]
        struct Deleted {
            device: Option<String>,
            path: String,
        }
        #[derive(Deserialize)]
        struct ExportDeleted {
            id: String,
        }
        let d = &self.data;
        let kind = match self.name.as_str() {
            "STOP" => Some(EventKind::Stop),
            "RESUME" => Some(EventKind::Resume),
            "POWERDOWN" => Some(EventKind::Powerdown),
            "SHUTDOWN" => data(d).map(EventKind::Shutdown),
            "RESET" => data(d).map(EventKind::Reset),
            "MIGRATION" => data::<Status<MigrationStatus>>(d)
                .map(|s| EventKind::Migration { status: s.status }),
            "MIGRATION_PASS" => data::<Pass>(d).map(|p| EventKind::MigrationPass { pass: p.pass }),
            "BLOCK_JOB_READY" => data(d).map(EventKind::BlockJobReady),
            "BLOCK_JOB_COMPLETED" => data(d).map(EventKind::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => data(d).map(EventKind::BlockJobCancelled),
            "JOB_STATUS_CHANGE" => data::<JobChange>(d).map(|j| EventKind::JobStatusChange {
                id: j.id,
                status: j.status,
            }),
            "DEVICE_DELETED" => data::<Deleted>(d).map(|x| EventKind::DeviceDeleted {
                device: x.device,
                path: x.path,
            }),
            "BLOCK_EXPORT_DELETED" => {
                data::<ExportDeleted>(d).map(|x| EventKind::BlockExportDeleted { id: x.id })
            }
            _ => None,
        };
        kind.unwrap_or(EventKind::Other)
    }

    /// Parses QMP's `{"event": .., "data": .., "timestamp": ..}` message.
    pub(crate) fn from_message(msg: &serde_json::Map<String, Value>) -> Option<Self> {
        let name = msg.get("event")?.as_str()?.to_owned();
        let data = msg
            .get("data")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let timestamp = msg
            .get("timestamp")
            .and_then(|t| {
                let secs = u64::try_from(t.get("seconds")?.as_i64()?).ok()?;
                let micros = u64::try_from(t.get("microseconds")?.as_i64()?).ok()?;
                UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
            })
            // QEMU sends -1 when it could not read the clock.
            .unwrap_or(UNIX_EPOCH);
        Some(Self {
            name,
            data,
            timestamp,
        })
    }
}

/// Why [`EventStream::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EventStreamError {
    /// The QMP connection is closed (QEMU exited); no more events will come.
    #[error("QMP connection closed")]
    Closed,
    /// This subscriber fell behind and missed events; the next `recv` gives
    /// the oldest it still has.
    #[error("missed {missed} QMP events")]
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// A subscription to a QMP connection's events, from the moment of
/// subscribing on.
#[derive(Debug)]
pub struct EventStream {
    pub(crate) rx: broadcast::Receiver<QmpEvent>,
}

impl EventStream {
    /// The next event; [`EventStreamError::Closed`] after the last one.
    pub async fn recv(&mut self) -> Result<QmpEvent, EventStreamError> {
        match self.rx.recv().await {
            Ok(e) => Ok(e),
            Err(broadcast::error::RecvError::Closed) => Err(EventStreamError::Closed),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Err(EventStreamError::Lagged { missed })
            }
        }
    }

    /// Waits for the first event for which `pred` holds, skipping others
    /// (and lag). Returns `None` when the connection closes first.
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&QmpEvent) -> bool) -> Option<QmpEvent> {
        loop {
            match self.recv().await {
                Ok(e) if pred(&e) => return Some(e),
                Ok(_) | Err(EventStreamError::Lagged { .. }) => {}
                Err(EventStreamError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ev(v: Value) -> QmpEvent {
        QmpEvent::from_message(v.as_object().expect("object")).expect("event")
    }

    #[test]
    fn events_are_typed() {
        let e = ev(
            json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"},
                          "timestamp": {"seconds": 1700000000, "microseconds": 250}}),
        );
        assert_eq!(
            e.kind(),
            EventKind::Shutdown(ShutdownInfo {
                guest: true,
                reason: ShutdownCause::GuestShutdown
            })
        );
        assert_eq!(
            e.timestamp,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(250)
        );

        let e = ev(json!({"event": "MIGRATION", "data": {"status": "completed"}}));
        assert_eq!(
            e.kind(),
            EventKind::Migration {
                status: MigrationStatus::Completed
            }
        );
        assert_eq!(e.timestamp, UNIX_EPOCH, "no timestamp: epoch");

        let e = ev(json!({"event": "STOP", "timestamp": {"seconds": -1, "microseconds": -1}}));
        assert_eq!(e.kind(), EventKind::Stop);
        assert_eq!(e.data, json!({}));

        let e = ev(json!({"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/d"}}));
        assert_eq!(
            e.kind(),
            EventKind::DeviceDeleted {
                device: None,
                path: "/machine/peripheral/d".into()
            }
        );
    }

    #[test]
    fn malformed_or_unknown_events_are_other() {
        assert_eq!(
            ev(json!({"event": "SHUTDOWN", "data": {"guest": "yes"}})).kind(),
            EventKind::Other
        );
        assert_eq!(
            ev(json!({"event": "NEW_THING", "data": {}})).kind(),
            EventKind::Other
        );
        assert!(
            QmpEvent::from_message(json!({"return": {}}).as_object().expect("object")).is_none()
        );
    }
}

//! Network egress metering: each VM's sent bytes, reported by the hour to
//! `billing/egress/<project>/<hour>` (see `skyvisor_core::usage`).
//!
//! The count is the VM's tap's receive counter (what the guest sent). Each
//! report adds the counter's growth since this host's mark for the VM
//! (`billing/egress-marks/<project>/<vm>/<host>`) to the hour's record
//! and moves the mark, in one compare-and-swap transaction: a report
//! retried after a lost answer, or made by a restarted agent, adds nothing
//! twice. A mark names the tap by the host's boot and its interface index,
//! so a new tap (after a reboot, or the VM back on this host) counts from
//! zero. Marks are per host, so a migration's source and destination
//! never undo each other's.
//!
//! Reports go out shortly before each hour ends, and once more just
//! before a tap is removed (a VM deleted or migrated away): what a VM sent
//! in its last minutes here is not lost. What a dead host's VMs sent since
//! its last report cannot be read and is not billed.

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use rand::Rng;
use skyvisor_core::usage::{EgressHour, EgressMark, hour_name};
use skyvisor_core::{HostName, InstanceId, InstanceRef, keys};
use skyvisor_store::{Compare, Op, Store, StoreError, StoreExt, decode, encode};
use tracing::{debug, warn};

/// Attempts of one report against concurrent writers of the same hour.
const ATTEMPTS: usize = 16;

/// How long before the end of each hour the reports go out (and the most
/// their start is spread by, so that hosts do not all write at once).
const BEFORE_HOUR_END: Duration = Duration::from_secs(45);

/// Serializes this host's reports with the removal of taps, so that no
/// report reads a counter whose mark is being removed.
#[derive(Debug, Default)]
pub struct Egress {
    lock: tokio::sync::Mutex<()>,
}

/// A tap's identity and sent bytes, read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TapReading {
    ifindex: u32,
    sent: u64,
}

fn read_tap(tap: &str) -> Option<TapReading> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(TapReading {
        ifindex: u32::try_from(read("ifindex")?).ok()?,
        // The tap receives what the guest sends.
        sent: read("statistics/rx_bytes")?,
    })
}

/// This boot of the host, so that a tap after a reboot is a new tap.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// How many of `reading`'s bytes `mark` has not counted yet.
fn unreported(mark: Option<&EgressMark>, id: InstanceId, boot: &str, r: TapReading) -> u64 {
    match mark {
        Some(m) if m.instance_id == id && m.boot == boot && m.ifindex == r.ifindex => {
            // A counter that went back is a new tap that got the old one's
            // index: all of it is new.
            r.sent.checked_sub(m.bytes).unwrap_or(r.sent)
        }
        _ => r.sent,
    }
}

impl Egress {
    /// Reports what instance `name` (id `id`) sent through tap `tap` on
    /// `host` since the last report; returns the bytes added.
    pub async fn report(
        &self,
        store: &dyn Store,
        host: &HostName,
        name: &InstanceRef,
        id: InstanceId,
        tap: &str,
    ) -> Result<u64, StoreError> {
        let _g = self.lock.lock().await;
        report_locked(store, host, name, id, tap, Utc::now()).await
    }

    /// Reports instance `name`'s last bytes through `tap`, then runs
    /// `remove` (which removes the tap) and forgets this host's mark: no
    /// report can run in between.
    pub async fn final_report<F: std::future::Future<Output = ()>>(
        &self,
        store: &dyn Store,
        host: &HostName,
        name: &InstanceRef,
        id: InstanceId,
        tap: &str,
        remove: F,
    ) {
        let _g = self.lock.lock().await;
        if let Err(e) = report_locked(store, host, name, id, tap, Utc::now()).await {
            warn!(instance = %name, error = %e, "could not report the VM's last network egress");
        }
        remove.await;
        if read_tap(tap).is_none()
            && let Err(e) = store.delete(&keys::egress_mark(name, host)).await
        {
            debug!(instance = %name, error = %e, "could not remove an egress mark");
        }
    }
}

async fn report_locked(
    store: &dyn Store,
    host: &HostName,
    name: &InstanceRef,
    id: InstanceId,
    tap: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let Some(reading) = read_tap(tap) else {
        return Ok(0);
    };
    let boot = boot_id();
    let mkey = keys::egress_mark(name, host);
    let hkey = keys::egress_hour(&name.project, &hour_name(now));
    for _ in 0..ATTEMPTS {
        let mark_kv = store.get(&mkey).await?;
        let mark: Option<EgressMark> = mark_kv.as_ref().map(decode).transpose()?;
        let delta = unreported(mark.as_ref(), id, &boot, reading);
        let new_mark = EgressMark {
            instance_id: id,
            host: host.clone(),
            boot: boot.clone(),
            ifindex: reading.ifindex,
            bytes: reading.sent,
        };
        if delta == 0 && mark.as_ref() == Some(&new_mark) {
            return Ok(0);
        }
        let hour_kv = store.get(&hkey).await?;
        let mut hour: EgressHour = hour_kv
            .as_ref()
            .map(decode)
            .transpose()?
            .unwrap_or_default();
        hour.bytes = hour.bytes.saturating_add(delta);
        let compare = |key: &str, kv: &Option<skyvisor_store::KeyValue>| match kv {
            Some(kv) => Compare::ModRevision(key.to_string(), kv.mod_revision),
            None => Compare::Absent(key.to_string()),
        };
        let mut ops = vec![Op::Put {
            key: mkey.clone(),
            value: encode(&new_mark),
            lease: None,
        }];
        if delta > 0 {
            ops.push(Op::Put {
                key: hkey.clone(),
                value: encode(&hour),
                lease: None,
            });
        }
        let out = store
            .txn(
                vec![compare(&mkey, &mark_kv), compare(&hkey, &hour_kv)],
                ops,
            )
            .await?;
        if out.succeeded {
            debug!(instance = %name, bytes = delta, "reported network egress");
            return Ok(delta);
        }
    }
    warn!(instance = %name, "the egress record kept changing; the next report counts these bytes");
    Ok(0)
}

/// How long until this hour's reports are due: [`BEFORE_HOUR_END`] before
/// the hour ends, less up to as much again at random.
fn until_next_report(now: DateTime<Utc>) -> Duration {
    let into_hour = u64::from(now.minute()) * 60 + u64::from(now.second());
    let due = 3600 - BEFORE_HOUR_END.as_secs();
    let jitter = rand::rng().random_range(0..BEFORE_HOUR_END.as_secs() / 2);
    let at = due.saturating_sub(jitter);
    if into_hour < at {
        Duration::from_secs(at - into_hour)
    } else {
        // Past this hour's slot: the next hour's.
        Duration::from_secs(3600 - into_hour + at)
    }
}

/// Reports every VM of this host near the end of each hour, until the
/// agent stops.
pub async fn run(ctx: std::sync::Arc<crate::AgentContext>) {
    loop {
        tokio::time::sleep(until_next_report(Utc::now())).await;
        for (id, name) in ctx.metrics.instances() {
            let tap = skyvisor_net::tap_name(&id);
            if let Err(e) = ctx
                .egress
                .report(ctx.store.as_ref(), &ctx.host, &name, id, &tap)
                .await
            {
                warn!(instance = %name, error = %e, "could not report network egress");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_growth_of_the_same_tap_is_new() {
        let id = InstanceId::random();
        let r = |ifindex, sent| TapReading { ifindex, sent };
        let mark = |ifindex, bytes, boot: &str| EgressMark {
            instance_id: id,
            host: HostName::new("h1").expect("host"),
            boot: boot.into(),
            ifindex,
            bytes,
        };
        assert_eq!(unreported(None, id, "b", r(7, 100)), 100);
        assert_eq!(unreported(Some(&mark(7, 60, "b")), id, "b", r(7, 100)), 40);
        // Another tap, another boot, another instance: all new.
        assert_eq!(unreported(Some(&mark(6, 60, "b")), id, "b", r(7, 100)), 100);
        assert_eq!(unreported(Some(&mark(7, 60, "a")), id, "b", r(7, 100)), 100);
        assert_eq!(
            unreported(
                Some(&mark(7, 60, "b")),
                InstanceId::random(),
                "b",
                r(7, 100)
            ),
            100
        );
        // A counter that went back: a new tap with the old index.
        assert_eq!(
            unreported(Some(&mark(7, 500, "b")), id, "b", r(7, 100)),
            100
        );
    }

    #[test]
    fn reports_fall_due_shortly_before_each_hour_ends() {
        use chrono::TimeZone;
        let at = |m, s| {
            Utc.with_ymd_and_hms(2026, 12, 7, 10, m, s)
                .single()
                .expect("time")
        };
        for _ in 0..50 {
            let wait = until_next_report(at(0, 0)).as_secs();
            assert!((3600 - 45 - 22..=3600 - 45).contains(&wait), "{wait}");
            // Inside the slot already: the next hour's.
            let late = until_next_report(at(59, 50)).as_secs();
            assert!(late > 3500, "{late}");
        }
    }
}

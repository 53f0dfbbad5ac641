//! Metering: a project's usage, computed from its recorded state
//! transitions (the event record, not samples), priced by a price sheet
//! into invoices. No other crate computes money; every amount is a
//! decimal, never a float.
//!
//! Usage is exact because the events are: each start and each end of a
//! guest's run is one event, written with the change it records (see
//! `skyvisor_core::event`). A run begins when an instance starts (or is
//! restarted by its agent) and ends when it stops, crashes, fails, is
//! failed over (from the moment its dead host fenced it) or is deleted; a
//! live migration does not interrupt it. An instance is "stopped" from its
//! creation or the end of a run until the next start or its deletion.
//!
//! Storage is metered the same way: a volume from its creation (at its
//! size and replica count, changed by a grow or a replica change) until
//! its deletion is asked, and its snapshots until they or it are deleted;
//! a VM checkpoint and an image from when they are ready (their size known)
//! until their deletion. Network egress is not a state: agents report each
//! instance's sent bytes by the hour ([`egress`]).

mod prices;

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use skyvisor_core::usage::{Invoice, InvoiceLine, Meter, UsageLine};
use skyvisor_core::{Event, EventKind, EventSize, ObjectKind, ProjectName};

pub use prices::{PriceError, PriceSheet};

/// The type name usage shows for instances of a custom size.
pub const CUSTOM: &str = "custom";

/// What an instance was doing since `since`.
#[derive(Debug, Clone)]
enum State {
    Running {
        since: DateTime<Utc>,
        size: Option<EventSize>,
    },
    Stopped {
        since: DateTime<Utc>,
        size: Option<EventSize>,
    },
}

/// What a line is keyed by: its meter, the instance type (instance
/// meters), the replica count (volume storage).
type LineKey = (Meter, Option<String>, Option<u32>);

/// Milliseconds per meter and type (times vCPUs, MiB or bytes where the
/// meter is per unit), as they add up.
#[derive(Default)]
struct Tally(BTreeMap<LineKey, i128>);

/// What a stored object takes up since `since`.
#[derive(Debug, Clone, Copy)]
struct Stored {
    since: DateTime<Utc>,
    bytes: u64,
    copies: u32,
}

/// The key of a stored object in the tally of [`usage`].
type StoredKey<'a> = (ObjectKind, &'a str);

impl Tally {
    /// Adds the part of `[start, end)` inside `[from, to)`.
    fn add(
        &mut self,
        running: bool,
        size: &Option<EventSize>,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        (from, to): (DateTime<Utc>, DateTime<Utc>),
    ) {
        let (a, b) = (start.max(from), end.min(to));
        if b <= a {
            return;
        }
        let ms = i128::from((b - a).num_milliseconds());
        let type_name = Some(
            size.as_ref()
                .and_then(|s| s.instance_type.clone())
                .unwrap_or_else(|| CUSTOM.to_string()),
        );
        if !running {
            *self
                .0
                .entry((Meter::InstanceStopped, type_name, None))
                .or_default() += ms;
            return;
        }
        match size {
            Some(EventSize {
                instance_type: None,
                resources,
            }) => {
                *self
                    .0
                    .entry((Meter::CustomVcpu, type_name.clone(), None))
                    .or_default() += ms * i128::from(resources.vcpus);
                // GiB-milliseconds scaled by 1024 (memory is in MiB).
                *self
                    .0
                    .entry((Meter::CustomMemory, type_name, None))
                    .or_default() += ms * i128::from(resources.memory_mib);
            }
            _ => {
                *self
                    .0
                    .entry((Meter::InstanceRunning, type_name, None))
                    .or_default() += ms;
            }
        }
    }

    /// Adds the part of stored object `what`'s `[stored.since, end)`
    /// inside `[from, to)`, in byte-milliseconds.
    fn add_stored(
        &mut self,
        what: ObjectKind,
        stored: Stored,
        end: DateTime<Utc>,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
    ) {
        let (a, b) = (stored.since.max(from), end.min(to));
        if b <= a {
            return;
        }
        let ms = i128::from((b - a).num_milliseconds());
        let bytes = i128::from(stored.bytes);
        let (key, per_ms) = match what {
            // Volumes are priced per replica: one line per replica count.
            ObjectKind::Volume => ((Meter::VolumeStorage, None, Some(stored.copies)), bytes),
            ObjectKind::VolumeSnapshot | ObjectKind::Snapshot => (
                (Meter::SnapshotStorage, None, None),
                bytes * i128::from(stored.copies),
            ),
            ObjectKind::Image => (
                (Meter::ImageStorage, None, None),
                bytes * i128::from(stored.copies),
            ),
            _ => return,
        };
        *self.0.entry(key).or_default() += ms * per_ms;
    }

    fn lines(self) -> Vec<UsageLine> {
        self.0
            .into_iter()
            .map(|((meter, instance_type, replicas), ms)| {
                let quantity = match meter {
                    // MiB-milliseconds to GiB-seconds.
                    Meter::CustomMemory => {
                        Decimal::from_i128_with_scale(ms, 3) / Decimal::from(1024)
                    }
                    // Byte-milliseconds to GiB-seconds, to the nano-GiB-second.
                    Meter::VolumeStorage | Meter::SnapshotStorage | Meter::ImageStorage => {
                        (Decimal::from_i128_with_scale(ms, 3) / Decimal::from(GIB)).round_dp(9)
                    }
                    _ => Decimal::from_i128_with_scale(ms, 3),
                };
                UsageLine {
                    meter,
                    instance_type,
                    replicas,
                    quantity: quantity.normalize(),
                    unit: meter.unit().to_string(),
                }
            })
            .collect()
    }
}

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;

/// The usage recorded by `events` (one project's, in their order) within
/// `[from, to)`; a run still going (an object still stored) at `to` counts
/// up to `to`. Events of other kinds and objects are ignored.
pub fn usage(events: &[Event], from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<UsageLine> {
    let mut ledger = Ledger::new((from, to));
    for (i, e) in events.iter().enumerate() {
        ledger.apply(i, e);
    }
    ledger.finish(to)
}

/// The positions in `events` of those that usage after the last of them
/// is still metered from: for each instance and stored object that still
/// exists, the event that set what it is metered at now (an instance's
/// start or stop, a stored object's size). A record pruned of everything
/// else meters the same from then on.
pub fn current_states<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<usize> {
    // An empty window: only the states matter, not what they add up to.
    let never = DateTime::<Utc>::MIN_UTC;
    let mut ledger = Ledger::new((never, never));
    for (i, e) in events.into_iter().enumerate() {
        ledger.apply(i, e);
    }
    ledger
        .states
        .values()
        .map(|(_, i)| *i)
        .chain(ledger.stored.values().map(|(_, i)| *i))
        .collect()
}

/// Every metered object's state as the events so far left it, each with
/// the index of the event that set it; what ended states add up to within
/// the window is in the tally.
struct Ledger<'a> {
    window: (DateTime<Utc>, DateTime<Utc>),
    tally: Tally,
    states: BTreeMap<&'a str, (State, usize)>,
    stored: BTreeMap<StoredKey<'a>, (Stored, usize)>,
}

impl<'a> Ledger<'a> {
    fn new(window: (DateTime<Utc>, DateTime<Utc>)) -> Self {
        Self {
            window,
            tally: Tally::default(),
            states: BTreeMap::new(),
            stored: BTreeMap::new(),
        }
    }

    /// Follows event `i`, `e`.
    fn apply(&mut self, i: usize, e: &'a Event) {
        if e.object == ObjectKind::Instance {
            self.apply_instance(i, e);
        } else {
            self.apply_stored(i, e);
        }
    }

    /// Counts `state` of an instance up to `end`.
    fn close(&mut self, state: &State, end: DateTime<Utc>) {
        match state {
            State::Running { since, size } => {
                self.tally.add(true, size, (*since, end), self.window)
            }
            State::Stopped { since, size } => {
                self.tally.add(false, size, (*since, end), self.window)
            }
        }
    }

    fn apply_instance(&mut self, i: usize, e: &'a Event) {
        let name = e.name.as_str();
        let next = match e.kind {
            EventKind::Created => State::Stopped {
                since: e.at,
                size: e.size.clone(),
            },
            // A second start without an end between (an event lost before
            // this record existed) never bills twice: the first ends here.
            EventKind::Started | EventKind::Restarted => State::Running {
                since: e.at,
                size: e.size.clone(),
            },
            EventKind::Stopped | EventKind::Crashed | EventKind::Failed | EventKind::FailedOver => {
                State::Stopped {
                    since: e.at,
                    size: e
                        .size
                        .clone()
                        .or_else(|| self.states.get(name).and_then(|(s, _)| size_of(s).clone())),
                }
            }
            // A stopped instance's new size applies from now; a running
            // one's from its next start (its agent restarts it).
            EventKind::Resized => match self.states.get(name) {
                Some((State::Stopped { .. }, _)) => State::Stopped {
                    since: e.at,
                    size: e.size.clone(),
                },
                _ => return,
            },
            EventKind::Deleted => {
                if let Some((old, _)) = self.states.remove(name) {
                    self.close(&old, e.at);
                }
                return;
            }
            _ => return,
        };
        if let Some((old, _)) = self.states.insert(name, (next, i)) {
            self.close(&old, e.at);
        }
    }

    /// Follows one event of a stored object: one that records its size
    /// starts (or, resized, restarts) its storage; a deletion ends it, and
    /// a volume's deletion ends its snapshots' too.
    fn apply_stored(&mut self, i: usize, e: &'a Event) {
        if !matches!(
            e.object,
            ObjectKind::Volume
                | ObjectKind::VolumeSnapshot
                | ObjectKind::Snapshot
                | ObjectKind::Image
        ) {
            return;
        }
        let key = (e.object, e.name.as_str());
        if let Some(s) = e.stored
            && e.kind != EventKind::Deleted
        {
            let now = Stored {
                since: e.at,
                bytes: s.bytes,
                copies: s.copies,
            };
            if let Some((old, _)) = self.stored.insert(key, (now, i)) {
                self.tally.add_stored(e.object, old, e.at, self.window);
            }
            return;
        }
        if e.kind != EventKind::Deleted {
            return;
        }
        let mut ended = vec![key];
        if e.object == ObjectKind::Volume {
            let prefix = format!("{}/", e.name);
            ended.extend(
                self.stored
                    .keys()
                    .filter(|(k, n)| *k == ObjectKind::VolumeSnapshot && n.starts_with(&prefix))
                    .copied(),
            );
        }
        for k in ended {
            if let Some((old, _)) = self.stored.remove(&k) {
                self.tally.add_stored(k.0, old, e.at, self.window);
            }
        }
    }

    /// What the events added up to, with every state still open counted
    /// up to `to`.
    fn finish(mut self, to: DateTime<Utc>) -> Vec<UsageLine> {
        let states = std::mem::take(&mut self.states);
        for (state, _) in states.values() {
            self.close(state, to);
        }
        for ((what, _), (s, _)) in std::mem::take(&mut self.stored) {
            self.tally.add_stored(what, s, to, self.window);
        }
        self.tally.lines()
    }
}

/// The network egress of the hours (start of each, bytes sent in it) that
/// begin within `[from, to)`: egress is reported, and counted, by the hour.
pub fn egress(
    hours: &[(DateTime<Utc>, u64)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<UsageLine> {
    let bytes: u128 = hours
        .iter()
        .filter(|(h, _)| *h >= from && *h < to)
        .map(|(_, b)| u128::from(*b))
        .sum();
    if bytes == 0 {
        return Vec::new();
    }
    vec![UsageLine {
        meter: Meter::NetworkEgress,
        instance_type: None,
        replicas: None,
        quantity: Decimal::from(bytes),
        unit: Meter::NetworkEgress.unit().to_string(),
    }]
}

fn size_of(s: &State) -> &Option<EventSize> {
    match s {
        State::Running { size, .. } | State::Stopped { size, .. } => size,
    }
}

/// The first instant of month `month` (`YYYY-MM`) and of the next.
pub fn month_bounds(month: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (y, m) = month.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    let start = NaiveDate::from_ymd_opt(y, m, 1)?;
    let next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1)?
    };
    Some((
        Utc.from_utc_datetime(&start.and_hms_opt(0, 0, 0)?),
        Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0)?),
    ))
}

/// The month (`YYYY-MM`) `at` falls in.
pub fn month_of(at: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", at.year(), at.month())
}

/// The invoice of `project` for `month` from its usage in that month.
/// Each line is rounded to the cent (half away from zero); the total is the
/// sum of the lines, so the lines always add up to it.
pub fn invoice(
    project: &ProjectName,
    month: &str,
    usage: &[UsageLine],
    sheet: &PriceSheet,
    closed: bool,
    now: DateTime<Utc>,
) -> Invoice {
    let seconds_per_hour = Decimal::from(3600);
    let lines: Vec<InvoiceLine> = usage
        .iter()
        .map(|u| {
            let ty = u.instance_type.as_deref().unwrap_or(CUSTOM);
            let (unit, description) = match u.meter {
                Meter::InstanceRunning => ("hours", format!("{ty} instance running")),
                Meter::InstanceStopped => ("hours", format!("{ty} instance stopped")),
                Meter::CustomVcpu => ("vCPU-hours", "custom-size vCPUs".to_string()),
                Meter::CustomMemory => ("GiB-hours", "custom-size memory".to_string()),
                Meter::VolumeStorage => (
                    "GiB-hours",
                    format!("volumes with {} replicas", u.replicas.unwrap_or(1)),
                ),
                Meter::SnapshotStorage => ("GiB-hours", "snapshots".to_string()),
                Meter::ImageStorage => ("GiB-hours", "images".to_string()),
                Meter::NetworkEgress => ("GiB", "network egress".to_string()),
            };
            let unit_price = sheet.price(u.meter, ty, u.replicas.unwrap_or(1));
            // Egress is counted in bytes and billed per GiB; the rest is
            // counted in seconds and billed per hour.
            let per_unit = if u.meter == Meter::NetworkEgress {
                Decimal::from(GIB)
            } else {
                seconds_per_hour
            };
            let billed = u.quantity / per_unit;
            let amount = (u.quantity * unit_price / per_unit)
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
            InvoiceLine {
                description,
                meter: u.meter,
                instance_type: u.instance_type.clone(),
                replicas: u.replicas,
                quantity: billed.round_dp(6).normalize(),
                unit: unit.to_string(),
                unit_price,
                amount,
            }
        })
        .collect();
    let total = lines.iter().map(|l| l.amount).sum();
    Invoice {
        project: project.clone(),
        month: month.to_string(),
        currency: sheet.currency.clone(),
        lines,
        total,
        closed,
        computed_at: now,
    }
}

#[cfg(test)]
mod tests;

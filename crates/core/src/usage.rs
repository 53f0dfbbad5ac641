//! Usage and invoices as the API shows them (computed by the metering
//! crate). Money and quantities are decimals, written as strings in JSON
//! so that no client reads them as floats.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::ProjectName;

/// What a usage line counts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Meter {
    /// Seconds an instance of a type ran.
    InstanceRunning,
    /// Seconds an instance of a type existed stopped (its disk kept).
    InstanceStopped,
    /// vCPU-seconds of running instances of a custom size.
    CustomVcpu,
    /// GiB-seconds of memory of running instances of a custom size.
    CustomMemory,
    /// GiB-seconds of volumes, by replica count (their provisioned size,
    /// from creation until deletion is asked).
    VolumeStorage,
    /// GiB-seconds of snapshots: VM checkpoints' files and volume
    /// snapshots' copies (one per replica holding one).
    SnapshotStorage,
    /// GiB-seconds of the project's own images (built or uploaded).
    ImageStorage,
    /// Bytes the project's instances sent on their network interfaces.
    NetworkEgress,
}

impl Meter {
    /// The unit its quantity is in.
    pub fn unit(self) -> &'static str {
        match self {
            Meter::InstanceRunning | Meter::InstanceStopped => "instance-seconds",
            Meter::CustomVcpu => "vcpu-seconds",
            Meter::CustomMemory
            | Meter::VolumeStorage
            | Meter::SnapshotStorage
            | Meter::ImageStorage => "gib-seconds",
            Meter::NetworkEgress => "bytes",
        }
    }
}

/// One metered quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageLine {
    /// What it counts.
    pub meter: Meter,
    /// The instance type (`custom` for a custom size), for instance meters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The replica count, for volume storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How much, in `unit` (instance time to the millisecond).
    #[schema(value_type = String, example = "3600.000")]
    pub quantity: Decimal,
    /// The unit.
    pub unit: String,
}

/// A project's usage over a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    /// Whose.
    pub project: ProjectName,
    /// From (inclusive).
    pub from: DateTime<Utc>,
    /// To (exclusive; at most now).
    pub to: DateTime<Utc>,
    /// What was used, by meter and type.
    pub lines: Vec<UsageLine>,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvoiceLine {
    /// What is billed.
    pub description: String,
    /// The meter.
    pub meter: Meter,
    /// The instance type (`custom` for a custom size), for instance meters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The replica count, for volume storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How much, in `unit`.
    #[schema(value_type = String, example = "720")]
    pub quantity: Decimal,
    /// The billing unit (hours, vCPU-hours, GiB-hours, GiB).
    pub unit: String,
    /// The price of one unit.
    #[schema(value_type = String, example = "0.0100")]
    pub unit_price: Decimal,
    /// quantity × unit price, rounded to the cent.
    #[schema(value_type = String, example = "7.20")]
    pub amount: Decimal,
}

/// A project's invoice for one month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Invoice {
    /// Whose.
    pub project: ProjectName,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// The price sheet's currency.
    pub currency: String,
    /// The lines.
    pub lines: Vec<InvoiceLine>,
    /// The sum of the lines.
    #[schema(value_type = String, example = "7.20")]
    pub total: Decimal,
    /// Whether the month is over and the invoice final: a closed invoice
    /// is stored when first made and never changes.
    pub closed: bool,
    /// When it was computed.
    pub computed_at: DateTime<Utc>,
}

/// The price sheet, as TOML text (see the metering docs for its shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PriceSheetText {
    /// The sheet: `currency`, `[running]` and `[stopped]` prices per hour by
    /// instance type, `[custom]` `vcpu_hour` and `memory_gib_hour`,
    /// `[storage]` `volume_replica_gib_hour`, `snapshot_gib_hour` and
    /// `image_gib_hour`, `[network]` `egress_gib`; every price a string
    /// like "0.0100".
    pub toml: String,
}

/// The bytes a project's instances sent in one hour, as their agents
/// reported them (`billing/egress/<project>/<hour>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressHour {
    /// Bytes sent.
    pub bytes: u64,
}

/// The name of the hour `at` falls in, as egress records are keyed
/// (`YYYY-MM-DDTHH`, UTC).
pub fn hour_name(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H").to_string()
}

/// The start of an hour named by [`hour_name`].
pub fn parse_hour_name(hour: &str) -> Option<DateTime<Utc>> {
    let t = chrono::NaiveDateTime::parse_from_str(&format!("{hour}:00:00"), "%Y-%m-%dT%H:%M:%S")
        .ok()?;
    Some(t.and_utc())
}

/// How much of an instance's network counter one host's agent has
/// reported (`billing/egress-marks/<project>/<instance>/<host>`): each report adds the
/// counter's growth since the mark, in the same transaction that moves
/// the mark, so no byte is counted twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressMark {
    /// The instance (a re-created one of the same name starts again).
    pub instance_id: crate::InstanceId,
    /// The host whose counter it is.
    pub host: crate::HostName,
    /// That host's boot (`/proc/sys/kernel/random/boot_id`): interface
    /// indexes start again after a reboot.
    pub boot: String,
    /// The interface's index on that host: a new tap starts from zero.
    pub ifindex: u32,
    /// The counter's value already reported.
    pub bytes: u64,
}

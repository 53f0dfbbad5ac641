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
}

impl Meter {
    /// The unit its quantity is in.
    pub fn unit(self) -> &'static str {
        match self {
            Meter::InstanceRunning | Meter::InstanceStopped => "instance-seconds",
            Meter::CustomVcpu => "vcpu-seconds",
            Meter::CustomMemory => "gib-seconds",
        }
    }
}

/// One metered quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageLine {
    /// What it counts.
    pub meter: Meter,
    /// The instance type (`custom` for a custom size).
    pub instance_type: String,
    /// How much, in `unit` (to the millisecond).
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
    /// The instance type (`custom` for a custom size).
    pub instance_type: String,
    /// How much, in `unit`.
    #[schema(value_type = String, example = "720")]
    pub quantity: Decimal,
    /// The billing unit (hours, vCPU-hours, GiB-hours).
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
    /// instance type, `[custom]` `vcpu_hour` and `memory_gib_hour`; every
    /// price a string like "0.0100".
    pub toml: String,
}

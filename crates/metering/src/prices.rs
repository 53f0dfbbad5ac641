//! The price sheet: prices per hour by meter and instance type, read from
//! TOML (decimals as strings, so that no price passes through a float).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use skyvisor_core::resources::builtin_types;
use skyvisor_core::usage::Meter;

use crate::CUSTOM;

/// Why a price sheet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    /// Not TOML of the sheet's shape.
    #[error("the price sheet is not valid: {0}")]
    Syntax(String),
    /// A price is negative.
    #[error("the price sheet's {what} is negative ({price}); allowed: 0 or more")]
    Negative {
        /// Which price.
        what: String,
        /// Its value.
        price: Decimal,
    },
    /// A type has no price.
    #[error(
        "the price sheet has no [{table}] price for instance type {instance_type}; every type needs one"
    )]
    Missing {
        /// The table (`running`, `stopped`).
        table: &'static str,
        /// The type.
        instance_type: String,
    },
    /// A type the cloud does not have.
    #[error(
        "the price sheet's [{table}] names instance type {instance_type}, which does not exist; known: {known}"
    )]
    Unknown {
        /// The table.
        table: &'static str,
        /// The type.
        instance_type: String,
        /// The known types.
        known: String,
    },
    /// The currency is not a three-letter code.
    #[error("the price sheet's currency {0:?} is not a three-letter code (USD, EUR...)")]
    Currency(String),
}

/// A sheet as written: every price a string.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSheet {
    currency: String,
    running: BTreeMap<String, String>,
    stopped: BTreeMap<String, String>,
    custom: RawCustom,
    storage: RawStorage,
    network: RawNetwork,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    volume_replica_gib_hour: String,
    snapshot_gib_hour: String,
    image_gib_hour: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    egress_gib: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    vcpu_hour: String,
    memory_gib_hour: String,
}

/// Prices of running custom-size instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomPrices {
    /// Per vCPU and hour.
    pub vcpu_hour: Decimal,
    /// Per GiB of memory and hour.
    pub memory_gib_hour: Decimal,
}

/// Prices of storage, per GiB and hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoragePrices {
    /// A volume's GiB on one replica (a volume with 2 replicas costs twice).
    pub volume_replica_gib_hour: Decimal,
    /// Snapshots (a volume snapshot's every copy counts).
    pub snapshot_gib_hour: Decimal,
    /// A project's own images.
    pub image_gib_hour: Decimal,
}

/// Prices of network use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPrices {
    /// Per GiB the project's instances send.
    pub egress_gib: Decimal,
}

/// Prices per hour (and per GiB sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceSheet {
    /// The currency, a three-letter code.
    pub currency: String,
    /// A running instance, by type.
    pub running: BTreeMap<String, Decimal>,
    /// A stopped instance, by type (`custom` for custom sizes).
    pub stopped: BTreeMap<String, Decimal>,
    /// Running instances of a custom size.
    pub custom: CustomPrices,
    /// Storage.
    pub storage: StoragePrices,
    /// Network.
    pub network: NetworkPrices,
}

impl PriceSheet {
    /// The sheet a cluster starts with.
    pub fn default_sheet() -> Self {
        // Checked by a test; a broken built-in sheet is a build bug.
        Self::parse(include_str!("default_prices.toml"))
            .unwrap_or_else(|e| panic!("the built-in price sheet: {e}"))
    }

    /// Reads and checks a sheet: every type has a running and a stopped
    /// price, no price is negative, no unknown type is named.
    pub fn parse(text: &str) -> Result<Self, PriceError> {
        // Prices are strings in the file: a TOML float would pass through
        // binary floating point on its way to a decimal.
        // The parser's message names the line, the column and the field.
        let raw: RawSheet = toml::from_str(text)
            .map_err(|e| PriceError::Syntax(e.to_string().trim().replace('\n', " ")))?;
        let decimal = |what: String, v: &str| {
            v.trim().parse::<Decimal>().map_err(|_| {
                PriceError::Syntax(format!("{what} is {v:?}, not a decimal like \"0.0100\""))
            })
        };
        let table = |name: &str, m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(t, v)| Ok((t.clone(), decimal(format!("[{name}] {t}"), v)?)))
                .collect::<Result<BTreeMap<_, _>, PriceError>>()
        };
        let sheet = PriceSheet {
            currency: raw.currency,
            running: table("running", &raw.running)?,
            stopped: table("stopped", &raw.stopped)?,
            custom: CustomPrices {
                vcpu_hour: decimal("[custom] vcpu_hour".into(), &raw.custom.vcpu_hour)?,
                memory_gib_hour: decimal(
                    "[custom] memory_gib_hour".into(),
                    &raw.custom.memory_gib_hour,
                )?,
            },
            storage: StoragePrices {
                volume_replica_gib_hour: decimal(
                    "[storage] volume_replica_gib_hour".into(),
                    &raw.storage.volume_replica_gib_hour,
                )?,
                snapshot_gib_hour: decimal(
                    "[storage] snapshot_gib_hour".into(),
                    &raw.storage.snapshot_gib_hour,
                )?,
                image_gib_hour: decimal(
                    "[storage] image_gib_hour".into(),
                    &raw.storage.image_gib_hour,
                )?,
            },
            network: NetworkPrices {
                egress_gib: decimal("[network] egress_gib".into(), &raw.network.egress_gib)?,
            },
        };
        sheet.check()?;
        Ok(sheet)
    }

    fn check(&self) -> Result<(), PriceError> {
        let c = &self.currency;
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PriceError::Currency(c.clone()));
        }
        let types: Vec<String> = builtin_types().iter().map(|t| t.name.to_string()).collect();
        for (table, prices, extra) in [
            ("running", &self.running, None),
            ("stopped", &self.stopped, Some(CUSTOM)),
        ] {
            for t in &types {
                if !prices.contains_key(t) {
                    return Err(PriceError::Missing {
                        table,
                        instance_type: t.clone(),
                    });
                }
            }
            if let Some(x) = extra
                && !prices.contains_key(x)
            {
                return Err(PriceError::Missing {
                    table,
                    instance_type: x.to_string(),
                });
            }
            for (t, price) in prices {
                if !types.contains(t) && Some(t.as_str()) != extra {
                    return Err(PriceError::Unknown {
                        table,
                        instance_type: t.clone(),
                        known: types.join(", "),
                    });
                }
                if price.is_sign_negative() && !price.is_zero() {
                    return Err(PriceError::Negative {
                        what: format!("[{table}] {t}"),
                        price: *price,
                    });
                }
            }
        }
        for (what, price) in [
            ("[custom] vcpu_hour", self.custom.vcpu_hour),
            ("[custom] memory_gib_hour", self.custom.memory_gib_hour),
            (
                "[storage] volume_replica_gib_hour",
                self.storage.volume_replica_gib_hour,
            ),
            (
                "[storage] snapshot_gib_hour",
                self.storage.snapshot_gib_hour,
            ),
            ("[storage] image_gib_hour", self.storage.image_gib_hour),
            ("[network] egress_gib", self.network.egress_gib),
        ] {
            if price.is_sign_negative() && !price.is_zero() {
                return Err(PriceError::Negative {
                    what: what.to_string(),
                    price,
                });
            }
        }
        Ok(())
    }

    /// The price of one hour (vCPU-hour, GiB-hour; one GiB of egress) of
    /// `meter` for `instance_type` or a volume of `replicas`; zero for a
    /// type the sheet does not know (a type removed since), which the check
    /// keeps from happening otherwise.
    pub fn price(&self, meter: Meter, instance_type: &str, replicas: u32) -> Decimal {
        match meter {
            Meter::InstanceRunning => self.running.get(instance_type).copied(),
            Meter::InstanceStopped => self.stopped.get(instance_type).copied(),
            Meter::CustomVcpu => Some(self.custom.vcpu_hour),
            Meter::CustomMemory => Some(self.custom.memory_gib_hour),
            Meter::VolumeStorage => {
                Some(self.storage.volume_replica_gib_hour * Decimal::from(replicas))
            }
            Meter::SnapshotStorage => Some(self.storage.snapshot_gib_hour),
            Meter::ImageStorage => Some(self.storage.image_gib_hour),
            Meter::NetworkEgress => Some(self.network.egress_gib),
        }
        .unwrap_or_default()
    }

    /// The sheet as TOML, in the form [`PriceSheet::parse`] reads.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

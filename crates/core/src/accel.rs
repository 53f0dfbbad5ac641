//! Hardware acceleration: KVM where it really works, QEMU's TCG otherwise.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;

/// The accelerator a host runs its VMs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Linux KVM: hardware virtualization.
    Kvm,
    /// QEMU's Tiny Code Generator: software emulation, slow but works anywhere.
    Tcg,
}

impl Accel {
    /// The name QEMU uses for this accelerator (`-accel NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

impl FromStr for Accel {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(ValidationError::new(
                "accel",
                format!("unknown accelerator {other:?}; allowed: kvm, tcg"),
            )),
        }
    }
}

/// How a host chooses its accelerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// Use KVM if a probe guest really boots with it, TCG otherwise.
    #[default]
    Auto,
    /// Always KVM; VMs fail to start where KVM does not work.
    Kvm,
    /// Always TCG.
    Tcg,
}

impl FromStr for AccelMode {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(ValidationError::new(
                "accel",
                format!("unknown accelerator {other:?}; allowed: auto, kvm, tcg"),
            )),
        }
    }
}

impl fmt::Display for AccelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

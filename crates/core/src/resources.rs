//! Compute resources and the catalog of instance types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::names::TypeName;

/// Smallest memory a VM may have: the guest kernel needs this much to boot.
pub const MIN_MEMORY_MIB: u64 = 96;
/// Largest memory a single VM may ask for.
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
/// Most vCPUs a single VM may ask for.
pub const MAX_VCPUS: u32 = 255;
/// Largest root disk a single VM may ask for.
pub const MAX_DISK_GIB: u64 = 64 * 1024;

/// vCPUs, memory and root-disk size of a VM; also used for host capacity
/// and allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Root disk size in GiB.
    pub disk_gib: u64,
}

impl Resources {
    /// Validates the size of a single VM.
    pub fn validate_vm(&self) -> Result<(), ValidationError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ValidationError::new(
                "vcpus",
                format!(
                    "{} vCPUs is out of range; allowed: 1 to {MAX_VCPUS}",
                    self.vcpus
                ),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ValidationError::new(
                "memory_mib",
                format!(
                    "{} MiB is out of range; allowed: {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB",
                    self.memory_mib
                ),
            ));
        }
        if self.disk_gib == 0 || self.disk_gib > MAX_DISK_GIB {
            return Err(ValidationError::new(
                "disk_gib",
                format!(
                    "{} GiB is out of range; allowed: 1 to {MAX_DISK_GIB} GiB",
                    self.disk_gib
                ),
            ));
        }
        Ok(())
    }

    /// Component-wise sum.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            disk_gib: self.disk_gib.saturating_add(other.disk_gib),
        }
    }

    /// Component-wise difference, never below zero.
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }
}

/// A named size of VM, like an EC2 instance type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceType {
    /// The type's name, e.g. `small`.
    pub name: TypeName,
    /// What a VM of this type gets.
    pub resources: Resources,
    /// One line for people.
    pub description: String,
}

/// The built-in instance types, sized for small hosts.
pub fn builtin_types() -> Vec<InstanceType> {
    let t = |name: &str, vcpus, memory_mib, disk_gib, description: &str| InstanceType {
        name: TypeName::new(name).unwrap_or_else(|e| panic!("built-in type name {name}: {e}")),
        resources: Resources {
            vcpus,
            memory_mib,
            disk_gib,
        },
        description: description.to_string(),
    };
    vec![
        t("nano", 1, 128, 1, "1 vCPU, 128 MiB, 1 GiB disk"),
        t("micro", 1, 256, 2, "1 vCPU, 256 MiB, 2 GiB disk"),
        t("small", 1, 512, 4, "1 vCPU, 512 MiB, 4 GiB disk"),
        t("medium", 2, 1024, 8, "2 vCPUs, 1 GiB, 8 GiB disk"),
        t("large", 2, 2048, 16, "2 vCPUs, 2 GiB, 16 GiB disk"),
        t("xlarge", 4, 4096, 32, "4 vCPUs, 4 GiB, 32 GiB disk"),
    ]
}

/// Looks up a built-in type by name; the error lists the known types.
pub fn find_type(name: &str) -> Result<InstanceType, ValidationError> {
    let types = builtin_types();
    types
        .iter()
        .find(|t| t.name.as_str() == name)
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
            ValidationError::new(
                "instance type",
                format!("unknown type {name:?}; known types: {}", known.join(", ")),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_types_are_valid_vm_sizes() {
        for t in builtin_types() {
            t.resources.validate_vm().expect("valid");
        }
    }

    #[test]
    fn unknown_type_lists_known_ones() {
        let err = find_type("huge").expect_err("unknown");
        assert!(err.message.contains("nano, micro, small"), "{err}");
    }

    #[test]
    fn out_of_range_sizes_are_refused() {
        let ok = Resources {
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
        };
        ok.validate_vm().expect("ok");
        let e = Resources { vcpus: 0, ..ok }
            .validate_vm()
            .expect_err("0 vcpus");
        assert_eq!(e.field, "vcpus");
        let e = Resources {
            memory_mib: 10,
            ..ok
        }
        .validate_vm()
        .expect_err("tiny memory");
        assert!(e.message.contains("allowed: 96"), "{e}");
    }

    #[test]
    fn arithmetic_saturates() {
        let a = Resources {
            vcpus: 1,
            memory_mib: 10,
            disk_gib: 1,
        };
        assert_eq!(a.minus(a.plus(a)), Resources::default());
    }
}

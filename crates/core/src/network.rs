//! Addresses of VMs: MACs, IPv4 subnets and a VM's network attachment.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast MAC derived from `seed` bytes
    /// (an instance id), in QEMU's `52:54:00` range.
    pub fn derived_from(seed: &[u8]) -> Self {
        // FNV-1a: stable across versions and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, b[5], b[6], b[7]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err =
            || ValidationError::new("mac", format!("{s:?} is not a MAC like 52:54:00:12:34:56"));
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An IPv4 subnet such as `10.213.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    /// The network address (host bits are zero).
    pub network: Ipv4Addr,
    /// Prefix length, 8 to 30.
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// A subnet from an address and prefix length; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, ValidationError> {
        if !(8..=30).contains(&prefix_len) {
            return Err(ValidationError::new(
                "subnet",
                format!("prefix length /{prefix_len} is out of range; allowed: /8 to /30"),
            ));
        }
        let mask = u32::MAX << (32 - prefix_len);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len,
        })
    }

    /// The `n`th address of the subnet (0 is the network address).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    /// Number of addresses in the subnet, network and broadcast included.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len)
    }

    /// The first usable address, by convention the gateway (the host bridge).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether `ip` lies in this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix_len);
        u32::from(ip) & mask == u32::from(self.network)
    }

    /// The addresses VMs may get: all but network, gateway and broadcast.
    pub fn vm_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (2..self.size() - 1).filter_map(|n| self.nth(n))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Net {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            ValidationError::new(
                "subnet",
                format!("{s:?} is not a subnet like 10.213.0.0/24"),
            )
        };
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        Self::new(addr, len)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Describes a type that travels as a string in the OpenAPI document.
macro_rules! string_schema {
    ($ty:ty, $example:literal) => {
        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .examples([serde_json::json!($example)])
                    .into()
            }
        }
        impl ToSchema for $ty {}
    };
}

string_schema!(MacAddr, "52:54:00:12:34:56");
string_schema!(Ipv4Net, "10.213.0.0/24");

/// How a VM is attached to its network: the address it keeps for life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAttachment {
    /// The network the VM is on (a name in the VM's project).
    pub network: String,
    /// The VXLAN id of a project's private network; none for the cluster
    /// network (the `default` project's `default` network), which hosts
    /// route to directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// The VM's IPv4 address.
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    /// The prefix length of its subnet.
    pub prefix_len: u8,
    /// The default gateway.
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    /// The VM's MAC, stable for life.
    pub mac: MacAddr,
}

impl NetworkAttachment {
    /// The scope its address is unique in: the cluster network's
    /// (`default`), or its private network's (`vni-<id>`), so that
    /// projects may use the same addresses.
    pub fn ipam_scope(&self) -> String {
        ipam_scope(self.vni)
    }
}

/// The address scope of the network with VXLAN id `vni` (none: the
/// cluster network).
pub fn ipam_scope(vni: Option<u32>) -> String {
    match vni {
        None => crate::keys::DEFAULT_NETWORK.to_string(),
        Some(v) => format!("vni-{v}"),
    }
}

/// The first VXLAN id of private networks; below it is the cluster
/// network's, chosen by the operator.
pub const PRIVATE_VNI_BASE: u32 = 0x1_0000;
/// How many private networks a cluster can hold (each needs its own
/// connection-tracking zone on a host, a 16-bit number).
pub const PRIVATE_VNI_COUNT: u32 = 0xfff0;

/// The subnet a project's network gets when none is asked for. Projects'
/// networks are isolated, so every project may use the same range.
pub const DEFAULT_PRIVATE_SUBNET: &str = "10.0.0.0/24";

/// Whether a network is the one hosts route to (the cluster network) or a
/// project's private one.
pub fn is_cluster_network(project: &crate::ProjectName, name: &str) -> bool {
    project.as_str() == crate::auth::DEFAULT_PROJECT && name == crate::keys::DEFAULT_NETWORK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_roundtrip_and_stability() {
        let m = MacAddr::derived_from(b"instance-1");
        assert_eq!(m, MacAddr::derived_from(b"instance-1"));
        assert_ne!(m, MacAddr::derived_from(b"instance-2"));
        assert_eq!(&m.0[..3], &[0x52, 0x54, 0x00]);
        let s = m.to_string();
        assert_eq!(s.parse::<MacAddr>().expect("parse"), m);
        assert!("52:54:00:zz:00:00".parse::<MacAddr>().is_err());
    }

    #[test]
    fn subnet_math() {
        let n: Ipv4Net = "10.213.0.7/24".parse().expect("parse");
        assert_eq!(n.to_string(), "10.213.0.0/24");
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        let vm: Vec<_> = n.vm_addresses().collect();
        assert_eq!(vm.len(), 253);
        assert_eq!(vm[0], Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(vm[252], Ipv4Addr::new(10, 213, 0, 254));
        assert!(n.contains(Ipv4Addr::new(10, 213, 0, 200)));
        assert!(!n.contains(Ipv4Addr::new(10, 213, 1, 2)));
        assert!("10.0.0.0/31".parse::<Ipv4Net>().is_err());
        assert!("nonsense".parse::<Ipv4Net>().is_err());
    }
}

/// A virtual network VMs attach to: one L2 segment and one subnet, spanning
/// every host through the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    /// Name, unique in its project; every project's first is `default`.
    pub name: String,
    /// The project that owns it.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Its subnet; the gateway is its first address.
    pub subnet: Ipv4Net,
    /// VXLAN network identifier of its overlay.
    pub vni: u32,
    /// MTU VMs should use (lower than the underlay's to fit VXLAN headers).
    pub mtu: u32,
}

impl Network {
    /// Whether this is the cluster network (hosts route to it) rather than
    /// a project's private network.
    pub fn is_cluster_network(&self) -> bool {
        is_cluster_network(&self.project, &self.name)
    }

    /// The VXLAN id VMs' attachments carry: none for the cluster network.
    pub fn private_vni(&self) -> Option<u32> {
        (!self.is_cluster_network()).then_some(self.vni)
    }
}

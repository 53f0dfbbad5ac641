//! IP address allocation: the lowest free address of a subnet. Uniqueness
//! is guaranteed by claim keys written in the same store transaction as
//! the instance, so two servers can never hand out one address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use skyvisor_core::Ipv4Net;

/// The lowest address of `subnet` VMs may get that is not in `used` nor in
/// `skip` (addresses a racing writer just took).
pub fn next_free(
    subnet: &Ipv4Net,
    used: &HashSet<Ipv4Addr>,
    skip: &HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    lowest_free(subnet, |ip| used.contains(&ip) || skip.contains(&ip))
}

/// The lowest address of `subnet` VMs may get for which `taken` is false.
pub fn lowest_free(subnet: &Ipv4Net, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
    subnet.vm_addresses().find(|ip| !taken(*ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_first_and_exhaustion() {
        let net: Ipv4Net = "10.1.0.0/29".parse().expect("subnet");
        let mut used = HashSet::new();
        let none = HashSet::new();
        assert_eq!(
            next_free(&net, &used, &none),
            Some(Ipv4Addr::new(10, 1, 0, 2))
        );
        used.insert(Ipv4Addr::new(10, 1, 0, 2));
        let skip: HashSet<_> = [Ipv4Addr::new(10, 1, 0, 3)].into();
        assert_eq!(
            next_free(&net, &used, &skip),
            Some(Ipv4Addr::new(10, 1, 0, 4))
        );
        for i in 2..7 {
            used.insert(Ipv4Addr::new(10, 1, 0, i));
        }
        assert_eq!(next_free(&net, &used, &none), None);
    }
}

//! The host's instance firewall, rendered as one nftables script.
//!
//! Two tables, replaced together in one transaction:
//! - `bridge skyvisor-guard-<scope>`: every tap may send only from its instance's
//!   MAC and address, and only IPv4, ARP and RARP, so no instance can forge
//!   another's address (or ARP its way into its traffic);
//! - `ip skyvisor-sg-<scope>`: inbound filters of instances in security groups:
//!   answers to what the instance sent pass, then what a rule allows, and
//!   nothing else. The host's `br_netfilter` shows bridged traffic to
//!   these hooks, with connection tracking, whichever host it came from.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use skyvisor_core::MacAddr;
use skyvisor_core::firewall::{AllowRule, Protocol};

/// A tap and the only addresses it may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapGuard {
    /// The tap device.
    pub tap: String,
    /// The instance's MAC.
    pub mac: MacAddr,
    /// The instance's address.
    pub ip: Ipv4Addr,
}

/// An instance in security groups, and what may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFilter {
    /// The instance's name (names its chain).
    pub instance: String,
    /// The bridge its network is on here.
    pub bridge: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// What may reach it besides answers.
    pub allow: Vec<AllowRule>,
    /// An address always let in: a private network's router (the host's
    /// health checks come from it; no instance can send from it, its tap's
    /// guard sees to that).
    pub platform: Option<Ipv4Addr>,
}

/// The host's whole instance firewall.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallConfig {
    /// What names its tables: the agent's cluster bridge, so that agents
    /// sharing one network namespace (test beds) keep apart.
    pub scope: String,
    /// One guard per local tap.
    pub guards: Vec<TapGuard>,
    /// One filter per local instance in security groups.
    pub filters: Vec<InboundFilter>,
}

/// Quotes an interface name for nft (names are checked to be
/// plain before they get here; quotes keep nft from reading keywords).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', ""))
}

/// A chain name for an instance (nft takes chain names unquoted; an
/// instance's name is a DNS label, so plain).
fn chain_of(instance: &str) -> String {
    // `project/name`: names never hold a '.', so `project.name` names one
    // instance only.
    let clean: String = instance
        .chars()
        .filter_map(|c| match c {
            '/' => Some('.'),
            c if c.is_ascii_alphanumeric() || c == '-' => Some(c),
            _ => None,
        })
        .collect();
    format!("in-{clean}")
}

/// The nft match of one allow rule (without the verdict).
fn rule_match(rule: &AllowRule) -> String {
    let mut m = String::new();
    let sources: Vec<String> = rule.sources.iter().map(|s| s.to_string()).collect();
    if !(sources.len() == 1 && sources[0] == "0.0.0.0/0") {
        let _ = write!(m, "ip saddr {{ {} }} ", sources.join(", "));
    }
    let ports = |proto: &str| match rule.ports {
        Some((a, b)) if a == b => format!("{proto} dport {a} "),
        Some((a, b)) => format!("{proto} dport {a}-{b} "),
        None => format!("meta l4proto {proto} "),
    };
    match rule.protocol {
        Protocol::Tcp => m.push_str(&ports("tcp")),
        Protocol::Udp => m.push_str(&ports("udp")),
        Protocol::Icmp => m.push_str("meta l4proto icmp "),
        Protocol::Any => {}
    }
    m
}

impl FirewallConfig {
    /// The nft script that replaces both tables with this configuration.
    pub fn script(&self) -> String {
        let scope: String = self
            .scope
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let guard_table = format!("skyvisor-guard-{scope}");
        let filter_table = format!("skyvisor-sg-{scope}");
        let mut s = String::new();
        // Add-then-delete-then-define is one atomic transaction that works
        // whether or not the tables existed.
        let _ = writeln!(s, "table bridge {guard_table} {{}}");
        let _ = writeln!(s, "delete table bridge {guard_table}");
        let _ = writeln!(s, "table bridge {guard_table} {{");
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;"
        );
        for g in &self.guards {
            let _ = writeln!(s, "    iifname {} jump tap-{}", quoted(&g.tap), g.tap);
        }
        let _ = writeln!(s, "  }}");
        for g in &self.guards {
            let _ = writeln!(s, "  chain tap-{} {{", g.tap);
            let _ = writeln!(s, "    ether saddr != {} drop", g.mac);
            // RARP (0x8035) is how QEMU announces a VM after a live
            // migration; its source MAC is checked above.
            let _ = writeln!(s, "    ether type != {{ ip, arp, 0x8035 }} drop");
            let _ = writeln!(s, "    ether type arp arp saddr ether != {} drop", g.mac);
            // 0.0.0.0 is an address probe's (RFC 5227), harmless.
            let _ = writeln!(
                s,
                "    ether type arp arp saddr ip != {{ {}, 0.0.0.0 }} drop",
                g.ip
            );
            let _ = writeln!(s, "    ether type ip ip saddr != {} drop", g.ip);
            let _ = writeln!(s, "  }}");
        }
        let _ = writeln!(s, "}}");

        let _ = writeln!(s, "table ip {filter_table} {{}}");
        let _ = writeln!(s, "delete table ip {filter_table}");
        let _ = writeln!(s, "table ip {filter_table} {{");
        // The forward hook only: what the host itself sends (its health
        // checks of the cluster network's instances) is the platform's.
        {
            let _ = writeln!(
                s,
                "  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;"
            );
            for f in &self.filters {
                let _ = writeln!(
                    s,
                    "    oifname {} ip daddr {} jump {}",
                    quoted(&f.bridge),
                    f.ip,
                    chain_of(&f.instance)
                );
            }
            let _ = writeln!(s, "  }}");
        }
        for f in &self.filters {
            let _ = writeln!(s, "  chain {} {{", chain_of(&f.instance));
            let _ = writeln!(s, "    ct state established,related accept");
            if let Some(p) = f.platform {
                let _ = writeln!(s, "    ip saddr {p} accept");
            }
            for rule in &f.allow {
                let _ = writeln!(s, "    {}accept", rule_match(rule));
            }
            let _ = writeln!(s, "    drop");
            let _ = writeln!(s, "  }}");
        }
        let _ = writeln!(s, "}}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_core::Ipv4Net;

    #[test]
    fn the_script_guards_taps_and_filters_members() {
        let config = FirewallConfig {
            scope: "svbr0".into(),
            guards: vec![TapGuard {
                tap: "svt0123abcd".into(),
                mac: MacAddr([0x52, 0x54, 0, 1, 2, 3]),
                ip: Ipv4Addr::new(10, 0, 0, 2),
            }],
            filters: vec![InboundFilter {
                instance: "web-1".into(),
                bridge: "svb010000".into(),
                ip: Ipv4Addr::new(10, 0, 0, 2),
                platform: Some(Ipv4Addr::new(10, 0, 0, 1)),
                allow: vec![
                    AllowRule {
                        protocol: Protocol::Tcp,
                        ports: Some((80, 80)),
                        sources: vec![Ipv4Net {
                            network: Ipv4Addr::UNSPECIFIED,
                            prefix_len: 0,
                        }],
                    },
                    AllowRule {
                        protocol: Protocol::Any,
                        ports: None,
                        sources: vec![Ipv4Net {
                            network: Ipv4Addr::new(10, 0, 0, 3),
                            prefix_len: 32,
                        }],
                    },
                ],
            }],
        };
        let script = config.script();
        assert!(script.contains("iifname \"svt0123abcd\" jump tap-svt0123abcd"));
        assert!(script.contains("ether saddr != 52:54:00:01:02:03 drop"));
        assert!(script.contains("ip saddr != 10.0.0.2 drop"));
        assert!(script.contains("oifname \"svb010000\" ip daddr 10.0.0.2 jump in-web-1"));
        assert!(script.contains("tcp dport 80 accept"));
        assert!(script.contains("ip saddr 10.0.0.1 accept"));
        assert!(!script.contains("hook output"));
        assert!(script.contains("ip saddr { 10.0.0.3/32 } accept"));
        assert!(script.trim_end().ends_with('}'));
    }
}

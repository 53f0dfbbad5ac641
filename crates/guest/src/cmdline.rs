//! The guest's identity: parsed from the kernel command line (`sv.*` keys set by the
//! host agent; in a container the same words in `SV_CMDLINE`) and later replaceable
//! through the control channel.
//!
//! Parsing must never fail hard: unknown keys are ignored and malformed values are
//! dropped with a message, so a bad command line still yields a reachable guest.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 address with its prefix length, e.g. `10.0.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not A.B.C.D/NN"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("invalid address {a:?}"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("invalid prefix {p:?}"))?;
        if prefix > 32 {
            return Err(format!("prefix {prefix} is larger than 32"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Who this guest is and how its network is configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// Instance name (`sv.name`).
    pub name: Option<String>,
    /// Instance id (`sv.id`).
    pub id: Option<String>,
    /// Address of eth0 (`sv.ip`).
    pub ip: Option<Ipv4Cidr>,
    /// Default gateway (`sv.gw`).
    pub gw: Option<Ipv4Addr>,
    /// DNS server (`sv.dns`).
    pub dns: Option<Ipv4Addr>,
}

/// Everything the guest reads from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootParams {
    /// The initial identity.
    pub identity: Identity,
    /// `sv.probe=1`: print the probe marker and power off.
    pub probe: bool,
    /// `sv.hooks=1`: serve the test hooks (power, `/fetch`, raw `/blk`).
    pub test_hooks: bool,
    /// Values that were present but malformed (key, value, reason).
    pub rejected: Vec<(String, String, String)>,
}

/// Identity values must be single printable tokens: they end up in hostnames, logs
/// and hand-written JSON.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// Parses a kernel command line such as the contents of `/proc/cmdline`.
pub fn parse(cmdline: &str) -> BootParams {
    let mut p = BootParams::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        // The kernel keeps quotes around values that contain spaces; ours never do.
        let value = value.trim_matches('"');
        let mut reject = |why: String| p.rejected.push((key.to_string(), value.to_string(), why));
        match key {
            "sv.name" | "sv.id" if !valid_token(value) => {
                reject("not a simple token".to_string());
            }
            "sv.name" => p.identity.name = Some(value.to_string()),
            "sv.id" => p.identity.id = Some(value.to_string()),
            "sv.ip" => match value.parse() {
                Ok(c) => p.identity.ip = Some(c),
                Err(e) => reject(e),
            },
            "sv.gw" => match value.parse() {
                Ok(a) => p.identity.gw = Some(a),
                Err(_) => reject("not an IPv4 address".to_string()),
            },
            "sv.dns" => match value.parse() {
                Ok(a) => p.identity.dns = Some(a),
                Err(_) => reject("not an IPv4 address".to_string()),
            },
            "sv.probe" => p.probe = value == "1",
            "sv.hooks" => p.test_hooks = value == "1",
            _ => {}
        }
    }
    p
}

/// The words to parse: `SV_CMDLINE` if set (a container, where `/proc/cmdline`
/// is the host's), else the kernel command line `read_proc` returns.
pub fn boot_words(
    sv_cmdline: Option<std::ffi::OsString>,
    read_proc: impl FnOnce() -> String,
) -> String {
    match sv_cmdline {
        Some(words) => words.to_string_lossy().into_owned(),
        None => read_proc(),
    }
}

/// A valid hostname label (what `sethostname` gets), if `name` is one.
pub fn hostname_for(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys() {
        let p = parse(
            "console=ttyS0 quiet panic=-1 sv.name=web-1 sv.id=6f1c0e3a-1b2c-4d5e-8f90-0a1b2c3d4e5f \
             sv.ip=10.1.2.3/24 sv.gw=10.1.2.1 sv.dns=10.1.2.1 sv.probe=1\n",
        );
        assert_eq!(p.identity.name.as_deref(), Some("web-1"));
        assert_eq!(
            p.identity.id.as_deref(),
            Some("6f1c0e3a-1b2c-4d5e-8f90-0a1b2c3d4e5f")
        );
        assert_eq!(
            p.identity.ip,
            Some(Ipv4Cidr {
                addr: Ipv4Addr::new(10, 1, 2, 3),
                prefix: 24
            })
        );
        assert_eq!(p.identity.gw, Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(p.identity.dns, Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert!(p.probe);
        assert!(p.rejected.is_empty());
    }

    #[test]
    fn missing_keys_are_none_and_bad_values_rejected() {
        let p = parse("console=ttyS0 sv.ip=10.0.0.1 sv.gw=300.1.1.1 sv.name=a\"b sv.probe=0 sv.");
        assert_eq!(p.identity, Identity::default());
        assert!(!p.probe);
        let keys: Vec<&str> = p.rejected.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(keys, ["sv.ip", "sv.gw", "sv.name"]);
        assert_eq!(parse("").identity, Identity::default());
    }

    #[test]
    fn cidr_round_trips_and_validates() {
        let c: Ipv4Cidr = "192.168.0.9/16".parse().expect("valid");
        assert_eq!(c.to_string(), "192.168.0.9/16");
        for bad in ["1.2.3.4", "1.2.3.4/33", "1.2.3/8", "x/8", "1.2.3.4/"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn container_words_replace_the_kernel_command_line() {
        let host = || "BOOT_IMAGE=/vmlinuz root=/dev/sda1 sv.name=host".to_string();
        let words = boot_words(Some("sv.name=c1 sv.ip=10.0.0.7/24".into()), || {
            panic!("/proc/cmdline must not be read in a container")
        });
        assert_eq!(parse(&words).identity.name.as_deref(), Some("c1"));
        // Set but empty still means a container: never the host's words.
        assert_eq!(boot_words(Some("".into()), host), "");
        assert_eq!(
            parse(&boot_words(None, host)).identity.name.as_deref(),
            Some("host")
        );
    }

    #[test]
    fn hostname_requires_a_dns_label() {
        assert_eq!(hostname_for("web-1"), Some("web-1"));
        assert_eq!(hostname_for("a.b"), None);
        assert_eq!(hostname_for("-x"), None);
        assert_eq!(hostname_for(""), None);
    }
}

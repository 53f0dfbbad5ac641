//! Kernel command lines for the default guest: the image's base arguments plus the
//! `sv.*` keys the guest's `/init` and service read (name, id, address, gateway,
//! DNS, probe mode).
//!
//! It must never produce a command line a value could break: values are single
//! tokens without spaces or quotes, checked here.

use std::net::Ipv4Addr;

use crate::ImageError;

/// The base command line of the default guest: serial console, quiet boot, reboot
/// at once on panic (so a broken guest does not hang).
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Per-VM arguments passed to the guest on its kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestKernelArgs {
    /// Instance name (`sv.name`); also the hostname.
    pub name: Option<String>,
    /// Instance id (`sv.id`).
    pub id: Option<String>,
    /// eth0 address and prefix length (`sv.ip=A.B.C.D/NN`).
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway (`sv.gw`).
    pub gw: Option<Ipv4Addr>,
    /// DNS server (`sv.dns`).
    pub dns: Option<Ipv4Addr>,
    /// Accelerator probe mode (`sv.probe=1`): print `SKYVISOR-PROBE-OK`, power off.
    pub probe: bool,
    /// Serve the guest's test hooks (`sv.hooks=1`): power, `/fetch`, raw `/blk`.
    pub test_hooks: bool,
}

fn check_token(key: &str, value: &str) -> Result<(), ImageError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidKernelArg {
            key: key.to_string(),
            value: value.to_string(),
            reason: "must be 1-128 characters of [A-Za-z0-9._:-]".to_string(),
        })
    }
}

impl GuestKernelArgs {
    /// The `sv.*` arguments, space-separated (empty if none).
    pub fn to_args(&self) -> Result<String, ImageError> {
        let mut args = Vec::new();
        if let Some(n) = &self.name {
            check_token("sv.name", n)?;
            args.push(format!("sv.name={n}"));
        }
        if let Some(i) = &self.id {
            check_token("sv.id", i)?;
            args.push(format!("sv.id={i}"));
        }
        if let Some((addr, prefix)) = self.ip {
            if prefix > 32 {
                return Err(ImageError::InvalidKernelArg {
                    key: "sv.ip".to_string(),
                    value: format!("{addr}/{prefix}"),
                    reason: "prefix length above 32".to_string(),
                });
            }
            args.push(format!("sv.ip={addr}/{prefix}"));
        }
        if let Some(gw) = self.gw {
            args.push(format!("sv.gw={gw}"));
        }
        if let Some(dns) = self.dns {
            args.push(format!("sv.dns={dns}"));
        }
        if self.probe {
            args.push("sv.probe=1".to_string());
        }
        if self.test_hooks {
            args.push("sv.hooks=1".to_string());
        }
        Ok(args.join(" "))
    }
}

/// `base` followed by the guest arguments.
pub fn guest_cmdline(base: &str, args: &GuestKernelArgs) -> Result<String, ImageError> {
    let extra = args.to_args()?;
    Ok(match (base.trim(), extra.as_str()) {
        (b, "") => b.to_string(),
        ("", e) => e.to_string(),
        (b, e) => format!("{b} {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_full_command_line() {
        let args = GuestKernelArgs {
            name: Some("web-1".to_string()),
            id: Some("6f1c0e3a-1b2c-4d5e-8f90-0a1b2c3d4e5f".to_string()),
            ip: Some((Ipv4Addr::new(10, 0, 2, 15), 24)),
            gw: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            probe: false,
            test_hooks: false,
        };
        assert_eq!(
            guest_cmdline(BASE_CMDLINE, &args).expect("valid"),
            "console=ttyS0 quiet panic=-1 sv.name=web-1 sv.id=6f1c0e3a-1b2c-4d5e-8f90-0a1b2c3d4e5f \
             sv.ip=10.0.2.15/24 sv.gw=10.0.2.2 sv.dns=10.0.2.3"
        );
    }

    #[test]
    fn probe_and_empty_arguments() {
        let probe = GuestKernelArgs {
            probe: true,
            ..Default::default()
        };
        assert_eq!(
            guest_cmdline(BASE_CMDLINE, &probe).expect("valid"),
            format!("{BASE_CMDLINE} sv.probe=1")
        );
        assert_eq!(
            guest_cmdline(BASE_CMDLINE, &GuestKernelArgs::default()).expect("valid"),
            BASE_CMDLINE
        );
        assert_eq!(guest_cmdline("", &probe).expect("valid"), "sv.probe=1");
    }

    #[test]
    fn rejects_values_that_would_break_the_line() {
        for bad in ["two words", "", "quo\"te", "x=y", &"a".repeat(129)] {
            let args = GuestKernelArgs {
                name: Some(bad.to_string()),
                ..Default::default()
            };
            let err = guest_cmdline(BASE_CMDLINE, &args).expect_err(bad);
            assert!(err.to_string().contains("sv.name"), "{err}");
        }
        let args = GuestKernelArgs {
            ip: Some((Ipv4Addr::LOCALHOST, 33)),
            ..Default::default()
        };
        assert!(guest_cmdline(BASE_CMDLINE, &args).is_err());
    }
}

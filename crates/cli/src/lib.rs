//! The `skyvisor` command-line client: every command is a call to the REST
//! API. Tables for people, `-o json` for scripts, progress while waiting.

pub mod auth;
pub mod billing;
pub mod client;
pub mod commands;
pub mod config;
pub mod dns;
pub mod events;
pub mod failovers;
pub mod groups;
pub mod identities;
pub mod keypairs;
pub mod lbs;
pub mod migrations;
pub mod networks;
pub mod output;
pub mod pinning;
pub mod progress;
pub mod projects;
pub mod readiness;
pub mod remotes;
pub mod snapshots;
pub mod terminal;
pub mod tokens;
pub mod top;
pub mod volumes;

pub use client::{Client, ClientError};
pub use commands::{ClientCommand, run};
pub use config::{Connection, ConnectionArgs};
pub use output::OutputFormat;

/// Parses a memory size: `512`, `512M`, `512MiB`, `1G`, `1GiB` → MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 1G"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use M or G")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a disk size: `4`, `4G`, `4GiB` → GiB.
pub fn parse_gib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4G"))?;
    match unit.trim().to_ascii_lowercase().as_str() {
        "" | "g" | "gb" | "gib" => Ok(n),
        "t" | "tb" | "tib" => n
            .checked_mul(1024)
            .ok_or_else(|| format!("{s:?} is too large")),
        other => Err(format!("unknown unit {other:?} in {s:?}; use G or T")),
    }
}

/// Parses a byte size with a binary unit: `512M`, `10G`, `1T` (also
/// `MiB`, `GiB`, `TiB`, `MB`...). A bare number is bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 10G"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use M, G or T")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("2GiB"), Ok(2048));
        assert!(parse_mib("lots").is_err());
        assert!(parse_mib("1X").is_err());
        assert_eq!(parse_gib("4G"), Ok(4));
        assert_eq!(parse_gib("1T"), Ok(1024));
        assert!(parse_gib("4M").is_err());
        assert_eq!(parse_bytes("10G"), Ok(10 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1T"), Ok(1 << 40));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("10X").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}

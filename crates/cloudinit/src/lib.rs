//! cloud-init for Skyvisor guests: what user data may be, and the NoCloud
//! seed a VM boots with.
//!
//! A seed is a small FAT file system labelled `CIDATA` holding `meta-data`
//! (the instance id, hostname and SSH public keys), `user-data` (the user's
//! own, untouched) and `network-config` (version 2, a static address from
//! the VM's network). cloud-init finds it by its label on any block device;
//! Skyvisor attaches it as a read-only IDE CD-ROM, as Proxmox does, so the
//! guest's virtio disks keep their names. The FAT uses 2048-byte sectors,
//! which a CD-ROM needs.
//!
//! A seed is a pure function of its [`Seed`]: the same VM gets the same
//! bytes on every host (no timestamps, a volume id from the instance id), so
//! a live migration's two ends attach identical drives. The instance id is
//! the VM's id, which never changes across stops, migrations and
//! failovers, so cloud-init runs first-boot steps exactly once per VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The most user data a VM may have, in characters (EC2 allows 16 KiB;
/// counted in characters, as the API document's `maxLength` counts).
pub const USER_DATA_MAX_CHARS: usize = 16 * 1024;
/// The size of a seed drive: room for the largest user data (at most 64
/// KiB in UTF-8) many times over.
pub const SEED_BYTES: u64 = 1 << 20;
/// The volume label cloud-init's NoCloud data source looks for.
pub const SEED_LABEL: &str = "CIDATA";

/// Why user data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    /// Over [`USER_DATA_MAX_CHARS`].
    #[error("user data is {len} characters; allowed: at most {max} characters")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `#cloud-config` that is not YAML, or not a mapping.
    #[error("user data is #cloud-config but not a valid YAML mapping: {detail}")]
    InvalidCloudConfig {
        /// What the YAML parser said.
        detail: String,
    },
}

/// The forms of user data cloud-init understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDataFormat {
    /// `#cloud-config`: YAML.
    CloudConfig,
    /// `#!`: a script run once at first boot.
    Script,
    /// A MIME multipart message of several parts.
    Multipart,
    /// Another marker cloud-init reads (`#include`, `#cloud-boothook`...).
    Other,
    /// None of them: cloud-init will not act on it (EC2 accepts such user
    /// data too, for software of the guest's own to read).
    Unrecognized,
}

/// The forms cloud-init acts on, for messages.
pub const KNOWN_FORMS: &str = "#cloud-config, #! (a script), Content-Type: multipart/ (MIME multipart), \
     #include, #cloud-boothook, #part-handler, #cloud-config-archive, #cloud-config-jsonp";

const OTHER_MARKERS: &[&str] = &[
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#cloud-config-archive",
    "#cloud-config-jsonp",
];

/// Checks user data as cloud-init would read it: its size, its form, and
/// for `#cloud-config` that it is a YAML mapping. Data of no form cloud-init
/// knows is allowed ([`UserDataFormat::Unrecognized`]; callers may warn).
pub fn check_user_data(text: &str) -> Result<UserDataFormat, UserDataError> {
    let len = text.chars().count();
    if len > USER_DATA_MAX_CHARS {
        return Err(UserDataError::TooLarge {
            len,
            max: USER_DATA_MAX_CHARS,
        });
    }
    let first = text.lines().next().unwrap_or_default().trim_end();
    if first.starts_with("#cloud-config") && !first.starts_with("#cloud-config-") {
        return match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Ok(serde_yaml::Value::Mapping(_) | serde_yaml::Value::Null) => {
                Ok(UserDataFormat::CloudConfig)
            }
            Ok(other) => Err(UserDataError::InvalidCloudConfig {
                detail: format!("the document is a {}, not a mapping", yaml_kind(&other)),
            }),
            Err(e) => Err(UserDataError::InvalidCloudConfig {
                detail: e.to_string(),
            }),
        };
    }
    if first.starts_with("#!") {
        return Ok(UserDataFormat::Script);
    }
    if first
        .to_ascii_lowercase()
        .starts_with("content-type: multipart/")
    {
        return Ok(UserDataFormat::Multipart);
    }
    if OTHER_MARKERS.iter().any(|m| first.starts_with(m)) {
        return Ok(UserDataFormat::Other);
    }
    Ok(UserDataFormat::Unrecognized)
}

fn yaml_kind(v: &serde_yaml::Value) -> &'static str {
    match v {
        serde_yaml::Value::Null => "null",
        serde_yaml::Value::Bool(_) => "boolean",
        serde_yaml::Value::Number(_) => "number",
        serde_yaml::Value::String(_) => "string",
        serde_yaml::Value::Sequence(_) => "list",
        serde_yaml::Value::Mapping(_) => "mapping",
        serde_yaml::Value::Tagged(_) => "tagged value",
    }
}

/// The guest's network settings, for `network-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// The NIC's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The MTU (smaller than 1500 on a VXLAN overlay).
    pub mtu: u32,
    /// DNS resolvers.
    pub nameservers: Vec<Ipv4Addr>,
    /// DNS search domains (a bare name is tried in each).
    pub search: Vec<String>,
}

/// What a VM's seed says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The instance id: the VM's id, stable for its life.
    pub instance_id: String,
    /// The guest's hostname.
    pub hostname: String,
    /// OpenSSH public key lines for the image's default user.
    pub ssh_keys: Vec<String>,
    /// The user's user data, as given.
    pub user_data: Option<String>,
    /// The network settings; `None` leaves the guest to its own (DHCP).
    pub network: Option<NetworkSettings>,
}

/// Why a seed could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Seed {
    /// `meta-data` (JSON, which is YAML).
    pub fn meta_data(&self) -> String {
        let mut m = serde_json::json!({
            "instance-id": self.instance_id,
            "local-hostname": self.hostname,
        });
        if !self.ssh_keys.is_empty() {
            m["public-keys"] = serde_json::json!(self.ssh_keys);
        }
        format!("{m:#}\n")
    }

    /// `user-data`: the user's, else an empty cloud-config.
    pub fn user_data(&self) -> String {
        self.user_data
            .clone()
            .unwrap_or_else(|| "#cloud-config\n{}\n".to_string())
    }

    /// `network-config` (version 2) for the one NIC, matched by MAC.
    pub fn network_config(&self) -> Option<String> {
        let n = self.network.as_ref()?;
        let mut eth = serde_json::json!({
            "match": { "macaddress": n.mac },
            "set-name": "eth0",
            "addresses": [format!("{}/{}", n.address, n.prefix_len)],
            "gateway4": n.gateway.to_string(),
            "mtu": n.mtu,
            // The metadata service through the gateway, even in a guest
            // that puts all of 169.254.0.0/16 on the link.
            "routes": [{ "to": "169.254.169.254/32", "via": n.gateway.to_string() }],
        });
        if !n.nameservers.is_empty() {
            let ns: Vec<String> = n.nameservers.iter().map(Ipv4Addr::to_string).collect();
            eth["nameservers"] = serde_json::json!({ "addresses": ns });
            if !n.search.is_empty() {
                eth["nameservers"]["search"] = serde_json::json!(n.search);
            }
        }
        let doc = serde_json::json!({ "version": 2, "ethernets": { "eth0": eth } });
        Some(format!("{doc:#}\n"))
    }

    /// The files of the seed, by name.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("meta-data", self.meta_data()),
            ("user-data", self.user_data()),
        ];
        if let Some(n) = self.network_config() {
            f.push(("network-config", n));
        }
        f
    }

    /// Writes the seed drive to `path` (replacing it in one step).
    pub fn write(&self, path: &Path) -> Result<(), SeedError> {
        let io = |op: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| SeedError::Io { op, path, source }
        };
        let tmp = path.with_extension("tmp");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        file.set_len(SEED_BYTES).map_err(io("sizing", &tmp))?;
        let mut label = [b' '; 11];
        label[..SEED_LABEL.len()].copy_from_slice(SEED_LABEL.as_bytes());
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .bytes_per_sector(2048)
                .volume_label(label)
                .volume_id(volume_id(&self.instance_id)),
        )
        .map_err(io("formatting", &tmp))?;
        {
            let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())
                .map_err(io("opening the file system in", &tmp))?;
            {
                let root = fs.root_dir();
                for (name, text) in self.files() {
                    let mut f = root.create_file(name).map_err(io("writing", &tmp))?;
                    f.truncate().map_err(io("writing", &tmp))?;
                    f.write_all(text.as_bytes()).map_err(io("writing", &tmp))?;
                    f.flush().map_err(io("writing", &tmp))?;
                }
            }
            fs.unmount().map_err(io("closing", &tmp))?;
        }
        file.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))
    }
}

/// A FAT volume id from the instance id (FNV-1a), so seeds are repeatable.
fn volume_id(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn seed() -> Seed {
        Seed {
            instance_id: "0f0e0d0c-0000-4000-8000-000000000001".into(),
            hostname: "web".into(),
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0 me@laptop".into()],
            user_data: Some("#cloud-config\nruncmd:\n  - echo hi\n".into()),
            network: Some(NetworkSettings {
                mac: "52:54:00:12:34:56".into(),
                address: Ipv4Addr::new(10, 0, 0, 5),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
                mtu: 1450,
                nameservers: vec![Ipv4Addr::new(10, 0, 0, 1)],
                search: vec!["alpha.skyvisor.internal".into()],
            }),
        }
    }

    #[test]
    fn user_data_forms_are_told_apart_and_bad_ones_refused() {
        assert_eq!(
            check_user_data("#cloud-config\nruncmd: [ls]\n"),
            Ok(UserDataFormat::CloudConfig)
        );
        assert_eq!(
            check_user_data("#cloud-config\n"),
            Ok(UserDataFormat::CloudConfig)
        );
        assert_eq!(
            check_user_data("#!/bin/sh\necho hi\n"),
            Ok(UserDataFormat::Script)
        );
        assert_eq!(
            check_user_data("Content-Type: multipart/mixed; boundary=x\n\n--x--\n"),
            Ok(UserDataFormat::Multipart)
        );
        assert_eq!(
            check_user_data("#include\nhttp://x/\n"),
            Ok(UserDataFormat::Other)
        );
        assert_eq!(check_user_data("hello\n"), Ok(UserDataFormat::Unrecognized));
        let bad = check_user_data("#cloud-config\nruncmd: [ls\n").expect_err("bad yaml");
        assert!(
            matches!(bad, UserDataError::InvalidCloudConfig { .. }),
            "{bad}"
        );
        let list = check_user_data("#cloud-config\n- a\n- b\n").expect_err("a list");
        assert!(list.to_string().contains("list"), "{list}");
        let big = format!("#!/bin/sh\n{}", "x".repeat(USER_DATA_MAX_CHARS));
        assert_eq!(
            check_user_data(&big),
            Err(UserDataError::TooLarge {
                len: big.len(),
                max: USER_DATA_MAX_CHARS
            })
        );
        // Counted in characters, as JSON Schema's maxLength counts.
        let wide = "é".repeat(USER_DATA_MAX_CHARS);
        assert!(check_user_data(&wide).is_ok());
    }

    #[test]
    fn meta_and_network_config_say_what_the_vm_is() {
        let s = seed();
        let meta: serde_json::Value = serde_json::from_str(&s.meta_data()).expect("json");
        assert_eq!(meta["instance-id"], "0f0e0d0c-0000-4000-8000-000000000001");
        assert_eq!(meta["local-hostname"], "web");
        assert_eq!(meta["public-keys"][0], s.ssh_keys[0]);
        let net: serde_json::Value =
            serde_json::from_str(&s.network_config().expect("network")).expect("json");
        let eth = &net["ethernets"]["eth0"];
        assert_eq!(net["version"], 2);
        assert_eq!(eth["match"]["macaddress"], "52:54:00:12:34:56");
        assert_eq!(eth["addresses"][0], "10.0.0.5/24");
        assert_eq!(eth["gateway4"], "10.0.0.1");
        assert_eq!(eth["mtu"], 1450);
        assert_eq!(eth["nameservers"]["addresses"][0], "10.0.0.1");
        assert_eq!(eth["nameservers"]["search"][0], "alpha.skyvisor.internal");
        let no_keys = Seed {
            ssh_keys: vec![],
            user_data: None,
            ..seed()
        };
        assert!(!no_keys.meta_data().contains("public-keys"));
        assert!(no_keys.user_data().starts_with("#cloud-config"));
    }

    #[test]
    fn the_seed_drive_is_a_fat_labelled_cidata_and_the_same_every_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        seed().write(&a).expect("write a");
        seed().write(&b).expect("write b");
        let bytes = std::fs::read(&a).expect("read");
        assert_eq!(bytes.len() as u64, SEED_BYTES);
        assert_eq!(bytes, std::fs::read(&b).expect("read"), "seeds must repeat");
        let mut file = std::fs::File::open(&a).expect("open");
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).expect("fat");
        assert_eq!(fs.volume_label().trim_end(), SEED_LABEL);
        let mut text = String::new();
        fs.root_dir()
            .open_file("user-data")
            .expect("user-data")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, seed().user_data());
        let names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
    }
}

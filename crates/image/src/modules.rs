//! Kernel modules for the initramfs: reads the `depends=` field of each module's
//! `.modinfo` ELF section, finds the module files in an extracted kernel package,
//! and orders them so that every module is loaded after its dependencies.
//!
//! It must never silently drop a module: a missing module or dependency, a
//! compressed module (busybox insmod cannot load those) or a dependency cycle is an
//! error.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The modules the default guest needs (virtio PCI devices, the ACPI power button
/// and its event device). Dependencies are added automatically.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "button",
    "evdev",
];

/// Module names use `_` and `-` interchangeably; we compare with `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The bytes of section `wanted` of a 64-bit little-endian ELF file.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, String> {
    if elf.get(0..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".to_string());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".to_string());
    }
    let bad = || "truncated or corrupt ELF header".to_string();
    let shoff = usize::try_from(u64_at(elf, 0x28).ok_or_else(bad)?).map_err(|_| bad())?;
    let shentsize = usize::from(u16_at(elf, 0x3A).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(elf, 0x3C).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(elf, 0x3E).ok_or_else(bad)?);
    if shentsize < 64 {
        return Err(format!("unexpected section header size {shentsize}"));
    }
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, h)?;
        let off = usize::try_from(u64_at(elf, h + 24)?).ok()?;
        let size = usize::try_from(u64_at(elf, h + 32)?).ok()?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) =
        section(shstrndx).ok_or_else(|| "corrupt section string table".to_string())?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or_else(|| format!("corrupt section header {i}"))?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == wanted.as_bytes() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// The `depends=` list of a `.modinfo` section (NUL-separated `key=value` strings).
pub fn depends_from_modinfo(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The dependencies declared by the module file at `path`.
pub fn module_depends(path: &Path) -> Result<Vec<String>, ImageError> {
    let elf = std::fs::read(path).map_err(ImageError::io("reading", path))?;
    let modinfo = elf_section(&elf, ".modinfo")
        .map_err(|reason| ImageError::InvalidModule {
            path: path.to_path_buf(),
            reason,
        })?
        .ok_or_else(|| ImageError::InvalidModule {
            path: path.to_path_buf(),
            reason: "no .modinfo section".to_string(),
        })?;
    Ok(depends_from_modinfo(modinfo))
}

/// Module files found under a kernel's module directory, by normalized name.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Uncompressed `.ko` files.
    pub plain: BTreeMap<String, PathBuf>,
    /// Compressed `.ko.xz` / `.ko.zst` / `.ko.gz` files.
    pub compressed: BTreeMap<String, PathBuf>,
}

impl ModuleIndex {
    /// Indexes every module below `dir` (recursively).
    pub fn scan(dir: &Path) -> Result<Self, ImageError> {
        let mut index = ModuleIndex::default();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(ImageError::io("listing", &d))?;
            for e in entries {
                let e = e.map_err(ImageError::io("listing", &d))?;
                let path = e.path();
                let ft = e.file_type().map_err(ImageError::io("inspecting", &path))?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                let fname = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = fname.strip_suffix(".ko") {
                    index.plain.insert(normalize(stem), path);
                } else if let Some(stem) = [".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|ext| fname.strip_suffix(ext))
                {
                    index.compressed.insert(normalize(stem), path);
                }
            }
        }
        Ok(index)
    }

    /// The file of module `name`, or why there is none usable.
    pub fn path_of(&self, name: &str, kernel_version: &str) -> Result<&Path, ImageError> {
        let key = normalize(name);
        if let Some(p) = self.plain.get(&key) {
            return Ok(p);
        }
        if let Some(p) = self.compressed.get(&key) {
            return Err(ImageError::CompressedModule {
                module: key,
                path: p.clone(),
            });
        }
        Err(ImageError::ModuleNotFound {
            module: key,
            kernel_version: kernel_version.to_string(),
        })
    }
}

/// Orders `wanted` and all their dependencies so that each module comes after its
/// dependencies; `depends` returns a module's direct dependencies. Ties keep the
/// order of `wanted`.
pub fn load_order<F>(wanted: &[&str], mut depends: F) -> Result<Vec<String>, ImageError>
where
    F: FnMut(&str) -> Result<Vec<String>, ImageError>,
{
    fn visit<F>(
        name: &str,
        depends: &mut F,
        done: &mut HashSet<String>,
        visiting: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ImageError>
    where
        F: FnMut(&str) -> Result<Vec<String>, ImageError>,
    {
        if done.contains(name) {
            return Ok(());
        }
        if visiting.iter().any(|v| v == name) {
            return Err(ImageError::ModuleCycle {
                module: name.to_string(),
            });
        }
        visiting.push(name.to_string());
        for dep in depends(name)? {
            visit(&normalize(&dep), depends, done, visiting, order)?;
        }
        visiting.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }

    let mut done = HashSet::new();
    let mut order = Vec::new();
    for w in wanted {
        visit(
            &normalize(w),
            &mut depends,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// The module files to load, in order, for `wanted` in `index`.
pub fn resolve(
    index: &ModuleIndex,
    wanted: &[&str],
    kernel_version: &str,
) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let order = load_order(wanted, |name| {
        module_depends(index.path_of(name, kernel_version)?)
    })?;
    order
        .into_iter()
        .map(|name| {
            let path = index.path_of(&name, kernel_version)?.to_path_buf();
            Ok((name, path))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A minimal ELF64 LE relocatable file with a `.modinfo` section holding
    /// `modinfo` (plus a decoy section before it).
    pub(crate) fn synthetic_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.decoy\0.modinfo\0";
        let decoy = b"depends=should_not_be_read\0";
        let mut f = vec![0u8; 64];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        let strtab_off = f.len();
        f.extend_from_slice(shstrtab);
        let decoy_off = f.len();
        f.extend_from_slice(decoy);
        let modinfo_off = f.len();
        f.extend_from_slice(modinfo);
        while !f.len().is_multiple_of(8) {
            f.push(0);
        }
        let shoff = f.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&1u32.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, shstrtab.len());
        sh(11, decoy_off, decoy.len());
        sh(18, modinfo_off, modinfo.len());
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        f[0x3C..0x3E].copy_from_slice(&4u16.to_le_bytes());
        f[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        f
    }

    #[test]
    fn reads_depends_from_a_synthetic_module() {
        let elf = synthetic_module(
            b"license=GPL\0depends=virtio,virtio_ring,net-failover\0name=virtio_net\0",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("virtio_net.ko");
        std::fs::write(&path, &elf).expect("write");
        assert_eq!(
            module_depends(&path).expect("parse"),
            ["virtio", "virtio_ring", "net_failover"]
        );
        let none = synthetic_module(b"depends=\0name=virtio_ring\0");
        assert_eq!(
            depends_from_modinfo(elf_section(&none, ".modinfo").expect("ok").expect("some")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn rejects_non_elf_and_truncated_files() {
        assert!(elf_section(b"hello", ".modinfo").is_err());
        let elf = synthetic_module(b"depends=a\0");
        assert!(elf_section(&elf[..elf.len() - 40], ".modinfo").is_err());
        let mut big_endian = elf.clone();
        big_endian[5] = 2;
        assert!(elf_section(&big_endian, ".modinfo").is_err());
        assert_eq!(elf_section(&elf, ".nothere").expect("valid"), None);
    }

    #[test]
    fn orders_dependencies_first() {
        let deps: HashMap<&str, Vec<&str>> = HashMap::from([
            ("virtio_net", vec!["net_failover", "virtio", "virtio_ring"]),
            ("net_failover", vec!["failover"]),
            ("failover", vec![]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
            ("evdev", vec![]),
        ]);
        let order = load_order(&["evdev", "virtio_net", "virtio"], |n| {
            Ok(deps[n].iter().map(|s| s.to_string()).collect())
        })
        .expect("acyclic");
        assert_eq!(
            order,
            [
                "evdev",
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net"
            ]
        );
        for (name, ds) in &deps {
            let pos = |m: &str| order.iter().position(|o| o == m).expect("present");
            for d in ds {
                assert!(pos(d) < pos(name), "{d} must precede {name}");
            }
        }
    }

    #[test]
    fn detects_cycles_and_missing_modules() {
        let err = load_order(&["a"], |n| {
            Ok(vec![if n == "a" { "b" } else { "a" }.to_string()])
        })
        .expect_err("cycle");
        assert!(matches!(err, ImageError::ModuleCycle { .. }));

        let dir = tempfile::tempdir().expect("tempdir");
        let kdir = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&kdir).expect("mkdir");
        std::fs::write(
            kdir.join("virtio-net.ko"),
            synthetic_module(b"depends=virtio\0"),
        )
        .expect("write");
        std::fs::write(kdir.join("virtio.ko.zst"), b"compressed").expect("write");
        let index = ModuleIndex::scan(dir.path()).expect("scan");
        assert!(index.plain.contains_key("virtio_net"));
        let err = resolve(&index, &["virtio_net"], "6.1.0-test").expect_err("compressed dep");
        assert!(
            matches!(err, ImageError::CompressedModule { ref module, .. } if module == "virtio"),
            "{err}"
        );
        let err = resolve(&index, &["evdev"], "6.1.0-test").expect_err("missing");
        assert!(
            err.to_string().contains("evdev") && err.to_string().contains("6.1.0-test"),
            "{err}"
        );
    }

    #[test]
    fn resolves_real_files_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.ko"), synthetic_module(b"depends=b\0")).expect("write");
        std::fs::write(dir.path().join("b.ko"), synthetic_module(b"depends=\0")).expect("write");
        let index = ModuleIndex::scan(dir.path()).expect("scan");
        let order: Vec<String> = resolve(&index, &["a"], "k")
            .expect("resolve")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["b", "a"]);
    }
}

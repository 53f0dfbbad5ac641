//! Guest images: what a VM's root disk and boot files are made from.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::ImageName;

/// How an image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ImageKind {
    /// QEMU loads a kernel and initrd directly; the image's disk is the
    /// VM's data disk.
    KernelInitrd,
    /// A bootable disk with its own OS, booted by QEMU's firmware.
    Disk,
    /// A root file system (a tarball) for containers: no kernel, run by an
    /// OCI runtime on the host's kernel.
    Rootfs,
}

impl ImageKind {
    /// Whether instances of `kind` run this image: containers run root
    /// file systems, VMs everything else.
    pub fn runs_as(self, kind: crate::InstanceKind) -> bool {
        (self == Self::Rootfs) == (kind == crate::InstanceKind::Container)
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KernelInitrd => "kernel-initrd",
            Self::Disk => "disk",
            Self::Rootfs => "rootfs",
        })
    }
}

/// What a file of an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileRole {
    /// The Linux kernel.
    Kernel,
    /// The initial RAM disk.
    Initrd,
    /// The base disk that VM root disks overlay.
    Disk,
    /// A container's root file system, a gzip tarball: the read-only lower
    /// layer of each container's root.
    Rootfs,
}

/// The format of a disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU copy-on-write.
    Qcow2,
    /// A plain image.
    Raw,
}

impl DiskFormat {
    /// QEMU's name for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// One file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageFile {
    /// What it is for.
    pub role: FileRole,
    /// Its file name inside the image's directory.
    pub file_name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// For disks: the format.
    pub format: Option<DiskFormat>,
    /// For disks: the virtual size in bytes.
    pub virtual_size_bytes: Option<u64>,
}

/// What a container of an imported OCI image runs, from the image's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct ContainerProcess {
    /// The command and its arguments (the image's entrypoint, then its
    /// command).
    pub args: Vec<String>,
    /// Its environment, `NAME=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Its working directory (`/` if none).
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum ImageSource {
    /// Built by a built-in recipe from Debian packages.
    Recipe {
        /// The recipe's name.
        recipe: String,
        /// The packages it was built from, with versions.
        packages: Vec<String>,
    },
    /// Uploaded by a user.
    Import,
}

/// Whether an image can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Being built or uploaded.
    Building,
    /// Usable.
    Ready,
    /// The build or upload failed; see `message`.
    Failed,
}

/// A guest image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Its name, unique within its project (and among public images).
    pub name: ImageName,
    /// The project that owns it.
    #[serde(default = "crate::auth::default_project")]
    #[schema(value_type = String)]
    pub project: crate::ProjectName,
    /// Whether every project may use it (only a cluster admin may publish).
    #[serde(default = "crate::auth::public_by_default")]
    pub public: bool,
    /// How it boots.
    pub kind: ImageKind,
    /// One line for people.
    pub description: String,
    /// Its files.
    pub files: Vec<ImageFile>,
    /// Kernel command line for kernel+initrd images; the agent appends the
    /// VM's identity and network settings.
    pub cmdline: Option<String>,
    /// Whether the guest runs Skyvisor's guest service (port 80), so that
    /// readiness can be checked.
    pub guest_service: bool,
    /// The user that cloud-init gives the VM's SSH keys (`debian` for the
    /// `debian-12` recipe), for the `ssh` command `vm show` prints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    /// Whether the image runs cloud-init (with the QEMU guest agent), so
    /// that a VM is ready once cloud-init reports it has finished.
    #[serde(default)]
    pub cloud_init: bool,
    /// For a container image imported from an OCI image: the process its
    /// configuration names. None: the image runs Skyvisor's guest service
    /// (`/init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ContainerProcess>,
    /// Where it came from.
    pub source: ImageSource,
    /// Whether it can be used.
    pub state: ImageState,
    /// Why it failed, if it did.
    pub message: Option<String>,
    /// While it is being built or uploaded: the server doing it. If that
    /// server dies, the leader resumes a build or fails an upload with the
    /// reason, so no image stays `building` forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub builder: Option<crate::ServerName>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl Image {
    /// The image as its project's name for it: what names it in the store.
    pub fn image_ref(&self) -> crate::ImageRef {
        crate::ImageRef::new(self.project.clone(), self.name.clone())
    }

    /// The file with `role`, if the image has one.
    pub fn file(&self, role: FileRole) -> Option<&ImageFile> {
        self.files.iter().find(|f| f.role == role)
    }

    /// Total size of the image's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// The image named `name` for `project`, among `images`: the project's
/// own, else the public one of that name (public names are unique, so at
/// most one). The one rule by which the API and the agents find an
/// instance's image.
pub fn resolve<'a>(
    images: impl IntoIterator<Item = &'a Image>,
    project: &crate::ProjectName,
    name: &ImageName,
) -> Option<&'a Image> {
    let mut public = None;
    for image in images {
        if &image.name != name {
            continue;
        }
        if &image.project == project {
            return Some(image);
        }
        if image.public {
            public = Some(image);
        }
    }
    public
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(project: &str, name: &str, public: bool) -> Image {
        Image {
            name: ImageName::new(name).expect("name"),
            project: crate::ProjectName::new(project).expect("project"),
            public,
            kind: ImageKind::KernelInitrd,
            description: String::new(),
            files: vec![],
            cmdline: None,
            guest_service: false,
            ssh_user: None,
            cloud_init: false,
            process: None,
            source: ImageSource::Import,
            state: ImageState::Ready,
            message: None,
            builder: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_projects_own_image_comes_before_a_public_one_of_its_name() {
        let all = [
            image("default", "debian", true),
            image("web", "debian", false),
            image("blog", "tool", false),
        ];
        let p = |s: &str| crate::ProjectName::new(s).expect("project");
        let n = |s: &str| ImageName::new(s).expect("name");
        let found = |project: &str, name: &str| {
            resolve(&all, &p(project), &n(name)).map(|i| i.project.to_string())
        };
        assert_eq!(found("web", "debian").as_deref(), Some("web"));
        assert_eq!(found("blog", "debian").as_deref(), Some("default"));
        // Another project's private image is not there for anyone else.
        assert_eq!(found("web", "tool"), None);
        assert_eq!(found("blog", "tool").as_deref(), Some("blog"));
    }
}

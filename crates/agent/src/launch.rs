//! Building a VM's launch: its image, root disk, tap and QEMU process.
//! Shared by a VM's supervisor (starts, restores) and the destination of a
//! live migration (which starts a VM that waits for its state).

use std::path::PathBuf;
use std::sync::Arc;

use skyvisor_core::image::{FileRole, ImageKind, ImageState};
use skyvisor_core::{Image, ImageFile, InstanceKind, InstanceSpec, InstanceVolume, keys};
use skyvisor_store::{StoreExt, encode};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::AgentContext;
use crate::disks::create_root_disk;
use crate::hypervisor::{LaunchBoot, LaunchVolume, TapFile, VmLaunch};
use crate::supervisor::{LAUNCH_FILE, ROOT_DISK, Running, launch_volume};
use crate::volumes::VolumeService;

/// Why a VM's volumes are being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServeMode {
    /// The VM starts here: become each volume's primary (a blank root
    /// volume then gets its first contents: see [`Launcher::serve_volumes`]).
    Start,
    /// A migration's destination VM: export each volume, waiting for the
    /// handover (the source is still the primary).
    Incoming,
    /// The handover to this host is committed: become the primary behind
    /// the exports made with [`ServeMode::Incoming`].
    HandedOver,
}

/// What a launched VM's image says about its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GuestFacts {
    /// It runs Skyvisor's guest service (readiness: it answers).
    pub(crate) service: bool,
    /// It runs cloud-init (readiness: cloud-init reports).
    pub(crate) cloud_init: bool,
}

impl GuestFacts {
    /// Records them in a VM's status.
    pub(crate) fn apply(self, status: &mut skyvisor_core::InstanceStatus) {
        status.guest_service = self.service;
        // Every guest without the guest service gets a seed and a guest
        // agent channel (see `Launcher::launch`).
        status.guest_agent_channel = !self.service;
        status.cloud_init_expected = self.cloud_init && !self.service;
    }
}

/// Launches VMs for the agent.
pub(crate) struct Launcher {
    pub(crate) ctx: Arc<AgentContext>,
}

impl Launcher {
    fn vm_dir(&self, spec: &InstanceSpec) -> PathBuf {
        self.ctx.vm_dir(&spec.id)
    }

    /// Prepares disk and network and launches the VM; undoes what it did
    /// on failure. With `incoming`, the VM continues from that saved
    /// memory instead of booting. `tap_file` is the tap's file held over
    /// from the VM's previous hypervisor process, if any.
    pub(crate) async fn launch(
        &self,
        spec: &InstanceSpec,
        incoming: Option<PathBuf>,
        link_down: bool,
        migration_target: bool,
        tap_file: Option<TapFile>,
    ) -> Result<(Running, GuestFacts), String> {
        let dir = self.vm_dir(spec);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // The watchdog fences only what is marked: protected VMs.
        let protected = spec.ha == skyvisor_core::HaPolicy::Restart && self.ctx.fence.is_some();
        crate::fencing::mark_protected(&dir, protected)
            .await
            .map_err(|e| format!("marking {} as HA-protected: {e}", dir.display()))?;
        if spec.kind == InstanceKind::Container {
            return self.launch_container(spec, &dir).await;
        }
        let image = self.image(spec).await?;
        let volumes = if migration_target {
            self.serve_volumes_as(spec, ServeMode::Incoming).await?
        } else {
            self.serve_volumes(spec, &image).await?
        };
        let root = dir.join(ROOT_DISK);
        let mut created_disk = false;
        if spec.root_volume().is_none() && !tokio::fs::try_exists(&root).await.unwrap_or(false) {
            let base = match image.file(FileRole::Disk) {
                Some(f) => Some((
                    self.ctx.images.file(&image, f).await?,
                    f.format.unwrap_or(skyvisor_core::image::DiskFormat::Qcow2),
                )),
                None => None,
            };
            if let Err(e) = create_root_disk(
                &root,
                base.as_ref().map(|(p, f)| (p.as_path(), *f)),
                spec.resources.disk_gib << 30,
            )
            .await
            {
                self.release_volumes(spec).await;
                return Err(e);
            }
            created_disk = true;
        }
        let boot = match image.kind {
            ImageKind::KernelInitrd => {
                let kernel = match image.file(FileRole::Kernel) {
                    Some(f) => self.ctx.images.file(&image, f).await?,
                    None => return Err(format!("image {} has no kernel", image.name)),
                };
                let initrd = match image.file(FileRole::Initrd) {
                    Some(f) => Some(self.ctx.images.file(&image, f).await?),
                    None => None,
                };
                LaunchBoot::Kernel {
                    kernel,
                    initrd,
                    cmdline: self.cmdline(spec, &image),
                }
            }
            ImageKind::Disk => LaunchBoot::Firmware,
            ImageKind::Rootfs => {
                return Err(format!(
                    "image {} is a container's root file system; a VM cannot boot it",
                    image.name
                ));
            }
        };
        let tap = skyvisor_net::tap_name(&spec.id);
        let undo = |created_disk: bool| {
            let root = root.clone();
            let tap = tap.clone();
            let net = self.ctx.network.clone();
            let volumes = self.ctx.volumes.clone();
            let name = spec.instance_ref();
            async move {
                let _ = net.delete_tap(&tap).await;
                if created_disk {
                    let _ = tokio::fs::remove_file(&root).await;
                }
                if let Some(v) = volumes {
                    v.release_instance(&name).await;
                }
            }
        };
        // A guest without Skyvisor's guest service is configured by
        // cloud-init (if it has it) from a seed made from the spec alone.
        let seed = if image.guest_service {
            None
        } else {
            match self.write_seed(spec, &dir).await {
                Ok(p) => Some(p),
                Err(e) => {
                    undo(created_disk).await;
                    return Err(e);
                }
            }
        };
        let bridge = match self.ctx.private_nets.bridge_for(&spec.network).await {
            Ok(b) => b,
            Err(e) => {
                undo(created_disk).await;
                return Err(format!("setting up network {}: {e}", spec.network.network));
            }
        };
        if let Err(e) = self.ctx.network.ensure_tap(&tap, &bridge).await {
            undo(created_disk).await;
            return Err(format!("creating tap {tap}: {e}"));
        }
        // Guarded (and filtered) before the VM sends its first frame.
        if let Err(e) = self.ctx.attach_tap(&tap, spec, &bridge).await {
            undo(created_disk).await;
            return Err(format!("guarding tap {tap}: {e}"));
        }
        let launch = VmLaunch {
            instance: spec.id,
            name: spec.name.to_string(),
            run_dir: dir.clone(),
            accel: self.ctx.accel,
            resources: spec.resources,
            boot,
            root_disk: root.clone(),
            tap: tap.clone(),
            mac: spec.network.mac,
            guest_channel: image.guest_service,
            guest_agent: !image.guest_service,
            seed,
            incoming,
            link_down,
            volumes: volumes.clone(),
            migration_target,
            tap_file,
        };
        let vm = match self.ctx.hypervisor.launch(&launch).await {
            Ok(vm) => vm,
            Err(e) => {
                undo(created_disk).await;
                return Err(e.to_string());
            }
        };
        if let Err(e) = tokio::fs::write(dir.join(LAUNCH_FILE), encode(&launch)).await {
            warn!(instance = %spec.name, error = %e, "could not record launch config");
        }
        Ok((
            Running {
                vm,
                resources: spec.resources,
                since: Instant::now(),
                volumes,
            },
            GuestFacts {
                service: image.guest_service,
                cloud_init: image.cloud_init,
            },
        ))
    }

    /// Serves every volume of the VM on this host (root first) to start
    /// it, giving a blank root volume its first contents: the disk of
    /// `image` if it boots its own disk, else a file system. On failure
    /// stops serving those already served.
    pub(crate) async fn serve_volumes(
        &self,
        spec: &InstanceSpec,
        image: &Image,
    ) -> Result<Vec<LaunchVolume>, String> {
        let served = self.serve_volumes_as(spec, ServeMode::Start).await?;
        if let (Some(v), Some(svc)) = (spec.root_volume(), &self.ctx.volumes)
            && let Err(e) = self.fill_blank_root(svc, v, image).await
        {
            svc.release_instance(&spec.instance_ref()).await;
            return Err(format!("volume {}: {e}", v.name));
        }
        Ok(served)
    }

    /// Gives a blank root volume served here its first contents.
    async fn fill_blank_root(
        &self,
        svc: &VolumeService,
        v: &InstanceVolume,
        image: &Image,
    ) -> Result<(), String> {
        match image.file(FileRole::Disk) {
            Some(f) if image.kind == ImageKind::Disk => {
                if !svc.is_blank(&v.id).await? {
                    return Ok(());
                }
                let path = self.ctx.images.file(image, f).await?;
                let format = f.format.unwrap_or(skyvisor_core::image::DiskFormat::Qcow2);
                let written = svc.fill_from_image(&v.id, &path, format.as_str()).await?;
                info!(volume = %v.name, image = %image.name, written, "root volume filled from its image");
                Ok(())
            }
            _ => svc.format_if_blank(&v.id).await.map(drop),
        }
    }

    /// [`Launcher::serve_volumes`] for a VM that is about to start, that
    /// waits for a migration's handover, or that has just been handed over.
    pub(crate) async fn serve_volumes_as(
        &self,
        spec: &InstanceSpec,
        mode: ServeMode,
    ) -> Result<Vec<LaunchVolume>, String> {
        if spec.volumes.is_empty() {
            return Ok(vec![]);
        }
        let Some(svc) = self.ctx.volumes.clone() else {
            return Err(format!(
                "host {} serves no volumes (its agent runs without a replica server)",
                self.ctx.host
            ));
        };
        let mut ordered: Vec<&InstanceVolume> = spec.volumes.iter().filter(|v| v.root).collect();
        ordered.extend(spec.volumes.iter().filter(|v| !v.root));
        let mut out = vec![];
        for v in ordered {
            let served = match mode {
                ServeMode::Incoming => svc.serve_incoming(v, &spec.instance_ref()).await,
                ServeMode::Start | ServeMode::HandedOver => {
                    svc.serve(v, &spec.instance_ref()).await
                }
            };
            match served {
                Ok(t) => out.push(launch_volume(v, t)),
                Err(e) => {
                    // A handed-over VM keeps its exports: its requests wait
                    // until a later attempt (its supervisor's) succeeds.
                    if mode != ServeMode::HandedOver {
                        svc.release_instance(&spec.instance_ref()).await;
                    }
                    return Err(format!("volume {}: {e}", v.name));
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn release_volumes(&self, spec: &InstanceSpec) {
        if let Some(svc) = &self.ctx.volumes {
            svc.release_instance(&spec.instance_ref()).await;
        }
    }

    /// The image `spec` boots, found as the API found it at the create:
    /// its project's own of that name, else the public one.
    pub(crate) async fn image(&self, spec: &InstanceSpec) -> Result<Image, String> {
        let all: Vec<Image> = match self.ctx.store.list_json::<Image>(keys::IMAGES).await {
            Ok((all, _)) => all.into_iter().map(|(i, _)| i).collect(),
            Err(e) => return Err(format!("reading image {}: {e}", spec.image)),
        };
        match skyvisor_core::image::resolve(&all, &spec.project, &spec.image) {
            Some(img) if img.state == ImageState::Ready => Ok(img.clone()),
            Some(_) => Err(format!("image {} is not ready", spec.image)),
            None => Err(format!("image {} no longer exists", spec.image)),
        }
    }

    /// The image of `spec` and those of its files a launch will read that
    /// this host has no verified copy of yet.
    pub(crate) async fn missing_image_files(
        &self,
        spec: &InstanceSpec,
    ) -> Result<(Image, Vec<ImageFile>), String> {
        let image = self.image(spec).await?;
        let root = self.vm_dir(spec).join(ROOT_DISK);
        // A root volume may be blank, to be filled from an image's disk.
        let needs_base = match spec.root_volume() {
            Some(_) => image.kind == ImageKind::Disk,
            None => !tokio::fs::try_exists(&root).await.unwrap_or(false),
        };
        let mut missing = Vec::new();
        for f in &image.files {
            let needed = match f.role {
                FileRole::Disk => needs_base,
                FileRole::Kernel | FileRole::Initrd => image.kind == ImageKind::KernelInitrd,
                FileRole::Rootfs => image.kind == ImageKind::Rootfs,
            };
            if needed && self.ctx.images.local(&image, f).await.is_none() {
                missing.push(f.clone());
            }
        }
        Ok((image, missing))
    }

    /// Writes the VM's cloud-init seed drive into its directory: its id as
    /// the instance id (so first-boot steps run once in its life, wherever
    /// it runs), hostname, keys, user data and static network settings.
    async fn write_seed(
        &self,
        spec: &InstanceSpec,
        dir: &std::path::Path,
    ) -> Result<PathBuf, String> {
        let n = &spec.network;
        let seed = skyvisor_cloudinit::Seed {
            instance_id: spec.id.to_string(),
            hostname: spec.guest_hostname(),
            ssh_keys: spec
                .guest
                .ssh_keys
                .iter()
                .map(|k| k.public_key.clone())
                .collect(),
            user_data: spec.guest.user_data.clone(),
            network: Some(skyvisor_cloudinit::NetworkSettings {
                mac: n.mac.to_string(),
                address: n.ip,
                prefix_len: n.prefix_len,
                gateway: n.gateway,
                mtu: self.ctx.mtu,
                // The host's DNS server on the gateway: the internal
                // zone, and other names forwarded upstream.
                nameservers: vec![n.gateway],
                search: vec![skyvisor_core::dns::search_domain(&spec.project)],
            }),
        };
        let path = dir.join(SEED_FILE);
        let target = path.clone();
        tokio::task::spawn_blocking(move || seed.write(&target))
            .await
            .map_err(|e| format!("writing the cloud-init seed: {e}"))?
            .map_err(|e| format!("writing the cloud-init seed: {e}"))?;
        Ok(path)
    }

    /// The kernel command line: the image's, plus the VM's identity and
    /// network settings for the guest's init.
    pub(crate) fn cmdline(&self, spec: &InstanceSpec, image: &Image) -> String {
        let mut c = image.cmdline.clone().unwrap_or_default();
        if image.guest_service {
            c.push(' ');
            c.push_str(&self.guest_words(spec));
        }
        c.trim().to_string()
    }

    /// The instance's identity and network settings as the guest
    /// service's init reads them (`sv.name=... sv.ip=...`): on a VM's
    /// kernel command line, in a container's environment.
    fn guest_words(&self, spec: &InstanceSpec) -> String {
        let n = &spec.network;
        let mut c = format!(
            "sv.name={} sv.id={} sv.ip={}/{} sv.gw={} sv.mtu={} sv.dns={} sv.domain={}",
            spec.name,
            spec.id,
            n.ip,
            n.prefix_len,
            n.gateway,
            self.ctx.mtu,
            n.gateway,
            skyvisor_core::dns::search_domain(&spec.project)
        );
        if self.ctx.guest_test_hooks {
            c.push_str(" sv.hooks=1");
        }
        c
    }

    /// Starts a container instance: its image's root file system under
    /// its own writable layer, its veth on its network's bridge, guarded
    /// before it sends a frame, and the runtime.
    async fn launch_container(
        &self,
        spec: &InstanceSpec,
        dir: &std::path::Path,
    ) -> Result<(Running, GuestFacts), String> {
        let Some(driver) = self.ctx.containers.clone() else {
            return Err(format!(
                "host {} runs no containers: {}",
                self.ctx.host,
                self.ctx
                    .containers_unavailable
                    .as_deref()
                    .unwrap_or("its agent runs without a container runtime")
            ));
        };
        let image = self.image(spec).await?;
        let Some(file) = image
            .file(FileRole::Rootfs)
            .filter(|_| image.kind == ImageKind::Rootfs)
        else {
            return Err(format!(
                "image {} is not a container image (kind {}); containers run root file system images",
                image.name, image.kind
            ));
        };
        let rootfs = self.ctx.images.file(&image, file).await?;
        let bridge = self
            .ctx
            .private_nets
            .bridge_for(&spec.network)
            .await
            .map_err(|e| format!("setting up network {}: {e}", spec.network.network))?;
        let veth = skyvisor_net::tap_name(&spec.id);
        let peer = crate::containers::make_veth(&veth, &bridge, self.ctx.mtu).await?;
        let undo = || async {
            let _ = self.ctx.network.delete_tap(&veth).await;
        };
        // Guarded (and filtered) before the container sends its first frame.
        if let Err(e) = self.ctx.attach_tap(&veth, spec, &bridge).await {
            undo().await;
            return Err(format!("guarding {veth}: {e}"));
        }
        let process = match &image.process {
            // An imported image runs what its configuration names, with
            // the network's resolver bound in.
            Some(p) => {
                let mut env = p.env.clone();
                if !env.iter().any(|e| e.starts_with("PATH=")) {
                    env.push(DEFAULT_PATH.to_string());
                }
                crate::containers::Process {
                    args: p.args.clone(),
                    env,
                    cwd: p.working_dir.clone(),
                    resolv_conf: Some(format!(
                        "nameserver {}\nsearch {}\noptions timeout:2 attempts:2\n",
                        spec.network.gateway,
                        skyvisor_core::dns::search_domain(&spec.project)
                    )),
                }
            }
            // Skyvisor's image: its init, told who it is as a VM's kernel
            // command line tells it.
            None => crate::containers::Process {
                args: vec!["/init".to_string()],
                env: vec![
                    DEFAULT_PATH.to_string(),
                    "SV_CONTAINER=1".to_string(),
                    format!("SV_CMDLINE={}", self.guest_words(spec)),
                ],
                cwd: None,
                resolv_conf: None,
            },
        };
        let vm = match driver
            .launch(
                spec,
                dir,
                crate::containers::ImageRoot {
                    rootfs: &rootfs,
                    sha256: &file.sha256,
                },
                &peer,
                self.ctx.mtu,
                process,
            )
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                undo().await;
                return Err(e);
            }
        };
        Ok((
            Running {
                vm: Box::new(vm),
                resources: spec.resources,
                since: Instant::now(),
                volumes: vec![],
            },
            GuestFacts {
                service: image.guest_service,
                cloud_init: false,
            },
        ))
    }
}

/// A container's `PATH` when its image names none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The VM's cloud-init seed drive, in its directory.
pub(crate) const SEED_FILE: &str = "seed.img";

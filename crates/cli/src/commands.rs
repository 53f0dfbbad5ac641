//! The client commands: `vm`, `image`, `host`, `type`, `info`, and where
//! the others (`volume`, `project`, `identity`, `token`, `remote`,
//! `login`, `whoami`...) are run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::{Args, Subcommand};
use reqwest::Method;
use skyvisor_core::api::{
    BuildImageRequest, ConsoleLog, CreateInstanceRequest, ResizeInstanceRequest, ServerInfo,
    StopInstanceRequest,
};
use skyvisor_core::image::ImageState;
use skyvisor_core::{
    Accel, HaPolicy, HostView, Image, Instance, InstanceKind, InstancePhase, InstanceType,
    PowerState, RestartPolicy,
};

use crate::client::Client;
use crate::config::ConnectionArgs;
use crate::output::{self, OutputFormat, ago, kv, mib, table};
use crate::progress::Progress;
use crate::readiness::{self, Needs};
use crate::snapshots::{self, SnapshotCommand};
use crate::volumes::VolumeCommand;
use crate::{parse_gib, parse_mib};

/// A client command.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Virtual machines: create, list, start, stop, delete...
    #[command(subcommand, alias = "instance")]
    Vm(VmCommand),
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Hosts of the pool.
    #[command(subcommand)]
    Host(HostCommand),
    /// Replicated block volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The project's private networks.
    #[command(subcommand)]
    Network(crate::networks::NetworkCommand),
    /// Security groups: what may reach the project's instances.
    #[command(subcommand, name = "security-group", alias = "sg")]
    SecurityGroup(crate::networks::SecurityGroupCommand),
    /// Instance groups: identical members kept at a desired count,
    /// health-checked and replaced when they fail (scale-out).
    #[command(subcommand)]
    Group(crate::groups::GroupCommand),
    /// Load balancers in front of instance groups.
    #[command(subcommand)]
    Lb(crate::lbs::LbCommand),
    /// The project's names in the internal DNS zone
    /// (NAME.PROJECT.skyvisor.internal), as its guests resolve them.
    #[command(subcommand)]
    Dns(crate::dns::DnsCommand),
    /// SSH key pairs of the project.
    #[command(subcommand)]
    Keypair(crate::keypairs::KeyPairCommand),
    /// Live migrations: what moved where, and how it went.
    #[command(subcommand)]
    Migration(crate::migrations::MigrationCommand),
    /// High availability: failovers after host deaths, and refusals.
    #[command(subcommand)]
    Failover(crate::failovers::FailoverCommand),
    /// Instance types.
    #[command(subcommand, name = "type")]
    Type(TypeCommand),
    /// What the server is.
    Info,
    /// Projects: quotas, usage and members.
    #[command(subcommand)]
    Project(crate::projects::ProjectCommand),
    /// Users and service accounts.
    #[command(subcommand)]
    Identity(crate::identities::IdentityCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(crate::tokens::TokenCommand),
    /// Named APIs to talk to, kept in the config file.
    #[command(subcommand)]
    Remote(crate::remotes::RemoteCommand),
    /// Log in: check an API token and save it in the config file.
    ///
    /// The token is --token (or SKYVISOR_TOKEN), else one line of standard
    /// input. It is checked with the API at --url (else the remote's); if
    /// the API accepts it, the URL and token (and --project, if given) are
    /// saved in the remote named by --remote, else the current one, else a
    /// new remote "default".
    Login,
    /// Who the API takes you for, and your roles.
    Whoami,
    /// Events: what was asked and what happened (created, started,
    /// crashed, migrated, failed over, refused...), in order.
    #[command(subcommand)]
    Event(EventCommand),
    /// The project's usage over a period, metered from its recorded state
    /// transitions (by meter and instance type).
    Usage {
        /// From (RFC 3339 or a date like 2026-12-01); default: this month's start.
        #[arg(long)]
        from: Option<String>,
        /// To (exclusive; default and at most: now).
        #[arg(long)]
        to: Option<String>,
        /// CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// The project's invoice for a month: final once the month is over.
    Invoice {
        /// The month, YYYY-MM (default: this month, an estimate so far).
        #[arg(long)]
        month: Option<String>,
        /// CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// The prices invoices are made with.
    #[command(subcommand)]
    PriceSheet(PriceSheetCommand),
    /// The audit trail: who did what to which object, and how it ended
    /// (the project's, for its admins; --cluster: the cluster-wide one).
    Audit {
        /// Most entries, newest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The cluster-wide trail (hosts, projects, identities, refusals).
        #[arg(long)]
        cluster: bool,
    },
}

/// `skyvisor price-sheet ...`
#[derive(Debug, Subcommand)]
pub enum PriceSheetCommand {
    /// Prints the price sheet in force (TOML).
    Show,
    /// Replaces the price sheet with a TOML file (cluster admins); closed
    /// invoices keep the prices they were made with.
    Set {
        /// The TOML file (`price-sheet show` prints the shape).
        file: String,
    },
}

/// `skyvisor event ...`
#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// The newest events of the project, oldest first; --follow keeps
    /// printing new ones as they happen.
    List {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
        /// Keep printing events as they happen (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        /// Every project's events and the cluster's (cluster admins).
        #[arg(long)]
        cluster: bool,
        /// Most past events to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// `skyvisor vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (and start it unless --no-start).
    Create(Box<CreateArgs>),
    /// A live table of the project's VMs: CPU, memory, disk and network
    /// rates, refreshed in place.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one table (after one interval) and exit.
        #[arg(long)]
        once: bool,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List {
        /// Only VMs whose labels match: comma-separated KEY=VALUE (the
        /// label has that value) or KEY (it has the label) terms.
        #[arg(long, value_name = "SELECTOR")]
        label: Option<String>,
    },
    /// Show one VM.
    Show {
        /// The VM.
        name: String,
    },
    /// Live-migrate a running VM to another host: it keeps its address,
    /// memory, disk and processes. Shows progress until it is done.
    Migrate {
        /// The VM.
        name: String,
        /// The destination host (default: the scheduler picks one).
        #[arg(long, conflicts_with = "cancel")]
        to: Option<String>,
        /// Cap the copy's bandwidth, MiB per second (default: no cap).
        #[arg(long, value_name = "MIB_S", conflicts_with = "cancel")]
        bandwidth: Option<u64>,
        /// Send memory and disk without TLS (a network you trust; less CPU
        /// per byte). Default: mutual TLS with the cluster's certificates.
        #[arg(long, conflicts_with = "cancel")]
        insecure: bool,
        /// Cancel the VM's migration in flight; it stays where it runs.
        #[arg(long)]
        cancel: bool,
        /// Return at once instead of following the migration.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a VM.
    Start {
        /// The VM.
        name: String,
        /// Wait until its service answers.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Stop a VM: ACPI shutdown, then power off after the timeout.
    Stop {
        /// The VM.
        name: String,
        /// Power off at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a graceful shutdown before powering off.
        #[arg(long = "stop-timeout")]
        stop_timeout: Option<u32>,
        /// Return without waiting for it to stop.
        #[arg(long)]
        no_wait: bool,
    },
    /// Reboot a running VM gracefully.
    Reboot {
        /// The VM.
        name: String,
        /// Wait until its service answers again.
        #[arg(long)]
        wait: bool,
    },
    /// Put a VM in exactly these security groups (none: not filtered); a
    /// running VM gets them within a second.
    SetSecurityGroups {
        /// The VM.
        name: String,
        /// A group (repeatable); give none to stop filtering.
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
    },
    /// Set or remove a VM's labels: KEY=VALUE sets one, KEY- removes one.
    Label {
        /// The VM.
        name: String,
        /// KEY=VALUE or KEY- (one or more).
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
    /// Change a VM's type or size (a running VM restarts).
    Resize {
        /// The VM.
        name: String,
        /// New instance type.
        #[arg(long = "type")]
        instance_type: Option<String>,
        /// New vCPU count.
        #[arg(long)]
        vcpus: Option<u32>,
        /// New memory, e.g. 512M or 1G.
        #[arg(long, value_parser = parse_mib)]
        memory: Option<u64>,
        /// Wait until it runs with the new size and its service answers.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a VM and its disk.
    #[command(alias = "rm")]
    Delete {
        /// The VM.
        name: String,
        /// Delete even if it is running.
        #[arg(long, short)]
        force: bool,
        /// Return without waiting until it is gone.
        #[arg(long)]
        no_wait: bool,
        /// Delete its snapshots too (they are kept by default).
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Snapshots (checkpoints) of VMs: create, list, show, delete.
    #[command(subcommand, alias = "snap")]
    Snapshot(SnapshotCommand),
    /// Put a VM back to one of its snapshots: memory, processes and disk
    /// as they were; what was written since is lost.
    Restore {
        /// The VM.
        name: String,
        /// The snapshot.
        snapshot: String,
        /// Wait until the VM runs from the snapshot and its service answers.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Change a VM's settings: its checkpoint schedule.
    Update {
        /// The VM.
        name: String,
        /// Take a checkpoint this often while it runs, e.g. 10m (`off` to stop).
        #[arg(long)]
        checkpoint_every: String,
        /// Scheduled checkpoints to keep (older ones are deleted; manual ones never).
        #[arg(long)]
        keep: Option<u32>,
    },
    /// Attach a volume to a VM (hot-plugged into a running VM).
    AttachVolume {
        /// The VM.
        name: String,
        /// The volume.
        volume: String,
        /// Return without waiting for a running VM to get the disk.
        #[arg(long)]
        no_wait: bool,
    },
    /// Detach a data volume from a VM (hot-unplugged from a running VM).
    DetachVolume {
        /// The VM.
        name: String,
        /// The volume.
        volume: String,
        /// Return without waiting until the volume is free.
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the VM's serial console output.
    #[command(alias = "logs")]
    Console {
        /// The VM.
        name: String,
        /// Keep printing new output.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N bytes.
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Run COMMAND in a running container, as its root: prints its output
    /// and exits with its status.
    Exec {
        /// The container.
        name: String,
        /// Kill it after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        /// Feed this process's standard input to it (read to its end first).
        #[arg(long, short = 'i', conflicts_with = "tty")]
        stdin: bool,
        /// Run it on a terminal, interactively (keystrokes go to it as you
        /// type; Ctrl-] ends the session).
        #[arg(long, short = 't')]
        tty: bool,
        /// The command and its arguments.
        #[arg(last = true, value_name = "COMMAND", required = true)]
        command: Vec<String>,
    },
    /// Log in to the VM with SSH as its image's default user (images with
    /// cloud-init), or run COMMAND there.
    Ssh {
        /// The VM.
        name: String,
        /// The private key to use (default: ssh's own choice).
        #[arg(short = 'i', long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The user (default: the image's, e.g. debian).
        #[arg(short = 'l', long)]
        user: Option<String>,
        /// A command to run instead of a login shell.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

/// Arguments of `vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name (lowercase letters, digits and '-').
    pub name: String,
    /// What runs it: vm, or container (a root file system image run on the
    /// host's kernel: starts in well under a second, costs megabytes).
    #[arg(long, value_parser = parse_kind, default_value = "vm")]
    pub kind: InstanceKind,
    /// Image to boot (default debian-busybox, debian-rootfs for a
    /// container; a clone takes its snapshot's).
    #[arg(long)]
    pub image: Option<String>,
    /// Clone: start from snapshot VM/SNAPSHOT (its memory, processes and
    /// disk) with a new name, id, MAC and IP.
    #[arg(long, conflicts_with_all = ["image", "instance_type", "vcpus", "memory"])]
    pub from_snapshot: Option<String>,
    /// Take a checkpoint this often while it runs, e.g. 10m.
    #[arg(long)]
    pub checkpoint_every: Option<String>,
    /// Scheduled checkpoints to keep (default 5).
    #[arg(long)]
    pub keep: Option<u32>,
    /// Instance type (see `skyvisor type list`).
    #[arg(long = "type", short = 't')]
    pub instance_type: Option<String>,
    /// vCPUs (overrides the type's).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 512M or 1G (overrides the type's).
    #[arg(long, value_parser = parse_mib)]
    pub memory: Option<u64>,
    /// Root disk size, e.g. 4G (overrides the type's).
    #[arg(long, value_parser = parse_gib, conflicts_with = "root_volume")]
    pub disk: Option<u64>,
    /// Boot from this volume: it is the VM's vda instead of a local disk (a
    /// blank one is filled from a disk image, or formatted, on first start).
    #[arg(long)]
    pub root_volume: Option<String>,
    /// Attach this volume too (vdb, vdc...); repeatable.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// What to do when the VM ends unasked: never, on-failure, always.
    #[arg(long, default_value = "on-failure")]
    pub restart: RestartPolicy,
    /// Create it stopped.
    #[arg(long)]
    pub no_start: bool,
    /// Seconds a graceful stop may take before the VM is powered off.
    #[arg(long)]
    pub stop_timeout: Option<u32>,
    /// Wait until the VM runs and its service answers.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Spread group: never on a host that already runs a VM of this group
    /// (replicas of a service on different hosts).
    #[arg(long)]
    pub spread_group: Option<String>,
    /// Only on hosts that run VMs with this accelerator: kvm or tcg.
    #[arg(long)]
    pub accel: Option<Accel>,
    /// When its host dies: restart it on another host (needs a replicated
    /// root disk, which a clustered VM has unless --local-disk; the default
    /// then), or off.
    #[arg(long)]
    pub ha: Option<HaPolicy>,
    /// Restart order after a host's death, higher first (0-1000).
    #[arg(long)]
    pub ha_priority: Option<u32>,
    /// In a cluster: keep the root disk local to the VM's host instead of a
    /// replicated volume (the VM then cannot be restarted elsewhere).
    #[arg(long, conflicts_with_all = ["root_volume", "disk_replicas"])]
    pub local_disk: bool,
    /// In a cluster: the replicas of the VM's root disk, a replicated
    /// volume (1-3; default 2 when two hosts are ready); with 2+ the VM is
    /// restarted elsewhere if its host dies.
    #[arg(long)]
    pub disk_replicas: Option<u32>,
    /// The project's network to join (default: its `default` network).
    #[arg(long)]
    pub network: Option<String>,
    /// A security group to put it in (repeatable); only what its groups
    /// allow reaches it. Default: none, not filtered.
    #[arg(long = "security-group")]
    pub security_groups: Vec<String>,
    /// A label, KEY=VALUE (repeatable), to find it by (`vm list --label`).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A key pair of the project whose public key the guest's default user
    /// accepts (repeatable; images with cloud-init).
    #[arg(long = "key", value_name = "KEYPAIR")]
    pub keys: Vec<String>,
    /// User data for cloud-init at first boot, from FILE: #cloud-config,
    /// a #! script or MIME multipart, at most 16 KiB.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// The guest's hostname (default: the VM's name).
    #[arg(long)]
    pub hostname: Option<String>,
}

/// A `KEY=VALUE` label argument (the server checks their shape).
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Applies `vm label` changes (`KEY=VALUE` sets, `KEY-` removes) to
/// `labels`.
fn apply_label_changes(
    labels: &mut skyvisor_core::labels::Labels,
    changes: &[String],
) -> Result<()> {
    for c in changes {
        if let Some((k, v)) = c.split_once('=') {
            labels.insert(k.to_string(), v.to_string());
        } else if let Some(k) = c.strip_suffix('-') {
            labels.remove(k);
        } else {
            anyhow::bail!("{c:?} is neither KEY=VALUE (set a label) nor KEY- (remove one)");
        }
    }
    Ok(())
}

/// `skyvisor image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    #[command(alias = "ls")]
    List,
    /// Show one image.
    Show {
        /// The image.
        name: String,
    },
    /// Build an image from a built-in recipe (from Debian packages).
    Build {
        /// Name of the new image.
        name: String,
        /// The recipe (default: the one named like the image, e.g.
        /// debian-12, else debian-busybox).
        #[arg(long)]
        recipe: Option<String>,
        /// Return without waiting for the build.
        #[arg(long)]
        no_wait: bool,
    },
    /// Import a disk image (qcow2 or raw, booted by firmware) or a kernel and initrd.
    Import {
        /// Name of the new image.
        name: String,
        /// A bootable disk image.
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "oci"])]
        disk: Option<PathBuf>,
        /// A container image: an OCI image layout or docker-archive tarball
        /// (as `docker save` or `skopeo copy ... oci-archive:` write), for
        /// `vm create --kind container`.
        #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
        oci: Option<PathBuf>,
        /// A Linux kernel.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// An initrd for the kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// One line for people.
        #[arg(long)]
        description: Option<String>,
        /// The guest runs Skyvisor's guest service on port 80 (readiness is checked).
        #[arg(long)]
        guest_service: bool,
        /// The user cloud-init gives the VM's SSH keys (`debian`, `ubuntu`...),
        /// for `vm ssh`.
        #[arg(long)]
        ssh_user: Option<String>,
        /// The image runs cloud-init and the QEMU guest agent: `vm create
        /// --wait` waits until cloud-init reports it has finished.
        #[arg(long)]
        cloud_init: bool,
    },
    /// Delete an image no VM uses.
    #[command(alias = "rm")]
    Delete {
        /// The image.
        name: String,
    },
}

/// `skyvisor host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List hosts.
    #[command(alias = "ls")]
    List,
    /// A live table of the hosts: CPU, memory, disk, network and VMs,
    /// refreshed in place (cluster admins and monitors).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one table (after one interval) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show one host (the only one if omitted).
    Show {
        /// The host.
        name: Option<String>,
    },
    /// Keep new VMs off a host.
    Cordon {
        /// The host.
        name: String,
    },
    /// Let new VMs land on a host again.
    Uncordon {
        /// The host.
        name: String,
    },
    /// Maintenance: keep new VMs off a host and live-migrate its running
    /// VMs to other hosts, one at a time.
    Drain {
        /// The host.
        name: String,
        /// Return at once instead of waiting until no running VM is left.
        #[arg(long)]
        no_wait: bool,
    },
    /// Return a drained host to service.
    Undrain {
        /// The host.
        name: String,
    },
    /// Even out memory allocation across hosts by live-migrating VMs, one
    /// migration at a time.
    Rebalance {
        /// At most this many migrations (default 3).
        #[arg(long)]
        max_moves: Option<u32>,
    },
    /// Make a join token: one new host may join with it (`skyvisor agent
    /// --server URL --join-token TOKEN`) before it expires. Shown once.
    JoinToken {
        /// How long it may be used, like 30m or 2h (at most 7d).
        #[arg(long, default_value = "1h", value_parser = crate::tokens::parse_expiry)]
        ttl: u64,
    },
}

/// `skyvisor type ...`
#[derive(Debug, Subcommand)]
pub enum TypeCommand {
    /// List instance types.
    #[command(alias = "ls")]
    List,
}

/// Runs a client command: `remote` and `login` work on the config file;
/// the others resolve the connection `args` describe and call the API.
pub async fn run(args: ConnectionArgs, format: OutputFormat, cmd: ClientCommand) -> Result<()> {
    let cmd = match cmd {
        ClientCommand::Remote(c) => return crate::remotes::remote(&args, format, c).await,
        ClientCommand::Login => return crate::auth::login(&args, format).await,
        other => other,
    };
    let conn = args.connect()?;
    let client = conn.client();
    match cmd {
        ClientCommand::Remote(_) | ClientCommand::Login => Ok(()),
        ClientCommand::Whoami => crate::auth::whoami(&client, &conn, format).await,
        ClientCommand::Event(EventCommand::List {
            vm,
            follow,
            cluster,
            limit,
        }) => {
            crate::events::list(
                &client,
                format,
                crate::events::EventArgs {
                    vm,
                    follow,
                    cluster,
                    limit,
                },
            )
            .await
        }
        ClientCommand::Usage { from, to, csv } => {
            crate::billing::usage(&client, format, from, to, csv).await
        }
        ClientCommand::Invoice { month, csv } => {
            let month = month.unwrap_or_else(|| chrono::Utc::now().format("%Y-%m").to_string());
            crate::billing::invoice(&client, format, &month, csv).await
        }
        ClientCommand::PriceSheet(PriceSheetCommand::Show) => {
            crate::billing::show_price_sheet(&client, format).await
        }
        ClientCommand::PriceSheet(PriceSheetCommand::Set { file }) => {
            crate::billing::set_price_sheet(&client, format, &file).await
        }
        ClientCommand::Audit { limit, cluster } => {
            crate::auth::audit(&client, format, limit, cluster).await
        }
        ClientCommand::Project(c) => crate::projects::project(&client, format, c).await,
        ClientCommand::Identity(c) => crate::identities::identity(&client, format, c).await,
        ClientCommand::Token(c) => crate::tokens::token(&client, format, c).await,
        ClientCommand::Vm(c) => vm(&client, format, c).await,
        ClientCommand::Image(c) => image(&client, format, c).await,
        ClientCommand::Host(c) => host(&client, format, c).await,
        ClientCommand::Volume(c) => crate::volumes::volume(&client, format, c).await,
        ClientCommand::Network(c) => crate::networks::network(&client, format, c).await,
        ClientCommand::SecurityGroup(c) => {
            crate::networks::security_group(&client, format, c).await
        }
        ClientCommand::Keypair(c) => crate::keypairs::keypair(&client, format, c).await,
        ClientCommand::Group(c) => crate::groups::group(&client, format, c).await,
        ClientCommand::Lb(c) => crate::lbs::lb(&client, format, c).await,
        ClientCommand::Dns(c) => crate::dns::dns(&client, format, c).await,
        ClientCommand::Migration(c) => crate::migrations::migration(&client, format, c).await,
        ClientCommand::Failover(c) => crate::failovers::failover(&client, format, c).await,
        ClientCommand::Type(TypeCommand::List) => {
            let types: Vec<InstanceType> = client.get("/v1/types").await?;
            output::print(format, &types, |types| {
                let mut t = table(&["TYPE", "VCPU", "MEMORY", "DISK", "DESCRIPTION"]);
                for ty in types {
                    t.add_row(vec![
                        ty.name.to_string(),
                        ty.resources.vcpus.to_string(),
                        mib(ty.resources.memory_mib),
                        format!("{} GiB", ty.resources.disk_gib),
                        ty.description.clone(),
                    ]);
                }
                println!("{t}");
            });
            Ok(())
        }
        ClientCommand::Info => {
            let info: ServerInfo = client.get("/v1/info").await?;
            output::print(format, &info, |i| {
                println!(
                    "{}",
                    kv(&[
                        ("api", client.base().to_string()),
                        ("version", i.version.clone()),
                        (
                            "store",
                            if i.store_ok {
                                i.store.clone()
                            } else {
                                format!("{} (unreachable)", i.store)
                            }
                        ),
                        ("hosts", i.hosts.to_string()),
                        ("server", i.server.clone().unwrap_or_default()),
                        ("leader", i.leader.clone().unwrap_or_else(|| "none".into())),
                        (
                            "servers",
                            i.servers
                                .iter()
                                .map(|s| format!("{} ({})", s.name, s.url))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ])
                );
            });
            Ok(())
        }
    }
}

fn phase_text(i: &Instance) -> String {
    let s = &i.status;
    match s.phase {
        InstancePhase::Running if s.guest_ready || !s.readiness_checked() => "running".into(),
        InstancePhase::Running => "running (booting)".into(),
        p => p.to_string(),
    }
}

fn vm_table(list: &[Instance]) {
    let mut t = table(&[
        "NAME", "STATE", "KIND", "TYPE", "VCPU", "MEMORY", "IP", "HOST", "UPTIME",
    ]);
    let now = Utc::now();
    for i in list {
        let uptime = match (i.status.phase, i.status.started_at) {
            (InstancePhase::Running, Some(at)) => ago((now - at).num_seconds()),
            _ => "-".into(),
        };
        t.add_row(vec![
            i.spec.name.to_string(),
            phase_text(i),
            i.spec.kind.to_string(),
            i.spec.type_label(),
            i.spec.resources.vcpus.to_string(),
            mib(i.spec.resources.memory_mib),
            i.spec.network.ip.to_string(),
            i.spec.host.to_string(),
            uptime,
        ]);
    }
    println!("{t}");
}

/// The `ssh` command line that reaches a VM's default user from a host of
/// its network, when its image names that user.
pub fn ssh_command(i: &Instance) -> Option<String> {
    let user = i.spec.guest.ssh_user.as_deref()?;
    Some(format!("ssh {user}@{}", i.spec.network.ip))
}

/// The arguments of `ssh` that reach `i`: its image's user unless `user`,
/// the host key remembered under the VM's id (an address a deleted VM had
/// may come back with another VM, whose key must not be taken for a
/// forgery), and accepted the first time.
fn ssh_args(
    i: &Instance,
    identity: Option<&std::path::Path>,
    user: Option<&str>,
    command: &[String],
) -> Result<Vec<String>> {
    if i.spec.network.vni.is_some() {
        bail!(
            "VM {} is on the private network {}, which only its own members reach; \
             SSH from another VM of that network",
            i.spec.name,
            i.spec.network.network
        );
    }
    let Some(user) = user.or(i.spec.guest.ssh_user.as_deref()) else {
        bail!(
            "image {} names no SSH user (it was imported without --ssh-user); give --user",
            i.spec.image
        );
    };
    let mut args = vec![
        "-o".to_string(),
        format!("HostKeyAlias=skyvisor-{}", i.spec.id),
        "-o".into(),
        "StrictHostKeyChecking=accept-new".into(),
    ];
    if let Some(key) = identity {
        args.push("-i".into());
        args.push(key.to_string_lossy().into_owned());
    }
    args.push(format!("{user}@{}", i.spec.network.ip));
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command.iter().cloned());
    }
    Ok(args)
}

/// User data read from `path`: text, since cloud-init's forms are text.
pub(crate) fn read_user_data(path: &std::path::Path) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read user data {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "user data {} is not UTF-8 text; allowed: {}",
            path.display(),
            skyvisor_cloudinit::KNOWN_FORMS
        )
    })?;
    // The server refuses what cloud-init cannot read; data of no form it
    // knows is allowed (as on EC2) but most likely a mistake.
    if skyvisor_cloudinit::check_user_data(&text)
        == Ok(skyvisor_cloudinit::UserDataFormat::Unrecognized)
    {
        eprintln!(
            "warning: cloud-init will ignore user data {}: it starts with none of {}",
            path.display(),
            skyvisor_cloudinit::KNOWN_FORMS
        );
    }
    Ok(text)
}

/// What to call an instance in messages: "VM" or "container".
fn kind_word(i: &Instance) -> &'static str {
    match i.spec.kind {
        InstanceKind::Vm => "VM",
        InstanceKind::Container => "container",
    }
}

/// Parses `--kind`: vm or container.
pub(crate) fn parse_kind(s: &str) -> Result<InstanceKind, String> {
    match s {
        "vm" => Ok(InstanceKind::Vm),
        "container" => Ok(InstanceKind::Container),
        other => Err(format!("unknown kind {other:?}; allowed: vm, container")),
    }
}

fn vm_detail(i: &Instance) {
    let s = &i.status;
    let mut rows = vec![
        ("name", i.spec.name.to_string()),
        ("id", i.spec.id.to_string()),
        ("state", phase_text(i)),
        (
            "desired",
            match i.spec.power {
                PowerState::Running => "running".into(),
                PowerState::Stopped => "stopped".into(),
            },
        ),
        ("kind", i.spec.kind.to_string()),
        ("image", i.spec.image.to_string()),
        ("type", i.spec.type_label()),
        (
            "size",
            format!(
                "{} vCPU, {}, {} GiB disk",
                i.spec.resources.vcpus,
                mib(i.spec.resources.memory_mib),
                i.spec.resources.disk_gib
            ),
        ),
        ("ip", i.spec.network.ip.to_string()),
        ("url", format!("http://{}/", i.spec.network.ip)),
        ("ssh", ssh_command(i).unwrap_or_else(|| "-".into())),
        (
            "cloud-init",
            match (&s.cloud_init, s.guest_agent_channel) {
                (Some(r), _) if r.errors.is_empty() => format!("finished ({})", r.datasource),
                (Some(r), _) => format!("finished with errors: {}", r.errors.join("; ")),
                (None, true) if s.phase == InstancePhase::Running => {
                    "not reported yet (the image may have no cloud-init or guest agent)".into()
                }
                _ => "-".into(),
            },
        ),
        (
            "guest addresses",
            if s.guest_addresses.is_empty() {
                "-".into()
            } else {
                s.guest_addresses.join(", ")
            },
        ),
        ("mac", i.spec.network.mac.to_string()),
        ("host", i.spec.host.to_string()),
        (
            "labels",
            if i.spec.labels.is_empty() {
                "-".into()
            } else {
                i.spec
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "volumes",
            if i.spec.volumes.is_empty() {
                "-".into()
            } else {
                i.spec
                    .volumes
                    .iter()
                    .map(|v| {
                        let plugged = s.attached_volumes.contains(&v.name);
                        format!(
                            "{}{}{}",
                            v.name,
                            if v.root { " (root)" } else { "" },
                            if plugged || s.phase != InstancePhase::Running {
                                ""
                            } else {
                                " (attaching)"
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        ("restart", i.spec.restart_policy.to_string()),
        (
            "ha",
            match (i.spec.ha, i.spec.root_volume()) {
                (HaPolicy::Restart, _) => format!(
                    "restart (priority {}): restarted on another host if {} dies",
                    i.spec.ha_priority, i.spec.host
                ),
                (HaPolicy::Off, None) => {
                    "off: not protected (its disk is local to its host)".to_string()
                }
                (HaPolicy::Off, Some(_)) => "off: not protected (--ha off)".to_string(),
            },
        ),
        ("boots", s.boot_count.to_string()),
        ("restarts", s.restart_count.to_string()),
    ];
    if let Some(c) = &i.spec.checkpoint_schedule {
        rows.push((
            "checkpoints",
            format!("every {}s, keep {}", c.every_secs, c.keep),
        ));
    }
    if let Some(c) = &i.spec.clone_of {
        rows.push(("clone of", format!("{}/{}", c.instance, c.snapshot)));
    }
    if let Some(r) = &s.restored_from {
        rows.push(("restored from", r.clone()));
    }
    if let Some(a) = s.accel {
        rows.push(("accel", a.to_string()));
    }
    if let Some(pid) = s.pid {
        rows.push(("pid", pid.to_string()));
    }
    if let Some(at) = s.started_at {
        rows.push(("started", at.to_rfc3339()));
    }
    if let (Some(a), Some(b)) = (s.started_at, s.ready_at) {
        rows.push((
            "boot time",
            format!("{:.1}s", (b - a).num_milliseconds() as f64 / 1000.0),
        ));
    }
    if let Some(e) = &s.last_exit {
        rows.push((
            "last exit",
            format!(
                "{} at {}: {}",
                serde_json::to_value(e.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                e.at.to_rfc3339(),
                e.detail
            ),
        ));
    }
    if let Some(m) = &s.message {
        rows.push(("message", m.clone()));
    }
    println!("{}", kv(&rows));
}

/// What a wait is for.
#[derive(Clone, Copy, PartialEq)]
enum Goal {
    /// Running and (when the image has one) its service answers.
    Ready,
    /// Stopped.
    Stopped,
    /// Gone.
    Deleted,
}

/// Polls the VM until `goal`, showing progress; fails if it fails.
async fn wait_for(
    client: &Client,
    name: &str,
    goal: Goal,
    timeout: Duration,
    quiet: bool,
    min_boots: u64,
    min_generation: u64,
) -> Result<Option<Instance>> {
    let mut progress = Progress::new(quiet);
    let path = format!("/v1/instances/{name}");
    loop {
        let inst: Instance = match client.get(&path).await {
            Ok(i) => i,
            Err(e) if goal == Goal::Deleted && e.is_not_found() => {
                progress.finish();
                return Ok(None);
            }
            Err(e) => {
                progress.finish();
                return Err(e.into());
            }
        };
        let s = &inst.status;
        let done = match goal {
            Goal::Ready => {
                s.phase == InstancePhase::Running
                    && (s.guest_ready || !s.readiness_checked())
                    && s.boot_count >= min_boots
            }
            Goal::Stopped => matches!(s.phase, InstancePhase::Stopped),
            Goal::Deleted => false,
        };
        if done {
            progress.finish();
            return Ok(Some(inst));
        }
        // A failure counts only once the agent has seen this request.
        if goal != Goal::Deleted
            && s.phase == InstancePhase::Failed
            && s.observed_generation >= min_generation
        {
            progress.finish();
            bail!(
                "VM {name} failed: {}",
                s.message
                    .clone()
                    .unwrap_or_else(|| "no reason given".into())
            );
        }
        let msg = match (s.phase, s.guest_ready) {
            (InstancePhase::Running, false) if goal == Goal::Ready => {
                format!(
                    "{name}: booting, waiting for its service at http://{}/",
                    inst.spec.network.ip
                )
            }
            (p, _) => format!("{name}: {p}"),
        };
        progress.set(&msg);
        if progress.elapsed() > timeout {
            progress.finish();
            bail!(
                "timed out after {}s waiting for VM {name} (it is {}); see `skyvisor vm console {name}`",
                timeout.as_secs(),
                s.phase
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn vm(client: &Client, format: OutputFormat, cmd: VmCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        VmCommand::Create(a) => {
            let instance_type = match (&a.instance_type, a.vcpus, a.memory, &a.from_snapshot) {
                (None, None, None, None) => Some("small".to_string()),
                (t, _, _, _) => t.clone(),
            };
            let image = match (&a.image, &a.from_snapshot) {
                (Some(i), _) => i.clone(),
                (None, Some(_)) => String::new(),
                (None, None) if a.kind == InstanceKind::Container => "debian-rootfs".to_string(),
                (None, None) => "debian-busybox".to_string(),
            };
            let req = CreateInstanceRequest {
                name: a.name.clone(),
                kind: (a.kind == InstanceKind::Container).then_some(a.kind),
                image,
                instance_type,
                vcpus: a.vcpus,
                memory_mib: a.memory,
                disk_gib: a.disk,
                restart_policy: Some(a.restart),
                start: Some(!a.no_start),
                stop_timeout_secs: a.stop_timeout,
                from_snapshot: a.from_snapshot.clone(),
                checkpoint_schedule: snapshots::schedule(a.checkpoint_every.as_deref(), a.keep)?,
                spread_group: a.spread_group.clone(),
                accel: a.accel,
                root_volume: a.root_volume.clone(),
                volumes: a.volumes.clone(),
                ha: a.ha,
                ha_priority: a.ha_priority,
                local_disk: a.local_disk.then_some(true),
                disk_replicas: a.disk_replicas,
                network: a.network.clone(),
                security_groups: a.security_groups.clone(),
                labels: a.labels.iter().cloned().collect(),
                keys: a.keys.clone(),
                user_data: match &a.user_data {
                    Some(path) => Some(read_user_data(path)?),
                    None => None,
                },
                hostname: a.hostname.clone(),
            };
            if a.wait {
                // Right after `skyvisor up` the host may not have registered
                // yet and the image may still be building: wait for both.
                let needs = Needs {
                    image: (!req.image.is_empty()).then_some(req.image.as_str()),
                    hosts: 1,
                };
                readiness::wait_for(client, needs, Duration::from_secs(a.timeout), quiet).await?;
            }
            let mut inst: Instance = client.post("/v1/instances", &req).await?;
            if a.wait && !a.no_start {
                let started = std::time::Instant::now();
                if let Some(i) = wait_for(
                    client,
                    &a.name,
                    Goal::Ready,
                    Duration::from_secs(a.timeout),
                    quiet,
                    1,
                    inst.spec.generation,
                )
                .await?
                {
                    inst = i;
                }
                if !quiet {
                    let took = started.elapsed().as_secs_f64();
                    match ssh_command(&inst) {
                        Some(ssh) if inst.status.cloud_init_expected => eprintln!(
                            "VM {} is ready after {took:.1}s (cloud-init finished): {ssh}",
                            a.name
                        ),
                        _ => eprintln!(
                            "{} {} is ready after {took:.1}s: http://{}/",
                            kind_word(&inst),
                            a.name,
                            inst.spec.network.ip
                        ),
                    }
                }
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Top { interval, once } => {
            crate::top::vm_top(client, format, crate::top::TopArgs { interval, once }).await?
        }
        VmCommand::Exec {
            name,
            timeout,
            stdin,
            tty,
            command,
        } => {
            if tty {
                let code = crate::terminal::exec_tty(client, &name, &command, timeout).await?;
                std::process::exit(code.clamp(0, 255));
            }
            let input = if stdin {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading standard input")?;
                Some(text)
            } else {
                None
            };
            let req = skyvisor_core::api::ExecRequest {
                command,
                stdin: input,
                timeout_secs: Some(timeout),
            };
            let r: skyvisor_core::api::ExecResult = client
                .post(&format!("/v1/instances/{name}/exec"), &req)
                .await?;
            if quiet {
                output::print(format, &r, |_| {});
            } else {
                use std::io::Write;
                let _ = std::io::stdout().write_all(r.stdout.as_bytes());
                let _ = std::io::stderr().write_all(r.stderr.as_bytes());
                if r.timed_out {
                    eprintln!("skyvisor: the command ran past {timeout}s and was killed");
                }
                if r.truncated {
                    eprintln!("skyvisor: the output was longer than 1 MiB and was cut");
                }
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(r.exit_code.clamp(0, 255));
        }
        VmCommand::List { label } => {
            let path = match label {
                Some(l) => format!("/v1/instances?label={}", crate::client::path_segment(&l)),
                None => "/v1/instances".to_string(),
            };
            let list: Vec<Instance> = client.get(&path).await?;
            output::print(format, &list, |l| vm_table(l));
        }
        VmCommand::Show { name } => {
            let inst: Instance = client.get(&format!("/v1/instances/{name}")).await?;
            output::print(format, &inst, vm_detail);
            if format == OutputFormat::Table {
                // Whether the protection holds right now, and why not.
                if let Some(p) = &inst.protection {
                    println!("protection: {}", p.state);
                    for r in &p.reasons {
                        println!("  - {r}");
                    }
                }
                // Its last failover, if it had one (a detail for people).
                let all: Vec<skyvisor_core::FailoverRecord> =
                    client.get("/v1/failovers").await.unwrap_or_default();
                if let Some(f) = all.iter().rev().find(|f| f.instance.as_str() == name) {
                    let took = f
                        .rebound_at
                        .and_then(|r| (r - f.lease_lost_at).to_std().ok())
                        .map(|d| {
                            format!(
                                ", rebound {:.1}s after its host's lease was lost",
                                d.as_secs_f64()
                            )
                        })
                        .unwrap_or_default();
                    println!(
                        "last failover: {} from {} to {} at {}{took}: {}",
                        match f.outcome {
                            skyvisor_core::FailoverOutcome::Restarted => "restarted",
                            skyvisor_core::FailoverOutcome::Refused => "refused",
                        },
                        f.from_host,
                        f.to_host
                            .as_ref()
                            .map_or("-".to_string(), |h| h.to_string()),
                        f.declared_dead_at.format("%Y-%m-%d %H:%M:%S"),
                        f.reason
                    );
                }
            }
        }
        VmCommand::Start {
            name,
            wait,
            timeout,
        } => {
            let before: Instance = client.get(&format!("/v1/instances/{name}")).await?;
            let mut inst: Instance = client
                .post(
                    &format!("/v1/instances/{name}/start"),
                    &serde_json::json!({}),
                )
                .await?;
            if wait {
                let need = if before.status.phase == InstancePhase::Running {
                    before.status.boot_count
                } else {
                    before.status.boot_count + 1
                };
                if let Some(i) = wait_for(
                    client,
                    &name,
                    Goal::Ready,
                    Duration::from_secs(timeout),
                    quiet,
                    need,
                    inst.spec.generation,
                )
                .await?
                {
                    inst = i;
                }
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Stop {
            name,
            force,
            stop_timeout,
            no_wait,
        } => {
            let req = StopInstanceRequest {
                force,
                timeout_secs: stop_timeout,
            };
            let mut inst: Instance = client
                .post(&format!("/v1/instances/{name}/stop"), &req)
                .await?;
            if !no_wait {
                let limit = u64::from(stop_timeout.unwrap_or(inst.spec.stop_timeout_secs)) + 60;
                if let Some(i) = wait_for(
                    client,
                    &name,
                    Goal::Stopped,
                    Duration::from_secs(limit),
                    quiet,
                    0,
                    inst.spec.generation,
                )
                .await?
                {
                    inst = i;
                }
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Reboot { name, wait } => {
            let mut inst: Instance = client
                .post(
                    &format!("/v1/instances/{name}/reboot"),
                    &serde_json::json!({}),
                )
                .await?;
            if wait {
                let need = inst.status.boot_count + 1;
                if let Some(i) = wait_for(
                    client,
                    &name,
                    Goal::Ready,
                    Duration::from_secs(300),
                    quiet,
                    need,
                    inst.spec.generation,
                )
                .await?
                {
                    inst = i;
                }
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Label { name, changes } => {
            let path = format!("/v1/instances/{}", crate::client::path_segment(&name));
            let current: Instance = client.get(&path).await?;
            let mut labels = current.spec.labels.clone();
            apply_label_changes(&mut labels, &changes)?;
            let inst: Instance = client
                .call(
                    Method::PUT,
                    &format!("{path}/labels"),
                    Some(&skyvisor_core::api::SetLabelsRequest { labels }),
                )
                .await?;
            output::print(format, &inst, vm_detail);
        }
        VmCommand::SetSecurityGroups {
            name,
            security_groups,
        } => {
            let inst: Instance = client
                .call(
                    Method::PUT,
                    &format!(
                        "/v1/instances/{}/security-groups",
                        crate::client::path_segment(&name)
                    ),
                    Some(&skyvisor_core::api::SetSecurityGroupsRequest { security_groups }),
                )
                .await?;
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Resize {
            name,
            instance_type,
            vcpus,
            memory,
            wait,
        } => {
            let before: Instance = client.get(&format!("/v1/instances/{name}")).await?;
            let req = ResizeInstanceRequest {
                instance_type,
                vcpus,
                memory_mib: memory,
            };
            let mut inst: Instance = client
                .post(&format!("/v1/instances/{name}/resize"), &req)
                .await?;
            if wait && before.spec.power == PowerState::Running {
                let need = before.status.boot_count + 1;
                if let Some(i) = wait_for(
                    client,
                    &name,
                    Goal::Ready,
                    Duration::from_secs(300),
                    quiet,
                    need,
                    inst.spec.generation,
                )
                .await?
                {
                    inst = i;
                }
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Delete {
            name,
            force,
            no_wait,
            with_snapshots,
        } => {
            let inst: Instance = client
                .call::<(), Instance>(
                    Method::DELETE,
                    &format!("/v1/instances/{name}?force={force}&with_snapshots={with_snapshots}"),
                    None,
                )
                .await?;
            if !no_wait {
                wait_for(
                    client,
                    &name,
                    Goal::Deleted,
                    Duration::from_secs(120),
                    quiet,
                    0,
                    0,
                )
                .await?;
                if !quiet {
                    eprintln!(
                        "{} {name} deleted{}",
                        kind_word(&inst),
                        if with_snapshots {
                            " with its snapshots"
                        } else if inst.spec.kind == InstanceKind::Container {
                            ""
                        } else {
                            "; its snapshots are kept (see `skyvisor vm snapshot list`)"
                        }
                    );
                }
            }
            if quiet {
                output::print(format, &inst, |_| {});
            }
        }
        VmCommand::Snapshot(c) => snapshots::snapshot(client, format, c).await?,
        VmCommand::Restore {
            name,
            snapshot,
            wait,
            timeout,
        } => {
            let started = std::time::Instant::now();
            let inst = snapshots::restore(
                client,
                format,
                &name,
                &snapshot,
                wait,
                Duration::from_secs(timeout),
            )
            .await?;
            if wait && !quiet {
                eprintln!(
                    "VM {name} restored from {snapshot}; it answers after {:.2}s",
                    started.elapsed().as_secs_f64()
                );
            }
            output::print(format, &inst, |i| vm_table(std::slice::from_ref(i)));
        }
        VmCommand::Update {
            name,
            checkpoint_every,
            keep,
        } => {
            let schedule = snapshots::schedule(Some(&checkpoint_every), keep)?;
            let inst = snapshots::update_schedule(client, &name, schedule).await?;
            output::print(format, &inst, vm_detail);
        }
        VmCommand::AttachVolume {
            name,
            volume,
            no_wait,
        } => crate::volumes::attach(client, format, &name, &volume, !no_wait).await?,
        VmCommand::DetachVolume {
            name,
            volume,
            no_wait,
        } => crate::volumes::detach(client, format, &name, &volume, !no_wait).await?,
        VmCommand::Migrate {
            name,
            to,
            bandwidth,
            insecure,
            cancel,
            no_wait,
        } => {
            let request = skyvisor_core::api::MigrateInstanceRequest {
                to,
                max_bandwidth_mib_s: bandwidth,
                insecure,
            };
            crate::migrations::migrate(client, format, &name, request, cancel, !no_wait).await?
        }
        VmCommand::Ssh {
            name,
            identity,
            user,
            command,
        } => {
            let inst: Instance = client.get(&format!("/v1/instances/{name}")).await?;
            let args = ssh_args(&inst, identity.as_deref(), user.as_deref(), &command)?;
            // ssh takes over the terminal; its exit status is ours.
            let status = std::process::Command::new("ssh")
                .args(&args)
                .status()
                .context("cannot run ssh (install openssh-client)")?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(255));
            }
        }
        VmCommand::Console { name, follow, tail } => {
            let mut offset: i64 = match tail {
                Some(n) => -(i64::try_from(n).unwrap_or(i64::MAX)),
                None => 0,
            };
            loop {
                let log: ConsoleLog = client
                    .get(&format!(
                        "/v1/instances/{name}/console?offset={offset}&max_bytes=1048576"
                    ))
                    .await?;
                use std::io::Write;
                let mut out = std::io::stdout();
                out.write_all(log.text.as_bytes())?;
                out.flush()?;
                offset = i64::try_from(log.offset + log.text.len() as u64).unwrap_or(i64::MAX);
                if !follow {
                    if log.text.len() < 1 << 20 {
                        break;
                    }
                    continue;
                }
                if log.text.is_empty() {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
    Ok(())
}

fn image_table(list: &[Image]) {
    let mut t = table(&["NAME", "STATE", "KIND", "SIZE", "SOURCE", "DESCRIPTION"]);
    for i in list {
        let state = match (&i.state, &i.message) {
            (ImageState::Building, Some(m)) => format!("building: {m}"),
            (ImageState::Failed, Some(m)) => format!("failed: {m}"),
            (s, _) => serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        };
        t.add_row(vec![
            i.name.to_string(),
            state,
            i.kind.to_string(),
            format!("{:.1} MiB", i.size_bytes() as f64 / 1048576.0),
            match &i.source {
                skyvisor_core::ImageSource::Recipe { recipe, .. } => format!("recipe {recipe}"),
                skyvisor_core::ImageSource::Import => "import".into(),
            },
            i.description.clone(),
        ]);
    }
    println!("{t}");
}

async fn image(client: &Client, format: OutputFormat, cmd: ImageCommand) -> Result<()> {
    let quiet = format == OutputFormat::Json;
    match cmd {
        ImageCommand::List => {
            let list: Vec<Image> = client.get("/v1/images").await?;
            output::print(format, &list, |l| image_table(l));
        }
        ImageCommand::Show { name } => {
            let img: Image = client.get(&format!("/v1/images/{name}")).await?;
            output::print(format, &img, |i| {
                image_table(std::slice::from_ref(i));
                let mut t = table(&["FILE", "ROLE", "SIZE", "SHA256"]);
                for f in &i.files {
                    t.add_row(vec![
                        f.file_name.clone(),
                        format!("{:?}", f.role).to_lowercase(),
                        format!("{} bytes", f.size_bytes),
                        f.sha256.clone(),
                    ]);
                }
                println!("{t}");
                if let skyvisor_core::ImageSource::Recipe { packages, .. } = &i.source
                    && !packages.is_empty()
                {
                    println!("built from: {}", packages.join(", "));
                }
            });
        }
        ImageCommand::Build {
            name,
            recipe,
            no_wait,
        } => {
            let mut img: Image = client
                .post(
                    "/v1/images/build",
                    &BuildImageRequest {
                        name: name.clone(),
                        recipe: recipe.unwrap_or_else(|| {
                            if name == "debian-12" {
                                name.clone()
                            } else {
                                "debian-busybox".into()
                            }
                        }),
                    },
                )
                .await?;
            if !no_wait {
                let mut progress = Progress::new(quiet);
                loop {
                    img = client.get(&format!("/v1/images/{name}")).await?;
                    match img.state {
                        ImageState::Ready => break,
                        ImageState::Failed => {
                            progress.finish();
                            bail!(
                                "image {name} failed to build: {}",
                                img.message.unwrap_or_default()
                            );
                        }
                        ImageState::Building => {
                            progress.set(&format!(
                                "building {name}: {}",
                                img.message.clone().unwrap_or_default()
                            ));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                progress.finish();
            }
            output::print(format, &img, |i| image_table(std::slice::from_ref(i)));
        }
        ImageCommand::Import {
            name,
            disk,
            oci,
            kernel,
            initrd,
            cmdline,
            description,
            guest_service,
            ssh_user,
            cloud_init,
        } => {
            let mut form = reqwest::multipart::Form::new();
            let mut parts = Vec::new();
            if let Some(d) = disk {
                parts.push(("disk", d));
            }
            if let Some(o) = oci {
                parts.push(("oci", o));
            }
            if let Some(k) = kernel {
                parts.push(("kernel", k));
            }
            if let Some(i) = initrd {
                parts.push(("initrd", i));
            }
            if parts.is_empty() {
                bail!("give --disk FILE, or --kernel FILE (and --initrd FILE), or --oci FILE");
            }
            // The server refuses a taken name before reading the upload and
            // closes the connection; ask first so the user sees why.
            match client.get::<Image>(&format!("/v1/images/{name}")).await {
                Ok(_) => bail!("image \"{name}\" already exists"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            let mut progress = Progress::new(quiet);
            for (part, path) in parts {
                let file = tokio::fs::File::open(&path)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                let len = file.metadata().await?.len();
                progress.set(&format!(
                    "uploading {} ({:.1} MiB)",
                    path.display(),
                    len as f64 / 1048576.0
                ));
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                form = form.part(
                    part,
                    reqwest::multipart::Part::stream_with_length(body, len).file_name(part),
                );
            }
            let mut query = vec![
                ("name", name.clone()),
                ("guest_service", guest_service.to_string()),
            ];
            if let Some(c) = cmdline {
                query.push(("cmdline", c));
            }
            if let Some(d) = description {
                query.push(("description", d));
            }
            if let Some(u) = ssh_user {
                query.push(("ssh_user", u));
            }
            if cloud_init {
                query.push(("cloud_init", "true".into()));
            }
            let req = client
                .request(Method::POST, "/v1/images/import")
                .query(&query)
                .multipart(form)
                .timeout(Duration::from_secs(3600));
            let img: Image = client.finish(req).await?;
            progress.finish();
            output::print(format, &img, |i| image_table(std::slice::from_ref(i)));
        }
        ImageCommand::Delete { name } => {
            client
                .call::<(), ()>(Method::DELETE, &format!("/v1/images/{name}"), None)
                .await?;
            if !quiet {
                eprintln!("image {name} deleted");
            }
        }
    }
    Ok(())
}

fn host_table(list: &[HostView]) {
    let mut t = table(&[
        "HOST",
        "STATE",
        "ACCEL",
        "VMS",
        "VCPU (used/total)",
        "MEMORY (used/total)",
        "DISK (used/total)",
        "ADDRESS",
    ]);
    for h in list {
        let a = h.host.capacity.allocatable;
        t.add_row(vec![
            h.host.name.to_string(),
            h.state.to_string(),
            h.host.accel.to_string(),
            h.instances.to_string(),
            format!("{}/{}", h.allocated.vcpus, a.vcpus),
            format!("{}/{}", mib(h.allocated.memory_mib), mib(a.memory_mib)),
            format!("{}/{} GiB", h.allocated.disk_gib, a.disk_gib),
            h.host.address.clone(),
        ]);
    }
    println!("{t}");
}

async fn host(client: &Client, format: OutputFormat, cmd: HostCommand) -> Result<()> {
    let show = |h: &HostView| {
        let c = &h.host.capacity;
        println!(
            "{}",
            kv(&[
                ("name", h.host.name.to_string()),
                ("state", h.state.to_string()),
                ("address", h.host.address.clone()),
                (
                    "accel",
                    format!("{} ({})", h.host.accel, h.host.accel_reason)
                ),
                ("qemu", h.host.qemu_version.clone()),
                (
                    "containers",
                    match (&h.host.container_runtime, &h.host.containers_unavailable) {
                        (Some(r), _) => r.clone(),
                        (None, Some(why)) => format!("none: {why}"),
                        (None, None) => "none".to_string(),
                    },
                ),
                ("agent", h.host.agent_version.clone()),
                ("subnet", h.host.subnet.to_string()),
                (
                    "vm network address",
                    h.host
                        .bridge_address
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                ),
                (
                    "physical",
                    format!(
                        "{} CPU, {}, {} GiB disk ({} MiB free)",
                        c.physical.vcpus,
                        mib(c.physical.memory_mib),
                        c.physical.disk_gib,
                        h.host.disk_free_bytes >> 20
                    )
                ),
                (
                    "overcommit",
                    format!(
                        "cpu {}x, memory {}x, disk {}x",
                        c.overcommit.cpu, c.overcommit.memory, c.overcommit.disk
                    )
                ),
                (
                    "allocatable",
                    format!(
                        "{} vCPU, {}, {} GiB",
                        c.allocatable.vcpus,
                        mib(c.allocatable.memory_mib),
                        c.allocatable.disk_gib
                    )
                ),
                (
                    "allocated",
                    format!(
                        "{} vCPU, {}, {} GiB to {} VMs",
                        h.allocated.vcpus,
                        mib(h.allocated.memory_mib),
                        h.allocated.disk_gib,
                        h.instances
                    )
                ),
                (
                    "free",
                    format!(
                        "{} vCPU, {}, {} GiB",
                        h.free.vcpus,
                        mib(h.free.memory_mib),
                        h.free.disk_gib
                    )
                ),
            ])
        );
    };
    match cmd {
        HostCommand::Top { interval, once } => {
            crate::top::host_top(client, format, crate::top::TopArgs { interval, once }).await?
        }
        HostCommand::List => {
            let list: Vec<HostView> = client.get("/v1/hosts").await?;
            output::print(format, &list, |l| host_table(l));
        }
        HostCommand::Show { name } => {
            let h: HostView = match name {
                Some(n) => client.get(&format!("/v1/hosts/{n}")).await?,
                None => {
                    let mut list: Vec<HostView> = client.get("/v1/hosts").await?;
                    match list.len() {
                        1 => list.remove(0),
                        0 => bail!("no hosts are registered"),
                        n => bail!("{n} hosts are registered; name one (see `skyvisor host list`)"),
                    }
                }
            };
            output::print(format, &h, show);
        }
        HostCommand::Drain { name, no_wait } => {
            crate::migrations::drain(client, format, &name, !no_wait).await?
        }
        HostCommand::Undrain { name } => crate::migrations::undrain(client, format, &name).await?,
        HostCommand::Rebalance { max_moves } => {
            crate::migrations::rebalance(client, format, max_moves).await?
        }
        HostCommand::JoinToken { ttl } => {
            let t: skyvisor_core::cluster::JoinToken = client
                .post(
                    "/v1/cluster/join-tokens",
                    &skyvisor_core::cluster::CreateJoinTokenRequest {
                        ttl_secs: Some(ttl),
                    },
                )
                .await?;
            output::print(format, &t, |t| {
                println!("{}", t.token);
                eprintln!(
                    "good for one host until {}; on the new host run:\n  skyvisor agent --server {} --join-token {}",
                    t.expires_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    client.base(),
                    t.token
                );
            });
        }
        HostCommand::Cordon { name } => {
            let h: HostView = client
                .post(&format!("/v1/hosts/{name}/cordon"), &serde_json::json!({}))
                .await?;
            output::print(format, &h, |h| host_table(std::slice::from_ref(h)));
        }
        HostCommand::Uncordon { name } => {
            let h: HostView = client
                .post(
                    &format!("/v1/hosts/{name}/uncordon"),
                    &serde_json::json!({}),
                )
                .await?;
            output::print(format, &h, |h| host_table(std::slice::from_ref(h)));
        }
    }
    Ok(())
}

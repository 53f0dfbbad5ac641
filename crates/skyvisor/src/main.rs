//! `skyvisor`: the one binary. `up` runs an all-in-one host (API, agent,
//! embedded store); `server` and `agent` run a cluster's control plane and
//! its hosts on etcd; every other command is a client of the REST API.

mod agent;
mod config;
mod daemon;
mod server;
mod tls;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use skyvisor_cli::{ClientCommand, ConnectionArgs, OutputFormat};
use skyvisor_core::{AccelMode, Ipv4Net};

/// Skyvisor: a private cloud of VMs on a pool of Linux hosts.
#[derive(Debug, Parser)]
#[command(name = "skyvisor", version, propagate_version = true)]
struct Cli {
    /// The API to talk to [default: the remote's, else http://127.0.0.1:7780].
    #[arg(long, global = true, env = "SKYVISOR_URL", help_heading = "Connection")]
    url: Option<String>,
    /// The API token [default: the remote's, else this host's bootstrap
    /// admin token when readable].
    #[arg(
        long,
        global = true,
        env = "SKYVISOR_TOKEN",
        hide_env_values = true,
        help_heading = "Connection"
    )]
    token: Option<String>,
    /// The project to act in [default: the remote's, else your home project].
    #[arg(
        long,
        global = true,
        env = "SKYVISOR_PROJECT",
        help_heading = "Connection"
    )]
    project: Option<String>,
    /// The remote (see `skyvisor remote`) to use instead of the current one.
    #[arg(
        long,
        global = true,
        env = "SKYVISOR_REMOTE",
        help_heading = "Connection"
    )]
    remote: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an all-in-one host: API, host agent and an embedded store.
    Up(UpArgs),
    /// Run a cluster's control plane (API, scheduler, controllers) on etcd.
    Server(server::ServerArgs),
    /// Join this host to a cluster's pool.
    Agent(agent::AgentArgs),
    /// The agent's fence watchdog (started by `skyvisor agent`): kills the
    /// host's HA-protected VMs when the agent stops feeding it.
    #[command(hide = true)]
    FenceWatchdog(FenceWatchdogArgs),
    /// The container runtime's network hook (run by crun as the agent set
    /// it up): moves a container's veth into its namespace.
    #[command(hide = true)]
    ContainerNetHook {
        /// PEER MAC ADDRESS/PREFIX GATEWAY MTU.
        args: Vec<String>,
    },
    #[command(flatten)]
    Client(ClientCommand),
}

/// Options of `skyvisor up`; each overrides the config file.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// A TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Where state, images and VM disks live.
    #[arg(long, env = "SKYVISOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Cache of downloaded packages and built images.
    #[arg(long, env = "SKYVISOR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// API listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Accelerator: auto (KVM if it really boots a guest), kvm, tcg.
    #[arg(long)]
    accel: Option<AccelMode>,
    /// This host's name.
    #[arg(long)]
    host_name: Option<String>,
    /// The VM bridge's name.
    #[arg(long)]
    bridge: Option<String>,
    /// The VM subnet.
    #[arg(long)]
    subnet: Option<Ipv4Net>,
    /// The first VXLAN id of projects' private networks (default 65536;
    /// 65520 ids from there).
    #[arg(long)]
    private_vni_base: Option<u32>,
    /// Serve the API over TLS, with a certificate from the cluster's CA;
    /// the local CLI trusts the CA by itself, others pin it.
    #[arg(long)]
    tls: bool,
    /// The QEMU binary.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Don't build the default image at start.
    #[arg(long)]
    no_default_image: bool,
    /// Turn on the default guest's test hooks (power off, reboot, /fetch,
    /// raw /blk on its public port) in the VMs of this host. For test beds
    /// and benchmarks only: a VM with them is an open proxy.
    #[arg(long)]
    guest_test_hooks: bool,
    /// Where the volume replica server listens (other hosts' primaries
    /// write replicas here).
    #[arg(long)]
    replica_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

/// Options of the hidden `skyvisor fence-watchdog`.
#[derive(Debug, clap::Args)]
struct FenceWatchdogArgs {
    /// The agent's data directory (its heartbeat file and VM directories).
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// Milliseconds without a heartbeat after which protected VMs are killed.
    #[arg(long)]
    deadline_ms: u64,
}

/// Where `skyvisor up` / `skyvisor server` on this host keep the bootstrap
/// admin's token: in `$SKYVISOR_DATA_DIR`, else the default data directory.
fn bootstrap_token_file() -> PathBuf {
    let data_dir = std::env::var_os("SKYVISOR_DATA_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(config::default_data_dir);
    data_dir.join(config::BOOTSTRAP_TOKEN_FILE)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A plain loop with no runtime: it must work when the agent's does not.
    if let Command::FenceWatchdog(a) = &cli.command {
        skyvisor_agent::fencing::run_watchdog(
            &a.data_dir,
            std::time::Duration::from_millis(a.deadline_ms),
        );
        return ExitCode::SUCCESS;
    }
    // Run by the container runtime, single-threaded, before the container
    // starts: its failure (a non-zero exit) fails the container's start.
    if let Command::ContainerNetHook { args } = &cli.command {
        let mut state = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut state) {
            eprintln!("container-net-hook: reading the runtime's state: {e}");
            return ExitCode::FAILURE;
        }
        return match skyvisor_agent::containers::run_net_hook(args, &state) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("container-net-hook: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Server(args) => server::run(args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::FenceWatchdog(_) | Command::ContainerNetHook { .. } => Ok(()),
            Command::Client(cmd) => {
                let args = ConnectionArgs {
                    url: cli.url,
                    token: cli.token,
                    project: cli.project,
                    remote: cli.remote,
                    config_file: None,
                    bootstrap_token_file: Some(bootstrap_token_file()),
                };
                skyvisor_cli::run(args, cli.output, cmd).await
            }
        }
    });
    // Blocking reads that never end by themselves (a terminal session's
    // pty, the CLI's standard input) must not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_flags_are_global() {
        let cli = Cli::try_parse_from([
            "skyvisor",
            "vm",
            "list",
            "--url",
            "http://a:1",
            "--token",
            "t",
            "--project",
            "web",
            "--remote",
            "lab",
        ])
        .expect("parse");
        assert_eq!(cli.url.as_deref(), Some("http://a:1"));
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert_eq!(cli.project.as_deref(), Some("web"));
        assert_eq!(cli.remote.as_deref(), Some("lab"));
    }
}

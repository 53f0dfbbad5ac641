//! `cluster-scale`: the control plane at scale. A real server (the
//! `skyvisor server` binary on a real etcd, or an in-process server on the
//! embedded store), 1,000 simulated hosts and 10,000 VM creates over HTTP.
//!
//! The simulated hosts are real agents (`skyvisor_agent::start`: lease,
//! registration, a watch on their own instances, one supervisor per VM
//! reporting status) with the fake hypervisor and network: this benchmark
//! measures the control plane, never a hypervisor. VMs are created stopped,
//! so no agent makes a disk (10,000 `qemu-img` runs would measure the disk).
//!
//! The simulated hosts and the API clients run on their own threads at a
//! lower CPU priority (nice 10): on a small machine they stand in for other
//! machines, and must not starve the server and etcd they load.
//!
//! Reported: placement latency p50/p99 (from the server's own histogram),
//! create throughput and latency, the time until every agent reported its
//! VMs, list-all latency, and the server's memory.
//!
//! `--serve-console` measures nothing itself: once the VMs are created and
//! reported, it prints one JSON line on stdout (`url`, `token` of a cluster
//! admin, `project`, `hosts`, `vms`, `first` and `last` VM names) and keeps
//! the server (API and web console at `/ui/`) and the simulated hosts
//! running until stdin closes or it gets SIGTERM/SIGINT. The web console
//! benchmark (`bench/console`) drives a browser against it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use skyvisor_agent::fake_hv::FakeHypervisor;
use skyvisor_agent::images::ImageCache;
use skyvisor_agent::{AgentConfig, AgentHandle};
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::image::{ImageKind, ImageSource, ImageState};
use skyvisor_core::{Accel, HostName, Image, ImageName, Overcommit, ServerName, keys};
use skyvisor_net::FakeNetwork;
use skyvisor_store::testing::EtcdProcess;
use skyvisor_store::{EmbeddedStore, EtcdOptions, EtcdStore, Store, StoreExt, encode};

/// Which store the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// A real etcd, with the `skyvisor server` binary as a separate process.
    Etcd,
    /// The embedded store, with the server in this process.
    Embedded,
}

/// Control-plane scale with simulated agents.
#[derive(Debug, Parser)]
#[command(name = "cluster-scale")]
struct Args {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// VMs to create.
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    /// Concurrent API clients creating VMs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The store.
    #[arg(long, value_enum, default_value = "etcd")]
    store: StoreKind,
    /// The skyvisor binary (etcd mode); default: next to this one.
    #[arg(long)]
    skyvisor: Option<PathBuf>,
    /// How many times to list all VMs.
    #[arg(long, default_value_t = 20)]
    list_runs: usize,
    /// Measure nothing: once the VMs are created, print the server's URL and
    /// an admin token as one JSON line on stdout and keep serving (API and
    /// web console) until stdin closes or SIGTERM/SIGINT.
    #[arg(long)]
    serve_console: bool,
}

/// Targets of the issue.
const PLACEMENT_P99_TARGET: Duration = Duration::from_millis(5);
const CREATES_TARGET: Duration = Duration::from_secs(60);
const LIST_TARGET: Duration = Duration::from_millis(100);

/// The server under test.
struct Server {
    url: String,
    /// The server's process (etcd mode); none when in this process.
    child: Option<std::process::Child>,
    _cp: Option<ControlPlane>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A percentile of the server's placement histogram (Prometheus text), by
/// linear interpolation inside the bucket.
fn histogram_percentile(metrics: &str, name: &str, p: f64) -> Option<Duration> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let prefix = format!("{name}_bucket{{le=\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ")?;
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse().ok()?));
    }
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let want = total * p;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return Some(Duration::from_secs_f64(prev.0));
            }
            let frac = if count > prev.1 {
                (want - prev.1) / (count - prev.1)
            } else {
                1.0
            };
            return Some(Duration::from_secs_f64(prev.0 + (le - prev.0) * frac));
        }
        prev = (le, count);
    }
    None
}

async fn wait_for_api(
    http: &reqwest::Client,
    url: &str,
    child: Option<&mut std::process::Child>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!("the server exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("the server at {url} did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready_image(store: &dyn Store) -> Result<()> {
    let image = Image {
        project: skyvisor_core::auth::default_project(),
        public: true,
        name: ImageName::new("sim")?,
        kind: ImageKind::KernelInitrd,
        description: "simulated".into(),
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
    };
    store
        .put(&keys::image(&image.image_ref()), encode(&image))
        .await?;
    Ok(())
}

/// A runtime for the simulated agents whose threads run at nice 10 (a
/// thread's priority is inherited by the threads it creates).
fn agent_runtime() -> Result<tokio::runtime::Runtime> {
    std::thread::spawn(|| {
        rustix::process::nice(10).context("lowering the agents' priority")?;
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sim-agent")
            .enable_all()
            .build()
            .context("agents' runtime")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the agents' runtime thread panicked"))?
}

async fn start_agents(n: usize, store: Arc<dyn Store>, dir: PathBuf) -> Result<Vec<AgentHandle>> {
    let dir = dir.as_path();
    let started = Instant::now();
    let results: Vec<Result<AgentHandle>> = futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            let data_dir = dir.join(format!("h{i:04}"));
            async move {
                let host = HostName::new(format!("h{i:04}"))?;
                skyvisor_agent::start(
                    AgentConfig {
                        host,
                        data_dir: data_dir.clone(),
                        address: "127.0.0.1".into(),
                        // Never run: simulated hosts report QEMU as unknown.
                        qemu_binary: "/nonexistent/qemu-system-x86_64".into(),
                        bridge: "svbr0".into(),
                        nat: false,
                        overcommit: Overcommit {
                            cpu: 16.0,
                            memory: 1.0,
                            disk: 2.0,
                        },
                        reserved_memory_mib: 0,
                        listen: ([127, 0, 0, 1], 0).into(),
                        lease_ttl: Duration::from_secs(10),
                        probe_guests: false,
                        overlay: None,
                        replica_listen: None,
                        fencing: None,
                        guest_test_hooks: false,
                        containers: None,
                    },
                    store,
                    Arc::new(FakeHypervisor::new()),
                    Arc::new(FakeNetwork::new()),
                    ImageCache::new(vec![], data_dir.join("image-cache"), None),
                    (Accel::Tcg, "simulated host".into()),
                )
                .await
                .context("starting a simulated agent")
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let agents = results.into_iter().collect::<Result<Vec<_>>>()?;
    eprintln!("{n} simulated agents registered in {:?}", started.elapsed());
    Ok(agents)
}

async fn start_server(
    args: &Args,
    dir: &Path,
    http: &reqwest::Client,
) -> Result<(Server, Arc<dyn Store>, Option<EtcdProcess>)> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    match args.store {
        StoreKind::Etcd => {
            let etcd = EtcdProcess::start().await.context("starting etcd")?;
            let store: Arc<dyn Store> = Arc::new(
                EtcdStore::connect(&etcd.endpoints(), "/skyvisor/", EtcdOptions::default()).await?,
            );
            let bin = match &args.skyvisor {
                Some(b) => b.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .context("no directory of this executable")?
                    .join("skyvisor"),
            };
            let log = std::fs::File::create(dir.join("server.log"))?;
            let mut child = std::process::Command::new(&bin)
                .args(["server", "--etcd", &etcd.endpoint(), "--name", "bench"])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(dir.join("server"))
                .arg("--cache-dir")
                .arg(dir.join("cache"))
                .args(["--subnet", "10.0.0.0/16", "--no-default-image"])
                // Control-plane scale, not TLS, is measured here.
                .arg("--plain-http")
                .env("RUST_LOG", "warn")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            wait_for_api(http, &url, Some(&mut child)).await?;
            Ok((
                Server {
                    url,
                    child: Some(child),
                    _cp: None,
                },
                store,
                Some(etcd),
            ))
        }
        StoreKind::Embedded => {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("store.redb"))?);
            let cp = ControlPlane::start(
                store.clone(),
                ServerConfig {
                    data_dir: dir.join("server"),
                    cache_dir: dir.join("cache"),
                    guest_binary: None,
                    subnet: "10.0.0.0/16".parse()?,
                    vni: 4213,
                    private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
                    audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
                    event_retention: skyvisor_control::events::DEFAULT_RETENTION,
                    mtu: 1450,
                    weigher: Weigher::Spread,
                    cluster: ClusterSettings::single(ServerName::new("bench")?, url.clone()),
                    max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
                    bootstrap_token_file: None,
                },
            )
            .await?;
            let membership = cp.join_cluster().await?;
            std::mem::forget(membership);
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            // As the real binary serves it: the API and the web console.
            let router = skyvisor_control::api::router(cp.clone()).merge(skyvisor_webui::router());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    eprintln!("the in-process server failed: {e}");
                }
            });
            wait_for_api(http, &url, None).await?;
            Ok((
                Server {
                    url,
                    child: None,
                    _cp: Some(cp),
                },
                store,
                None,
            ))
        }
    }
}

/// Waits until stdin reaches its end (the driver that started this process
/// closed it, or exited) or a SIGTERM/SIGINT arrives.
async fn serve_until_stopped() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = rx => eprintln!("stdin closed: stopping"),
        _ = term.recv() => eprintln!("SIGTERM: stopping"),
        _ = int.recv() => eprintln!("SIGINT: stopping"),
    }
    Ok(())
}

/// Stops the simulated agents and their runtime.
async fn stop_agents(agents_rt: tokio::runtime::Runtime, agents: Vec<AgentHandle>) -> Result<()> {
    agents_rt
        .spawn(async move {
            for a in agents {
                a.shutdown().await;
            }
        })
        .await?;
    agents_rt.shutdown_background();
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::Builder::new()
        .prefix("skyvisor-bench-")
        .tempdir()?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;

    let (server, store, _etcd) = start_server(&args, dir.path(), &http).await?;
    // Every API call carries a token, as a real client's does.
    let token = skyvisor_auth::bootstrap::service_token(
        &skyvisor_auth::Directory::new(store.clone()),
        "bench",
        "cluster-scale",
    )
    .await?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;
    ready_image(store.as_ref()).await?;
    let agents_rt = agent_runtime()?;
    let agents = agents_rt
        .spawn(start_agents(
            args.hosts,
            store.clone(),
            dir.path().join("agents"),
        ))
        .await??;
    // All hosts visible to placement.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hosts: serde_json::Value = http
            .get(format!("{}/v1/hosts", server.url))
            .send()
            .await?
            .json()
            .await?;
        let ready = hosts
            .as_array()
            .map(|a| a.iter().filter(|h| h["state"] == "ready").count())
            .unwrap_or(0);
        if ready == args.hosts {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {} hosts ready", args.hosts);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Creates.
    eprintln!(
        "creating {} VMs with {} clients...",
        args.vms, args.concurrency
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let next = next.clone();
            let http = http.clone();
            let url = format!("{}/v1/instances", server.url);
            let total = args.vms;
            // The clients stand in for users on other machines too.
            agents_rt.spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return (latencies, failures);
                    }
                    let body = serde_json::json!({
                        "name": format!("vm-{i:05}"),
                        "image": "sim",
                        "instance_type": "nano",
                        "start": false,
                    });
                    let t = Instant::now();
                    match http.post(&url).json(&body).send().await {
                        Ok(r) if r.status().as_u16() == 201 => latencies.push(t.elapsed()),
                        Ok(r) => failures.push(format!(
                            "{}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let mut create_lat = Vec::new();
    let mut failures = Vec::new();
    for w in workers {
        let (l, f) = w.await?;
        create_lat.extend(l);
        failures.extend(f);
    }
    let create_total = started.elapsed();
    if !failures.is_empty() {
        eprintln!("{} creates failed; first: {}", failures.len(), failures[0]);
    }
    create_lat.sort();
    eprintln!("{} creates in {create_total:?}", create_lat.len());

    // Every agent reports its VMs.
    let converge_started = Instant::now();
    let reported = loop {
        let list: serde_json::Value = http
            .get(format!("{}/v1/instances", server.url))
            .send()
            .await?
            .json()
            .await?;
        let done = list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["status"]["phase"] == "stopped")
                    .count()
            })
            .unwrap_or(0);
        if done >= create_lat.len() || converge_started.elapsed() > Duration::from_secs(300) {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let converge = converge_started.elapsed() + create_total;

    if args.serve_console {
        if let Some(first) = failures.first() {
            let error = format!(
                "{} of {} creates failed (first: {first}); give more --hosts",
                failures.len(),
                args.vms
            );
            // The agents' runtime must not be dropped inside this one.
            stop_agents(agents_rt, agents).await?;
            bail!(error);
        }
        eprintln!(
            "{} VMs created ({reported} reported stopped) after {:.1} s; serving {}/ui/ until stdin closes",
            create_lat.len(),
            converge.as_secs_f64(),
            server.url
        );
        let ready = serde_json::json!({
            "url": server.url,
            "token": token,
            "project": skyvisor_core::auth::default_project().to_string(),
            "hosts": args.hosts,
            "vms": create_lat.len(),
            "reported": reported,
            "first": "vm-00000",
            "last": format!("vm-{:05}", args.vms.saturating_sub(1)),
        });
        println!("{ready}");
        use std::io::Write;
        std::io::stdout().flush()?;
        serve_until_stopped().await?;
        return stop_agents(agents_rt, agents).await;
    }

    // List all.
    let mut list_lat = Vec::new();
    let mut list_bytes = 0;
    for _ in 0..args.list_runs {
        let t = Instant::now();
        let body = http
            .get(format!("{}/v1/instances", server.url))
            .send()
            .await?
            .bytes()
            .await?;
        list_lat.push(t.elapsed());
        list_bytes = body.len();
    }
    list_lat.sort();

    // Placement latency, from the server's own histogram.
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await?
        .text()
        .await?;
    let p50 = histogram_percentile(&metrics, "skyvisor_placement_seconds", 0.50);
    let p99 = histogram_percentile(&metrics, "skyvisor_placement_seconds", 0.99);
    let commit50 = histogram_percentile(&metrics, "skyvisor_create_commit_seconds", 0.50);
    let commit99 = histogram_percentile(&metrics, "skyvisor_create_commit_seconds", 0.99);

    let (rss, hwm) = match &server.child {
        Some(c) => memory_mib(c.id())?,
        None => memory_mib(std::process::id())?,
    };
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    let ok = |met: bool| if met { "met" } else { "MISSED" };
    let throughput = create_lat.len() as f64 / create_total.as_secs_f64();
    println!(
        "\n## {} hosts, {} VMs, {} clients, {} store\n",
        args.hosts,
        args.vms,
        args.concurrency,
        match args.store {
            StoreKind::Etcd => "etcd (server: `skyvisor server` process)",
            StoreKind::Embedded => "embedded (server in the benchmark's process)",
        }
    );
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!(
        "| placement latency p50 / p99 | {} / {} | p99 < 5 ms: {} |",
        p50.map(ms).unwrap_or_else(|| "-".into()),
        p99.map(ms).unwrap_or_else(|| "-".into()),
        ok(p99.is_some_and(|p| p < PLACEMENT_P99_TARGET))
    );
    println!(
        "| {} creates (201) | {:.1} s, {throughput:.0} creates/s | < 60 s: {} |",
        create_lat.len(),
        create_total.as_secs_f64(),
        ok(create_total < CREATES_TARGET && create_lat.len() == args.vms)
    );
    println!(
        "| store commit of a create p50 / p99 | {} / {} | |",
        commit50.map(ms).unwrap_or_else(|| "-".into()),
        commit99.map(ms).unwrap_or_else(|| "-".into()),
    );
    println!(
        "| create request latency p50 / p99 | {} / {} | |",
        ms(percentile(&create_lat, 0.5)),
        ms(percentile(&create_lat, 0.99))
    );
    println!(
        "| all VMs reported by their agents | {reported} after {:.1} s | |",
        converge.as_secs_f64()
    );
    println!(
        "| list all {} VMs ({:.1} MiB JSON) p50 / p99 | {} / {} | < 100 ms: {} |",
        create_lat.len(),
        list_bytes as f64 / (1 << 20) as f64,
        ms(percentile(&list_lat, 0.5)),
        ms(percentile(&list_lat, 0.99)),
        ok(percentile(&list_lat, 0.99) < LIST_TARGET)
    );
    println!(
        "| server memory RSS / peak | {rss:.0} MiB / {hwm:.0} MiB{} | |",
        if server.child.is_none() {
            " (whole process, simulated agents included)"
        } else {
            ""
        }
    );
    if !failures.is_empty() {
        println!(
            "\n{} creates failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
    stop_agents(agents_rt, agents).await
}

//! The event record and billing at scale (bench/metering runs this):
//!
//! 1. event write throughput and store space per 1,000 events: each event
//!    written in its own transaction together with an instance status, as
//!    an agent records a transition, on the embedded store (a file) and on
//!    a real etcd when one is installed;
//! 2. the time to compute a closed month's invoice for a project of 1,000
//!    VMs, each started and stopped every day (simulated records, ~62,000
//!    events), through the control plane, and to read it back once stored.
//!
//! `cargo run --release -p skyvisor-control --example events_scale [EVENTS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use skyvisor_control::{ClusterSettings, ControlPlane, ServerConfig, Weigher};
use skyvisor_core::{Event, EventKind, ObjectKind, ProjectName, Resources, ServerName, keys};
use skyvisor_store::{EmbeddedStore, Op, Store, encode};

fn event(project: &ProjectName, vm: usize, kind: EventKind, at: chrono::DateTime<Utc>) -> Event {
    let mut e = Event::new(
        kind,
        ObjectKind::Instance,
        Some(project.clone()),
        format!("vm-{vm:04}"),
        "running on host-07",
    )
    .on(&skyvisor_core::HostName::new("host-07").expect("host"))
    .sized(
        Some("micro".into()),
        Resources {
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 2,
        },
    );
    e.at = at;
    e
}

/// Writes `n` transitions, one transaction each; returns events/s and the
/// bytes of keys and values per 1,000 events.
async fn write_throughput(store: &dyn Store, n: usize) -> (f64, f64) {
    let project = ProjectName::new("bench").expect("project");
    let status = vec![0u8; 700];
    let start = Utc::now();
    let mut bytes = 0usize;
    let began = Instant::now();
    for i in 0..n {
        let e = event(
            &project,
            i % 1000,
            EventKind::Started,
            start + chrono::Duration::milliseconds(i as i64),
        );
        let key = keys::event(&e);
        let value = encode(&e);
        bytes += key.len() + value.len();
        store
            .txn(
                vec![],
                vec![
                    Op::Put {
                        key: format!("bench/status/{}", i % 1000),
                        value: status.clone(),
                        lease: None,
                    },
                    Op::Put {
                        key,
                        value,
                        lease: None,
                    },
                ],
            )
            .await
            .expect("write");
    }
    let rate = n as f64 / began.elapsed().as_secs_f64();
    (rate, bytes as f64 / n as f64 * 1000.0)
}

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("server"),
        cache_dir: dir.join("cache"),
        guest_binary: None,
        subnet: "10.99.0.0/16".parse().expect("subnet"),
        vni: 4213,
        private_vni_base: skyvisor_core::network::PRIVATE_VNI_BASE,
        audit_retention: skyvisor_control::audit::DEFAULT_RETENTION,
        event_retention: skyvisor_control::events::DEFAULT_RETENTION,
        mtu: 1450,
        weigher: Weigher::Spread,
        cluster: ClusterSettings::single(
            ServerName::new("bench").expect("name"),
            "http://bench.invalid".into(),
        ),
        max_upload_bytes: skyvisor_control::DEFAULT_MAX_UPLOAD_BYTES,
        bootstrap_token_file: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tmp");

    // 1. Write throughput and space.
    let file = dir.path().join("events.redb");
    let embedded = EmbeddedStore::open(&file).expect("store");
    let before = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let (rate, raw) = write_throughput(&embedded, n).await;
    let after = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "embedded store: {n} events, {rate:.0} events/s (one transaction each, with a status); \
         {raw:.0} bytes of keys and values per 1,000 events; file grew {:.0} bytes per 1,000 events",
        (after.saturating_sub(before)) as f64 / n as f64 * 1000.0
    );
    drop(embedded);
    match skyvisor_store::testing::EtcdProcess::start().await {
        Ok(etcd) => {
            let store = skyvisor_store::EtcdStore::connect(
                &etcd.endpoints(),
                "/bench/",
                skyvisor_store::EtcdOptions::default(),
            )
            .await
            .expect("etcd");
            let m = n.min(5_000);
            let (rate, raw) = write_throughput(&store, m).await;
            println!(
                "etcd: {m} events, {rate:.0} events/s (one transaction each, with a status); \
                 {raw:.0} bytes of keys and values per 1,000 events"
            );
        }
        Err(e) => println!("etcd: not measured ({e})"),
    }

    // 2. A month's invoice for 1,000 VMs started and stopped every day.
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
    let project = ProjectName::new("big").expect("project");
    let month_start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .expect("time");
    let mut ops = Vec::new();
    let mut count = 0usize;
    for vm in 0..1000 {
        let mut push = |e: Event| {
            ops.push(Op::Put {
                key: keys::event(&e),
                value: encode(&e),
                lease: None,
            });
            count += 1;
        };
        push(event(&project, vm, EventKind::Created, month_start));
        for day in 0..30 {
            let day_start = month_start + chrono::Duration::days(day);
            push(event(
                &project,
                vm,
                EventKind::Started,
                day_start + chrono::Duration::hours(8),
            ));
            push(event(
                &project,
                vm,
                EventKind::Stopped,
                day_start + chrono::Duration::hours(18),
            ));
        }
    }
    for chunk in ops.chunks(1000) {
        store.txn(vec![], chunk.to_vec()).await.expect("events");
    }
    let cp = ControlPlane::start(store.clone(), config(dir.path()))
        .await
        .expect("control plane");
    let began = Instant::now();
    let invoice = cp.invoice(&project, "2026-11").await.expect("invoice");
    let computed = began.elapsed();
    let began = Instant::now();
    let again = cp.invoice(&project, "2026-11").await.expect("invoice");
    let stored = began.elapsed();
    assert_eq!(invoice, again, "a closed invoice changed");
    println!(
        "invoice of a month for 1,000 VMs ({count} events): computed and closed in {:.1} ms, \
         read back in {:.2} ms; total {} {} over {} lines",
        ms(computed),
        ms(stored),
        invoice.total,
        invoice.currency,
        invoice.lines.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

//! A Jepsen-like register test, bounded in time: writers issue unique
//! writes through NBD to a diskless primary and record every acknowledged
//! one while a nemesis SIGKILLs and SIGSTOPs replica processes. Reads during
//! the run and everything at the end must show, for every block, the last
//! acknowledged write (or a later unacknowledged one); all replicas end
//! byte-identical. Then the primary dies: a stale replica's host cannot
//! promote itself, and a takeover from in-sync replicas loses nothing.
//!
//! `JEPSEN_SECS` sets the nemesis duration (default 60).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skyvisor_nbd::NbdClient;
use tokio::sync::Mutex;

const BLOCK: usize = 4096;
const SLOTS: u64 = 2048;
const WORKERS: u64 = 16;

fn block(slot: u64, id: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.extend_from_slice(&slot.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

/// The id a block holds: `Some(0)` for never written, `None` if torn.
fn decode(slot: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (data == block(slot, id).as_slice()).then_some(id)
}

#[derive(Default, Clone)]
struct Slot {
    acked: u64,
    uncertain: Vec<u64>,
}

impl Slot {
    fn allows(&self, id: u64) -> bool {
        id == self.acked || self.uncertain.contains(&id)
    }
}

type Model = Arc<std::sync::Mutex<HashMap<u64, Slot>>>;

fn check(model: &Model, slot: u64, data: &[u8], when: &str) {
    let m = model.lock().expect("model");
    let s = m.get(&slot).cloned().unwrap_or_default();
    let id = decode(slot, data);
    assert!(
        id.is_some_and(|id| s.allows(id)),
        "{when}: slot {slot} holds {id:?}, last acknowledged {} (uncertain {:?})",
        s.acked,
        s.uncertain
    );
}

async fn writer(
    client: Arc<NbdClient>,
    model: Model,
    w: u64,
    ids: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stats: Arc<[AtomicU64; 3]>,
) {
    let mut rng = StdRng::seed_from_u64(w);
    while !stop.load(Ordering::Relaxed) {
        let slot = rng.random_range(0..SLOTS / WORKERS) * WORKERS + w;
        if rng.random_bool(0.2) {
            // Read back one of our slots (nobody else writes it).
            if let Ok(d) = client.read(slot * BLOCK as u64, BLOCK as u32).await {
                check(&model, slot, &d, "read during the run");
                stats[2].fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let r = client
            .write(slot * BLOCK as u64, &block(slot, id), rng.random_bool(0.1))
            .await;
        {
            let mut m = model.lock().expect("model");
            let s = m.entry(slot).or_default();
            match r {
                Ok(()) => {
                    s.acked = id;
                    s.uncertain.clear();
                    stats[0].fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    s.uncertain.push(id);
                    stats[1].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if r.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn nemesis(hosts: Arc<Mutex<Vec<Host>>>, secs: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(4242);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        // Replicas are hosts 1..=3; host 0 is the primary.
        let i = rng.random_range(1..4usize);
        let action = rng.random_range(0..10);
        if action == 0 {
            // Every replica frozen at once: writes must fail, not be acknowledged.
            for j in 1..4 {
                hosts.lock().await[j].sigstop();
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(1200..2000))).await;
            for j in 1..4 {
                hosts.lock().await[j].sigcont();
            }
        } else if action == 1 {
            // Two replicas killed together.
            let k = i % 3 + 1;
            hosts.lock().await[i].sigkill();
            hosts.lock().await[k].sigkill();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
            hosts.lock().await[i].restart().await;
            hosts.lock().await[k].restart().await;
        } else if action < 6 {
            hosts.lock().await[i].sigkill();
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            hosts.lock().await[i].restart().await;
        } else {
            hosts.lock().await[i].sigstop();
            tokio::time::sleep(Duration::from_millis(rng.random_range(1200..2500))).await;
            hosts.lock().await[i].sigcont();
        }
        rounds += 1;
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_nemesis_and_failover() {
    init_tracing();
    let secs: u64 = std::env::var("JEPSEN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let root = tempfile::tempdir().expect("tempdir");
    let mut v = vec![Host::start(root.path(), "p", 1000).await];
    for i in 1..=3 {
        v.push(Host::start(root.path(), &format!("r{i}"), 1000).await);
    }
    let replicas: Vec<String> = v[1..]
        .iter()
        .map(|h| format!("{}={}", h.node, h.addr))
        .collect();
    v[0].control(&format!("create vol {} 1 {}", 16 << 20, replicas.join(" ")))
        .await
        .expect("create");
    let nbd = v[0]
        .control(&format!("open vol 127.0.0.1:{} 0", free_port()))
        .await
        .expect("open")["nbd"]
        .as_str()
        .expect("addr")
        .to_owned();
    let hosts = Arc::new(Mutex::new(v));
    let client = Arc::new(
        NbdClient::connect_tcp(nbd.as_str(), "vol")
            .await
            .expect("connect"),
    );
    let model: Model = Arc::default();
    let ids = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<[AtomicU64; 3]> =
        Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let writers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(writer(
                client.clone(),
                model.clone(),
                w,
                ids.clone(),
                stop.clone(),
                stats.clone(),
            ))
        })
        .collect();

    let rounds = nemesis(hosts.clone(), secs).await;
    // Heal, let every replica resync, keep writing meanwhile.
    {
        let mut h = hosts.lock().await;
        for x in h.iter_mut().skip(1) {
            if x.is_running() {
                x.sigcont();
            } else {
                x.restart().await;
            }
        }
    }
    {
        let h = hosts.lock().await;
        wait_status(
            &h[0],
            "vol",
            "every replica in sync after the nemesis",
            120,
            all_in_sync,
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = stats[0].load(Ordering::Relaxed);
    let failed = stats[1].load(Ordering::Relaxed);
    let reads = stats[2].load(Ordering::Relaxed);
    eprintln!(
        "nemesis rounds {rounds}, writes acknowledged {acked}, failed {failed}, reads checked {reads}"
    );
    assert!(
        rounds >= 10 && acked > 1000 && reads > 100,
        "the run did too little"
    );
    assert!(
        failed > 0 || secs < 60,
        "the nemesis never made a write fail"
    );
    client.flush().await.expect("flush");

    // Every block through NBD and in every replica file agrees with the model.
    let h = hosts.lock().await;
    let files: Vec<Vec<u8>> = h[1..]
        .iter()
        .map(|x| file_bytes(&x.data_file("vol")))
        .collect();
    assert!(
        files[0] == files[1] && files[0] == files[2],
        "replicas are not identical"
    );
    for slot in 0..SLOTS {
        let d = client
            .read(slot * BLOCK as u64, BLOCK as u32)
            .await
            .expect("final read");
        check(&model, slot, &d, "final read");
        let off = (slot as usize) * BLOCK;
        assert_eq!(
            &files[0][off..off + BLOCK],
            &d[..],
            "replica file differs from NBD at slot {slot}"
        );
    }
    drop(h);

    // Make r3 stale: it misses acknowledged writes.
    let mut h = hosts.lock().await;
    h[3].sigkill();
    for slot in 0..64u64 {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        client
            .write(slot * BLOCK as u64, &block(slot, id), false)
            .await
            .expect("write without r3");
        let mut m = model.lock().expect("model");
        let s = m.entry(slot).or_default();
        s.acked = id;
        s.uncertain.clear();
    }
    client.flush().await.expect("flush");
    wait_status(&h[0], "vol", "r3 out of sync", 20, |s| {
        states(s).iter().any(|(n, st)| n == "r3" && st != "in_sync")
    })
    .await;
    // The primary dies; only r3 is reachable: it must not be promoted.
    h[0].sigkill();
    h[3].restart().await;
    h[1].sigstop();
    h[2].sigstop();
    let r = h[3]
        .control(&format!("open vol 127.0.0.1:{} 1", free_port()))
        .await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("no in-sync replica")),
        "a stale replica was promoted: {r:?}"
    );
    h[1].sigcont();
    h[2].sigcont();
    // With in-sync replicas reachable, r3's host may take over; it reads
    // from them, never from its own stale copy, until it is resynced.
    let nbd2 = h[3]
        .control(&format!("open vol 127.0.0.1:{} 1", free_port()))
        .await
        .expect("takeover")["nbd"]
        .as_str()
        .expect("addr")
        .to_owned();
    let c2 = NbdClient::connect_tcp(nbd2.as_str(), "vol")
        .await
        .expect("connect");
    for slot in 0..SLOTS {
        let d = c2
            .read(slot * BLOCK as u64, BLOCK as u32)
            .await
            .expect("read after failover");
        check(&model, slot, &d, "read after failover");
    }
    wait_status(&h[3], "vol", "r3 resynced", 60, all_in_sync).await;
    let a = file_bytes(&h[1].data_file("vol"));
    assert!(
        a == file_bytes(&h[3].data_file("vol")),
        "r3 differs after its resync"
    );
}

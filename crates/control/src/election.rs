//! Leader election on the [`Store`] trait, so that it works (and is tested)
//! on the embedded store as on etcd.
//!
//! Each candidate holds a lease. Leading means: the leader key exists, was
//! created by this candidate's transaction ("create if absent") and is
//! bound to its lease. The key disappears when the leader revokes its lease
//! (a clean stop) or stops renewing it (a crash, a partition); the others
//! watch the key and campaign as soon as it is gone.
//!
//! A leader that cannot renew its lease for a whole TTL steps down at once,
//! before the store can have expired the lease and let another candidate
//! in: two servers never both believe they lead for longer than the clock
//! skew between them. Work that must run once therefore runs only while
//! [`Leadership::is_leader`], and must still be idempotent (a step-down can
//! interrupt it anywhere).
//!
//! This module must never take leadership by overwriting the key: only an
//! absent key may be created.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use skyvisor_core::cluster::LeaderRecord;
use skyvisor_core::{ServerName, keys};
use skyvisor_store::{Compare, LeaseId, Op, Store, StoreError, WatchEvent, decode, encode};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// What a candidate knows about the leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The current leader, as last read from the store (none while nobody
    /// leads or the store cannot be read).
    pub leader: Option<LeaderRecord>,
    /// Whether this candidate leads.
    pub is_leader: bool,
}

/// A candidate's identity and timing.
#[derive(Debug, Clone)]
pub struct CandidateConfig {
    /// The key to compete for (normally [`keys::LEADER`]).
    pub key: String,
    /// Who this candidate is.
    pub name: ServerName,
    /// Its API URL, recorded in the leader key.
    pub url: String,
    /// Lease time-to-live: how long a crashed leader keeps the key.
    pub ttl: Duration,
}

/// A running candidate. Dropping it stops campaigning (the lease then
/// expires); [`Election::resign`] hands leadership over at once.
pub struct Election {
    state: watch::Receiver<Leadership>,
    lease: Arc<Mutex<Option<LeaseId>>>,
    store: Arc<dyn Store>,
    task: JoinHandle<()>,
}

impl Election {
    /// Starts campaigning with a lease of its own.
    pub fn start(store: Arc<dyn Store>, config: CandidateConfig) -> Self {
        Self::start_with_lease(store, config, Arc::new(Mutex::new(None)))
    }

    /// Starts campaigning with a shared lease slot: the election renews the
    /// lease in `lease` (granting one when empty), so other keys of the
    /// same server (its registration) can share it.
    pub fn start_with_lease(
        store: Arc<dyn Store>,
        config: CandidateConfig,
        lease: Arc<Mutex<Option<LeaseId>>>,
    ) -> Self {
        let (tx, rx) = watch::channel(Leadership {
            leader: None,
            is_leader: false,
        });
        let task = tokio::spawn(campaign(store.clone(), config, lease.clone(), tx));
        Self {
            state: rx,
            lease,
            store,
            task,
        }
    }

    /// The leadership as last observed.
    pub fn current(&self) -> Leadership {
        self.state.borrow().clone()
    }

    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().is_leader
    }

    /// Follows changes of the leadership.
    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// Stops campaigning and revokes the lease, so another candidate can
    /// lead at once.
    pub async fn resign(self) {
        self.task.abort();
        let lease = self.lease.lock().await.take();
        if let Some(lease) = lease
            && let Err(e) = self.store.revoke_lease(lease).await
        {
            debug!(error = %e, "could not revoke the election lease");
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The campaign loop: hold a lease, try to create the key, watch it, renew.
async fn campaign(
    store: Arc<dyn Store>,
    config: CandidateConfig,
    lease_slot: Arc<Mutex<Option<LeaseId>>>,
    state: watch::Sender<Leadership>,
) {
    let renew_every = config.ttl / 3;
    let mut last_renewed = Instant::now();
    let mut watch: Option<skyvisor_store::WatchStream> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        // 1. A lease.
        let lease = {
            let mut slot = lease_slot.lock().await;
            match *slot {
                Some(l) => l,
                None => match store.grant_lease(config.ttl).await {
                    Ok(l) => {
                        *slot = Some(l);
                        last_renewed = Instant::now();
                        l
                    }
                    Err(e) => {
                        drop(slot);
                        debug!(error = %e, "cannot grant an election lease; retrying");
                        set(&state, None, false);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(renew_every.max(Duration::from_millis(100)));
                        continue;
                    }
                },
            }
        };
        // 2. Try to lead, then read who leads.
        match try_lead(store.as_ref(), &config, lease).await {
            Ok((leader, is_leader)) => {
                backoff = Duration::from_millis(100);
                if is_leader && !state.borrow().is_leader {
                    info!(server = %config.name, "became the leader");
                }
                set(&state, leader, is_leader);
            }
            Err(StoreError::LeaseNotFound(_)) => {
                lease_lost(&lease_slot, lease, &state, &config).await;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "cannot read or take the leader key");
                step_down_if_stale(&state, last_renewed, config.ttl, &config);
            }
        }
        // 3. Watch the key so its deletion is seen at once.
        if watch.is_none() {
            watch = store.watch(&config.key, 0).await.ok();
        }
        // 4. Wait for a change of the key or the time to renew.
        let deadline = tokio::time::sleep(renew_every);
        tokio::pin!(deadline);
        let mut renew = false;
        loop {
            tokio::select! {
                () = &mut deadline => { renew = true; break; }
                event = next_event(&mut watch) => match event {
                    Some(Ok(WatchEvent::Delete { key, .. })) if key == config.key => break,
                    Some(Ok(_)) => continue,
                    // A broken watch: campaign again (it is recreated).
                    Some(Err(_)) | None => { watch = None; break; }
                },
            }
        }
        if renew {
            match store.keep_alive(lease).await {
                Ok(()) => last_renewed = Instant::now(),
                Err(StoreError::LeaseNotFound(_)) => {
                    lease_lost(&lease_slot, lease, &state, &config).await;
                }
                Err(e) => {
                    debug!(error = %e, "cannot renew the election lease");
                    step_down_if_stale(&state, last_renewed, config.ttl, &config);
                }
            }
        }
    }
}

async fn next_event(
    watch: &mut Option<skyvisor_store::WatchStream>,
) -> Option<Result<WatchEvent, StoreError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Creates the key if absent (bound to `lease`), then reads it.
async fn try_lead(
    store: &dyn Store,
    config: &CandidateConfig,
    lease: LeaseId,
) -> Result<(Option<LeaderRecord>, bool), StoreError> {
    let record = LeaderRecord {
        name: config.name.clone(),
        url: config.url.clone(),
        since: Utc::now(),
    };
    store
        .txn(
            vec![Compare::Absent(config.key.clone())],
            vec![Op::Put {
                key: config.key.clone(),
                value: encode(&record),
                lease: Some(lease),
            }],
        )
        .await?;
    match store.get(&config.key).await? {
        None => Ok((None, false)),
        Some(kv) => {
            let leader: LeaderRecord = decode(&kv)?;
            // Leading needs the key bound to this very lease: a record with
            // our name under an old lease is a previous life of ours.
            let mine = kv.lease == Some(lease) && leader.name == config.name;
            Ok((Some(leader), mine))
        }
    }
}

async fn lease_lost(
    slot: &Mutex<Option<LeaseId>>,
    lease: LeaseId,
    state: &watch::Sender<Leadership>,
    config: &CandidateConfig,
) {
    let mut slot = slot.lock().await;
    if *slot == Some(lease) {
        *slot = None;
    }
    if state.borrow().is_leader {
        warn!(server = %config.name, "the election lease expired; no longer the leader");
    }
    set(state, None, false);
}

/// A leader that could not renew for a whole TTL must assume the lease is
/// gone and stop acting as leader.
fn step_down_if_stale(
    state: &watch::Sender<Leadership>,
    last_renewed: Instant,
    ttl: Duration,
    config: &CandidateConfig,
) {
    if state.borrow().is_leader && last_renewed.elapsed() >= ttl.mul_f32(0.8) {
        warn!(server = %config.name, "cannot reach the store to renew the lease; stepping down");
        set(state, None, false);
    }
}

fn set(state: &watch::Sender<Leadership>, leader: Option<LeaderRecord>, is_leader: bool) {
    state.send_if_modified(|s| {
        let new = Leadership { leader, is_leader };
        // `since` of the same leader does not change; compare the rest.
        let changed = s.is_leader != new.is_leader
            || s.leader.as_ref().map(|l| (&l.name, &l.url))
                != new.leader.as_ref().map(|l| (&l.name, &l.url));
        if changed {
            *s = new;
        }
        changed
    });
}

/// The default key every server of a cluster competes for.
pub fn leader_key() -> String {
    keys::LEADER.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skyvisor_store::EmbeddedStore;

    fn candidate(name: &str, ttl_ms: u64) -> CandidateConfig {
        CandidateConfig {
            key: leader_key(),
            name: ServerName::new(name).expect("name"),
            url: format!("http://{name}:7780"),
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_leader_and_handover_on_resign() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let a = Election::start(store.clone(), candidate("a", 600));
        wait_until("a leads", || a.is_leader()).await;
        let b = Election::start(store.clone(), candidate("b", 600));
        let mut b_rx = b.subscribe();
        b_rx.wait_for(|s| s.leader.is_some())
            .await
            .expect("b sees a leader");
        assert!(!b.is_leader());
        assert_eq!(b.current().leader.expect("leader").name.as_str(), "a");

        // A clean stop hands over without waiting for the lease to expire.
        let started = Instant::now();
        a.resign().await;
        wait_until("b leads", || b.is_leader()).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "handover took {:?}",
            started.elapsed()
        );
        assert_eq!(b.current().leader.expect("leader").name.as_str(), "b");
    }

    #[tokio::test]
    async fn crashed_leader_is_replaced_after_its_lease_expires() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let a = Election::start(store.clone(), candidate("a", 600));
        wait_until("a leads", || a.is_leader()).await;
        let b = Election::start(store.clone(), candidate("b", 600));
        let mut b_rx = b.subscribe();
        b_rx.wait_for(|s| s.leader.is_some())
            .await
            .expect("b sees a");
        // A crash: no resign, the lease is simply not renewed any more.
        drop(a);
        let started = Instant::now();
        wait_until("b leads", || b.is_leader()).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "takeover took {took:?}");
        let kv = store.get(&leader_key()).await.expect("get").expect("key");
        let rec: LeaderRecord = decode(&kv).expect("record");
        assert_eq!(rec.name.as_str(), "b");
    }

    #[tokio::test]
    async fn never_two_leaders_among_many_candidates() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let mut all: Vec<Election> = (0..5)
            .map(|i| Election::start(store.clone(), candidate(&format!("s{i}"), 500)))
            .collect();
        for round in 0..4 {
            wait_until("someone leads", || all.iter().any(Election::is_leader)).await;
            // Let the others observe; still exactly one.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let leaders: Vec<usize> = (0..all.len()).filter(|i| all[*i].is_leader()).collect();
            assert_eq!(leaders.len(), 1, "round {round}: leaders {leaders:?}");
            let gone = all.remove(leaders[0]);
            if round % 2 == 0 {
                gone.resign().await;
            } else {
                drop(gone);
            }
        }
    }

    #[tokio::test]
    async fn a_leader_cut_off_from_the_store_steps_down() {
        // The lease is revoked behind the leader's back, as when the store
        // expired it during a partition: the leader must notice and stop.
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory().expect("store"));
        let slot = Arc::new(Mutex::new(None));
        let a = Election::start_with_lease(store.clone(), candidate("a", 600), slot.clone());
        wait_until("a leads", || a.is_leader()).await;
        let lease = slot.lock().await.expect("lease");
        store.revoke_lease(lease).await.expect("revoke");
        wait_until("a steps down or re-takes with a new lease", || {
            let cur = a.current();
            !cur.is_leader || slot.try_lock().is_ok_and(|s| *s != Some(lease))
        })
        .await;
        // With nobody else around it leads again, under a new lease.
        wait_until("a leads again", || a.is_leader()).await;
        let kv = store.get(&leader_key()).await.expect("get").expect("key");
        assert_ne!(kv.lease, Some(lease));
    }
}

//! The conformance suite: what every [`Store`] must do, checked the same way
//! on every backend (embedded on a file, embedded in memory, etcd).
//!
//! [`run_all`] runs every check, each on a fresh store from the caller's
//! factory (for etcd: a fresh namespace). Each check is also public on its
//! own. A failed check panics with a message naming the backend and what
//! differed: this is test code, called from `#[test]`s.
//!
//! The checks compare revisions with `<`/`>=` rather than exact numbers
//! where another writer on the same etcd could bump the global revision, so
//! they stay valid on a shared etcd; the lease checks take a few seconds of
//! real time because leases expire in real time.
//!
//! Run it alone on its etcd: the compaction check compacts the whole etcd,
//! which breaks other clients' watches from older revisions.
//!
//! This module must never depend on one backend's details: what it checks is
//! the contract of the [`Store`] trait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{
    Compare, LeaseId, Op, Revision, Store, StoreError, StoreExt, WatchEvent, WatchStream, encode,
};

/// The longest a check waits for an event (lease expiry included).
const WAIT: Duration = Duration::from_secs(15);

/// Runs every check, each on a fresh store made by `make`.
pub async fn run_all<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    let mut fresh = async || -> Arc<dyn Store> {
        let store: Arc<dyn Store> = Arc::new(make().await);
        store
    };
    let started = Instant::now();
    macro_rules! check {
        ($name:ident) => {{
            let store = fresh().await;
            let at = Instant::now();
            $name(store.clone()).await;
            tracing::info!(
                backend = store.backend(),
                check = stringify!($name),
                elapsed = ?at.elapsed(),
                "conformance check passed"
            );
        }};
    }
    check!(get_put_delete);
    check!(create_if_absent);
    check!(compare_and_swap);
    check!(txn_is_atomic);
    check!(requests_the_store_rejects);
    check!(list_by_prefix);
    check!(revisions_increase);
    check!(watch_from_revision);
    check!(watch_from_now);
    check!(watch_sees_concurrent_writes_in_order);
    check!(compaction);
    check!(concurrent_cas_loses_no_update);
    // Leases take seconds of real time each: run them side by side.
    let (a, b, c) = (fresh().await, fresh().await, fresh().await);
    let at = Instant::now();
    futures::join!(
        lease_expiry_deletes_keys(a.clone()),
        keep_alive_extends(b),
        revoke_deletes_keys(c),
    );
    tracing::info!(backend = a.backend(), elapsed = ?at.elapsed(), "conformance lease checks passed");
    tracing::info!(backend = a.backend(), elapsed = ?started.elapsed(), "conformance suite passed");
}

/// Waits for the next event of a watch; panics on an error, the end, or
/// silence for [`WAIT`].
async fn next_event(backend: &str, stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("[{backend}] watch failed: {e}"),
        Ok(None) => panic!("[{backend}] watch ended unexpectedly"),
        Err(_) => panic!("[{backend}] no watch event within {WAIT:?}"),
    }
}

/// Asserts that a watch from `start` is refused as compacted, by `watch`
/// itself or as the stream's first item. Returns the oldest revision kept.
async fn expect_compacted(store: &dyn Store, prefix: &str, start: Revision) -> Revision {
    let backend = store.backend();
    let error = match store.watch(prefix, start).await {
        Err(e) => e,
        Ok(mut stream) => match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("[{backend}] watch from compacted revision {start} gave {other:?}"),
        },
    };
    match error {
        StoreError::Compacted { requested, oldest } => {
            assert_eq!(
                requested, start,
                "[{backend}] Compacted names the revision asked for"
            );
            assert!(
                oldest > start,
                "[{backend}] oldest kept {oldest} must be after {start}"
            );
            oldest
        }
        other => panic!("[{backend}] expected Compacted from revision {start}, got {other}"),
    }
}

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease: None,
    }
}

fn put_leased(key: &str, value: &[u8], lease: LeaseId) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease: Some(lease),
    }
}

fn deleted(key: &str, revision: Revision) -> WatchEvent {
    WatchEvent::Delete {
        key: key.into(),
        mod_revision: revision,
    }
}

/// Puts, gets and deletes a key; revisions and values follow.
pub async fn get_put_delete(store: Arc<dyn Store>) {
    let b = store.backend();
    assert_eq!(
        store.get("missing").await.expect("get"),
        None,
        "[{b}] absent key"
    );
    let r1 = store.put("k", b"v1".to_vec()).await.expect("put");
    let kv = store.get("k").await.expect("get").expect("k exists");
    assert_eq!(kv.key, "k");
    assert_eq!(kv.value, b"v1", "[{b}] value read back");
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r1),
        "[{b}] revisions of a new key"
    );
    assert_eq!(kv.lease, None);
    let r2 = store.put("k", b"v2".to_vec()).await.expect("put");
    assert!(r2 > r1, "[{b}] revision grows: {r2} > {r1}");
    let kv = store.get("k").await.expect("get").expect("k exists");
    assert_eq!(kv.value, b"v2");
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r2),
        "[{b}] update keeps create revision"
    );
    let r3 = store.delete("k").await.expect("delete");
    assert!(r3 > r2, "[{b}] delete bumps the revision");
    assert_eq!(store.get("k").await.expect("get"), None, "[{b}] deleted");
    let r4 = store
        .delete("k")
        .await
        .expect("deleting an absent key is no error");
    assert!(r4 >= r3);
    let r5 = store.put("k", b"v3".to_vec()).await.expect("put");
    let kv = store.get("k").await.expect("get").expect("k exists");
    assert_eq!(
        kv.create_revision, r5,
        "[{b}] a re-created key has a new create revision"
    );
}

/// `create` only writes an absent key.
pub async fn create_if_absent(store: Arc<dyn Store>) {
    let b = store.backend();
    assert!(
        store.create("c", b"one".to_vec()).await.expect("create"),
        "[{b}] first create"
    );
    assert!(
        !store.create("c", b"two".to_vec()).await.expect("create"),
        "[{b}] second create"
    );
    let kv = store.get("c").await.expect("get").expect("c exists");
    assert_eq!(kv.value, b"one", "[{b}] a failed create changes nothing");
}

/// Compare-and-swap on mod revision, existence and absence.
pub async fn compare_and_swap(store: Arc<dyn Store>) {
    let b = store.backend();
    assert!(
        store
            .compare_and_swap("n", 0, b"a".to_vec())
            .await
            .expect("cas"),
        "[{b}] cas 0 on absent"
    );
    assert!(
        !store
            .compare_and_swap("n", 0, b"b".to_vec())
            .await
            .expect("cas"),
        "[{b}] cas 0 on present"
    );
    let first = store.get("n").await.expect("get").expect("n");
    assert!(
        store
            .compare_and_swap("n", first.mod_revision, b"c".to_vec())
            .await
            .expect("cas"),
        "[{b}] cas with current revision"
    );
    assert!(
        !store
            .compare_and_swap("n", first.mod_revision, b"d".to_vec())
            .await
            .expect("cas"),
        "[{b}] cas with stale revision"
    );
    let now = store.get("n").await.expect("get").expect("n");
    assert_eq!(now.value, b"c", "[{b}] a failed cas changes nothing");

    let cases = [
        (Compare::Exists("n".into()), true),
        (Compare::Absent("n".into()), false),
        (Compare::Exists("missing".into()), false),
        (Compare::Absent("missing".into()), true),
        (Compare::ModRevision("missing".into(), 0), true),
        (Compare::ModRevision("n".into(), now.mod_revision), true),
    ];
    for (i, (compare, expected)) in cases.into_iter().enumerate() {
        let key = format!("flag/{i}");
        let out = store
            .txn(vec![compare.clone()], vec![put(&key, b"x")])
            .await
            .expect("txn");
        assert_eq!(out.succeeded, expected, "[{b}] {compare:?}");
        let written = store.get(&key).await.expect("get").is_some();
        assert_eq!(
            written, expected,
            "[{b}] write applied only if {compare:?} held"
        );
    }
}

/// A transaction applies all of its writes or none, at one revision.
pub async fn txn_is_atomic(store: Arc<dyn Store>) {
    let b = store.backend();
    let ra = store.put("t/a", b"a".to_vec()).await.expect("put");
    let ops = vec![put("t/x", b"x"), put("t/y", b"y"), Op::Delete("t/a".into())];

    // One failing comparison among several: nothing happens.
    let out = store
        .txn(
            vec![
                Compare::Exists("t/a".into()),
                Compare::Absent("t/b".into()),
                Compare::ModRevision("t/a".into(), ra + 1000),
            ],
            ops.clone(),
        )
        .await
        .expect("txn");
    assert!(!out.succeeded, "[{b}] a false comparison fails the txn");
    assert!(out.revision >= ra);
    let listing = store.list("t/").await.expect("list");
    let keys: Vec<_> = listing.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["t/a"], "[{b}] a failed txn writes nothing");

    let mut stream = store
        .watch("t/", listing.revision + 1)
        .await
        .expect("watch");
    let out = store
        .txn(
            vec![Compare::Exists("t/a".into()), Compare::Absent("t/b".into())],
            ops,
        )
        .await
        .expect("txn");
    assert!(out.succeeded, "[{b}] true comparisons apply the txn");
    let rev = out.revision;
    assert!(rev > ra);
    for key in ["t/x", "t/y"] {
        let kv = store.get(key).await.expect("get").expect("written");
        assert_eq!(
            kv.mod_revision, rev,
            "[{b}] every write of a txn has its revision"
        );
    }
    assert_eq!(
        store.get("t/a").await.expect("get"),
        None,
        "[{b}] txn delete applied"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = next_event(b, &mut stream).await;
        got.push((
            e.key().to_owned(),
            e.revision(),
            matches!(e, WatchEvent::Put(_)),
        ));
    }
    assert_eq!(
        got,
        [
            ("t/x".to_owned(), rev, true),
            ("t/y".to_owned(), rev, true),
            ("t/a".to_owned(), rev, false)
        ],
        "[{b}] a txn's events share its revision, in operation order"
    );

    // A put on a dead lease fails the whole txn, including its other writes.
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store.revoke_lease(lease).await.expect("revoke");
    let err = store
        .txn(
            vec![],
            vec![put("t/p", b"p"), put_leased("t/q", b"q", lease)],
        )
        .await
        .expect_err("put with a revoked lease");
    assert!(
        matches!(err, StoreError::LeaseNotFound(id) if id == lease.0),
        "[{b}] expected LeaseNotFound({}), got {err}",
        lease.0
    );
    assert_eq!(
        store.get("t/p").await.expect("get"),
        None,
        "[{b}] failed txn wrote t/p"
    );
}

/// Requests a store refuses, identically on every backend.
pub async fn requests_the_store_rejects(store: Arc<dyn Store>) {
    let b = store.backend();
    let err = store.put("", b"v".to_vec()).await.expect_err("empty key");
    assert!(
        matches!(err, StoreError::Rejected(_)),
        "[{b}] empty key: {err}"
    );
    let err = store
        .txn(vec![], vec![put("d/k", b"1"), Op::Delete("d/k".into())])
        .await
        .expect_err("a key twice in one txn");
    assert!(
        matches!(err, StoreError::Rejected(_)),
        "[{b}] duplicate key: {err}"
    );
    assert_eq!(
        store.get("d/k").await.expect("get"),
        None,
        "[{b}] rejected txn wrote"
    );
}

/// Listing returns exactly the keys under a prefix, in key order.
pub async fn list_by_prefix(store: Arc<dyn Store>) {
    let b = store.backend();
    let mut last = 0;
    for key in ["a/2", "ab/1", "a/10", "a", "b/1", "a/1"] {
        last = store.put(key, key.as_bytes().to_vec()).await.expect("put");
    }
    let keys = |l: &crate::Listing| l.items.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    let listing = store.list("a/").await.expect("list");
    assert_eq!(keys(&listing), ["a/1", "a/10", "a/2"], "[{b}] list a/");
    for kv in &listing.items {
        assert_eq!(kv.value, kv.key.as_bytes(), "[{b}] value of {}", kv.key);
    }
    assert!(
        listing.revision >= last,
        "[{b}] listing revision {} >= last write {last}",
        listing.revision
    );
    assert_eq!(
        keys(&store.list("ab/").await.expect("list")),
        ["ab/1"],
        "[{b}] list ab/"
    );
    assert!(
        store.list("zz/").await.expect("list").items.is_empty(),
        "[{b}] empty prefix"
    );
    assert_eq!(
        keys(&store.list("").await.expect("list")),
        ["a", "a/1", "a/10", "a/2", "ab/1", "b/1"],
        "[{b}] list everything"
    );
}

/// Every write gets a larger revision; reads report it.
pub async fn revisions_increase(store: Arc<dyn Store>) {
    let b = store.backend();
    let mut previous = 0;
    for i in 0..5 {
        let key = format!("r/{i}");
        let rev = store.put(&key, vec![i]).await.expect("put");
        assert!(rev > previous, "[{b}] {rev} > {previous}");
        let kv = store.get(&key).await.expect("get").expect("exists");
        assert_eq!(
            kv.mod_revision, rev,
            "[{b}] get reports the write's revision"
        );
        previous = rev;
    }
    let listing = store.list("r/").await.expect("list");
    assert!(
        listing.revision >= previous,
        "[{b}] listing is at or after the last write"
    );
    let max = listing.items.iter().map(|kv| kv.mod_revision).max();
    assert_eq!(max, Some(previous), "[{b}] newest item is the last write");
    let out = store
        .txn(vec![Compare::Absent("r/0".into())], vec![put("r/0", b"no")])
        .await
        .expect("txn");
    assert!(!out.succeeded);
    assert!(
        out.revision >= previous,
        "[{b}] failed txn reports the current revision"
    );
    let kv = store.get("r/0").await.expect("get").expect("exists");
    assert_ne!(kv.value, b"no", "[{b}] failed txn wrote");
}

/// A watch from a past revision sees exactly the later changes, in order,
/// then live ones; sibling prefixes do not leak in.
pub async fn watch_from_revision(store: Arc<dyn Store>) {
    let b = store.backend();
    store.put("w/pre", b"0".to_vec()).await.expect("put");
    let listing = store.list("w/").await.expect("list");
    let r1 = store.put("w/a", b"1".to_vec()).await.expect("put");
    let r2 = store.put("w/b", b"2".to_vec()).await.expect("put");
    let r3 = store.delete("w/a").await.expect("delete");
    store.put("wx/sibling", b"no".to_vec()).await.expect("put");
    store.put("x/other", b"no".to_vec()).await.expect("put");
    let r4 = store.put("w/c", b"3".to_vec()).await.expect("put");

    let mut stream = store
        .watch("w/", listing.revision + 1)
        .await
        .expect("watch");
    let expect_put = |e: WatchEvent, key: &str, value: &[u8], rev: Revision| match e {
        WatchEvent::Put(kv) => {
            assert_eq!(
                (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
                (key, value, rev),
                "[{b}]"
            );
        }
        other => panic!("[{b}] expected put of {key}, got {other:?}"),
    };
    expect_put(next_event(b, &mut stream).await, "w/a", b"1", r1);
    expect_put(next_event(b, &mut stream).await, "w/b", b"2", r2);
    assert_eq!(
        next_event(b, &mut stream).await,
        deleted("w/a", r3),
        "[{b}]"
    );
    expect_put(next_event(b, &mut stream).await, "w/c", b"3", r4);
    // Then live changes: nothing from the siblings came in between.
    let r5 = store.put("w/d", b"4".to_vec()).await.expect("put");
    expect_put(next_event(b, &mut stream).await, "w/d", b"4", r5);

    let mut middle = store.watch("w/", r2).await.expect("watch");
    expect_put(next_event(b, &mut middle).await, "w/b", b"2", r2);
    assert_eq!(
        next_event(b, &mut middle).await,
        deleted("w/a", r3),
        "[{b}]"
    );
    expect_put(next_event(b, &mut middle).await, "w/c", b"3", r4);
    expect_put(next_event(b, &mut middle).await, "w/d", b"4", r5);
}

/// A watch from revision 0 sees only changes made after it started.
pub async fn watch_from_now(store: Arc<dyn Store>) {
    let b = store.backend();
    store.put("n/old", b"old".to_vec()).await.expect("put");
    let mut stream = store.watch("n/", 0).await.expect("watch");
    let rev = store.put("n/new", b"new".to_vec()).await.expect("put");
    match next_event(b, &mut stream).await {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.key.as_str(), kv.mod_revision), ("n/new", rev), "[{b}]")
        }
        other => panic!("[{b}] expected put of n/new, got {other:?}"),
    }
}

/// Writes from many tasks reach a watcher once each, in revision order.
pub async fn watch_sees_concurrent_writes_in_order(store: Arc<dyn Store>) {
    let b = store.backend();
    let start = store.list("c/").await.expect("list").revision + 1;
    let mut stream = store.watch("c/", start).await.expect("watch");
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    store
                        .put(&format!("c/{t}/{i}"), vec![i])
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    let mut seen = std::collections::HashSet::new();
    let mut last = 0;
    for _ in 0..100 {
        let event = next_event(b, &mut stream).await;
        assert!(event.revision() > last, "[{b}] revisions in order");
        last = event.revision();
        assert!(
            seen.insert(event.key().to_owned()),
            "[{b}] {} seen twice",
            event.key()
        );
    }
    assert_eq!(seen.len(), 100);
}

/// After compaction, a watch from before it fails with `Compacted`; one
/// from the compaction revision works.
pub async fn compaction(store: Arc<dyn Store>) {
    let b = store.backend();
    let r1 = store.put("cp/a", b"1".to_vec()).await.expect("put");
    store.put("cp/b", b"2".to_vec()).await.expect("put");
    let r3 = store.put("cp/c", b"3".to_vec()).await.expect("put");
    store.compact(r3).await.expect("compact");
    let oldest = expect_compacted(store.as_ref(), "cp/", r1).await;
    assert!(
        oldest <= r3,
        "[{b}] oldest kept {oldest} <= compaction revision {r3}"
    );
    let mut stream = store
        .watch("cp/", r3)
        .await
        .expect("watch from the compaction revision");
    match next_event(b, &mut stream).await {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.key.as_str(), kv.mod_revision), ("cp/c", r3), "[{b}]")
        }
        other => panic!("[{b}] expected put of cp/c, got {other:?}"),
    }
    store.compact(r3).await.expect("compacting twice is fine");
    let all = store
        .get("cp/a")
        .await
        .expect("get")
        .expect("values survive compaction");
    assert_eq!(all.value, b"1");
}

/// 20 tasks increment one counter with compare-and-swap; no update is lost.
pub async fn concurrent_cas_loses_no_update(store: Arc<dyn Store>) {
    let b = store.backend();
    const TASKS: u64 = 20;
    const EACH: u64 = 5;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut conflicts = 0u64;
                for _ in 0..EACH {
                    loop {
                        let (n, rev) = store
                            .get_json::<u64>("counter")
                            .await
                            .expect("get")
                            .unwrap_or((0, 0));
                        if store
                            .compare_and_swap("counter", rev, encode(&(n + 1)))
                            .await
                            .expect("cas")
                        {
                            break;
                        }
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.expect("task");
    }
    let (n, _) = store
        .get_json::<u64>("counter")
        .await
        .expect("get")
        .expect("counter");
    assert_eq!(
        n,
        TASKS * EACH,
        "[{b}] lost updates ({conflicts} conflicts retried)"
    );
}

/// An expired lease deletes its keys (watchers see the deletions) and can
/// no longer be renewed or used.
pub async fn lease_expiry_deletes_keys(store: Arc<dyn Store>) {
    let b = store.backend();
    let lease = store
        .grant_lease(Duration::from_secs(1))
        .await
        .expect("grant");
    store
        .txn(
            vec![],
            vec![put_leased("l/k", b"v", lease), put("l/keep", b"v")],
        )
        .await
        .expect("put with lease");
    let kv = store.get("l/k").await.expect("get").expect("l/k");
    assert_eq!(kv.lease, Some(lease), "[{b}] key reports its lease");
    let start = store.list("l/").await.expect("list").revision + 1;
    let mut stream = store.watch("l/", start).await.expect("watch");
    let granted = Instant::now();
    match next_event(b, &mut stream).await {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "l/k", "[{b}]"),
        other => panic!("[{b}] expected deletion of l/k, got {other:?}"),
    }
    tracing::debug!(backend = b, after = ?granted.elapsed(), "lease expired");
    assert_eq!(
        store.get("l/k").await.expect("get"),
        None,
        "[{b}] expired key gone"
    );
    assert!(
        store.get("l/keep").await.expect("get").is_some(),
        "[{b}] unleased key stays"
    );
    let err = store
        .keep_alive(lease)
        .await
        .expect_err("keep-alive of an expired lease");
    assert!(
        matches!(err, StoreError::LeaseNotFound(id) if id == lease.0),
        "[{b}] {err}"
    );
    let err = store
        .txn(vec![], vec![put_leased("l/late", b"v", lease)])
        .await
        .expect_err("put with an expired lease");
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "[{b}] {err}");
}

/// Keep-alives hold a lease past its TTL; without them it expires.
pub async fn keep_alive_extends(store: Arc<dyn Store>) {
    let b = store.backend();
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.expect("grant");
    store
        .txn(vec![], vec![put_leased("ka/k", b"v", lease)])
        .await
        .expect("put with lease");
    let until = Instant::now() + ttl * 2 + Duration::from_secs(1);
    while Instant::now() < until {
        store.keep_alive(lease).await.expect("keep-alive");
        // The pacing of a lease holder, not a readiness wait.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        store.get("ka/k").await.expect("get").is_some(),
        "[{b}] kept-alive key survives 2×TTL"
    );
    let start = store.list("ka/").await.expect("list").revision + 1;
    let mut stream = store.watch("ka/", start).await.expect("watch");
    assert_eq!(
        next_event(b, &mut stream).await.key(),
        "ka/k",
        "[{b}] without keep-alives the lease expires"
    );
    assert_eq!(store.get("ka/k").await.expect("get"), None);
}

/// Revoking a lease deletes its keys at once; a revoked lease is gone.
pub async fn revoke_deletes_keys(store: Arc<dyn Store>) {
    let b = store.backend();
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store
        .txn(
            vec![],
            vec![
                put_leased("rv/a", b"1", lease),
                put_leased("rv/b", b"2", lease),
            ],
        )
        .await
        .expect("put with lease");
    let start = store.list("rv/").await.expect("list").revision + 1;
    let mut stream = store.watch("rv/", start).await.expect("watch");
    store.revoke_lease(lease).await.expect("revoke");
    let e1 = next_event(b, &mut stream).await;
    let e2 = next_event(b, &mut stream).await;
    let mut keys = [e1.key().to_owned(), e2.key().to_owned()];
    keys.sort();
    assert_eq!(keys, ["rv/a", "rv/b"], "[{b}] both keys deleted");
    assert!(matches!(e1, WatchEvent::Delete { .. }) && matches!(e2, WatchEvent::Delete { .. }));
    assert!(
        store.list("rv/").await.expect("list").items.is_empty(),
        "[{b}] keys gone"
    );
    let err = store.revoke_lease(lease).await.expect_err("second revoke");
    assert!(
        matches!(err, StoreError::LeaseNotFound(id) if id == lease.0),
        "[{b}] {err}"
    );
    let err = store
        .keep_alive(lease)
        .await
        .expect_err("keep-alive after revoke");
    assert!(matches!(err, StoreError::LeaseNotFound(_)), "[{b}] {err}");
}

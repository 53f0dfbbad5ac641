//! Tests of the embedded store: the conformance suite on both backends, and
//! what only a local file can show (reopen, crash, disk full, history).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::schema::{META, SCHEMA_KEY};
use super::*;
use crate::{StoreExt, conformance};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_in_memory() {
    init_tracing();
    conformance::run_all(|| async { EmbeddedStore::in_memory().expect("in-memory store") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_file() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let n = AtomicUsize::new(0);
    let dir_path = dir.path().to_owned();
    conformance::run_all(|| {
        let path = dir_path.join(format!("store-{}.redb", n.fetch_add(1, Ordering::SeqCst)));
        async move { EmbeddedStore::open(&path).expect("file store") }
    })
    .await;
}

#[tokio::test]
async fn reopen_keeps_data_and_revision_and_drops_leased_keys() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/dir/store.redb");
    let (revision, lease) = {
        let store = EmbeddedStore::open(&path).expect("open");
        store.put("keep", b"v".to_vec()).await.expect("put");
        let lease = store
            .grant_lease(Duration::from_secs(600))
            .await
            .expect("grant");
        let out = store
            .txn(
                vec![],
                vec![Op::Put {
                    key: "leased".into(),
                    value: b"v".to_vec(),
                    lease: Some(lease),
                }],
            )
            .await
            .expect("put leased");
        (out.revision, lease)
    };
    let store = EmbeddedStore::open(&path).expect("reopen");
    let kv = store
        .get("keep")
        .await
        .expect("get")
        .expect("kept across reopen");
    assert_eq!(kv.value, b"v");
    assert_eq!(
        store.get("leased").await.expect("get"),
        None,
        "keys of a previous process's lease are deleted"
    );
    let listing = store.list("").await.expect("list");
    assert_eq!(
        listing.revision,
        revision + 1,
        "revision kept, plus one for the orphan deletion"
    );
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // History starts at the reopen: older revisions are compacted, the next works.
    assert!(matches!(
        store.watch("", revision).await.err(),
        Some(StoreError::Compacted { .. })
    ));
    let mut stream = store.watch("", listing.revision + 1).await.expect("watch");
    let rev = store.put("after", b"x".to_vec()).await.expect("put");
    assert_eq!(rev, listing.revision + 1, "revisions continue after reopen");
    let event = stream.next().await.expect("event").expect("ok");
    assert_eq!((event.key(), event.revision()), ("after", rev));
}

#[tokio::test]
async fn second_open_of_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let _first = EmbeddedStore::open(&path).expect("open");
    let err = EmbeddedStore::open(&path).expect_err("second open");
    assert!(
        matches!(&err, StoreError::Io(m) if m.contains("already open")),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_schema_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    drop(EmbeddedStore::open(&path).expect("create"));
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("write");
        txn.open_table(META)
            .expect("meta")
            .insert(SCHEMA_KEY, 99)
            .expect("insert");
        txn.commit().expect("commit");
    }
    match EmbeddedStore::open(&path) {
        Err(StoreError::Schema { found, supported }) => {
            assert_eq!((found, supported), (99, schema::SCHEMA_VERSION));
        }
        other => panic!("expected a schema error, got {other:?}"),
    }
}

#[tokio::test]
async fn history_beyond_the_ring_is_compacted() {
    let store = EmbeddedStore::in_memory_with(EmbeddedOptions {
        history_events: 10,
        ..EmbeddedOptions::default()
    })
    .expect("store");
    let mut revs = Vec::new();
    for i in 0..30u8 {
        revs.push(store.put(&format!("h/{i}"), vec![i]).await.expect("put"));
    }
    match store.watch("h/", revs[0]).await.err() {
        Some(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, revs[0]);
            assert_eq!(oldest, revs[20], "the ring keeps the last 10 events");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut stream = store.watch("h/", revs[20]).await.expect("within the ring");
    for rev in &revs[20..] {
        let event = stream.next().await.expect("event").expect("ok");
        assert_eq!(event.revision(), *rev);
    }
}

/// Puts `n` keys one revision each and returns the revision before them.
async fn put_many(store: &EmbeddedStore, prefix: &str, n: usize) -> Revision {
    let before = store.list(prefix).await.expect("list").revision;
    for i in 0..n {
        store
            .put(&format!("{prefix}{i}"), vec![1])
            .await
            .expect("put");
    }
    before
}

#[tokio::test]
async fn lagging_watcher_catches_up_from_history() {
    let store = EmbeddedStore::in_memory_with(EmbeddedOptions {
        watch_buffer: 4,
        ..EmbeddedOptions::default()
    })
    .expect("store");
    let mut stream = store.watch("g/", 0).await.expect("watch");
    // The watcher reads nothing while 50 revisions go by a 4-slot channel.
    let before = put_many(&store, "g/", 50).await;
    for i in 0..50 {
        let event = stream
            .next()
            .await
            .expect("event")
            .expect("caught up, not compacted");
        assert_eq!(event.revision(), before + 1 + i, "no event skipped");
    }
}

#[tokio::test]
async fn watcher_behind_the_history_gets_compacted_never_a_gap() {
    let store = EmbeddedStore::in_memory_with(EmbeddedOptions {
        watch_buffer: 2,
        history_events: 8,
        ..EmbeddedOptions::default()
    })
    .expect("store");
    let mut stream = store.watch("s/", 0).await.expect("watch");
    let before = put_many(&store, "s/", 50).await;
    let mut expected = before + 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("stream answers")
        {
            Some(Ok(event)) => {
                assert_eq!(
                    event.revision(),
                    expected,
                    "events before the error are contiguous"
                );
                expected += 1;
            }
            Some(Err(StoreError::Compacted { requested, .. })) => {
                assert_eq!(
                    requested, expected,
                    "the error names the first missed revision"
                );
                break;
            }
            other => panic!("expected events then Compacted, got {other:?}"),
        }
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after Compacted"
    );
}

#[tokio::test]
async fn watch_streams_end_when_the_store_is_dropped() {
    let store = EmbeddedStore::in_memory().expect("store");
    let mut stream = store.watch("", 0).await.expect("watch");
    store.put("x", b"1".to_vec()).await.expect("put");
    drop(store);
    assert!(
        matches!(stream.next().await, Some(Ok(_))),
        "queued event still delivered"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends promptly");
    assert!(end.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_many_small_writes() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).expect("open"));
    const TASKS: usize = 50;
    const EACH: usize = 200;
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let value = format!("{{\"task\":{t},\"i\":{i}}}").into_bytes();
                    store
                        .put(&format!("obj/{t:03}/{i:04}"), value)
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let put_time = started.elapsed();

    let started = Instant::now();
    for i in 0..2000 {
        let key = format!("obj/{:03}/{:04}", i % TASKS, i % EACH);
        assert!(store.get(&key).await.expect("get").is_some());
    }
    let get_time = started.elapsed();

    let started = Instant::now();
    let listing = store.list("obj/").await.expect("list");
    let list_time = started.elapsed();
    assert_eq!(listing.items.len(), TASKS * EACH);

    let started = Instant::now();
    for i in 0..200 {
        store
            .put(&format!("seq/{i}"), b"v".to_vec())
            .await
            .expect("put");
    }
    let seq_time = started.elapsed();
    let n = (TASKS * EACH) as f64;
    tracing::info!(
        "embedded throughput: {} puts from {TASKS} tasks in {put_time:.2?} ({:.0}/s); \
         200 sequential puts in {seq_time:.2?} ({:.0}/s, one fsync each); \
         2000 gets in {get_time:.2?} ({:.0}/s); list of {} in {list_time:.2?}",
        TASKS * EACH,
        n / put_time.as_secs_f64(),
        200.0 / seq_time.as_secs_f64(),
        2000.0 / get_time.as_secs_f64(),
        listing.items.len(),
    );
    assert!(
        put_time < Duration::from_secs(10),
        "10,000 puts took {put_time:?}"
    );
}

const CRASH_CHILD_ENV: &str = "SKYVISOR_STORE_CRASH_CHILD";
const CRASH_TEST: &str = "embedded::tests::sigkill_loses_no_acknowledged_write";

/// The child side: writes from several tasks and prints each acknowledged key.
async fn crash_child(path: &Path) {
    let store = Arc::new(EmbeddedStore::open(path).expect("child open"));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..100_000 {
                    let key = format!("ack/{t}/{i}");
                    store
                        .put(&key, key.clone().into_bytes())
                        .await
                        .expect("child put");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {key}").expect("stdout");
                    out.flush().expect("stdout");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("child task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write() {
    if let Ok(path) = std::env::var(CRASH_CHILD_ENV) {
        crash_child(Path::new(&path)).await;
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([CRASH_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 500 {
        assert!(
            Instant::now() < deadline,
            "child acknowledged only {}",
            acked.len()
        );
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(key) = line.strip_prefix("ACK ") {
                    acked.push(key.to_owned());
                }
            }
            other => panic!("child output ended early: {other:?}"),
        }
    }
    child.kill().expect("SIGKILL the child");
    // Whatever it printed before dying is still in the pipe.
    for line in lines.map_while(Result::ok) {
        if let Some(key) = line.strip_prefix("ACK ") {
            acked.push(key.to_owned());
        }
    }
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed");

    let store = EmbeddedStore::open(&path).expect("reopen after SIGKILL");
    let listing = store.list("ack/").await.expect("list");
    let present: std::collections::HashSet<_> =
        listing.items.iter().map(|kv| kv.key.as_str()).collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    tracing::info!(
        acknowledged = acked.len(),
        present = present.len(),
        "no acknowledged write lost"
    );
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN)"
        );
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn disk_full_fails_cleanly_then_recovers() {
    init_tracing();
    let fs = Tmpfs::mount("2m");
    let store = EmbeddedStore::open(&fs.dir.path().join("store.redb")).expect("open");
    let mut acked = Vec::new();
    let error = loop {
        let key = format!("full/{}", acked.len());
        match store.put(&key, vec![7; 16 * 1024]).await {
            Ok(_) => acked.push(key),
            Err(e) => break (key, e),
        }
        assert!(acked.len() < 10_000, "a 2 MiB tmpfs never filled");
    };
    let (failed_key, error) = error;
    assert!(
        matches!(&error, StoreError::Io(m) if m.contains("No space left on device")),
        "disk full must be an I/O error with the OS message, got {error}"
    );
    assert!(!acked.is_empty());
    tracing::info!(acked = acked.len(), %error, "store filled up");
    // Nothing of the failed write, everything acknowledged before it.
    assert_eq!(
        store.get(&failed_key).await.expect("get after disk full"),
        None
    );
    let listing = store.list("full/").await.expect("list after disk full");
    assert_eq!(listing.items.len(), acked.len());
    // Still full: the next write fails the same way, and reads still work.
    let again = store.put("still/full", vec![7; 64 * 1024]).await;
    assert!(matches!(again, Err(StoreError::Io(_))), "{again:?}");
    assert_eq!(
        store.list("full/").await.expect("list").items.len(),
        acked.len()
    );
    // Once there is room again, writes work again without a reopen.
    fs.resize("64m");
    // Reopening is rate-limited to once a second: poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = store.put("after", b"room again".to_vec()).await {
        assert!(Instant::now() < deadline, "writes never recovered: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.get("after").await.expect("get").is_some());
    drop(store);
    let store = EmbeddedStore::open(&fs.dir.path().join("store.redb")).expect("reopen");
    assert_eq!(
        store.list("full/").await.expect("list").items.len(),
        acked.len()
    );
    assert!(store.get("after").await.expect("get").is_some());
}

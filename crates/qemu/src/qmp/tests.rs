//! The QMP client against the fake server.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::fake::{FakeQmp, FakeReply};

const T: Duration = Duration::from_secs(10);

struct Setup {
    _dir: tempfile::TempDir,
    fake: FakeQmp,
    qmp: Qmp,
}

async fn setup(timeout: Duration) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeQmp::start(&dir.path().join("qmp.sock")).expect("fake");
    let qmp = Qmp::connect(
        fake.path(),
        QmpOptions {
            command_timeout: timeout,
        },
    )
    .await
    .expect("connect");
    Setup {
        _dir: dir,
        fake,
        qmp,
    }
}

#[tokio::test]
async fn handshake_and_typed_commands() {
    let s = setup(T).await;
    assert_eq!(
        s.qmp.greeting().version,
        VersionTriple {
            major: 10,
            minor: 0,
            micro: 0
        }
    );
    assert_eq!(s.qmp.greeting().capabilities, vec!["oob".to_owned()]);
    assert_eq!(s.fake.received()[0].command, "qmp_capabilities");

    let st = s.qmp.query_status().await.expect("status");
    assert_eq!((st.running, st.status), (false, RunState::Prelaunch));
    s.qmp.cont().await.expect("cont");
    assert_eq!(
        s.qmp.query_status().await.expect("status").status,
        RunState::Running
    );
    assert_eq!(
        s.qmp.query_version().await.expect("version").package,
        "skyvisor-fake"
    );

    s.qmp
        .migrate("unix:/tmp/x.sock")
        .await
        .expect_err("not scripted");
    s.fake.script("migrate", FakeReply::Return(json!({})));
    s.qmp.migrate("unix:/tmp/x.sock").await.expect("migrate");
    let last = s
        .fake
        .received()
        .into_iter()
        .rfind(|c| c.command == "migrate")
        .expect("sent");
    assert_eq!(last.arguments, json!({"uri": "unix:/tmp/x.sock"}));
}

#[tokio::test]
async fn qemu_errors_keep_class_and_message() {
    let s = setup(T).await;
    match s.qmp.execute("no-such-command", Value::Null).await {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    s.fake.script(
        "device_del",
        FakeReply::Error {
            class: "DeviceNotFound".into(),
            desc: "Device 'x' not found".into(),
        },
    );
    let e = s.qmp.device_del("x").await.expect_err("error");
    assert_eq!(
        e.to_string(),
        "QMP command device_del failed: Device 'x' not found (DeviceNotFound)"
    );
    // Still usable afterwards.
    s.qmp.stop().await.expect("stop");
}

#[tokio::test]
async fn wrong_answer_shape_is_a_decode_error() {
    let s = setup(T).await;
    s.fake.script(
        "query-status",
        FakeReply::Return(json!({"running": "maybe"})),
    );
    assert!(matches!(
        s.qmp.query_status().await,
        Err(QmpError::Decode { .. })
    ));
}

#[tokio::test]
async fn concurrent_commands_get_their_own_answers() {
    let s = setup(T).await;
    s.fake.script(
        "slow",
        FakeReply::Delayed(
            Duration::from_secs(2),
            Box::new(FakeReply::Return(json!("slow"))),
        ),
    );
    s.fake.script("fast", FakeReply::Return(json!("fast")));
    let started = tokio::time::Instant::now();
    let (a, b, c) = tokio::join!(
        s.qmp.execute("slow", Value::Null),
        s.qmp.execute("fast", json!({"n": 1})),
        async {
            // Answered before the slow one although sent after it.
            let r = s.qmp.execute("fast", Value::Null).await;
            (r, started.elapsed())
        },
    );
    assert_eq!(a.expect("slow"), json!("slow"));
    assert_eq!(b.expect("fast"), json!("fast"));
    let (c, fast_after) = c;
    assert_eq!(c.expect("fast"), json!("fast"));
    assert!(
        fast_after < Duration::from_secs(2),
        "the fast answer waited for the slow one: {fast_after:?}"
    );

    let many = futures::future::join_all((0..50).map(|i| {
        let q = s.qmp.clone();
        async move { (i, q.execute("fast", json!({"i": i})).await) }
    }))
    .await;
    for (_, r) in many {
        assert_eq!(r.expect("fast"), json!("fast"));
    }
}

#[tokio::test]
async fn timeouts_leave_the_connection_usable() {
    let s = setup(Duration::from_millis(200)).await;
    s.fake.script("hang", FakeReply::Never);
    match s.qmp.execute("hang", Value::Null).await {
        Err(QmpError::Timeout { command, after }) => {
            assert_eq!(command, "hang");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        s.qmp.inner.shared.lock().pending.is_empty(),
        "the timed-out slot is freed"
    );
    let r = s
        .qmp
        .execute_with_timeout("query-status", Value::Null, T)
        .await
        .expect("usable");
    assert_eq!(r["status"], "prelaunch");

    // A late answer to an abandoned command is dropped, not misdelivered.
    s.fake.script(
        "late",
        FakeReply::Delayed(
            Duration::from_millis(400),
            Box::new(FakeReply::Return(json!("late"))),
        ),
    );
    assert!(matches!(
        s.qmp.execute("late", Value::Null).await,
        Err(QmpError::Timeout { .. })
    ));
    s.fake.script(
        "next",
        FakeReply::Delayed(
            Duration::from_millis(300),
            Box::new(FakeReply::Return(json!("next"))),
        ),
    );
    let next = s
        .qmp
        .execute_with_timeout("next", Value::Null, T)
        .await
        .expect("next");
    assert_eq!(next, json!("next"));
}

#[tokio::test]
async fn events_reach_every_subscriber_in_order() {
    let s = setup(T).await;
    let mut a = s.qmp.events();
    let mut b = s.qmp.events();
    assert!(s.fake.emit("STOP", json!({})));
    assert!(s.fake.emit(
        "SHUTDOWN",
        json!({"guest": true, "reason": "guest-shutdown"})
    ));
    assert!(s.fake.emit("MIGRATION", json!({"status": "active"})));
    for sub in [&mut a, &mut b] {
        let e1 = sub.recv().await.expect("event");
        assert_eq!(e1.kind(), EventKind::Stop);
        assert!(e1.timestamp > std::time::UNIX_EPOCH);
        let e2 = sub.recv().await.expect("event");
        assert_eq!(
            e2.kind(),
            EventKind::Shutdown(ShutdownInfo {
                guest: true,
                reason: ShutdownCause::GuestShutdown
            })
        );
        let e3 = sub.recv().await.expect("event");
        assert_eq!(
            e3.kind(),
            EventKind::Migration {
                status: MigrationStatus::Active
            }
        );
    }
    // Events caused by commands arrive too.
    s.qmp.system_reset().await.expect("reset");
    let reset = a
        .wait_for(|e| e.name == "RESET")
        .await
        .expect("reset event");
    assert!(matches!(
        reset.kind(),
        EventKind::Reset(ShutdownInfo { guest: false, .. })
    ));
}

#[tokio::test]
async fn eof_fails_waiting_commands_and_ends_event_streams() {
    let s = setup(T).await;
    let mut events = s.qmp.events();
    s.fake.script("hang", FakeReply::Never);
    let waiting = {
        let q = s.qmp.clone();
        tokio::spawn(async move { q.execute("hang", Value::Null).await })
    };
    // Make sure the command reached the server before it hangs up.
    let deadline = tokio::time::Instant::now() + T;
    while !s.fake.received().iter().any(|c| c.command == "hang") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "command never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.fake.emit("POWERDOWN", json!({})));
    s.fake.disconnect();

    let r = tokio::time::timeout(T, waiting)
        .await
        .expect("in time")
        .expect("join");
    assert!(
        matches!(&r, Err(QmpError::Disconnected { command: Some(c) }) if c == "hang"),
        "{r:?}"
    );
    // The event sent before the hang-up still arrives, then the end.
    assert_eq!(
        events.recv().await.expect("event").kind(),
        EventKind::Powerdown
    );
    assert_eq!(events.recv().await, Err(EventStreamError::Closed));
    tokio::time::timeout(T, s.qmp.closed())
        .await
        .expect("closed resolves");
    assert!(!s.qmp.is_connected());
    assert!(matches!(
        s.qmp.cont().await,
        Err(QmpError::Disconnected { .. })
    ));
    let mut late = s.qmp.events();
    assert_eq!(late.recv().await, Err(EventStreamError::Closed));
}

#[tokio::test]
async fn quit_counts_a_hang_up_as_success() {
    let s = setup(T).await;
    let mut events = s.qmp.events();
    s.qmp.quit().await.expect("quit");
    let ev = events
        .wait_for(|e| e.name == "SHUTDOWN")
        .await
        .expect("shutdown");
    assert_eq!(
        ev.kind(),
        EventKind::Shutdown(ShutdownInfo {
            guest: false,
            reason: ShutdownCause::HostQmpQuit
        })
    );
    s.fake.script("quit", FakeReply::Disconnect);
    let s2 = setup(T).await;
    s2.fake.script("quit", FakeReply::Disconnect);
    s2.qmp.quit().await.expect("hang-up is success");
}

#[tokio::test]
async fn dropping_the_client_frees_the_socket_for_the_next() {
    let s = setup(T).await;
    let path = s.fake.path().to_owned();
    drop(s.qmp);
    // The fake, like QEMU, serves one client at a time: a second client only
    // gets its greeting once the first is gone.
    let q2 = Qmp::connect(&path, QmpOptions { command_timeout: T })
        .await
        .expect("reconnect");
    assert_eq!(s.fake.connections(), 2);
    q2.query_status().await.expect("works");
}

#[tokio::test]
async fn bad_greetings_fail_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"{\"hello\": 1}\n").await;
            // Keep it open until the client gives up.
            let mut buf = [0u8; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        }
    });
    let e = Qmp::connect(&path, QmpOptions { command_timeout: T })
        .await
        .expect_err("bad greeting");
    assert!(
        matches!(&e, QmpError::Handshake { reason } if reason.contains("not a QMP greeting")),
        "{e}"
    );

    let e = Qmp::connect(&dir.path().join("missing.sock"), QmpOptions::default())
        .await
        .expect_err("no socket");
    assert!(matches!(e, QmpError::Connect { .. }));
}

#[tokio::test]
async fn typed_helpers_send_qemu_10_arguments() {
    let s = setup(T).await;
    for c in [
        "migrate-set-parameters",
        "blockdev-mirror",
        "announce-self",
        "nbd-server-start",
        "block-export-add",
        "block-job-cancel",
        "migrate-set-capabilities",
    ] {
        s.fake.script(c, FakeReply::Return(json!({})));
    }
    s.fake.script(
        "human-monitor-command",
        FakeReply::Return(json!("info\r\n")),
    );
    s.fake.script(
        "query-block-jobs",
        FakeReply::Return(
            json!([{"type": "mirror", "device": "m0", "len": 10, "offset": 5, "busy": true,
            "paused": false, "speed": 0, "io-status": "ok", "ready": false, "status": "running",
            "auto-finalize": true, "auto-dismiss": true}]),
        ),
    );
    s.qmp
        .migrate_set_parameters(&MigrationParameters {
            max_bandwidth: Some(1 << 30),
            ..Default::default()
        })
        .await
        .expect("params");
    s.qmp
        .migrate_set_capabilities(&[(MigrationCapability::Events, true)])
        .await
        .expect("caps");
    s.qmp
        .blockdev_mirror(&BlockdevMirror {
            job_id: "m0".into(),
            device: "root".into(),
            target: "root-new".into(),
            sync: MirrorSync::Full,
            speed: None,
            copy_mode: Some("write-blocking".into()),
        })
        .await
        .expect("mirror");
    s.qmp
        .announce_self(&AnnounceParameters::default())
        .await
        .expect("announce");
    s.qmp
        .nbd_server_start(&NbdListen::Inet {
            host: "127.0.0.1".into(),
            port: 10809,
        })
        .await
        .expect("nbd start");
    s.qmp
        .nbd_server_add("root", "vol1", true)
        .await
        .expect("export");
    s.qmp.block_job_cancel("m0", false).await.expect("cancel");
    assert_eq!(
        s.qmp
            .human_monitor_command("info status")
            .await
            .expect("hmp"),
        "info\r\n"
    );
    let jobs = s.qmp.query_block_jobs().await.expect("jobs");
    assert_eq!(
        (jobs[0].device.as_str(), jobs[0].status.clone()),
        ("m0", JobStatus::Running)
    );

    let args = |name: &str| {
        s.fake
            .received()
            .into_iter()
            .find(|c| c.command == name)
            .map(|c| c.arguments)
            .expect("sent")
    };
    assert_eq!(
        args("migrate-set-parameters"),
        json!({"max-bandwidth": 1u64 << 30})
    );
    assert_eq!(
        args("migrate-set-capabilities"),
        json!({"capabilities": [{"capability": "events", "state": true}]})
    );
    assert_eq!(
        args("blockdev-mirror"),
        json!({"job-id": "m0", "device": "root", "target": "root-new", "sync": "full", "copy-mode": "write-blocking"})
    );
    assert_eq!(
        args("announce-self"),
        json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
    );
    assert_eq!(
        args("nbd-server-start"),
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}})
    );
    assert_eq!(
        args("block-export-add"),
        json!({"type": "nbd", "id": "vol1", "node-name": "root", "name": "vol1", "writable": true})
    );
    assert_eq!(
        args("block-job-cancel"),
        json!({"device": "m0", "force": false})
    );
}

//! Our QMP client against a real QEMU running the test guest.

use std::process::Stdio;
use std::time::{Duration, Instant};

use migrator::qmp::{Qmp, QmpError};
use tests::guest;
use tests::proc::ChildGuard;

#[tokio::test]
async fn qmp_commands_events_and_errors_against_a_running_guest() {
    let k = guest::kernel(&guest::cache_dir()).expect("guest kernel and initramfs");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.img");
    guest::rootfs(&disk, 64, &[]).expect("rootfs");
    let sock = dir.path().join("qmp.sock");
    let mut cmd = guest::qemu_command(&k, &disk, "");
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let _qemu = ChildGuard::spawn(&mut cmd).expect("qemu");
    let started = Instant::now();
    let qmp = loop {
        match Qmp::connect(&sock).await {
            Ok(q) => break q,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    assert!(
        qmp.version.starts_with(|c: char| c.is_ascii_digit()),
        "{}",
        qmp.version
    );
    let t = Duration::from_secs(10);

    let status = qmp
        .execute_timeout("query-status", None, t)
        .await
        .expect("query-status");
    assert_eq!(status["running"], true, "{status}");

    let mut events = qmp.events();
    qmp.execute_timeout("stop", None, t).await.expect("stop");
    Qmp::wait_event(&mut events, "STOP", t)
        .await
        .expect("STOP event");
    let status = qmp
        .execute_timeout("query-status", None, t)
        .await
        .expect("query-status");
    assert_eq!(status["status"], "paused", "{status}");
    qmp.execute_timeout("cont", None, t).await.expect("cont");
    Qmp::wait_event(&mut events, "RESUME", t)
        .await
        .expect("RESUME event");

    // concurrent commands each get their own answer
    let (a, b) = tokio::join!(
        qmp.execute("query-status", None),
        qmp.execute("query-name", None)
    );
    assert_eq!(a.expect("a")["status"], "running");
    assert!(b.expect("b").is_object());

    match qmp.execute_timeout("no-such-command", None, t).await {
        Err(QmpError::Command { class, command, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert_eq!(command, "no-such-command");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match qmp
        .execute_timeout(
            "migrate-set-parameters",
            Some(serde_json::json!({"downtime-limit": "soon"})),
            t,
        )
        .await
    {
        Err(e @ QmpError::Command { .. }) => {
            assert!(e.to_string().contains("migrate-set-parameters"), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let _ = qmp.execute_timeout("quit", None, t).await;
    // QEMU is gone: later commands fail clearly instead of hanging
    tokio::time::sleep(Duration::from_millis(500)).await;
    match qmp.execute_timeout("query-status", None, t).await {
        Err(QmpError::Closed(_)) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}

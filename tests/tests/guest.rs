//! The guest test bed boots and its writer keeps a gap-free, durable log
//! (needs qemu-system-x86, busybox-static, cpio, e2fsprogs and the Debian
//! archive for the kernel: `sudo bash tests/install-deps.sh`).

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::guest;
use tests::proc::ChildGuard;

#[test]
fn the_guest_boots_writes_its_log_without_gaps_and_shuts_down_clean() {
    let k = guest::kernel(&guest::cache_dir()).expect("guest kernel and initramfs");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.img");
    guest::rootfs(&disk, 64, &[("index.html", b"hello from the guest\n")]).expect("rootfs");

    let mut cmd = guest::qemu_command(&k, &disk, "guest_beats=150");
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child =
        ChildGuard::spawn(&mut cmd).expect("qemu-system-x86_64 (install qemu-system-x86)");
    let out = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("console");
    let started = Instant::now();
    let mut console = Vec::new();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        console.push(line.trim().to_string());
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the guest ran too long:\n{}",
            console.join("\n")
        );
    }
    let status = child.0.as_mut().expect("child").wait().expect("qemu exit");
    let text = console.join("\n");
    assert!(status.success(), "qemu failed ({status}):\n{text}");
    assert!(console.iter().any(|l| l.ends_with("guest ready")), "{text}");
    assert!(
        console.iter().any(|l| l.ends_with("heartbeat 150")),
        "{text}"
    );
    assert!(
        console.iter().any(|l| l.ends_with("guest halted")),
        "{text}"
    );

    // the writer's log: consecutive sequence numbers from 1, no gap, no duplicate
    let log = guest::read_file(&disk, "/var/log/writer.log").expect("writer log");
    let log = String::from_utf8_lossy(&log);
    let seqs: Vec<u64> = log
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .expect("sequence")
        })
        .collect();
    assert!(seqs.len() >= 20, "only {} log lines", seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1, "gap or duplicate at line {}", i + 1);
    }
    // and the filesystem is clean
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

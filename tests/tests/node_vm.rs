//! A running guest on nodes: node A boots it from its own launch file, it
//! moves to node B and home again (`migrator node migrate`), memory and disk
//! through the link, and never stops where the guest could tell, beyond the
//! switchover's pause.

use std::time::Duration;

use tests::guest;
use tests::netns::available;
use tests::vmbed::VmBed;

fn summary(events: &[serde_json::Value]) -> serde_json::Value {
    events
        .iter()
        .find(|e| e["event"] == "summary")
        .cloned()
        .unwrap_or_else(|| panic!("no summary among {events:?}"))
}

fn state(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(dir.join("root.state")).expect("state file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("state JSON");
    v["state"].as_str().unwrap_or("?").to_string()
}

#[test]
fn ring_a_running_guest_moves_to_another_node_and_home_again() {
    assert!(available(), "needs root (network namespaces)");
    let bed = VmBed::new(2500, None).expect("VM test bed");
    let nodes = bed.start_nodes().expect("two nodes");
    bed.wait_beats("A", 20, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("node A boots the guest: {e:#}\n{}", bed.logs()));

    let there = summary(&bed.node_migrate("A", "B", &[]).expect("A -> B"));
    let at = bed.last_beat("A");
    bed.wait_beats("B", at + 20, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the guest runs on at B: {e:#}\n{}", bed.logs()));
    assert_eq!(
        (state(&nodes.a_dir), state(&nodes.b_dir)),
        ("moved".into(), "complete".into())
    );

    let home = summary(&bed.node_migrate("B", "A", &[]).expect("B -> A"));
    let at = bed.last_beat("B");
    bed.wait_beats("A", at + 20, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the guest runs on at A again: {e:#}\n{}", bed.logs()));
    assert_eq!(
        (state(&nodes.a_dir), state(&nodes.b_dir)),
        ("complete".into(), "moved".into())
    );

    // Memory moved both times; the way home reused the disk A kept.
    for s in [&there, &home] {
        assert!(
            s["vm"]["memory_wire_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{s}"
        );
    }
    eprintln!("there: {there}\nhome: {home}");
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    // what A kept and still matched: most of the disk
    assert!(
        n(&home, "resumed_bytes") * 4 > n(&home, "size_bytes") * 3,
        "{home}"
    );
    assert!(
        n(&home, "wire_bytes") * 4 < n(&there, "wire_bytes"),
        "the way home put {} bytes of disk on the wire, the way there {}",
        n(&home, "wire_bytes"),
        n(&there, "wire_bytes")
    );

    // Two switches, each going on exactly where the guest stopped.
    let (switches, gap) = bed.continuity_across().expect("continuity");
    eprintln!("largest heartbeat gap across both moves: {gap:?}");
    assert_eq!(switches.len(), 2, "{switches:?}");
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");

    // It halts at A: its writer's log is whole and the filesystem clean.
    bed.wait_line("A", "guest halted", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs()));
    std::thread::sleep(Duration::from_millis(500));
    let image = nodes.a_dir.join("root.img");
    let lines = guest::check_writer_log(&image).expect("writer's log");
    assert!(lines > 100, "only {lines} log lines");
    guest::fsck_clean(&image).expect("fsck");
}

/// Live QEMU processes (not zombies) on this machine: the VM slot lock
/// keeps other VM tests off it meanwhile.
fn qemus() -> usize {
    let out = std::process::Command::new("pgrep")
        .args(["-c", "-x", "-r", "D,R,S,T", "qemu-system-x86"])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn recover_kill_9_of_the_destination_node_after_its_commit_boots_the_vm_there_only() {
    assert!(available(), "needs root (network namespaces)");
    let bed = VmBed::new(2500, None).expect("VM test bed");
    let mut nodes = bed
        .start_nodes_with(Some("dest.after_commit_record"))
        .expect("two nodes");
    bed.wait_beats("A", 20, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("node A boots the guest: {e:#}\n{}", bed.logs()));
    let moving = std::thread::scope(|s| {
        let m = s.spawn(|| bed.node_migrate("A", "B", &[]));
        // B records the commit and dies (its QEMU with it, before it ran)
        let t = std::time::Instant::now();
        while nodes
            .b
            .0
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "B was not killed at its commit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        nodes.b = bed.spawn_node("B", None).expect("B starts again");
        m.join().expect("migrate thread")
    });
    // A, in doubt, asked B: B had committed, so A sent it the rest and quit.
    moving.unwrap_or_else(|e| panic!("the move finishes once B is back: {e:#}"));
    assert_eq!(
        (state(&nodes.a_dir), state(&nodes.b_dir)),
        ("moved".into(), "complete".into())
    );
    // Its memory died with B's first process: B boots it from its disk.
    bed.wait_beats("B", 20, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("B boots the VM: {e:#}\n{}", bed.logs()));
    // the source's QEMU quits once its last block is in: give it a moment
    let t = std::time::Instant::now();
    while qemus() > 1 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = std::process::Command::new("pgrep")
        .args(["-a", "-x", "qemu-system-x86"]) // zombies too, to tell them apart
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert_eq!(
        qemus(),
        1,
        "exactly one QEMU runs the VM:\n{ps}\n{}",
        bed.logs()
    );
    let b_log = std::fs::read_to_string(bed.path("node-B.log")).unwrap_or_default();
    assert!(b_log.contains("booting it"), "{b_log}");
}

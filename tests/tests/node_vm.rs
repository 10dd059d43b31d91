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

    let there = summary(&bed.node_migrate("A", "B").expect("A -> B"));
    let at = bed.last_beat("A");
    bed.wait_beats("B", at + 20, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the guest runs on at B: {e:#}\n{}", bed.logs()));
    assert_eq!(
        (state(&nodes.a_dir), state(&nodes.b_dir)),
        ("moved".into(), "complete".into())
    );

    let home = summary(&bed.node_migrate("B", "A").expect("B -> A"));
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
    assert_eq!(switches, 2);
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

//! A running guest moves from one QEMU to another — memory, CPU state and
//! disk — between two network namespaces, through `migrator disk migrate
//! --qmp`: the source disk server drives the source QEMU, the destination
//! agent starts the destination QEMU from its launch file, and the memory
//! stream and the disk blocks share our one TLS link.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrator::qmp::Qmp;
use tests::bed::start_agent;
use tests::netns::available;
use tests::vmbed::{summary, wait_exit, VmBed};

fn bed(beats: u64) -> VmBed {
    assert!(available(), "needs root (network namespaces)");
    VmBed::new(beats, None).expect("VM test bed")
}

/// Migrates the running guest with `extra` options; returns the summary.
fn migrate_ok(bed: &VmBed, addr: &str, extra: &[&str]) -> serde_json::Value {
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut m = bed.migrate(addr, extra, events.clone()).expect("migrate");
    let st = wait_exit(&mut m, Duration::from_secs(300)).expect("migrate exits");
    assert!(st.success(), "migration failed\n{}", bed.logs());
    let sum = summary(&events).expect("summary");
    eprintln!("summary: {sum}");
    sum
}

/// The guest runs on at the destination, exactly where it stopped, and its
/// disk there is whole once it halts.
fn check_moved(bed: &VmBed) {
    let gap = bed.continuity().expect("continuity");
    eprintln!("guest-visible pause (largest heartbeat gap): {gap:?}");
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");
    let lines = bed
        .check_disk_after_halt(&bed.agent_dir.join("root.img"))
        .expect("the destination's disk");
    assert!(lines > 100, "only {lines} log lines");
    // the agent watched the guest it resumed and saw it shut down cleanly
    let agent_log = bed.agent_dir.join("agent.log");
    let t = std::time::Instant::now();
    let said = loop {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("the VM stopped at the destination"))
        {
            break l.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent never said the VM stopped\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        said.contains("guest-shutdown") && said.contains("INFO"),
        "{said}"
    );
}

#[test]
fn a_running_guest_moves_with_its_disk_through_our_link() {
    let bed = bed(1500);
    let mut run = bed.start_all().expect("guest and agent");
    let addr = run.addr.clone();

    let sum = migrate_ok(&bed, &addr, &[]);
    let vm = &sum["vm"];
    // the memory stream went through our link, compressed
    assert!(
        vm["memory_wire_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{sum}"
    );
    assert!(
        vm["memory_wire_bytes"].as_u64() < vm["memory_stream_bytes"].as_u64(),
        "{sum}"
    );
    assert!(vm["paused_ms"].as_f64().is_some(), "{sum}");
    // the source QEMU is gone and its copy of the disk refuses to serve again
    assert!(wait_exit(&mut run.src, Duration::from_secs(30))
        .expect("source QEMU exits")
        .success());
    assert!(bed.path("root.img.moved").exists());
    check_moved(&bed);
}

/// The destination agent dies in the middle of the memory phase: the source
/// VM runs on, never paused, and a second migration completes.
#[test]
fn killing_the_agent_mid_memory_leaves_the_guest_running_at_the_source() {
    let bed = bed(3000);
    let (_server, _src) = bed.start_vm().expect("source VM");
    bed.wait_beats("src", 20, Duration::from_secs(60))
        .expect("guest runs");
    let (mut agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");

    // slow enough that the memory phase lasts a few seconds
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut m = bed
        .migrate(&addr, &["--max-rate-mbit", "100"], events.clone())
        .expect("migrate");
    let in_memory = || {
        events
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e["event"] == "memory")
    };
    let t = std::time::Instant::now();
    while !in_memory() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no memory phase\n{}",
            bed.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // the agent's children (QEMU), from any of its threads
    let pid = agent.pid().expect("agent pid");
    let children: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("agent tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert_eq!(
        children.len(),
        1,
        "the agent runs the destination QEMU: {children:?}"
    );
    agent.kill();
    let st = wait_exit(&mut m, Duration::from_secs(60)).expect("migrate exits");
    assert!(!st.success(), "the migration cannot succeed");
    assert!(
        events
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e["event"] == "error"),
        "the failure is reported"
    );
    // the agent's QEMU died with it
    for p in &children {
        let t = std::time::Instant::now();
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "destination QEMU {p} outlived its agent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // the source runs, not paused, and its guest keeps printing
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let q = Qmp::connect(&bed.path("a.qmp")).await.expect("qmp");
        q.execute_timeout("query-status", None, Duration::from_secs(10))
            .await
            .expect("status")
    });
    assert_eq!(status["status"], "running", "{status}");
    let before = bed.last_beat("src");
    bed.wait_beats("src", before + 10, Duration::from_secs(20))
        .expect("the source guest runs on");
    assert!(!bed.path("root.img.moved").exists());

    // a second attempt (a fresh agent, resuming its partial disk) completes
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");
    bed.tail_destination();
    let sum = migrate_ok(&bed, &addr, &[]);
    assert!(sum["resumed_bytes"].as_u64().unwrap_or(0) > 0, "{sum}");
    check_moved(&bed);
}

/// Post-copy: the guest runs at the destination while its memory is still
/// arriving, fetched on demand through our link.
#[test]
fn post_copy_moves_the_guest_too() {
    let bed = bed(1500);
    let mut run = bed.start_all().expect("guest and agent");
    let addr = run.addr.clone();
    // slow memory, and post-copy from the first pass on
    let sum = migrate_ok(
        &bed,
        &addr,
        &["--postcopy-after", "1", "--max-rate-mbit", "200"],
    );
    assert_eq!(sum["vm"]["postcopy"], true, "{sum}");
    assert!(wait_exit(&mut run.src, Duration::from_secs(30))
        .expect("source QEMU exits")
        .success());
    check_moved(&bed);
}

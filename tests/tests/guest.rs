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

    // the writer's log: consecutive sequence numbers from 1, no gap, no
    // duplicate; and the filesystem is clean
    let lines = guest::check_writer_log(&disk).expect("writer log");
    assert!(lines >= 20, "only {lines} log lines");
    guest::fsck_clean(&disk).expect("e2fsck");
}

#[test]
fn the_guest_serves_http_on_its_network_from_a_namespace() {
    use std::io::{Read as _, Write as _};
    use tests::netns::{available, in_netns, unique, Netns};
    assert!(available(), "needs root (network namespaces)");
    let k = guest::kernel(&guest::cache_dir()).expect("guest kernel and initramfs");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.img");
    let page = b"served from the guest's disk\n".repeat(1000);
    guest::rootfs(&disk, 64, &[("index.html", &page)]).expect("rootfs");

    let site = Netns::new(unique("gs")).expect("netns");
    let tap = unique("tp");
    site.exec(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"])
        .expect("tap");
    site.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", &tap])
        .expect("addr");
    site.exec(&["ip", "link", "set", &tap, "up"]).expect("up");

    let plain = guest::qemu_command(
        &k,
        &disk,
        "guest_ip=10.1.0.10/24 guest_gw=10.1.0.1 guest_beats=2000",
    );
    let mut cmd = site.command("qemu-system-x86_64");
    cmd.args(plain.get_args());
    guest::add_tap(&mut cmd, &tap);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd).expect("qemu");
    let out = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("console");
    let mut lines = BufReader::new(out).lines();
    let started = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("console closed before the guest was ready")
            .expect("read");
        if line.trim().ends_with("guest ready") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the guest did not come up"
        );
    }
    // fetch the page over the guest's network
    let to: std::net::SocketAddr = "10.1.0.10:80".parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let got = in_netns(&site.name, move || -> std::io::Result<Vec<u8>> {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut all = Vec::new();
            s.read_to_end(&mut all)?;
            Ok(all)
        })
        .expect("netns");
        match got {
            Ok(all) => break all,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot fetch from the guest: {e}"),
        }
    };
    let split = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header");
    assert!(
        body.starts_with(b"HTTP/1.0 200") || body.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&body[..split])
    );
    assert_eq!(&body[split + 4..], &page[..], "the page came back changed");
}

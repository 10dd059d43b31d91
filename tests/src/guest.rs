//! The guest test bed: a small Linux guest built on the fly from Debian
//! packages, booted by QEMU with TCG (KVM hangs on these machines).
//!
//! - kernel: Debian's cloud kernel (`apt-get download`, `dpkg -x`), the
//!   version the `linux-image-cloud-amd64` metapackage points to;
//! - initramfs: busybox-static, the virtio modules, and an `/init` that loads
//!   them and switches to the ext4 root on `/dev/vda`;
//! - root filesystem: an ext4 image made with `mke2fs -d` (no loop mounts)
//!   holding busybox and an `/sbin/init` that configures `eth0` from the
//!   kernel command line (`guest_ip=A/N guest_gw=G`), serves `/www` with
//!   busybox httpd on port 80, echoes on TCP port 7 (`nc -ll -e cat`), appends `sequence uptime` lines to
//!   `/var/log/writer.log` with an fdatasync every 10 ms, and prints
//!   `heartbeat N` on the console every 20 ms; with `guest_beats=N` it
//!   shuts down cleanly after N heartbeats.
//!
//! Kernel and initramfs are cached under `cache/<kernel package version>/`,
//! so a machine builds them once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The modules the guest needs; their dependencies are found from each
/// module's own `depends=` field (the package ships no modules.dep).
const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

/// Module name → file, for every module under `dir`.
fn index_modules(dir: &Path, out: &mut std::collections::HashMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            out.insert(name.replace('-', "_"), p.clone());
        }
    }
    Ok(())
}

/// The `depends=` list in a module's .modinfo section.
fn module_deps(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path)?;
    let key = b"depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// `wanted` and their dependencies, dependencies first.
fn load_order(
    index: &std::collections::HashMap<String, PathBuf>,
    wanted: &[&str],
) -> Result<Vec<PathBuf>> {
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        seen: &mut std::collections::HashSet<String>,
        out: &mut Vec<PathBuf>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        for d in module_deps(path)? {
            visit(&d, index, seen, out)?;
        }
        out.push(path.clone());
        Ok(())
    }
    let (mut seen, mut out) = (std::collections::HashSet::new(), Vec::new());
    for w in wanted {
        visit(w, index, &mut seen, &mut out)?;
    }
    Ok(out)
}

pub struct GuestKernel {
    pub version: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cloud kernel package to use: what the metapackage depends on.
pub fn kernel_package() -> Result<String> {
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .context("apt-cache knows no linux-image-cloud-amd64 (run apt-get update)")
}

/// Builds (or finds in `cache`) the guest kernel and initramfs.
pub fn kernel(cache: &Path) -> Result<GuestKernel> {
    let pkg = kernel_package()?;
    let dir = cache.join(&pkg);
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
    if kernel.exists() && initrd.exists() {
        return Ok(GuestKernel {
            version: pkg,
            kernel,
            initrd,
        });
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = tempfile::tempdir_in(&dir)?;
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(work.path()))
    .with_context(|| format!("cannot download {pkg}"))?;
    let deb = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let kver = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_string();
    let mods = root.join("lib/modules").join(&kver).join("kernel");

    let initramfs = work.path().join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(initramfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", initramfs.join("bin/busybox"))
        .context("cannot copy /bin/busybox (install busybox-static)")?;
    let mut index = std::collections::HashMap::new();
    index_modules(&mods, &mut index)?;
    let mut insmods = String::new();
    for src in load_order(&index, MODULES)? {
        let name = src.file_name().context("module name")?;
        std::fs::copy(&src, initramfs.join("lib/modules").join(name))?;
        insmods.push_str(&format!("insmod /lib/modules/{}\n", name.to_string_lossy()));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         {insmods}\
         mount -t ext4 /dev/vda /newroot || {{ echo 'initramfs: cannot mount /dev/vda'; poweroff -f; }}\n\
         mount --move /dev /newroot/dev\numount /proc /sys\n\
         exec switch_root /newroot /sbin/init\n"
    );
    let init_path = initramfs.join("init");
    std::fs::write(&init_path, init)?;
    set_exec(&init_path)?;
    // cpio archive, gzip: `find . | cpio -o -H newc | gzip`
    let archive = work.path().join("initrd.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        initramfs.display(),
        archive.display()
    )))
    .context("cannot build the initramfs (install cpio)")?;
    std::fs::copy(&vmlinuz, &kernel)?;
    std::fs::rename(&archive, &initrd)?;
    Ok(GuestKernel {
        version: pkg,
        kernel,
        initrd,
    })
}

fn set_exec(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The guest's `/sbin/init`.
const GUEST_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -o remount,rw /
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
ip link set lo up
if [ -n "$(arg guest_ip)" ]; then
  ip addr add "$(arg guest_ip)" dev eth0
  ip link set eth0 up
  [ -n "$(arg guest_gw)" ] && ip route add default via "$(arg guest_gw)"
fi
httpd -p 80 -h /www
# an echo service for interactive sessions (each connection runs cat)
nc -ll -p 7 -e /bin/cat &
(
  i=$(tail -n 1 /var/log/writer.log 2>/dev/null | cut -d' ' -f1)
  i=${i:-0}
  while :; do
    i=$((i + 1))
    echo "$i $(cut -d' ' -f1 /proc/uptime)" >> /var/log/writer.log
    sync -d /var/log/writer.log
    usleep 10000
  done
) &
writer=$!
echo "guest ready"
beats=$(arg guest_beats)
n=0
while [ -z "$beats" ] || [ "$n" -lt "$beats" ]; do
  n=$((n + 1))
  echo "heartbeat $n"
  usleep 20000
done
# a clean shutdown: stop the writer, flush, read-only root, power off
kill $writer
wait $writer 2>/dev/null
sync
mount -o remount,ro /
echo "guest halted"
poweroff -f
"#;

/// Makes the guest's root filesystem: an ext4 image of `size_mib` with
/// busybox, the init above, and `www` files (name, bytes) for httpd.
pub fn rootfs(image: &Path, size_mib: u64, www: &[(&str, &[u8])]) -> Result<()> {
    let work = tempfile::tempdir()?;
    let root = work.path();
    for d in [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "var/log", "www", "usr/bin", "usr/sbin",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("cannot copy /bin/busybox (install busybox-static)")?;
    // the applets the init uses, as links to busybox
    for a in [
        "sh", "mount", "umount", "ip", "tr", "sed", "cut", "tail", "echo", "sync", "usleep",
        "httpd", "cat", "ls", "poweroff", "sleep", "kill", "nc",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    let init = root.join("sbin/init");
    std::fs::write(&init, GUEST_INIT)?;
    set_exec(&init)?;
    for (name, bytes) in www {
        std::fs::write(root.join("www").join(name), bytes)?;
    }
    let _ = std::fs::remove_file(image);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(root)
        .arg(image)
        .arg(format!("{size_mib}M")))
    .context("mke2fs failed (install e2fsprogs)")?;
    Ok(())
}

/// A file of an ext4 image, read without mounting it (`debugfs`).
pub fn read_file(image: &Path, path: &str) -> Result<Vec<u8>> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .context("cannot run debugfs (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "debugfs cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Checks the guest writer's log on `image`: sequence numbers 1..=n, no gap,
/// no duplicate. Returns n.
pub fn check_writer_log(image: &Path) -> Result<usize> {
    let log = read_file(image, "/var/log/writer.log")?;
    let mut n = 0usize;
    for (i, line) in String::from_utf8_lossy(&log).lines().enumerate() {
        let seq: u64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("writer log line {} unreadable: {line:?}", i + 1))?;
        if seq != i as u64 + 1 {
            bail!(
                "writer log: line {} has sequence {seq}: a gap or a duplicate",
                i + 1
            );
        }
        n = i + 1;
    }
    Ok(n)
}

/// `e2fsck -fn image` finds nothing to fix.
pub fn fsck_clean(image: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .context("cannot run e2fsck (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "e2fsck found errors:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// The guest's RAM: 256 MiB plus 8 KiB. QEMU 7.2 (Debian 12) loses guest
/// writes during a TCG migration when a RAM block's size is a multiple of
/// 256 KiB: its fast dirty-bitmap sync (`cpu_physical_memory_sync_dirty_bitmap`,
/// the word-aligned path) clears the dirty bits but never re-arms the TCG
/// TLB entries of pages already written (`tlb_reset_dirty_range_all` is only
/// on its per-page path), so later writes through those entries go
/// unrecorded and the destination gets stale pages. Hot kernel data (slab
/// freelists, softirq state written from the idle loop) is what stays in the
/// TLB: the guest crashed at the destination in about one migration in ten
/// under network load, and a dump of both guests' RAM at the handover
/// showed 7 stale pages there (none in runs that passed). A size that is not
/// a multiple of 256 KiB takes the per-page path. KVM tracks dirty pages in
/// the kernel and is not affected.
pub const GUEST_RAM: &str = "262152k";

/// The QEMU command line for the guest (TCG), its console on stdout.
pub fn qemu_command(k: &GuestKernel, disk: &Path, append_extra: &str) -> Command {
    qemu_with_drive(
        k,
        &format!("file={},if=virtio,format=raw", disk.display()),
        append_extra,
    )
}

/// As [`qemu_command`], the disk being NBD export `export` on unix socket
/// `socket` (a path, or a placeholder such as `{disk}` for a launch file).
pub fn qemu_nbd_command(
    k: &GuestKernel,
    socket: &str,
    export: &str,
    append_extra: &str,
) -> Command {
    qemu_with_drive(
        k,
        &format!("file=nbd+unix:///{export}?socket={socket},if=virtio,format=raw"),
        append_extra,
    )
}

fn qemu_with_drive(k: &GuestKernel, drive: &str, append_extra: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg",
        // 256 MiB and 8 KiB, not 256 MiB: works around QEMU 7.2's TCG dirty
        // tracking (see GUEST_RAM).
        "-m",
        GUEST_RAM,
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&k.kernel)
    .arg("-initrd")
    .arg(&k.initrd)
    .arg("-append")
    // no lockup watchdogs: a TCG guest on a loaded host, or one that was
    // paused for a migration, is slow, not stuck
    .arg(format!(
        "console=ttyS0 quiet panic=-1 nowatchdog nosoftlockup rcupdate.rcu_cpu_stall_suppress=1 {append_extra}"
    ))
    .arg("-drive")
    .arg(drive);
    c
}

/// A launch file for `migrator receive` (`DIR/NAME.qemu`): the command's
/// program and arguments, one per line.
pub fn launch_file(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("{}\n", a.to_string_lossy()))
        .collect()
}

/// Gives the guest a virtio NIC on tap device `tap` (which must exist, in
/// the namespace QEMU runs in).
pub fn add_tap(cmd: &mut Command, tap: &str) {
    cmd.arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56");
}

/// Where the guest build is cached: `$MIGRATOR_GUEST_CACHE`, else
/// `/var/cache/migrator-guest`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MIGRATOR_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/migrator-guest"))
}

#[cfg(test)]
mod tests {
    use super::GUEST_RAM;

    /// The guest's RAM must not be a multiple of 256 KiB (64 pages of one
    /// dirty-bitmap word), or QEMU 7.2's TCG migration takes the sync path
    /// that loses writes (see [`GUEST_RAM`]).
    #[test]
    fn guest_ram_takes_the_per_page_dirty_sync() {
        let kib: u64 = GUEST_RAM
            .strip_suffix('k')
            .and_then(|n| n.parse().ok())
            .expect("GUEST_RAM in KiB");
        assert!(kib >= 256 * 1024, "the guest needs its 256 MiB");
        assert_ne!(kib % 256, 0, "{kib} KiB is a multiple of 256 KiB");
        assert_eq!(kib % 8, 0, "QEMU rounds RAM up to 8 KiB");
    }
}

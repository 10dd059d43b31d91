//! The kernel fast path: two tc-BPF programs (`bpf/fastpath.bpf.c`) that
//! carry a tunnel's bulk TCP traffic inside the kernel, without the four
//! copies and the trips through userspace of the TUN data plane.
//!
//! - `encap` on the TUN device's egress: a TCP segment routed into the
//!   tunnel (a GSO super-packet, or a packet that fits) gets its outer
//!   header and leaves by the WAN interface (`bpf_redirect_neigh`). The
//!   kernel cuts super-packets to fit the path, as for its own tunnels; a
//!   lone segment too big for the tunnel is cut in two, as TSO would.
//! - `decap` on the WAN interface's ingress: an encapsulated TCP segment
//!   from a configured peer, for an allowed destination, loses its
//!   outer header and enters the TUN device's ingress, as if the userspace
//!   plane had written it.
//!
//! Everything else goes the ordinary way to the userspace plane, which
//! decides and counts as before: SYN, FIN and RST (flow state, MSS
//! clamping), UDP, ICMP, IP options and IPv6 extension headers,
//! fragments, oversize packets that cannot be cut (URG; too big for two;
//! with pmtu signalling), unknown peers, unregistered destinations,
//! anything malformed. The wire format is the userspace plane's (FOU: UDP
//! checksum zero, as IPv4 allows and Linux's FOU sends by default; the
//! source port is a hash of the inner flow). The outer addresses are
//! IPv4; inside, IPv4 or IPv6 (6in4, protocol 41, in an IP-in-IP tunnel).
//!
//! The programs are attached with tcx links owned by [`FastPath`]: they
//! are detached when it is dropped or the process dies.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use serde::Serialize;

/// The object `build.rs` made; empty when clang was missing.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o"));

/// `struct config` of the BPF program: addresses and port in network byte
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Config {
    local: u32,
    peer: u32,
    wan_ifindex: u32,
    tun_ifindex: u32,
    fou_port: u16,
    max_plain: u16,
    deliver_any: u32,
    gateway: u32,
    signal_pmtu: u32,
}

// SAFETY: plain integers, no padding (4 × u32, 2 × u16, 3 × u32).
unsafe impl aya::Pod for Config {}

/// `struct guest`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Guest {
    peer: u32,
    role: u32,
}

// SAFETY: plain u32 fields.
unsafe impl aya::Pod for Guest {}

/// `struct flow`: a TCP flow as its packets go, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

// SAFETY: plain integers, no padding (2 × u32, 2 × u16).
unsafe impl aya::Pod for Flow {}

/// `struct flow6`: the same over IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

// SAFETY: plain bytes and integers, no padding (32 bytes, 2 × u16).
unsafe impl aya::Pod for Flow6 {}

/// `struct activity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Activity {
    packets: u64,
    bytes: u64,
}

// SAFETY: plain u64 fields.
unsafe impl aya::Pod for Activity {}

/// A guest's side of a migration, as the gateway's fast path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Moved away from this site: packets to it go to its peer, its
    /// replies come back from there.
    Old,
    /// Here: packets for it come from its peer; its own go back there
    /// unless their flow is translated.
    New,
}

/// What the fast path carried of one TCP flow since it was last asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub from: (IpAddr, u16),
    pub to: (IpAddr, u16),
    pub packets: u64,
    pub bytes: u64,
}

/// `struct stats` of the BPF program, summed over the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Inner packets encapsulated (a super-packet counts its segments).
    pub encap_packets: u64,
    pub encap_bytes: u64,
    pub decap_packets: u64,
    pub decap_bytes: u64,
    /// Packets lost after the outer header was added (no memory for a MAC
    /// header, or a segment being cut in two): should stay zero.
    pub errors: u64,
    /// Lone segments too big for the tunnel that were cut in two (as TSO
    /// would) instead of going to userspace to be fragmented.
    pub split: u64,
}

// SAFETY: plain u64 fields.
unsafe impl aya::Pod for Stats {}

/// What the fast path needs to know about a tunnel endpoint.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The TUN device whose egress is encapsulated.
    pub tun: String,
    /// This end's outer address: the interface that holds it is where
    /// encapsulated packets leave and arrive.
    pub local: IpAddr,
    pub peer: IpAddr,
    /// Outer sources accepted besides the peer.
    pub extra_peers: Vec<IpAddr>,
    /// FOU's UDP port; None: IP-in-IP.
    pub fou_port: Option<u16>,
    /// The largest inner packet that fits the tunnel whole.
    pub max_plain: u16,
    /// Inner destinations allowed out of the tunnel; empty: any. Not used
    /// with `gateway`.
    pub deliver: Vec<(IpAddr, u8)>,
    /// The gateway's rules: which packets go to which peer is decided per
    /// guest ([`FastPath::set_guest`]), not by `peer` and `deliver`.
    pub gateway: bool,
    /// Segments too big for the tunnel are left to userspace, which
    /// answers with ICMP, instead of being cut to fit.
    pub signal_pmtu: bool,
}

/// The attached programs; detached on drop.
pub struct FastPath {
    _bpf: Ebpf,
    stats: PerCpuArray<MapData, Stats>,
    guests: HashMap<MapData, u32, Guest>,
    guests6: HashMap<MapData, [u8; 16], Guest>,
    slow: HashMap<MapData, Flow, u32>,
    slow6: HashMap<MapData, Flow6, u32>,
    activity: HashMap<MapData, Flow, Activity>,
    activity6: HashMap<MapData, Flow6, Activity>,
    wan: String,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").field("wan", &self.wan).finish()
    }
}

fn v4(a: IpAddr, what: &str) -> anyhow::Result<Ipv4Addr> {
    match a {
        IpAddr::V4(v) => Ok(v),
        IpAddr::V6(_) => bail!("the kernel fast path carries IPv4 tunnels only ({what} is {a})"),
    }
}

/// Network byte order, as the program reads it.
fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// The name of the interface that holds `addr`.
fn interface_holding(addr: Ipv4Addr) -> anyhow::Result<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot list the interfaces");
    }
    let mut found = None;
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, still alive.
        let ifa = unsafe { &*at };
        at = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        if u32::from_be(sin.sin_addr.s_addr) == u32::from(addr) {
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    found.with_context(|| format!("no interface holds {addr} (the tunnel's local address)"))
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = CString::new(name).context("interface name")?;
    // SAFETY: a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()).with_context(|| format!("no interface {name}")),
        i => Ok(i),
    }
}

/// The programs loaded and configured, not attached: what [`FastPath`]
/// attaches, and what tests run packets through ([`Loaded::test_run`]).
pub struct Loaded {
    bpf: Ebpf,
}

impl Loaded {
    /// Loads the programs with `s`'s configuration; encapsulated packets
    /// leave by interface `wan_ifindex`, decapsulated ones enter
    /// `tun_ifindex`. Needs CAP_BPF.
    pub fn new(s: &Settings, wan_ifindex: u32, tun_ifindex: u32) -> anyhow::Result<Self> {
        if !FastPath::built() {
            bail!("this build has no kernel fast path (clang was missing when it was built: install clang and libbpf-dev, then rebuild)");
        }
        let config = Config {
            local: be(v4(s.local, "the local address")?),
            peer: be(v4(s.peer, "the peer")?),
            wan_ifindex,
            tun_ifindex,
            fou_port: s.fou_port.unwrap_or(0).to_be(),
            max_plain: s.max_plain,
            deliver_any: u32::from(s.deliver.is_empty()),
            gateway: u32::from(s.gateway),
            signal_pmtu: u32::from(s.signal_pmtu),
        };
        let mut bpf = Ebpf::load(OBJECT).context("cannot load the kernel fast path")?;
        // the maps stay the object's (the programs hold their descriptors):
        // filled before the programs are attached
        fn map<'a>(bpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
            bpf.map_mut(name)
                .with_context(|| format!("the fast path has no map {name}"))
        }
        Array::<_, Config>::try_from(map(&mut bpf, "CONFIG")?)?
            .set(0, config, 0)
            .context("cannot configure the fast path")?;
        let mut peers = HashMap::<_, u32, u32>::try_from(map(&mut bpf, "PEERS")?)?;
        for p in std::iter::once(&s.peer).chain(&s.extra_peers) {
            if let IpAddr::V4(p) = p {
                peers.insert(be(*p), 1, 0).context("cannot add a peer")?;
            }
        }
        let mut deliver = LpmTrie::<_, u32, u32>::try_from(map(&mut bpf, "DELIVER")?)?;
        for (net, len) in &s.deliver {
            if let IpAddr::V4(n) = net {
                deliver
                    .insert(&Key::new(u32::from(*len.min(&32)), be(*n)), 1, 0)
                    .context("cannot add a destination prefix")?;
            }
        }
        let mut deliver6 = LpmTrie::<_, [u8; 16], u32>::try_from(map(&mut bpf, "DELIVER6")?)?;
        for (net, len) in &s.deliver {
            if let IpAddr::V6(n) = net {
                deliver6
                    .insert(&Key::new(u32::from(*len.min(&128)), n.octets()), 1, 0)
                    .context("cannot add an IPv6 destination prefix")?;
            }
        }
        for prog in ["encap", "decap"] {
            Self::program(&mut bpf, prog)?
                .load()
                .with_context(|| format!("the kernel refused the fast path's {prog} program"))?;
        }
        Ok(Self { bpf })
    }

    fn program<'a>(bpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
        Ok(bpf
            .program_mut(name)
            .with_context(|| format!("the fast path has no program {name}"))?
            .try_into()?)
    }

    /// Runs program `prog` ("encap" or "decap") once on an Ethernet frame
    /// (`BPF_PROG_TEST_RUN`): its verdict (`TC_ACT_*`, -1 for "not mine")
    /// and the frame as it left it. Nothing is sent. Needs CAP_NET_ADMIN.
    pub fn test_run(&mut self, prog: &str, frame: &[u8]) -> anyhow::Result<(i32, Vec<u8>)> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        /// The `test` member of `union bpf_attr`.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
        }
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let fd = Self::program(&mut self.bpf, prog)?
            .fd()?
            .as_fd()
            .as_raw_fd();
        // room for the outer header a program may add
        let mut out = vec![0u8; frame.len() + 128];
        let mut attr = TestRun {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..TestRun::default()
        };
        // SAFETY: attr points to live buffers of the sizes it gives, and
        // outlives the call; the kernel reads size_of::<TestRun>() bytes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot test-run the fast path's {prog} program"));
        }
        out.truncate(attr.data_size_out as usize);
        Ok((attr.retval as i32, out))
    }
}

impl FastPath {
    /// Whether this build carries the programs (clang was there).
    pub fn built() -> bool {
        !OBJECT.is_empty()
    }

    /// Loads the programs and attaches them: `encap` to the TUN device's
    /// egress, `decap` to the ingress of the interface holding the local
    /// address. Needs CAP_BPF and CAP_NET_ADMIN; the TUN device must exist.
    pub fn attach(s: &Settings) -> anyhow::Result<Self> {
        let wan = interface_holding(v4(s.local, "the local address")?)?;
        let Loaded { mut bpf } = Loaded::new(s, ifindex(&wan)?, ifindex(&s.tun)?)?;
        for (prog, dev, at) in [
            ("encap", s.tun.as_str(), TcAttachType::Egress),
            ("decap", wan.as_str(), TcAttachType::Ingress),
        ] {
            Loaded::program(&mut bpf, prog)?
                .attach(dev, at)
                .with_context(|| {
                    format!("cannot attach the fast path's {prog} program to {dev}")
                })?;
        }
        fn take(bpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
            bpf.take_map(name)
                .with_context(|| format!("the fast path has no map {name}"))
        }
        let stats = PerCpuArray::try_from(take(&mut bpf, "STATS")?)?;
        let guests = HashMap::try_from(take(&mut bpf, "GUESTS")?)?;
        let guests6 = HashMap::try_from(take(&mut bpf, "GUESTS6")?)?;
        let slow = HashMap::try_from(take(&mut bpf, "SLOW")?)?;
        let slow6 = HashMap::try_from(take(&mut bpf, "SLOW6")?)?;
        let activity = HashMap::try_from(take(&mut bpf, "ACTIVITY")?)?;
        let activity6 = HashMap::try_from(take(&mut bpf, "ACTIVITY6")?)?;
        tracing::info!(tun = %s.tun, wan = %wan, "kernel fast path attached");
        Ok(Self {
            _bpf: bpf,
            stats,
            guests,
            guests6,
            slow,
            slow6,
            activity,
            activity6,
            wan,
        })
    }

    /// Gateway mode: carries the TCP flows of `guest` (IPv4 or IPv6) from
    /// now on, to and from `peer` as `role` says. A guest whose peer is
    /// IPv6 (a tunnel over IPv6) is left to the userspace plane (false).
    pub fn set_guest(&mut self, guest: IpAddr, peer: IpAddr, role: Role) -> anyhow::Result<bool> {
        let IpAddr::V4(p) = peer else {
            return Ok(false);
        };
        let g = Guest {
            peer: be(p),
            role: match role {
                Role::Old => 1,
                Role::New => 2,
            },
        };
        match guest {
            IpAddr::V4(a) => self.guests.insert(be(a), g, 0),
            IpAddr::V6(a) => self.guests6.insert(a.octets(), g, 0),
        }
        .with_context(|| format!("cannot give {guest} to the kernel fast path"))?;
        Ok(true)
    }

    /// Gateway mode: stops carrying `guest`'s flows.
    pub fn remove_guest(&mut self, guest: IpAddr) {
        // absent: nothing to do
        let _ = match guest {
            IpAddr::V4(g) => self.guests.remove(&be(g)),
            IpAddr::V6(g) => self.guests6.remove(&g.octets()),
        };
    }

    /// Gateway mode: the TCP flow a guest here sends as `from` → `to` is
    /// translated (`on`), so its packets go to the userspace plane; or not
    /// any more.
    pub fn set_translated(
        &mut self,
        from: (IpAddr, u16),
        to: (IpAddr, u16),
        on: bool,
    ) -> anyhow::Result<()> {
        match (from, to) {
            ((IpAddr::V4(s), sp), (IpAddr::V4(d), dp)) => {
                let f = Flow {
                    saddr: be(s),
                    daddr: be(d),
                    sport: sp.to_be(),
                    dport: dp.to_be(),
                };
                mark(&mut self.slow, f, on)?;
            }
            ((IpAddr::V6(s), sp), (IpAddr::V6(d), dp)) => {
                let f = Flow6 {
                    saddr: s.octets(),
                    daddr: d.octets(),
                    sport: sp.to_be(),
                    dport: dp.to_be(),
                };
                mark(&mut self.slow6, f, on)?;
            }
            _ => {} // no such flow
        }
        Ok(())
    }

    /// Gateway mode: the flows carried since the last call, and clears
    /// them. (A packet counted between the read and the clearing of its
    /// flow is not reported; the next one is.)
    pub fn take_activity(&mut self) -> Vec<Carried> {
        let mut out = Vec::new();
        take(&mut self.activity, &mut out, |k| {
            (
                (
                    Ipv4Addr::from(k.saddr.to_ne_bytes()).into(),
                    u16::from_be(k.sport),
                ),
                (
                    Ipv4Addr::from(k.daddr.to_ne_bytes()).into(),
                    u16::from_be(k.dport),
                ),
            )
        });
        take(&mut self.activity6, &mut out, |k| {
            (
                (Ipv6Addr::from(k.saddr).into(), u16::from_be(k.sport)),
                (Ipv6Addr::from(k.daddr).into(), u16::from_be(k.dport)),
            )
        });
        out
    }

    /// What the programs have carried, over all CPUs.
    pub fn stats(&self) -> Stats {
        let mut t = Stats::default();
        if let Ok(per_cpu) = self.stats.get(&0, 0) {
            for s in per_cpu.iter() {
                t.encap_packets += s.encap_packets;
                t.encap_bytes += s.encap_bytes;
                t.decap_packets += s.decap_packets;
                t.decap_bytes += s.decap_bytes;
                t.errors += s.errors;
                t.split += s.split;
            }
        }
        t
    }
}

/// Puts translated flow `f` in a SLOW map (`on`) or takes it out.
fn mark<K: aya::Pod>(slow: &mut HashMap<MapData, K, u32>, f: K, on: bool) -> anyhow::Result<()> {
    if on {
        slow.insert(f, 1, 0)
            .context("cannot keep a translated flow out of the kernel fast path")?;
    } else {
        let _ = slow.remove(&f); // absent: nothing to do
    }
    Ok(())
}

/// Moves what an ACTIVITY map holds into `out` (`ends` gives a flow's
/// two ends) and clears it.
fn take<K: aya::Pod>(
    activity: &mut HashMap<MapData, K, Activity>,
    out: &mut Vec<Carried>,
    ends: impl Fn(&K) -> ((IpAddr, u16), (IpAddr, u16)),
) {
    let keys: Vec<K> = activity.keys().filter_map(Result::ok).collect();
    for k in keys {
        if let Ok(a) = activity.get(&k, 0) {
            let (from, to) = ends(&k);
            out.push(Carried {
                from,
                to,
                packets: a.packets,
                bytes: a.bytes,
            });
        }
        let _ = activity.remove(&k);
    }
}

//! What a moved VM's open connections keep: bulk TCP from the client to
//! the VM's old address before the move (routed by siteA to the VM) and
//! after it (gateway A tunnels to gateway B, which delivers to the VM and
//! tunnels the replies back), one flow and 16, with the gateways' kernel
//! fast path on (the default) and off. The bed is the continuity tests'
//! (`gateway/tests/continuity`), five namespaces on this machine.
//!
//! `sudo cargo bench -p gateway --bench continuity -- [--seconds 5]
//! [--rounds 3]`; writes `bench/results/gateway.md`.

#[allow(dead_code)] // the tests' bed; the benchmark uses part of it
#[path = "../tests/continuity/bed.rs"]
mod bed;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use bed::Bed;
use clap::Parser;
use tests::load::{median, throughput};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds: each measures both configurations on fresh beds; the table
    /// gives medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One configuration's figures in one round: bytes per second and cores
/// busy, before and after the move, for 1 and 16 flows.
#[derive(Clone, Copy, Default)]
struct Sample {
    before: [(f64, f64); 2],
    after: [(f64, f64); 2],
    /// Bytes gateway A's kernel fast path encapsulated.
    fast_bytes: u64,
}

/// One configuration: the gateways' `fast_path` and `clamp_mss`, and the
/// guest's family.
#[derive(Clone, Copy)]
struct Setup {
    fast_path: bool,
    clamp_mss: bool,
    v6: bool,
    name: &'static str,
}

fn measure(c: Setup, secs: u64) -> Result<Sample> {
    let bed = Bed::with_tunnel(&format!(
        "kind = \"fou\"\nfast_path = {}\nclamp_mss = {}",
        c.fast_path, c.clamp_mss
    ));
    let (ga, gb) = (bed.gateway_a(), bed.gateway_b());
    let (service, old, at, public) = if c.v6 {
        ("web6", "fd00:1::10", "[fd00:1::10]", "fd00:2::100")
    } else {
        ("web1", "10.1.0.10", "10.1.0.10", "10.2.0.100")
    };
    bed.register_and_prepare_service(&ga, &gb, service, old);
    let (client, vm) = (bed.client.name.clone(), bed.vm.name.clone());
    let run = |port: u16, flows: usize| {
        throughput(&client, &vm, format!("{at}:{port}").parse()?, flows, secs)
    };
    let mut s = Sample {
        before: [run(9001, 1)?, run(9002, 16)?],
        ..Sample::default()
    };
    bed.move_vm();
    bed.switch(&ga, &gb, service, public);
    bed.echo_once(&format!("{at}:7000"), b"through the tunnel");
    s.after = [run(9003, 1)?, run(9004, 16)?];
    let (_, st) = ga.api("GET", "/v1/status", "");
    s.fast_bytes = st["data_plane"]["fast_path"]["encap_bytes"]
        .as_u64()
        .unwrap_or(0);
    if c.fast_path && s.fast_bytes == 0 {
        anyhow::bail!("the fast path was on but carried nothing: {st}");
    }
    bed.assert_no_gateway_errors();
    Ok(s)
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results/gateway.md")
    });
    let setup = |fast_path, clamp_mss, v6, name| Setup {
        fast_path,
        clamp_mss,
        v6,
        name,
    };
    let configs = [
        setup(
            true,
            false,
            false,
            "fast path on, full-size segments (as from connections opened before the move)",
        ),
        setup(true, true, false, "fast path on, MSS clamped (default)"),
        setup(
            false,
            true,
            false,
            "fast path off: the userspace plane, MSS clamped",
        ),
        setup(
            true,
            false,
            true,
            "IPv6 guest: fast path on, full-size segments",
        ),
        setup(false, true, true, "IPv6 guest: fast path off, MSS clamped"),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..args.rounds {
        for (i, c) in configs.iter().enumerate() {
            eprintln!("round {}/{}: {}", round + 1, args.rounds, c.name);
            samples[i].push(measure(*c, args.seconds)?);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = tests::bed::cpu_model();
    let mut md = String::new();
    writeln!(
        md,
        "# Gateway benchmark: open connections across a move\n\n\
Bulk TCP from the client to the VM's old address, 10.1.0.10 (fd00:1::10 for the IPv6 guest), on the continuity tests' bed (client, WAN router, siteA, siteB, \
VM: five namespaces joined by veths, MTU 1500; the WAN router drops packets whose source is not routed from the side they \
come from). Before: siteA routes to the VM on its LAN. After: the VM's link has moved to siteB and both gateways are switched \
(FOU): gateway A captures the old address and tunnels to gateway B, which delivers to the VM and tunnels its replies back \
through A (so each direction crosses the WAN router twice instead of once, and both gateways). Each connection is opened in \
the phase it is measured in. After the move, gateway A clamps the MSS of new connections to fit the tunnel (`clamp_mss`, the \
default); with `clamp_mss = false` they keep MSS 1460 and send 1500-byte segments, too big for the tunnel, as connections \
opened before the move do: the kernel fast path cuts them to fit. {cores} cores ({cpu}) shared by everything; \
{} s per measurement after a 0.5 s ramp; {} rounds on fresh beds, each figure the median, each ratio the median of the rounds' \
ratios (after ÷ before, same bed). Command: `sudo cargo bench -p gateway --bench continuity -- --seconds {} --rounds {}`.\n",
        args.seconds, args.rounds, args.seconds, args.rounds
    )?;
    md.push_str(
        "| gateways | before, 1 flow Mbit/s | after, 1 flow Mbit/s | after ÷ before, 1 flow (min–max) | before, 16 flows Mbit/s | after, 16 flows Mbit/s | after ÷ before, 16 flows (min–max) | cores busy after, 1 / 16 flows | CPU s per GB before → after, 16 flows |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (Setup { name, .. }, ss) in configs.iter().zip(&samples) {
        let m = |f: &dyn Fn(&Sample) -> f64| median(ss.iter().map(f).collect());
        let ratio = |k: usize| {
            let r: Vec<f64> = ss.iter().map(|s| s.after[k].0 / s.before[k].0).collect();
            let (lo, hi) = r
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
            (median(r), lo, hi)
        };
        let (r1, r1lo, r1hi) = ratio(0);
        let (r16, r16lo, r16hi) = ratio(1);
        writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {r1:.2} ({r1lo:.2}–{r1hi:.2}) | {:.0} | {:.0} | {r16:.2} ({r16lo:.2}–{r16hi:.2}) | {:.2} / {:.2} | {:.2} → {:.2} |",
            m(&|s| s.before[0].0) * 8e-6,
            m(&|s| s.after[0].0) * 8e-6,
            m(&|s| s.before[1].0) * 8e-6,
            m(&|s| s.after[1].0) * 8e-6,
            m(&|s| s.after[0].1),
            m(&|s| s.after[1].1),
            m(&|s| s.before[1].1 / (s.before[1].0 * 1e-9)),
            m(&|s| s.after[1].1 / (s.after[1].0 * 1e-9)),
        )?;
    }
    md.push_str(
        "\nWith the fast path on, the gateways carry the bulk of each connection in the kernel (tc-BPF, `tunnel/bpf/fastpath.bpf.c`: \
the same programs as `tunnel-pipe --fast-path`, see `bench/results/tunnel.md`, with per-guest rules and per-flow accounting \
for the drain); handshakes, UDP and the new address's translated connections stay in the userspace plane.\n",
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&out, &md).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{md}");
    Ok(())
}

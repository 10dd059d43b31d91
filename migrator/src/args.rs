//! The migration's knobs, as the CLI takes them and as the disk server's
//! control socket receives them (one JSON line).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::precopy::{self, throttle::ThrottleConfig};
use crate::source::MigrateOptions;
use crate::transport::tls::{parse_fingerprint, Identity};
use crate::vm::VmOptions;

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct Keys {
    /// Directory holding this host's cert.der and key.der (from `migrator keygen`).
    #[arg(long)]
    pub identity: PathBuf,
    /// SHA-256 fingerprint of a peer's key to accept (repeatable).
    #[arg(long = "peer", required = true)]
    pub peers: Vec<String>,
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// Control socket of a running `migrator disk serve` (live migration).
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    pub control: Option<PathBuf>,
    /// An image nobody is writing to (offline migration).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Destination agent, host:port.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub keys: Keys,
    /// Migrate the VM using this disk too: the source QEMU's QMP socket (as
    /// the disk server sees it). The destination agent starts the VM from its
    /// `DIR/NAME.qemu`. `--downtime-ms` and `--max-rate-mbit` apply to its
    /// memory as well.
    #[arg(long, requires = "control")]
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub tuning: Tuning,
    /// JSON lines on stdout instead of progress bars.
    #[arg(long)]
    #[serde(default)]
    pub json: bool,
}

/// How the disk and memory travel (both `migrator disk migrate` and
/// `migrator migrate`).
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct Tuning {
    /// How writes during the migration travel: `dirty` (resend dirty blocks in
    /// rounds) or `deltas` (forward every write, as the research prototype did).
    #[arg(long, value_enum, default_value = "dirty")]
    #[serde(default)]
    pub mode: ModeArg,
    /// Disable write throttling.
    #[arg(long)]
    pub no_throttle: bool,
    /// Guest's share of the link for newly dirtied data while throttling.
    #[arg(long, default_value_t = 0.5)]
    pub throttle_ratio: f64,
    /// Most delay added to one write, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub max_delay_ms: u64,
    /// Roll back if the dirty set is still too large after this many rounds.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// The pause budget, milliseconds: the disk switches over when its dirty
    /// set drains in this long, and it is QEMU's `downtime-limit` for memory.
    #[arg(long, default_value_t = 100)]
    pub downtime_ms: u64,
    /// Cap the migration link at this many megabits per second.
    #[arg(long)]
    #[serde(default)]
    pub max_rate_mbit: Option<f64>,
    /// Send blocks uncompressed.
    #[arg(long)]
    pub no_compress: bool,
    /// Do not slow the guest's vCPUs when its memory does not converge.
    #[arg(long)]
    #[serde(default)]
    pub no_auto_converge: bool,
    /// Switch to post-copy after this many memory passes without converging.
    #[arg(long)]
    #[serde(default)]
    pub postcopy_after: Option<u64>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            mode: ModeArg::Dirty,
            no_throttle: false,
            throttle_ratio: 0.5,
            max_delay_ms: 100,
            max_rounds: 30,
            downtime_ms: 100,
            max_rate_mbit: None,
            no_compress: false,
            no_auto_converge: false,
            postcopy_after: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeArg {
    #[default]
    Dirty,
    Deltas,
}

impl MigrateArgs {
    pub fn options(&self, marker: Option<PathBuf>) -> Result<MigrateOptions> {
        let identity = Identity::load(&self.keys.identity)?;
        let peers = self
            .keys
            .peers
            .iter()
            .map(|p| parse_fingerprint(p))
            .collect::<Result<Vec<_>, _>>()?;
        if !(self.tuning.throttle_ratio > 0.0 && self.tuning.throttle_ratio <= 1.0) {
            bail!(
                "--throttle-ratio must be in (0, 1], got {}",
                self.tuning.throttle_ratio
            );
        }
        Ok(MigrateOptions {
            to: self.to.clone(),
            identity,
            peers,
            precopy: precopy::Config {
                mode: match self.tuning.mode {
                    ModeArg::Dirty => precopy::Mode::Dirty,
                    ModeArg::Deltas => precopy::Mode::Deltas,
                },
                max_rounds: self.tuning.max_rounds,
                downtime_target: Duration::from_millis(self.tuning.downtime_ms),
                throttle: (!self.tuning.no_throttle).then_some(ThrottleConfig {
                    ratio: self.tuning.throttle_ratio,
                    max_delay: Duration::from_millis(self.tuning.max_delay_ms),
                }),
                ..precopy::Config::default()
            },
            compress: !self.tuning.no_compress,
            max_rate: self.tuning.max_rate_mbit.map(|m| (m * 1e6 / 8.0) as u64),
            marker,
            vm: self.qmp.as_ref().map(|qmp| VmOptions {
                qmp: qmp.clone(),
                downtime: Duration::from_millis(self.tuning.downtime_ms),
                max_bandwidth: self.tuning.max_rate_mbit.map(|m| (m * 1e6 / 8.0) as u64),
                auto_converge: !self.tuning.no_auto_converge,
                postcopy_after_passes: self.tuning.postcopy_after,
            }),
        })
    }
}

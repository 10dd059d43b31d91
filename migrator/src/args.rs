//! The migration's knobs, as the CLI takes them and as the disk server's
//! control socket receives them (one JSON line).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::precopy::{self, throttle::ThrottleConfig};
use crate::source::{Ledger, MigrateOptions};
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
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
    /// After a link break at or after the commit, keep reconnecting this
    /// many seconds to learn what the destination decided and to finish.
    #[arg(long, default_value_t = 60)]
    #[serde(default = "default_reconnect_s")]
    pub reconnect_s: u64,
}

/// A link cap must be a positive, finite number of Mbit/s.
pub fn check_rate(mbit: f64) -> Result<(), TuningError> {
    if mbit.is_finite() && mbit > 0.0 {
        Ok(())
    } else {
        Err(TuningError::MaxRate(mbit))
    }
}

/// Megabits per second to bytes per second.
pub fn mbit_to_bytes(m: f64) -> u64 {
    (m * 1e6 / 8.0) as u64
}

fn default_reconnect_s() -> u64 {
    60
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
            reconnect_s: default_reconnect_s(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeArg {
    #[default]
    Dirty,
    Deltas,
}

impl MigrateArgs {
    pub fn options(&self, ledger: Option<Arc<dyn Ledger>>) -> Result<MigrateOptions> {
        let identity = Identity::load(&self.keys.identity)?;
        let peers = self
            .keys
            .peers
            .iter()
            .map(|p| parse_fingerprint(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .tuning
            .options(self.to.clone(), identity, peers, self.qmp.clone(), ledger)?)
    }
}

impl Tuning {
    /// The source's options for a link to `to` (`qmp`: move the VM too).
    pub fn options(
        &self,
        to: String,
        identity: Identity,
        peers: Vec<crate::transport::tls::Fingerprint>,
        qmp: Option<PathBuf>,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> Result<MigrateOptions, TuningError> {
        if !(self.throttle_ratio > 0.0 && self.throttle_ratio <= 1.0) {
            return Err(TuningError::ThrottleRatio(self.throttle_ratio));
        }
        if let Some(m) = self.max_rate_mbit {
            check_rate(m)?;
        }
        Ok(MigrateOptions {
            to,
            identity,
            peers,
            precopy: precopy::Config {
                mode: match self.mode {
                    ModeArg::Dirty => precopy::Mode::Dirty,
                    ModeArg::Deltas => precopy::Mode::Deltas,
                },
                max_rounds: self.max_rounds,
                downtime_target: Duration::from_millis(self.downtime_ms),
                throttle: (!self.no_throttle).then_some(ThrottleConfig {
                    ratio: self.throttle_ratio,
                    max_delay: Duration::from_millis(self.max_delay_ms),
                }),
                ..precopy::Config::default()
            },
            compress: !self.no_compress,
            max_rate: self.max_rate_mbit.map(mbit_to_bytes),
            live: Arc::default(),
            ledger,
            qmp_connection: None,
            reconnect_for: Duration::from_secs(self.reconnect_s),
            vm: qmp.map(|qmp| VmOptions {
                qmp,
                downtime: Duration::from_millis(self.downtime_ms),
                max_bandwidth: self.max_rate_mbit.map(mbit_to_bytes),
                auto_converge: !self.no_auto_converge,
                postcopy_after_passes: self.postcopy_after,
            }),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    #[error("--throttle-ratio must be in (0, 1], got {0}")]
    ThrottleRatio(f64),
    #[error("--max-rate-mbit must be above 0, got {0}")]
    MaxRate(f64),
}

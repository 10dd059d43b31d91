//! `dyndns`: serve authoritative zones with signed dynamic updates, or drive
//! the migration operations against any RFC 2136 server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use dyndns::client::Client;
use dyndns::ops::{self, Prepared};
use dyndns::{Config, TsigKey};

#[derive(Parser)]
#[command(
    name = "dyndns",
    version,
    about = "Authoritative dynamic DNS (RFC 2136 + TSIG) and its migration client"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the zones of a config file (UDP and TCP) until Ctrl-C.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a new HMAC-SHA256 TSIG key; prints nsupdate's -y form and a named.conf clause.
    Keygen {
        name: String,
        /// Print only the named.conf clause (tsig-keygen's output).
        #[arg(long)]
        bind: bool,
    },
    /// Print a name's addresses and TTL as the server holds them.
    Show {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Lower the TTL of a name's A/AAAA records before a migration.
    Prepare {
        name: String,
        #[command(flatten)]
        target: Target,
        /// The lowered TTL, seconds.
        #[arg(long, default_value_t = 5)]
        ttl: u32,
        /// Where to remember the original TTL (read back by `finish`).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Point a name at new addresses in one update, if it still points at the old ones.
    Switch {
        name: String,
        #[command(flatten)]
        target: Target,
        /// New address(es).
        #[arg(long, required = true, value_delimiter = ',')]
        to: Vec<IpAddr>,
        /// Expected current address(es); default: what the server has now.
        #[arg(long, value_delimiter = ',')]
        from: Vec<IpAddr>,
        /// TTL of the new records; default: the current TTL.
        #[arg(long)]
        ttl: Option<u32>,
    },
    /// Restore the TTL that `prepare` lowered.
    Finish {
        name: String,
        #[command(flatten)]
        target: Target,
        /// The state file `prepare` wrote.
        #[arg(long, conflicts_with = "ttl")]
        state: Option<PathBuf>,
        /// The TTL to restore.
        #[arg(long)]
        ttl: Option<u32>,
    },
}

#[derive(Args)]
struct Target {
    /// The zone's primary server, e.g. 127.0.0.1:53.
    #[arg(long)]
    server: SocketAddr,
    /// The zone; default: found by asking the server for the name's SOA.
    #[arg(long)]
    zone: Option<String>,
    /// TSIG key as ALGORITHM:NAME:BASE64 (nsupdate -y form). Also $DYNDNS_KEY,
    /// which keeps the secret out of the process list.
    #[arg(long, env = "DYNDNS_KEY", hide_env_values = true)]
    key: Option<String>,
    /// TSIG key file in named.conf form (tsig-keygen's output).
    #[arg(long, conflicts_with = "key")]
    key_file: Option<PathBuf>,
    /// Print the result as one JSON line.
    #[arg(long)]
    json: bool,
}

impl Target {
    fn client(&self) -> anyhow::Result<Client> {
        let key = match (&self.key, &self.key_file) {
            (Some(spec), _) => Some(TsigKey::parse_spec(spec)?),
            (None, Some(file)) => Some(TsigKey::from_bind_file(file)?),
            (None, None) => None,
        };
        Ok(Client::new(self.server, key.as_ref())?)
    }

    fn require_key(&self) -> anyhow::Result<()> {
        if self.key.is_none() && self.key_file.is_none() {
            bail!("updates must be signed: pass --key ALG:NAME:SECRET, --key-file FILE or set $DYNDNS_KEY");
        }
        Ok(())
    }

    async fn zone(
        &self,
        client: &Client,
        name: &hickory_proto::rr::Name,
    ) -> anyhow::Result<hickory_proto::rr::Name> {
        match &self.zone {
            Some(z) => Ok(ops::parse_name(z)?),
            None => Ok(ops::find_zone(client, name).await?),
        }
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{human}");
    }
    Ok(())
}

fn ips(v: &[IpAddr]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve { config } => {
            let config = Config::load(&config)?;
            let mut running = dyndns::server::start(&config).await?;
            for a in &running.addrs {
                // tests and scripts wait for this line
                println!("listening on {a}");
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = running.wait() => r.map_err(|e| anyhow::anyhow!("server stopped: {e}"))?,
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("Ctrl-C: shutting down");
                    running.shutdown().await;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    running.shutdown().await;
                }
            }
            Ok(())
        }
        Cmd::Keygen { name, bind } => {
            let key = TsigKey::generate(&name)?;
            if bind {
                print!("{}", key.bind_clause());
            } else {
                println!(
                    "# nsupdate -y / dyndns --key / $DYNDNS_KEY:\n{}",
                    key.spec()
                );
                println!(
                    "# dyndns.toml:\n[[key]]\nname = \"{}\"\nalgorithm = \"{}\"\nsecret = \"{}\"",
                    key.display_name(),
                    key.algorithm().as_str(),
                    key.secret_base64()
                );
                println!("# named.conf:\n{}", key.bind_clause());
            }
            Ok(())
        }
        Cmd::Show { name, target } => {
            let client = target.client()?;
            let name = ops::parse_name(&name)?;
            let a = ops::addresses(&client, &name).await?;
            let value =
                serde_json::json!({"name": name.to_string(), "addrs": a.ips(), "ttl": a.ttl()});
            print(
                target.json,
                &value,
                format!(
                    "{name} {} ttl {}",
                    ips(&a.ips()),
                    a.ttl().map(|t| t.to_string()).unwrap_or("-".into())
                ),
            )
        }
        Cmd::Prepare {
            name,
            target,
            ttl,
            state,
        } => {
            target.require_key()?;
            let client = target.client()?;
            let name = ops::parse_name(&name)?;
            let zone = target.zone(&client, &name).await?;
            let p = ops::prepare(&client, &zone, &name, ttl).await?;
            if let Some(path) = state {
                let text = serde_json::to_string_pretty(&p)?;
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write state file {}", path.display()))?;
            }
            print(
                target.json,
                &p,
                format!(
                    "{}: TTL {} -> {} (resolvers holding the old answer may keep it {} s more)",
                    p.name, p.original_ttl, p.lowered_ttl, p.original_ttl
                ),
            )
        }
        Cmd::Switch {
            name,
            target,
            to,
            from,
            ttl,
        } => {
            target.require_key()?;
            let client = target.client()?;
            let name = ops::parse_name(&name)?;
            let zone = target.zone(&client, &name).await?;
            let current = ops::addresses(&client, &name).await?;
            let from = if from.is_empty() { current.ips() } else { from };
            let ttl = ttl.or(current.ttl()).unwrap_or(5);
            let s = ops::switch(&client, &zone, &name, &from, &to, ttl).await?;
            print(
                target.json,
                &s,
                format!(
                    "{}: {} -> {} (ttl {})",
                    s.name,
                    ips(&s.from),
                    ips(&s.to),
                    s.ttl
                ),
            )
        }
        Cmd::Finish {
            name,
            target,
            state,
            ttl,
        } => {
            target.require_key()?;
            let client = target.client()?;
            let name = ops::parse_name(&name)?;
            let original = match (state, ttl) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!(
                            "cannot read state file {} (written by `dyndns prepare --state`)",
                            path.display()
                        )
                    })?;
                    let p: Prepared = serde_json::from_str(&text).with_context(|| {
                        format!("state file {} is not a prepare record", path.display())
                    })?;
                    p.original_ttl
                }
                (None, Some(t)) => t,
                (None, None) => bail!("pass --state FILE (from prepare) or --ttl SECONDS"),
            };
            let zone = target.zone(&client, &name).await?;
            let addrs = ops::finish(&client, &zone, &name, original).await?;
            let value =
                serde_json::json!({"name": name.to_string(), "addrs": addrs, "ttl": original});
            print(
                target.json,
                &value,
                format!("{name}: TTL restored to {original} ({})", ips(&addrs)),
            )
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,hickory_server=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

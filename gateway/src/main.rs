//! `gateway run --config gateway.toml`: the per-site gateway daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::{Config, Gateway};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Per-site gateway: tunnels a moved VM's connections, gives it a new address, serves DNS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon until Ctrl-C or SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { config } => {
            let config = Config::load(&config)?;
            let site = config.site.clone();
            let gw = Gateway::start(config).await?;
            if let Some(dns) = &gw.dns {
                for a in &dns.addrs {
                    // tests and scripts wait for this line
                    println!("dns listening on {a}");
                }
            }
            if let Some(a) = gw.api_addr {
                println!("api listening on {a}");
            }
            println!("gateway {site} running");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!(%site, "shutting down");
            gw.shutdown().await;
            Ok(())
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

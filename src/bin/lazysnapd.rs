//! `lazysnapd`: the node service, a containerd remote snapshotter. Argument parsing and wiring
//! only; everything else is in `lazysnap::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lazysnap::service::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "lazysnapd",
    version,
    about = "containerd remote snapshotter that mounts lazy layers (zstd:chunked, eStargz) before they are downloaded"
)]
struct Cli {
    /// TOML config file (docs/configuration.md). Without it, every setting has its default.
    #[arg(long, env = "LAZYSNAPD_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (overrides `root` in the config; default /var/lib/lazysnap).
    #[arg(long)]
    root: Option<PathBuf>,
    /// gRPC unix socket (overrides `address`; default /run/lazysnap/lazysnapd.sock).
    #[arg(long)]
    address: Option<PathBuf>,
    /// Stop the layer host and unmount every layer and snapshot mount left under the root, then
    /// exit.
    #[arg(long)]
    cleanup: bool,
    /// Run as the layer host (started by lazysnapd itself; its config comes in the environment).
    #[arg(long, hide = true)]
    layer_host: bool,
    /// More log output on stderr (-v debug). `LAZYSNAP_LOG` takes a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = if cli.verbose > 0 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = match (&cli.config, std::env::var(service::layer_host::CONFIG_ENV)) {
        (Some(path), _) => Config::load(path)?,
        (None, Ok(json)) if cli.layer_host => {
            serde_json::from_str(&json).context("the layer host's config from lazysnapd")?
        }
        (None, _) => Config::default(),
    };
    if let Some(root) = cli.root {
        config.root = root;
    }
    if let Some(address) = cli.address {
        config.address = address;
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if cli.cleanup {
        let points = runtime.block_on(service::cleanup(&config.root))?;
        tracing::info!(mounts = points.len(), root = %config.root.display(), "unmounted");
        return Ok(());
    }
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        };
        if cli.layer_host {
            service::layer_host::serve(&config, stop).await?;
        } else {
            service::run(&config, stop).await?;
        }
        anyhow::Ok(())
    });
    // Background fetches and blocking reads are abandoned, not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

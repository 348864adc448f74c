//! `lazysnap`: the client. Argument parsing and wiring only; the work is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lazysnap::convert::{self, human, ConvertOptions, ImageLocation};
use lazysnap::format::LayerFormat;
use lazysnap::inspect;
use lazysnap::mount::{self, MountConfig, ProfileSource};
use lazysnap::oci::{Platform, Reference};
use lazysnap::registry::ClientConfig;
use lazysnap::run::{self as launcher, spec::Network, RunOptions, Stage};

// Beside this file, not `src/bin/profile.rs`, which cargo would build as a binary of its own.
#[path = "lazysnap/profile.rs"]
mod profile;
use profile::ProfileCommand;

#[derive(Debug, Parser)]
#[command(
    name = "lazysnap",
    version,
    about = "Start containers before their image has been downloaded"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug). `LAZYSNAP_LOG` takes a tracing filter.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Speak plain HTTP to registries that are not on loopback (loopback always is).
    #[arg(long, global = true)]
    plain_http: bool,
    /// Directory holding all state: chunk cache, metadata, unpacked layers, mount points.
    /// Created (or set) mode 0700: it holds image content only root may reach.
    #[arg(long, global = true, default_value = "/var/lib/lazysnap")]
    root: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an image into a lazily loadable one and write or push it.
    ///
    /// SRC: oci:DIR[:TAG], docker-archive:FILE or HOST[:PORT]/REPO[:TAG|@DIGEST].
    /// DST: oci:DIR[:TAG] or a registry reference. The last line on stdout is the manifest digest.
    Convert {
        #[arg(long, value_enum, default_value_t = FormatArg::ZstdChunked)]
        format: FormatArg,
        /// Largest chunk of a file, in bytes.
        #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
        chunk_size: u64,
        /// Compression level (default: zstd 3, gzip 6).
        #[arg(long)]
        level: Option<i32>,
        /// Platform to take from a multi-platform source, as os/arch[/variant].
        #[arg(long)]
        platform: Option<Platform>,
        /// A start-up profile: a file (`lazysnap profile record --out`), or an image reference
        /// whose profile the registry holds (`profile record --push`). Each layer it matches gets
        /// the files start-up read written first, in access order, and recorded in its TOC.
        #[arg(long, value_name = "REF|FILE")]
        profile: Option<String>,
        /// Without a profile: write the entrypoint's program, its dynamic loader and shared
        /// libraries first (found from ELF headers; every layer is decompressed to a temporary
        /// file first).
        #[arg(long, conflicts_with = "profile")]
        startup_elf: bool,
        src: ImageLocation,
        dst: ImageLocation,
    },
    /// Mount an image read-only at MOUNTPOINT, fetching file content only when it is read.
    ///
    /// Stays in the foreground; SIGTERM or SIGINT unmounts everything and exits 0.
    Mount {
        /// Fetch only what is read (and the prefetch set), not the rest of each layer.
        #[arg(long)]
        no_background_fetch: bool,
        /// Seconds a read may wait for the registry before it fails with EIO.
        #[arg(long, default_value_t = 30)]
        read_timeout: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        platform: Option<Platform>,
        /// Honour setuid/setgid bits and file capabilities of the image's files at MOUNTPOINT
        /// (default: mounted nosuid, so running them grants no privilege).
        #[arg(long)]
        allow_suid: bool,
        /// Let the image's device nodes be opened through MOUNTPOINT (default: mounted nodev).
        #[arg(long)]
        allow_dev: bool,
        /// The image's start-up profile, whose chunks are fetched ahead of the reads: FILE (JSON,
        /// as `lazysnap profile record --out` writes), or `none`. Default: look it up among the
        /// image's referrers in its registry. A profile that cannot be used is logged and skipped.
        #[arg(long, value_name = "FILE|none")]
        profile: Option<ProfileSource>,
        /// The image: HOST[:PORT]/REPO[:TAG|@DIGEST].
        reference: Reference,
        /// Where the image's root appears (an existing directory).
        mountpoint: std::path::PathBuf,
    },
    /// Run an image as a container (with runc) before it has been downloaded.
    ///
    /// The container's standard streams and exit status are its own; lazysnap's report (digest,
    /// time to mount and to first exec, bytes fetched) goes to stderr. Failures of lazysnap
    /// itself exit with 125. SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 are forwarded.
    Run(Box<RunArgs>),
    /// Start-up profiles: record what an image reads while it starts, store that next to the
    /// image in its registry (an OCI artifact whose subject is the image), show it.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Show an image's layers, their lazy format, and whether each TOC verifies.
    Inspect {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        platform: Option<Platform>,
        reference: ImageLocation,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Remove the container's writable layer on exit (the default; see --keep).
    #[arg(long)]
    rm: bool,
    /// Keep the container's writable layer and bundle under ROOT/containers/NAME after exit.
    #[arg(long, conflicts_with = "rm")]
    keep: bool,
    /// Container name and hostname (default: generated).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    container: ContainerArgs,
    /// Fetch only what the container reads (and the prefetch set), not the rest of each layer.
    #[arg(long)]
    no_background_fetch: bool,
    /// Seconds a read may wait for the registry before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    #[arg(long)]
    platform: Option<Platform>,
    /// The image's start-up profile, whose chunks are fetched ahead of the reads: FILE (JSON,
    /// as `lazysnap profile record --out` writes), or `none`. Default: look it up among the
    /// image's referrers in its registry. A profile that cannot be used is logged and skipped.
    #[arg(long, value_name = "FILE|none")]
    profile: Option<ProfileSource>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<std::path::PathBuf>,
    /// lazysnapd's socket: when it listens, the container's root comes from its snapshots (the
    /// node's shared cache); otherwise the image is mounted in this process under --root.
    #[arg(long, value_name = "SOCK", default_value = launcher::daemon::DEFAULT_SOCKET)]
    lazysnapd: std::path::PathBuf,
    /// Never ask lazysnapd; always mount in this process.
    #[arg(long, conflicts_with = "lazysnapd")]
    no_lazysnapd: bool,
    /// The image: HOST[:PORT]/REPO[:TAG|@DIGEST]; the report names the digest that ran.
    reference: Reference,
    /// Command and arguments, replacing the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// How the container runs, as `lazysnap run` and `lazysnap profile record` both take it.
#[derive(Debug, clap::Args)]
struct ContainerArgs {
    /// Set an environment variable (K=V), or pass K from this environment.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the container (default: the image's WorkingDir, or /).
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid, resolved in the image's /etc/passwd and /etc/group.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Security options, as docker takes them: `seccomp=unconfined` turns the default seccomp
    /// filter off (`seccomp=default` keeps it).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Network: the host's, or a new namespace with only loopback.
    #[arg(long, value_enum, default_value_t = NetArg::Host)]
    net: NetArg,
    /// Replace the image's Entrypoint (and drop its Cmd); "" clears it.
    #[arg(long)]
    entrypoint: Option<String>,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    runc: std::path::PathBuf,
}

impl ContainerArgs {
    /// The run options these flags and `command` ask for (mount, name and lazysnapd aside),
    /// or what is wrong with them.
    fn options(self, mount: MountConfig, command: Vec<String>) -> Result<RunOptions, String> {
        let mut seccomp = true;
        for opt in &self.security_opt {
            match opt.as_str() {
                "seccomp=unconfined" => seccomp = false,
                "seccomp=default" => seccomp = true,
                other => {
                    return Err(format!(
                    "--security-opt {other}: not supported (seccomp=unconfined or seccomp=default)"
                ))
                }
            }
        }
        Ok(RunOptions {
            mount,
            name: None,
            overrides: launcher::spec::Overrides {
                entrypoint: self.entrypoint,
                command,
                env: self.env,
                working_dir: self.workdir,
                user: self.user,
            },
            network: match self.net {
                NetArg::Host => Network::Host,
                NetArg::None => Network::None,
            },
            seccomp,
            keep: false,
            lazysnapd: None,
            runc: launcher::runc::Runc {
                binary: self.runc,
                ..Default::default()
            },
            stop: None,
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NetArg {
    Host,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    ZstdChunked,
    Estargz,
}

impl From<FormatArg> for LayerFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::ZstdChunked => LayerFormat::ZstdChunked,
            FormatArg::Estargz => LayerFormat::Estargz,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazysnap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazysnap: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each named once: a cause whose text the message already holds (a
/// registry error that prints its own sources) is left out, and so is a cause's leading
/// `REFERENCE: ` when the context before it already named that reference.
fn describe(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        let text = match text.split_once(": ") {
            Some((head, rest)) if !out.is_empty() && out.contains(head) => rest.to_owned(),
            _ => text,
        };
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The reference with the digest that was resolved from it, the digest written once.
fn pinned(reference: &Reference, digest: &lazysnap::oci::Digest) -> String {
    match &reference.digest {
        Some(_) => reference.to_string(),
        None => format!("{reference}@{digest}"),
    }
}

/// `X of Y fetched`, never more than the image holds: bytes that on-demand reads fetched and the
/// background completion streamed again (it reads the whole blob, for its digest) are counted
/// once in that figure, and the excess is said apart.
fn fetched_of(fetched: u64, image: u64) -> String {
    if fetched <= image {
        format!("{} of {} fetched", human(fetched), human(image))
    } else {
        format!(
            "{} of {} fetched ({} of it transferred twice: read on demand, then again by the background fetch)",
            human(image),
            human(image),
            human(fetched - image)
        )
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Reads a profile document from `path`, at most [`lazysnap::profile::MAX_BYTES`] of it.
fn read_profile(path: &std::path::Path) -> anyhow::Result<lazysnap::profile::Profile> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(lazysnap::profile::MAX_BYTES + 1)
                .read_to_end(&mut bytes)
        })
        .with_context(|| format!("reading the profile {}", path.display()))?;
    lazysnap::profile::Profile::decode(&bytes)
        .with_context(|| format!("the profile {}", path.display()))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let registry = ClientConfig {
        plain_http: cli.plain_http,
        ..ClientConfig::default()
    };
    match cli.command {
        Command::Convert {
            format,
            chunk_size,
            level,
            platform,
            profile,
            startup_elf,
            src,
            dst,
        } => {
            let mut options = ConvertOptions::new(format.into());
            options.startup_elf = startup_elf;
            options.chunk_size = chunk_size;
            options.level = level;
            options.registry = registry;
            if let Some(p) = platform {
                options.platform = p;
            }
            if let Some(source) = profile {
                let path = std::path::Path::new(&source);
                let looks_like_file = source.starts_with('/')
                    || source.starts_with("./")
                    || source.ends_with(".json");
                options.profile = Some(if path.exists() || looks_like_file {
                    read_profile(path)?
                } else {
                    let reference: Reference = source.parse().with_context(|| {
                        format!("--profile {source}: neither a file nor an image reference")
                    })?;
                    convert::find_profile(&reference, &options).await?
                });
            }
            let report = convert::convert(&src, &dst, &options)
                .await
                .with_context(|| format!("converting {src} to {dst}"))?;
            let (size, uploaded): (u64, usize) = (
                report.layers.iter().map(|l| l.size).sum(),
                report
                    .layers
                    .iter()
                    .filter(|l| l.outcome == "uploaded" || l.outcome == "written")
                    .count(),
            );
            for (i, layer) in report.layers.iter().enumerate() {
                if let Some(reason) = &layer.kept_plain {
                    eprintln!(
                        "layer {}/{} {}: kept plain, not lazy (same blob as the source): {reason}",
                        i + 1,
                        report.layers.len(),
                        layer.digest,
                    );
                }
                if let Some(s) = &layer.startup {
                    eprintln!(
                        "layer {}/{} {}: start-up set of {} files ({}) first, from the {}{}{}{}",
                        i + 1,
                        report.layers.len(),
                        layer.digest.short(),
                        s.files,
                        human(s.bytes),
                        match s.source {
                            convert::StartupSource::Profile => "profile",
                            convert::StartupSource::Elf => "entrypoint's ELF headers",
                        },
                        if s.skipped > 0 {
                            format!(", {} names not movable", s.skipped)
                        } else {
                            String::new()
                        },
                        if s.sparse > 0 {
                            format!(", {} sparsely read files left in place", s.sparse)
                        } else {
                            String::new()
                        },
                        s.refused
                            .as_ref()
                            .map(|r| format!(" (nothing moved: {r})"))
                            .unwrap_or_default(),
                    );
                }
            }
            eprintln!(
                "{}: {} layers, {} compressed, {uploaded} new, in {:.1} s",
                report.destination,
                report.layers.len(),
                human(size),
                report.seconds
            );
            println!("{}", report.manifest_digest);
        }
        Command::Mount {
            no_background_fetch,
            read_timeout,
            metrics_addr,
            platform,
            allow_suid,
            allow_dev,
            profile,
            reference,
            mountpoint,
        } => {
            let mut config = mount_config(
                cli.root,
                !no_background_fetch,
                read_timeout,
                registry,
                platform,
                profile,
            );
            config.nosuid = !allow_suid;
            config.nodev = !allow_dev;
            if let Some(addr) = metrics_addr {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening for metrics on {addr}"))?;
                tokio::spawn(lazysnap::metrics::serve(listener));
            }
            let mounted = mount::mount_image(&reference, &mountpoint, &config)
                .await
                .with_context(|| format!("mounting {reference} at {}", mountpoint.display()))?;
            eprintln!(
                "mounted {} at {} in {:.0} ms",
                pinned(&reference, &mounted.manifest_digest),
                mountpoint.display(),
                mounted.seconds * 1000.0
            );
            for l in &mounted.layer_info {
                eprintln!(
                    "  {} {:>10} {:<13} {:>6.0} ms",
                    l.digest.short(),
                    human(l.size),
                    l.mode,
                    l.seconds * 1000.0
                );
            }
            wait_for_stop_signal().await?;
            let fetched = mounted.fetched_bytes();
            mounted.unmount().context("unmounting")?;
            eprintln!(
                "unmounted {}; fetched {}",
                mountpoint.display(),
                human(fetched)
            );
        }
        Command::Run(args) => return Ok(run_container(*args, cli.root, registry).await),
        Command::Profile { command } => {
            return profile::profile_command(command, cli.root, registry).await
        }
        Command::Inspect {
            json,
            platform,
            reference,
        } => {
            let platform = platform.unwrap_or_else(Platform::host);
            let info = inspect::inspect(&reference, &platform, registry)
                .await
                .with_context(|| format!("inspecting {reference}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_table(&info);
            }
            if let Some(bad) = info.layers.iter().find_map(|l| l.toc_error.as_ref()) {
                anyhow::bail!("a lazy layer's TOC did not verify: {bad}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `mount` and `run` share: state under `root`, and how the image is fetched.
fn mount_config(
    root: std::path::PathBuf,
    background_fetch: bool,
    read_timeout_secs: u64,
    registry: ClientConfig,
    platform: Option<Platform>,
    profile: Option<ProfileSource>,
) -> MountConfig {
    let mut config = MountConfig::new(root);
    config.profile = profile.unwrap_or_default();
    config.background_fetch = background_fetch;
    config.fs.read_timeout = std::time::Duration::from_secs(read_timeout_secs);
    config.registry = registry;
    if let Some(p) = platform {
        config.platform = p;
    }
    config
}

/// `lazysnap run`: the container's exit status, or 125 when lazysnap itself failed.
async fn run_container(
    args: RunArgs,
    root: std::path::PathBuf,
    registry: ClientConfig,
) -> ExitCode {
    let mount = mount_config(
        root,
        !args.no_background_fetch,
        args.read_timeout,
        registry,
        args.platform,
        args.profile,
    );
    let options = match args.container.options(mount, args.command) {
        Ok(options) => RunOptions {
            name: args.name,
            keep: args.keep,
            lazysnapd: (!args.no_lazysnapd).then_some(args.lazysnapd),
            ..options
        },
        Err(e) => {
            eprintln!("lazysnap: {e}");
            return ExitCode::from(launcher::EXIT_LAUNCHER_FAILED);
        }
    };
    let reference = args.reference;
    let mut on_stage = |stage: Stage<'_>| match stage {
        Stage::Mounted {
            digest,
            layers,
            seconds,
            served_by,
        } => {
            eprintln!("lazysnap: {}", pinned(&reference, &digest));
            let total: u64 = layers.iter().map(|l| l.size).sum();
            eprintln!(
                "lazysnap: {} layers ({}) ready in {:.0} ms, {served_by}",
                layers.len(),
                human(total),
                seconds * 1000.0
            );
            for l in layers {
                eprintln!(
                    "lazysnap:   {} {:>10} {:<13} {:>6.0} ms",
                    l.digest.short(),
                    human(l.size),
                    l.mode,
                    l.seconds * 1000.0
                );
            }
        }
        Stage::Started { seconds, fetched } => eprintln!(
            "lazysnap: first exec after {:.0} ms{}",
            seconds * 1000.0,
            fetched.map_or_else(String::new, |f| format!(", {} fetched", human(f)))
        ),
    };
    match launcher::run(&reference, &options, &mut on_stage).await {
        Ok(report) => {
            eprintln!(
                "lazysnap: exit {} after {:.2} s, {}",
                report.exit_code,
                report.total_seconds,
                match report.fetched_at_exit {
                    Some(f) => fetched_of(f, report.image_bytes),
                    None => format!(
                        "{} image (lazysnapd counts what it fetched)",
                        human(report.image_bytes)
                    ),
                }
            );
            if let Some(path) = &args.report {
                let written = serde_json::to_vec_pretty(&report)
                    .map_err(std::io::Error::other)
                    .and_then(|json| std::fs::write(path, json));
                if let Err(e) = written {
                    eprintln!("lazysnap: writing the report to {}: {e}", path.display());
                }
            }
            ExitCode::from(u8::try_from(report.exit_code).unwrap_or(255))
        }
        Err(e) => {
            eprintln!(
                "lazysnap: {}",
                describe(&anyhow::Error::new(e).context(format!("running {reference}")))
            );
            ExitCode::from(launcher::EXIT_LAUNCHER_FAILED)
        }
    }
}

/// Returns at the first SIGTERM or SIGINT.
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn print_table(info: &inspect::ImageInfo) {
    println!("image     {}", info.location);
    if let Some(d) = info.manifest_digest {
        println!("digest    {d}");
    }
    if let Some(p) = &info.platform {
        println!("platform  {p}");
    }
    println!("config    {}", info.config_digest);
    println!(
        "{:<3} {:<20} {:>10} {:<13} {:>8} {:>8}  toc",
        "#", "layer", "size", "format", "entries", "chunks"
    );
    for (i, l) in info.layers.iter().enumerate() {
        println!(
            "{:<3} {:<20} {:>10} {:<13} {:>8} {:>8}  {}",
            i + 1,
            l.digest.map_or_else(|| "-".into(), |d| d.short()),
            l.size.map_or_else(|| "-".into(), human),
            l.format.unwrap_or("plain"),
            l.entries.map_or_else(|| "-".into(), |n| n.to_string()),
            l.chunks.map_or_else(|| "-".into(), |n| n.to_string()),
            match (&l.toc_digest, l.toc_verified, &l.toc_error) {
                (Some(d), true, _) => format!("{} verified", d.short()),
                (Some(_), false, Some(e)) => format!("ERROR {e}"),
                _ => "-".into(),
            }
        );
    }
}

//! `lazysnap profile record|push|show`: wiring only; the work is in `lazysnap::profile`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use lazysnap::mount;
use lazysnap::oci::{Platform, Reference};
use lazysnap::profile::{record, show, store};
use lazysnap::registry::ClientConfig;
use lazysnap::run::Stage;

use super::{mount_config, ContainerArgs};

#[derive(Debug, Subcommand)]
pub(crate) enum ProfileCommand {
    /// Run the image on a fresh root (no cache, no background fetch) and record, per layer,
    /// the chunks its start-up reads in first-read order, until the container exits, reads
    /// nothing new for --quiet-ms, or --time-limit passes (then it is killed).
    Record(Box<RecordArgs>),
    /// Store the profile in FILE next to the image it was recorded from, in REF's repository.
    /// Prints the artifact's manifest digest.
    Push {
        #[arg(long)]
        platform: Option<Platform>,
        reference: Reference,
        file: std::path::PathBuf,
    },
    /// Print what the start-up profile of an image (REF) or a file (FILE) holds. Exits 1 when
    /// the image has none.
    Show {
        /// Print the profile document (JSON) instead.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        platform: Option<Platform>,
        /// An image reference, or the path of a profile file.
        target: String,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("destination").required(true).multiple(true).args(["push", "out"])))]
pub(crate) struct RecordArgs {
    /// Push the profile to the image's repository.
    #[arg(long)]
    push: bool,
    /// Write the profile (JSON) to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<std::path::PathBuf>,
    /// Stop once the container has read nothing new for this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    quiet_ms: u64,
    /// Stop this many seconds after recording began, whatever the container does.
    #[arg(long, default_value_t = 120)]
    time_limit: u64,
    #[command(flatten)]
    container: ContainerArgs,
    /// Seconds a read may wait for the registry before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    #[arg(long)]
    platform: Option<Platform>,
    reference: Reference,
    /// Command and arguments, replacing the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `lazysnap profile ...`.
pub(crate) async fn profile_command(
    command: ProfileCommand,
    root: std::path::PathBuf,
    registry: ClientConfig,
) -> anyhow::Result<ExitCode> {
    let client = lazysnap::registry::Client::new(registry.clone())?;
    match command {
        ProfileCommand::Record(args) => record_profile(*args, root, registry, &client).await,
        ProfileCommand::Push {
            platform,
            reference,
            file,
        } => {
            let profile = show::read_file(&file)?;
            let platform = platform.unwrap_or_else(Platform::host);
            let image = show::resolve_image(&client, &reference, &platform).await?;
            anyhow::ensure!(
                image == profile.image,
                "{} was recorded from image {}, but {reference} is {image}: push it to the image it \
                 was recorded from ({}@{})",
                file.display(),
                profile.image,
                reference.repository,
                profile.image
            );
            let artifact = store::push(&client, &reference, &profile)
                .await
                .with_context(|| format!("pushing the profile of {reference}"))?;
            eprintln!(
                "lazysnap: profile of {image} ({} accesses) stored as {artifact}",
                profile.accesses()
            );
            println!("{artifact}");
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Show {
            json,
            platform,
            target,
        } => {
            let path = std::path::Path::new(&target);
            let (profile, tocs) = if path.is_file() {
                (show::read_file(path)?, Default::default())
            } else {
                let reference: Reference = target.parse().with_context(|| {
                    format!("{target:?} is neither a file nor an image reference")
                })?;
                let platform = platform.unwrap_or_else(Platform::host);
                let image = show::resolve_image(&client, &reference, &platform).await?;
                match store::find(&client, &reference, &image).await? {
                    Some(p) => {
                        let tocs = show::layer_tocs(&client, &reference, &image, &p).await;
                        (p, tocs)
                    }
                    None => {
                        if json {
                            println!("null");
                        } else {
                            println!(
                                "{reference} ({image}) has no start-up profile; record one with \
                                 `lazysnap profile record --push {reference}`"
                            );
                        }
                        return Ok(ExitCode::from(1));
                    }
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&profile)?);
            } else {
                print!(
                    "{}",
                    show::render(&profile, &show::summarize(&profile, &tocs))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `lazysnap profile record`: on a fresh root under ROOT, removed afterwards.
async fn record_profile(
    args: RecordArgs,
    root: std::path::PathBuf,
    registry: ClientConfig,
    client: &lazysnap::registry::Client,
) -> anyhow::Result<ExitCode> {
    mount::private_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    let fresh = tempfile::Builder::new()
        .prefix("profile-record-")
        .tempdir_in(&root)
        .with_context(|| format!("creating a fresh root under {}", root.display()))?;
    let mount = mount_config(
        fresh.path().to_owned(),
        false,
        args.read_timeout,
        registry,
        args.platform,
        Some(mount::ProfileSource::Off),
    );
    let run = args
        .container
        .options(mount, args.command)
        .map_err(anyhow::Error::msg)?;
    let options = record::RecordOptions {
        run,
        quiet: std::time::Duration::from_millis(args.quiet_ms),
        time_limit: std::time::Duration::from_secs(args.time_limit),
    };
    let reference = args.reference;
    let mut on_stage = |stage: Stage<'_>| {
        if let Stage::Started { seconds, .. } = stage {
            eprintln!(
                "lazysnap: recording; first exec after {:.0} ms",
                seconds * 1000.0
            );
        }
    };
    let recording = record::record(&reference, &options, &mut on_stage)
        .await
        .with_context(|| format!("recording the start-up of {reference}"))?;
    let _ = fresh.close();
    let profile = &recording.profile;
    let ended = match recording.ended {
        record::Ended::Exited => format!("the container exited ({})", recording.report.exit_code),
        record::Ended::Quiet => format!("nothing new was read for {} ms", args.quiet_ms),
        record::Ended::TimeLimit => format!("the time limit of {} s passed", args.time_limit),
    };
    eprintln!(
        "lazysnap: recorded {} accesses in {} layers of {}; stopped because {ended}",
        profile.accesses(),
        profile.layers.len(),
        profile.image
    );
    if recording.ended == record::Ended::Exited && recording.report.exit_code != 0 {
        eprintln!(
            "lazysnap: warning: the command failed (exit {}); the profile records what it read anyway",
            recording.report.exit_code
        );
    }
    if recording.dropped > 0 {
        eprintln!(
            "lazysnap: warning: {} more first reads were past the profile's bound and left out",
            recording.dropped
        );
    }
    eprint!(
        "{}",
        show::render(profile, &show::summarize(profile, &Default::default()))
    );
    if let Some(out) = &args.out {
        std::fs::write(out, profile.encode()?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if args.push {
        let artifact = store::push(client, &reference, profile)
            .await
            .with_context(|| format!("pushing the profile of {reference}"))?;
        eprintln!("lazysnap: profile stored as {artifact}");
        println!("{artifact}");
    }
    Ok(ExitCode::SUCCESS)
}

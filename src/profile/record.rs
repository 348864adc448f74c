//! Recording a start-up profile: run the image as `lazysnap run` does, on a fresh root (no cache,
//! no background fetch, no profile of its own, no lazysnapd), with an access log on every lazy
//! layer, until the container exits, reads nothing new for a quiet period, or runs out of time
//! (then it is killed). What the log holds becomes the profile, layer by layer, bottom first.
//!
//! The root must be fresh: a chunk already cached is still recorded (the log notes reads, not
//! misses), but a file already complete in the cache is read through FUSE passthrough, past the
//! fetcher, and would go unrecorded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{LayerProfile, Profile, ProfileError};
use crate::fetch::AccessLog;
use crate::mount::{self, MountError};
use crate::oci::{Digest, Reference};
use crate::registry::{Client, RegistryError};
use crate::run::spec::{self, ImageProcess, SpecError};
use crate::run::{self, RunError, RunOptions, RunReport, Stage};

/// How often the quiet period and the time limit are checked.
const POLL: Duration = Duration::from_millis(50);

/// Why no profile was recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Image(#[from] MountError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{reference}: start-up read nothing from a lazy layer, so there is nothing to record (are its layers lazy? `lazysnap inspect` tells; `lazysnap convert` makes them so)")]
    NothingRead { reference: String },
    #[error("{reference}: the recorded profile cannot be kept: {source}")]
    Profile {
        reference: String,
        #[source]
        source: ProfileError,
    },
}

/// What to run and when to stop.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// How the container runs. Its `mount.root` must be a fresh directory; background fetch,
    /// lazysnapd, the access log and `stop` are set by [`record`].
    pub run: RunOptions,
    /// Stop once no chunk has been read for the first time for this long (after the start).
    pub quiet: Duration,
    /// Stop this long after recording began, whatever the container does.
    pub time_limit: Duration,
}

/// Why recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The container exited by itself.
    Exited,
    /// It read nothing new for the quiet period and was stopped.
    Quiet,
    /// The time limit passed and it was stopped.
    TimeLimit,
}

/// A recorded profile and how the run went.
#[derive(Debug)]
pub struct Recording {
    pub profile: Profile,
    pub report: RunReport,
    pub ended: Ended,
    /// First reads past the profile's bound on accesses, not kept.
    pub dropped: u64,
}

/// Runs `reference` and records what its start-up reads. `on_stage` sees the run's stages.
pub async fn record(
    reference: &Reference,
    options: &RecordOptions,
    on_stage: &mut (dyn FnMut(Stage<'_>) + Send),
) -> Result<Recording, RecordError> {
    let client = Client::new(options.run.mount.registry.clone())?;
    let (digest, manifest, config) =
        mount::resolve(&client, reference, &options.run.mount.platform).await?;
    // The run mounts exactly the manifest the profile names, whatever the tag does meanwhile.
    let pinned = reference.with_digest(digest);
    let command = spec::command(&ImageProcess::from_config(&config), &options.run.overrides)?;

    let log = AccessLog::new();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut run_options = options.run.clone();
    run_options.mount.background_fetch = false;
    // A profile's prefetch would fill the cache ahead of the reads being recorded: none.
    run_options.mount.profile = mount::ProfileSource::Off;
    run_options.mount.fetch.access = Some(log.clone());
    run_options.lazysnapd = None;
    run_options.stop = Some(stop.clone());

    let started = AtomicBool::new(false);
    let mut stage = |s: Stage<'_>| {
        if matches!(s, Stage::Started { .. }) {
            // Mounting and creating the container read little: quiet counts from its start.
            log.touch();
            started.store(true, Ordering::Relaxed);
        }
        on_stage(s);
    };
    let watch = async {
        loop {
            tokio::time::sleep(POLL).await;
            if log.elapsed() >= options.time_limit {
                return Ended::TimeLimit;
            }
            if started.load(Ordering::Relaxed) && log.quiet_for() >= options.quiet {
                return Ended::Quiet;
            }
        }
    };
    let running = run::run(&pinned, &run_options, &mut stage);
    tokio::pin!(running);
    let (report, ended) = tokio::select! {
        done = &mut running => (done?, Ended::Exited),
        why = watch => {
            tracing::info!(?why, "stopping the container");
            stop.notify_one();
            (running.await?, why)
        }
    };

    let profile = profile_from(reference, digest, &manifest, &config, command, &log)?;
    Ok(Recording {
        profile,
        report,
        ended,
        dropped: log.dropped(),
    })
}

/// The profile of `digest` from what `log` holds, layers in manifest order (bottom first).
fn profile_from(
    reference: &Reference,
    digest: Digest,
    manifest: &Value,
    config: &Value,
    command: Vec<String>,
    log: &AccessLog,
) -> Result<Profile, RecordError> {
    let mut read: HashMap<Digest, _> = log.layers().into_iter().collect();
    let diff_ids = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut layers = Vec::new();
    let descriptors = manifest["layers"].as_array().cloned().unwrap_or_default();
    for (i, descriptor) in descriptors.iter().enumerate() {
        let Some(blob) = descriptor["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
        else {
            continue;
        };
        if let Some(accesses) = read.remove(&blob) {
            let diff_id = diff_ids
                .get(i)
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok());
            layers.push(LayerProfile {
                digest: blob,
                diff_id,
                accesses,
            });
        }
    }
    if layers.is_empty() {
        return Err(RecordError::NothingRead {
            reference: reference.to_string(),
        });
    }
    let profile = Profile {
        version: 1,
        image: digest,
        command,
        layers,
    };
    // The bounds a reader applies, checked before anyone stores it.
    profile.encode().map_err(|source| RecordError::Profile {
        reference: reference.to_string(),
        source,
    })?;
    Ok(profile)
}

//! The build path: turn an image (OCI layout, `docker save` archive or registry) into a lazily
//! loadable one, and write it to a layout or push it to a registry.
//!
//! Owns: reading source images, the per-layer rewrite pipeline (decompress, [`crate::format`]
//! writer, digest checks), the new config and manifest, and the order of writes (blobs first,
//! manifest last, so nothing half-written is ever named by a tag).
//! Does not own: the layer byte layout (`format`) or the wire protocol (`registry`).
//!
//! A layer the lazy format cannot hold (a file name that is not UTF-8, say) is kept as it is
//! stored, and the rest convert (`plain`); hostile input still fails the conversion.

mod archive;
mod destination;
mod layer;
mod layout;
mod location;
mod plain;
mod progress;
mod rewrite;
mod source;
pub mod startup;

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::format::{self, FormatError, LayerFormat, WriteOptions};
use crate::oci::{self, Digest, OciError, Platform, Reference};
use crate::registry::{Client, ClientConfig, RegistryError};

use destination::Destination;
pub use layer::convert_layer;
pub use layout::{Layout, REF_NAME};
pub use location::ImageLocation;
pub use progress::human;
pub use source::{SourceImage, SourceLayer};
pub use startup::{StartupReport, StartupSet, StartupSource};

use crate::profile::Profile;

/// Why a conversion failed. Every message names the image, layer or entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{0}")]
    Location(String),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}: digest mismatch (expected {expected}, got {got})")]
    DigestMismatch {
        what: String,
        expected: Digest,
        got: Digest,
    },
    // The causes are in the messages (not `#[source]`), so a chain printer does not repeat them.
    #[error("layer {layer}: {error}")]
    Format { layer: String, error: FormatError },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("{0}")]
    Profile(String),
}

impl From<oci::DigestError> for ConvertError {
    fn from(e: oci::DigestError) -> Self {
        Self::Oci(OciError::from(e))
    }
}

impl ConvertError {
    /// The reason, when the error says only that a layer cannot be written in the lazy format
    /// (see [`FormatError::Unrepresentable`]): that layer may be kept plain instead.
    pub fn unrepresentable(&self) -> Option<String> {
        match self {
            Self::Format { error, .. } if error.is_unrepresentable() => Some(error.to_string()),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        let context = context.into();
        if error.raw_os_error() == Some(28) {
            // ENOSPC: say where, and what to do.
            return Self::Io {
                context: format!(
                    "{context} (the disk is full: free space there, or when pushing to a registry point TMPDIR at a larger disk)"
                ),
                error,
            };
        }
        Self::Io { context, error }
    }
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: LayerFormat,
    /// Largest chunk of a file (bytes).
    pub chunk_size: u64,
    /// Compression level; `None` for the format's default.
    pub level: Option<i32>,
    /// Compression threads per layer.
    pub threads: usize,
    /// Platform to choose from a multi-platform source.
    pub platform: Platform,
    pub registry: ClientConfig,
    /// A start-up profile: each layer it matches gets its start-up set written first and recorded
    /// in the TOC (see [`startup::from_profile`]).
    pub profile: Option<Profile>,
    /// Without a profile: put the entrypoint's program, its dynamic loader and libraries first
    /// (see [`startup::from_elf`]). Every layer is decompressed to a temporary file first.
    pub startup_elf: bool,
}

impl ConvertOptions {
    /// Defaults: zstd:chunked, 4 MiB chunks, all cores, the host platform.
    pub fn new(format: LayerFormat) -> Self {
        Self {
            format,
            chunk_size: 4 << 20,
            level: None,
            threads: std::thread::available_parallelism().map_or(2, usize::from),
            platform: Platform::host(),
            registry: ClientConfig::default(),
            profile: None,
            startup_elf: false,
        }
    }

    fn write_options(&self) -> WriteOptions {
        WriteOptions {
            format: self.format,
            chunk_size: self.chunk_size,
            level: self.level.unwrap_or(match self.format {
                LayerFormat::ZstdChunked => 3,
                LayerFormat::Estargz => 6,
            }),
            threads: self.threads.max(1),
        }
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub source_digest: Option<Digest>,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub media_type: String,
    /// Already in the requested lazy format, so carried over unchanged.
    pub passthrough: bool,
    /// `written`, `existed`, `mounted` or `uploaded`.
    pub outcome: &'static str,
    /// Why the layer was kept plain (its stored blob, unchanged) instead of converted: something
    /// in it the lazy format cannot hold, such as a file name that is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_plain: Option<String>,
    pub seconds: f64,
    /// The start-up set written first, when the layer got one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupReport>,
}

/// The result of a conversion.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub destination: String,
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    pub layers: Vec<LayerReport>,
    pub seconds: f64,
}

/// The start-up profile stored in the registry for the image `reference` names (its manifest for
/// the options' platform), as `lazysnap profile push` stores it: for `convert --profile REF`.
pub async fn find_profile(
    reference: &Reference,
    options: &ConvertOptions,
) -> Result<Profile, ConvertError> {
    let client = Client::new(options.registry.clone())?;
    let image = SourceImage::load(
        &ImageLocation::Registry(reference.clone()),
        &client,
        &options.platform,
    )
    .await?;
    let manifest = image
        .manifest_digest
        .ok_or_else(|| ConvertError::Profile(format!("{reference}: no manifest digest")))?;
    match crate::profile::store::find(&client, reference, &manifest).await {
        Ok(Some(profile)) => Ok(profile),
        Ok(None) => Err(ConvertError::Profile(format!(
            "{reference} (manifest {manifest}): the registry holds no start-up profile for it; \
             record one with `lazysnap profile record {reference} --push`, or pass a profile file"
        ))),
        Err(e) => Err(ConvertError::Profile(format!(
            "{reference}: reading its start-up profile: {e}"
        ))),
    }
}

/// Converts the image at `src` and writes it to `dst`: every blob first, the manifest last.
pub async fn convert(
    src: &ImageLocation,
    dst: &ImageLocation,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let start = Instant::now();
    let client = Client::new(options.registry.clone())?;
    let source = SourceImage::load(src, &client, &options.platform).await?;
    let dest = Destination::open(dst, &client, source.registry_reference())?;
    let write_options = options.write_options();
    let total = source.layers.len();
    // Layers decompressed ahead of the loop (the ELF heuristic reads across all of them).
    let mut spooled: Vec<Option<layer::Spooled>> = (0..total).map(|_| None).collect();
    // Layers found ahead of the loop to be kept plain, with the reason.
    let mut kept_plain: Vec<Option<String>> = vec![None; total];
    let startup_sets: Vec<(StartupSet, StartupSource)> = match &options.profile {
        Some(profile) => startup::from_profile(profile, &source.layers)
            .into_iter()
            .map(|names| (names, StartupSource::Profile))
            .collect(),
        None if options.startup_elf => {
            for (i, layer) in source.layers.iter().enumerate() {
                let label = layer
                    .digest
                    .map_or_else(|| format!("#{}", i + 1), |d| d.short());
                let stored = source.open_layer(layer).await?;
                let spool = dest.new_spool()?;
                let diff_id = layer.diff_id;
                let spooled_layer = tokio::task::spawn_blocking(move || {
                    layer::spool_layer(stored, &diff_id, spool, &label)
                })
                .await
                .map_err(|e| ConvertError::Source(format!("spool task failed: {e}")))?;
                match spooled_layer {
                    Ok(s) => spooled[i] = Some(s),
                    Err(e) => kept_plain[i] = Some(e.unrepresentable().ok_or(e)?),
                }
            }
            let config = source.config.clone();
            // A layer kept plain is left out of the heuristic (it can hold no start-up set): a
            // program found only there is not found, which costs a start-up set, nothing more.
            let (found, back) = tokio::task::spawn_blocking(move || {
                let refs: Vec<&layer::Spooled> = spooled.iter().flatten().collect();
                (startup::from_elf(&config, &refs), spooled)
            })
            .await
            .map_err(|e| ConvertError::Source(format!("ELF heuristic task failed: {e}")))?;
            spooled = back;
            let present: Vec<usize> = (0..total).filter(|&i| spooled[i].is_some()).collect();
            let mut sets = vec![StartupSet::default(); total];
            for (set, i) in found.sets.into_iter().zip(present) {
                sets[i] = set;
            }
            tracing::info!(
                program = found.program.as_deref().unwrap_or("(none)"),
                files = found.files,
                "start-up set from the entrypoint's ELF headers"
            );
            sets.into_iter()
                .map(|names| (names, StartupSource::Elf))
                .collect()
        }
        None => vec![(StartupSet::default(), StartupSource::Profile); total],
    };

    let mut reports = Vec::with_capacity(total);
    let mut descriptors = Vec::with_capacity(total);
    let mut diff_ids = Vec::with_capacity(total);
    // One upload runs while the next layer converts; awaiting it first bounds the temporary disk
    // use to two layers.
    let mut pending: Option<tokio::task::JoinHandle<Result<(LayerReport, Value), ConvertError>>> =
        None;
    for (i, layer) in source.layers.iter().enumerate() {
        let label = layer
            .digest
            .map_or_else(|| format!("#{}", i + 1), |d| d.short());
        let layer_start = Instant::now();
        let lazy = format::detect(&layer.media_type, &layer.annotations);
        let (wanted, startup_source) = &startup_sets[i];
        // A layer that gets a start-up set is rewritten even when already in the format.
        let passthrough = lazy.as_ref().is_some_and(|l| l.format == options.format)
            && layer.digest.is_some()
            && wanted.is_empty();
        let mut startup_report = None;
        let mut plain_reason = kept_plain[i].take().filter(|_| !passthrough);
        let (file, written) = if passthrough {
            // Already lazy in this format: the stored blob is the result. Copy it (verified) only
            // if the destination lacks it.
            let digest = layer
                .digest
                .ok_or_else(|| ConvertError::Source("passthrough without digest".into()))?;
            let file = dest.stage_existing(&source, layer, &digest).await?;
            let written = format::WrittenLayer {
                media_type: if layer.media_type.is_empty() {
                    format::MEDIA_TYPE_ZSTD
                } else {
                    media_type_static(&layer.media_type)
                },
                digest,
                size: layer.size.unwrap_or(0),
                diff_id: layer.diff_id,
                uncompressed_size: 0,
                toc_digest: lazy.as_ref().map_or(digest, |l| l.toc_digest),
                annotations: layer.annotations.clone(),
                entries: 0,
            };
            (file, written)
        } else if plain_reason.is_some() {
            plain::keep(&source, layer, &dest, &label).await?
        } else {
            let job = rewrite::Job {
                index: i,
                total,
                label: &label,
                wanted,
                startup_source: *startup_source,
                spooled: spooled[i].take(),
                drop_estargz_toc: layer::carries_estargz_toc(lazy.as_ref()),
            };
            match rewrite::rewrite(&source, layer, &dest, &write_options, job).await {
                Ok((out, written, report)) => {
                    startup_report = report;
                    (Some(out), written)
                }
                // A layer the lazy format cannot hold (and nothing worse) is kept as it is stored.
                Err(e) => {
                    plain_reason = Some(e.unrepresentable().ok_or(e)?);
                    plain::keep(&source, layer, &dest, &label).await?
                }
            }
        };
        if let Some(reason) = &plain_reason {
            // The report carries the reason; `lazysnap convert` prints it.
            tracing::info!(
                layer = i + 1,
                digest = %written.digest,
                reason = %reason,
                "layer kept plain (not lazy): the format cannot hold it"
            );
        }
        tracing::info!(layer = %label, digest = %written.digest, size = written.size, "layer ready");
        diff_ids.push(written.diff_id);
        if let Some(previous) = pending.take() {
            finish_upload(previous, &mut reports, &mut descriptors).await?;
        }
        let dest = dest.clone();
        let source_digest = layer.digest;
        pending = Some(tokio::spawn(async move {
            let outcome = dest.put_blob(file, &written.digest).await?;
            let mut descriptor = json!({
                "mediaType": written.media_type,
                "digest": written.digest.to_string(),
                "size": written.size,
            });
            if !written.annotations.is_empty() {
                descriptor["annotations"] = json!(written.annotations);
            }
            let report = LayerReport {
                source_digest,
                digest: written.digest,
                size: written.size,
                diff_id: written.diff_id,
                uncompressed_size: written.uncompressed_size,
                media_type: written.media_type.to_owned(),
                passthrough,
                outcome,
                kept_plain: plain_reason,
                seconds: layer_start.elapsed().as_secs_f64(),
                startup: startup_report,
            };
            Ok((report, descriptor))
        }));
    }
    if let Some(previous) = pending.take() {
        finish_upload(previous, &mut reports, &mut descriptors).await?;
    }

    let config = new_config(&source.config, &diff_ids)?;
    let config_digest = Digest::of(&config);
    dest.put_small_blob(&config_digest, config.clone()).await?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": oci::MEDIA_TYPE_OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config.len(),
        },
        "layers": descriptors,
    });
    if !source.annotations.is_empty() {
        manifest["annotations"] = json!(source.annotations);
    }
    let manifest =
        serde_json::to_vec(&manifest).map_err(|e| ConvertError::Source(e.to_string()))?;
    let manifest_size = manifest.len() as u64;
    let manifest_digest = dest.put_manifest(manifest).await?;
    Ok(ConvertReport {
        destination: dst.to_string(),
        manifest_digest,
        manifest_size,
        config_digest,
        layers: reports,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Waits for one layer's upload and records its report and manifest descriptor.
async fn finish_upload(
    upload: tokio::task::JoinHandle<Result<(LayerReport, Value), ConvertError>>,
    reports: &mut Vec<LayerReport>,
    descriptors: &mut Vec<Value>,
) -> Result<(), ConvertError> {
    let (report, descriptor) = upload
        .await
        .map_err(|e| ConvertError::Source(format!("upload task failed: {e}")))??;
    reports.push(report);
    descriptors.push(descriptor);
    Ok(())
}

/// The source config with the new layers' `diff_ids`; every other field is kept as it was.
fn new_config(source: &[u8], diff_ids: &[Digest]) -> Result<Vec<u8>, ConvertError> {
    let mut config: Value = serde_json::from_slice(source)
        .map_err(|e| ConvertError::Source(format!("invalid image config: {e}")))?;
    let rootfs = config
        .get_mut("rootfs")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ConvertError::Source("image config has no rootfs".into()))?;
    rootfs.insert(
        "diff_ids".into(),
        json!(diff_ids.iter().map(Digest::to_string).collect::<Vec<_>>()),
    );
    serde_json::to_vec(&config).map_err(|e| ConvertError::Source(e.to_string()))
}

fn media_type_static(media_type: &str) -> &'static str {
    match media_type {
        format::MEDIA_TYPE_GZIP => format::MEDIA_TYPE_GZIP,
        _ => format::MEDIA_TYPE_ZSTD,
    }
}

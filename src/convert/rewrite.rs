//! One layer rewritten into the lazy format, as the conversion loop runs it: straight from the
//! stored stream, or through a spooled copy when a start-up set goes first. The byte work runs on
//! a blocking thread; progress goes to the terminal.

use tempfile::NamedTempFile;

use crate::format::{WriteOptions, WrittenLayer};

use super::destination::Destination;
use super::layer::{self, Spooled};
use super::{progress, ConvertError, SourceImage, SourceLayer};
use super::{StartupReport, StartupSet, StartupSource};

/// What the loop knows about the layer it hands over.
#[derive(Debug)]
pub(super) struct Job<'a> {
    /// From 0.
    pub index: usize,
    pub total: usize,
    /// Names the layer in errors and progress.
    pub label: &'a str,
    /// Entry names to write first (empty for none).
    pub wanted: &'a StartupSet,
    pub startup_source: StartupSource,
    /// The layer, already decompressed and indexed (for the ELF heuristic).
    pub spooled: Option<Spooled>,
    /// The source is eStargz: its own TOC entry rides in the tar.
    pub drop_estargz_toc: bool,
}

/// Rewrites `layer` into a new blob; returns it, what the manifest needs, and the start-up set
/// report when one was written first. A [`crate::format::FormatError::Unrepresentable`] error
/// says the layer may be kept plain instead (see `plain`).
pub(super) async fn rewrite(
    source: &SourceImage,
    layer: &SourceLayer,
    dest: &Destination,
    options: &WriteOptions,
    job: Job<'_>,
) -> Result<(NamedTempFile, WrittenLayer, Option<StartupReport>), ConvertError> {
    if job.wanted.is_empty() && job.spooled.is_none() {
        let (out, written) = straight(source, layer, dest, options, &job).await?;
        return Ok((out, written, None));
    }
    let Job {
        index,
        total,
        label,
        wanted,
        startup_source,
        spooled: pre,
        drop_estargz_toc,
    } = job;
    let stored = match pre {
        Some(_) => None,
        None => Some((source.open_layer(layer).await?, dest.new_spool()?)),
    };
    let mut out = dest.new_blob()?;
    let options = options.clone();
    let diff_id = layer.diff_id;
    let task_label = label.to_owned();
    let wanted = wanted.clone();
    let wanted_empty = wanted.is_empty();
    let (out, written, plan) = tokio::task::spawn_blocking(move || {
        let mut progress = progress::LayerProgress::new(index + 1, total, &task_label);
        let mut seen = 0;
        let spooled = match (pre, stored) {
            (Some(pre), _) => pre,
            (None, Some((stored, spool))) => {
                layer::spool_layer(stored, &diff_id, spool, &task_label)?
            }
            (None, None) => {
                return Err(ConvertError::Source(format!(
                    "layer {task_label}: nothing to convert"
                )))
            }
        };
        let (written, plan) = layer::write_spooled(
            spooled,
            &wanted,
            drop_estargz_toc,
            std::io::BufWriter::with_capacity(1 << 20, out.as_file_mut()),
            &options,
            &task_label,
            &mut |n| {
                seen = n;
                progress.update(n);
            },
        )?;
        progress.finish(seen, "converted");
        Ok::<_, ConvertError>((out, written, plan))
    })
    .await
    .map_err(|e| ConvertError::Source(format!("layer {label}: conversion task failed: {e}")))??;
    let (plan, sparse) = plan;
    let moved = !plan.startup.is_empty() || !wanted_empty;
    tracing::info!(
        layer = %label,
        files = plan.startup.len(),
        bytes = plan.startup_bytes,
        skipped = plan.skipped,
        refused = plan.refused.as_deref().unwrap_or(""),
        "start-up set written first"
    );
    let report = moved.then_some(StartupReport {
        source: startup_source,
        files: plan.startup.len(),
        bytes: plan.startup_bytes,
        skipped: plan.skipped,
        sparse,
        refused: plan.refused,
    });
    Ok((out, written, report))
}

/// The common case: the stored stream, decompressed, straight into the writer.
async fn straight(
    source: &SourceImage,
    layer: &SourceLayer,
    dest: &Destination,
    options: &WriteOptions,
    job: &Job<'_>,
) -> Result<(NamedTempFile, WrittenLayer), ConvertError> {
    let stored = source.open_layer(layer).await?;
    let mut out = dest.new_blob()?;
    let options = options.clone();
    let diff_id = layer.diff_id;
    let task_label = job.label.to_owned();
    let (index, total) = (job.index, job.total);
    tokio::task::spawn_blocking(move || {
        let mut progress = progress::LayerProgress::new(index + 1, total, &task_label);
        let mut seen = 0;
        let file = out.as_file_mut();
        let written = layer::convert_layer(
            stored,
            &diff_id,
            std::io::BufWriter::with_capacity(1 << 20, file),
            &options,
            &task_label,
            &mut |n| {
                seen = n;
                progress.update(n);
            },
        )?;
        progress.finish(seen, "converted");
        Ok::<_, ConvertError>((out, written))
    })
    .await
    .map_err(|e| {
        ConvertError::Source(format!("layer {}: conversion task failed: {e}", job.label))
    })?
}

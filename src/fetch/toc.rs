//! Reading a lazy layer's TOC: where it lies (the annotation, else the footer), its stated sizes
//! bounded, its bytes checked against the pinned digest and decoded off the async workers.
//!
//! Owns: the TOC's way from a blob to a [`Toc`]. Does not own: the formats' parsing (`format`)
//! or the HTTP (`registry`).

use super::{FetchError, Scheduler};
use crate::format::{self, LazyLayer, Toc};
use crate::oci::{Digest, Reference};
use crate::registry::Client;

/// Finds and verifies a lazy layer's TOC with at most two range reads of its `size`-byte blob:
/// the footer (skipped when the annotation gives the position), then the TOC, which is checked
/// against the digest the manifest pins before it is parsed. `read(start, end)` reads
/// `[start, end)` of the blob, from a registry or a local file. The TOC's stated sizes are checked
/// against `limits` before it is read, and its content while it is decoded, which waits for a
/// turn from `scheduler`.
pub async fn read_toc<F, Fut, B, E>(
    blob: &Digest,
    lazy: &LazyLayer,
    size: u64,
    limits: &format::Limits,
    scheduler: &Scheduler,
    read: F,
) -> Result<Toc, FetchError>
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<B, E>>,
    B: AsRef<[u8]> + Send + 'static,
    E: std::fmt::Display,
{
    let fail = |message: String| FetchError::Layer {
        layer: blob.short(),
        message,
    };
    let position = match lazy.toc_position {
        Some(p) => p,
        None => {
            let tail_len = format::tail_len(lazy.format).min(size);
            let tail = read(size - tail_len, size)
                .await
                .map_err(|e| fail(format!("reading the footer: {e}")))?;
            format::parse_tail(lazy.format, tail.as_ref(), size).map_err(|e| fail(e.to_string()))?
        }
    };
    // The annotation's position is as untrusted as the footer's: bound it before the read.
    limits
        .check_toc_size(position.compressed_len, position.uncompressed_len)
        .map_err(|e| fail(e.to_string()))?;
    let end = position
        .offset
        .checked_add(position.compressed_len)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            fail(format!(
                "TOC position {}+{} lies outside the {size}-byte blob",
                position.offset, position.compressed_len
            ))
        })?;
    let raw = read(position.offset, end)
        .await
        .map_err(|e| fail(format!("reading the TOC: {e}")))?;
    // Decoding is CPU work that a TOC at the limits stretches to seconds: off the async workers
    // (they serve every layer's reads), and in turns, so hostile TOCs hold bounded memory.
    let _turn = scheduler.toc_decode().await;
    let (lazy, limits) = (lazy.clone(), *limits);
    tokio::task::spawn_blocking(move || {
        format::parse_toc_limited(&lazy, position, raw.as_ref(), &limits)
    })
    .await
    .map_err(|e| fail(format!("decoding the TOC: {e}")))?
    .map_err(|e| fail(e.to_string()))
}

/// [`read_toc`] of the layer `blob` at `reference`, by range reads from its registry.
pub async fn read_toc_at(
    client: &Client,
    reference: &Reference,
    blob: &Digest,
    lazy: &LazyLayer,
    size: u64,
    limits: &format::Limits,
    scheduler: &Scheduler,
) -> Result<Toc, FetchError> {
    let read = |start: u64, end: u64| client.get_blob_range(reference, blob, start..end);
    read_toc(blob, lazy, size, limits, scheduler, read).await
}

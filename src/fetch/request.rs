//! One range request: its answer read as it arrives, and each chunk in it decoded, verified,
//! cached and handed to its readers as soon as its own bytes are in.
//!
//! A miss asks for the chunk it needs and the read-ahead that rides along (the rest of the file,
//! small neighbouring files), and a profile window may be megabytes. A reader waits only for its
//! chunk: at 100 Mbit/s, 256 KiB of read-ahead behind it is another 21 ms, about one round trip,
//! that the container's next read no longer waits out. The request as a whole still resolves to
//! every chunk it verified (for prefetch, and for readers whose chunk failed), and no byte reaches
//! a reader before its chunk matched its digest.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use super::{Inner, Kind, RangeResult, Span};
use crate::format::{self, Chunk};
use crate::fs::ChunkError;
use crate::metrics::METRICS;

/// One chunk's verified bytes, as soon as they are in; `None` if it failed verification or its
/// request failed first (its readers then look at the whole request's result).
pub(super) type EarlyChunk = Shared<BoxFuture<'static, Option<Bytes>>>;

/// Where each chunk of a span goes once verified.
pub(super) type EarlySenders = Vec<oneshot::Sender<Bytes>>;

/// A sender and a shared receiver for each of `n` chunks, in the span's order.
pub(super) fn early_chunks(n: usize) -> (EarlySenders, Vec<EarlyChunk>) {
    (0..n)
        .map(|_| {
            let (tx, rx) = oneshot::channel();
            (tx, async move { rx.await.ok() }.boxed().shared())
        })
        .unzip()
}

/// One range GET of `span` (its chunks in blob order), read as it arrives: every chunk whose
/// bytes are complete is decoded and verified (off the async workers), cached, and sent to
/// `early`; then the map of every verified chunk, or the request's error.
pub(super) async fn fetch_span(
    inner: &Inner,
    span: &Span,
    kind: Kind,
    early: EarlySenders,
) -> RangeResult {
    let layer = inner.blob.short();
    let started = std::time::Instant::now();
    METRICS
        .fetch_requests
        .with_label_values(&[kind.label()])
        .inc();
    let failed = |e: crate::registry::RegistryError| {
        ChunkError(format!(
            "layer {layer}: range {}-{}: {e}",
            span.start, span.end
        ))
    };
    let mut body = inner
        .client
        .blob_range(&inner.reference, &inner.blob, span.start..span.end)
        .await
        .map_err(failed)?;
    // Counted when answered, bytes as they come: readers may return before the body has ended.
    inner.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (counter, requests) = match kind {
        Kind::OnDemand => (
            &inner.stats.on_demand_bytes,
            &inner.stats.on_demand_requests,
        ),
        Kind::Prefetch => (&inner.stats.prefetch_bytes, &inner.stats.prefetch_requests),
        Kind::Profile => (&inner.stats.profile_bytes, &inner.stats.profile_requests),
    };
    requests.fetch_add(1, Ordering::Relaxed);
    // Bounded by planning: a span is at most a request's size plus small gaps.
    let mut received: Vec<u8> = Vec::with_capacity((span.end - span.start) as usize);
    let mut pending = span.chunks.iter().zip(early).peekable();
    let mut out = HashMap::with_capacity(span.chunks.len());
    let mut first_error = None;
    let mut first_ms = None;
    let streamed: Result<(), ChunkError> = async {
        loop {
            let piece = body.next().await.map_err(failed)?;
            if let Some(piece) = &piece {
                received.extend_from_slice(piece);
                counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            let mut ready = Vec::new();
            while let Some((c, _)) = pending.peek() {
                let (from, to) = (
                    c.compressed_start - span.start,
                    c.compressed_end - span.start,
                );
                if to as usize > received.len() {
                    break;
                }
                let data = Bytes::copy_from_slice(&received[from as usize..to as usize]);
                if let Some((c, tx)) = pending.next() {
                    ready.push((c.clone(), data, tx));
                }
            }
            if !ready.is_empty() {
                first_ms.get_or_insert(started.elapsed().as_millis() as u64);
                deliver(inner, ready, &mut out, &mut first_error).await?;
            }
            if piece.is_none() {
                return Ok(());
            }
        }
    }
    .await;
    // The node's metrics once per request (they are labelled, so not per piece of the body).
    inner.record(kind.label(), received.len() as u64);
    streamed?;
    // Planning puts every chunk inside its span; one that is not cannot be verified.
    if let Some((c, _)) = pending.next() {
        first_error.get_or_insert(format!(
            "chunk at {} lies outside the response",
            c.compressed_start
        ));
    }
    // One line per request: what a trace of start-up's round trips is made from.
    tracing::debug!(layer = %layer, kind = kind.label(), start = span.start, end = span.end, chunks = span.chunks.len(), first_ms, ms = started.elapsed().as_millis() as u64, "range request answered");
    METRICS
        .fetch_seconds
        .observe(started.elapsed().as_secs_f64());
    if out.is_empty() {
        if let Some(e) = first_error {
            return Err(ChunkError(format!("layer {layer}: {e}")));
        }
    }
    Ok(Arc::new(out))
}

/// Decodes and verifies `ready` chunks (compressed bytes in hand) off the async workers, then
/// caches each one that verified, sends it to its readers and adds it to `out`.
async fn deliver(
    inner: &Inner,
    ready: Vec<(Chunk, Bytes, oneshot::Sender<Bytes>)>,
    out: &mut HashMap<crate::oci::Digest, Bytes>,
    first_error: &mut Option<String>,
) -> Result<(), ChunkError> {
    let layer = inner.blob.short();
    let format = inner.format;
    let (work, senders): (Vec<(Chunk, Bytes)>, Vec<_>) = ready
        .into_iter()
        .map(|(c, data, tx)| ((c, data), tx))
        .unzip();
    // Decompression and hashing are CPU work: keep them off the async workers.
    let decoded = tokio::task::spawn_blocking(move || {
        work.iter()
            .map(|(c, data)| {
                format::decode_chunk(format, c, data)
                    .map(|d| (c.digest, Bytes::from(d)))
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ChunkError(format!("layer {layer}: decode task failed: {e}")))?;
    for (d, tx) in decoded.into_iter().zip(senders) {
        match d {
            Ok((digest, data)) => {
                if let Err(e) = inner.cache.put(&digest, data.clone()) {
                    tracing::warn!(layer = %layer, chunk = %digest.short(), "cannot cache a verified chunk: {e}");
                }
                // No reader left is no error: the bytes are cached and in `out`.
                let _ = tx.send(data.clone());
                out.insert(digest, data);
            }
            Err(e) => {
                inner.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                METRICS.verify_failures.inc();
                tracing::warn!(layer = %layer, "chunk failed verification, dropped: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    Ok(())
}

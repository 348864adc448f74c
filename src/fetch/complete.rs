//! Completing a layer in the background: the whole blob streamed once, every chunk not yet
//! cached decoded, verified and stored, the blob checked against its manifest digest at the end;
//! tried again with capped backoff until it verifies.
//!
//! Owns: the background stream and its retries. Does not own: the on-demand path (`request`) or
//! when completion starts (the mount's background task).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::stall::StallGuard;
use super::{lock, uncompressed, FetchError, LayerFetcher};
use crate::format;
use crate::metrics::METRICS;

/// The first delay before a failed background completion is tried again; doubled per failure.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest delay between two background attempts: a registry back from an outage is used
/// again within this, and a blob the registry keeps serving wrong is streamed at most this often.
const RETRY_CAP: Duration = Duration::from_secs(120);

impl LayerFetcher {
    /// Completes the layer in the background, trying again after every failure (network error,
    /// stall, bad byte, truncated stream, whole-blob digest mismatch) with capped exponential
    /// backoff, until the blob has streamed whole and verified: a registry that misbehaves for a
    /// while delays completion, it does not end it. Each attempt streams from the blob's start,
    /// because the whole-blob digest needs every byte; chunks already cached are skipped, not
    /// decoded or stored again. Returns only once complete (abort the task to stop it).
    pub async fn complete_retrying(&self) {
        let layer = self.inner.blob.short();
        let mut failures = 0u32;
        loop {
            match self.complete().await {
                Ok(()) => return,
                Err(e) => {
                    let delay = retry_delay(failures);
                    failures = failures.saturating_add(1);
                    self.inner
                        .stats
                        .background_retries
                        .fetch_add(1, Ordering::Relaxed);
                    METRICS.background_retries.inc();
                    tracing::warn!(%layer, failures, ?delay, "background fetch failed, trying again after the delay: {e}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Streams the whole blob once, caching every chunk not yet held, and checks the blob against
    /// its manifest digest at the end. Pauses while on-demand reads are waiting.
    pub async fn complete(&self) -> Result<(), FetchError> {
        let inner = &self.inner;
        let fail = |message: String| FetchError::Layer {
            layer: inner.blob.short(),
            message,
        };
        let scheduler = &inner.config.scheduler;
        let _slot = scheduler.stream_slot(inner.blob_size).await;
        scheduler.wait_quiet().await;
        let deadline = inner.config.deadline;
        let reader = tokio::time::timeout(
            deadline,
            // Sized: a stream that runs past the blob's size fails there, not at the digest.
            inner
                .client
                .blob_reader_sized(&inner.reference, &inner.blob, inner.blob_size),
        )
        .await
        .map_err(|_| fail(format!("the registry did not answer within {deadline:?}")))?
        .map_err(|e| fail(e.to_string()))?;
        // A stream that stalls fails (and is retried) instead of holding its slot for good.
        let mut reader = StallGuard::new(reader, deadline);
        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        METRICS
            .fetch_requests
            .with_label_values(&["background"])
            .inc();
        let mut pos = 0u64;
        let mut buf: Vec<u8> = Vec::new(); // bytes from `buf_start`
        let mut buf_start = 0u64;
        let mut next = 0usize; // index into chunks
        let mut block = vec![0u8; 256 << 10];
        let mut uncompressed = inner.hash_uncompressed.load(Ordering::Relaxed).then(|| {
            uncompressed::UncompressedDigest::start(inner.format, inner.uncompressed_bound)
        });
        loop {
            if scheduler.busy() {
                scheduler.wait_quiet().await;
            }
            let n = reader
                .read(&mut block)
                .await
                .map_err(|e| fail(format!("background read: {e}")))?;
            if n == 0 {
                break;
            }
            inner
                .stats
                .background_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            inner.record("background", n as u64);
            if let Some(hasher) = &mut uncompressed {
                hasher.feed(Bytes::copy_from_slice(&block[..n])).await;
            }
            buf.extend_from_slice(&block[..n]);
            pos += n as u64;
            // Decode every chunk whose compressed range is now complete.
            while let Some(c) = inner.chunks.get(next) {
                if c.compressed_end > pos {
                    break;
                }
                next += 1;
                if inner.cache.contains(&c.digest) {
                    continue;
                }
                let start = (c.compressed_start - buf_start) as usize;
                let end = (c.compressed_end - buf_start) as usize;
                let data =
                    format::decode_chunk(inner.format, c, &buf[start..end]).map_err(|e| {
                        inner.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                        fail(e.to_string())
                    })?;
                inner
                    .cache
                    .put(&c.digest, Bytes::from(data))
                    .map_err(|e| fail(e.to_string()))?;
            }
            // Keep only what a chunk still to come needs.
            let keep_from = inner
                .chunks
                .get(next)
                .map_or(pos, |c| c.compressed_start.min(pos));
            if keep_from > buf_start {
                buf.drain(..(keep_from - buf_start) as usize);
                buf_start = keep_from;
            }
        }
        if pos != inner.blob_size {
            return Err(fail(format!(
                "background read ended at {pos} of {} bytes",
                inner.blob_size
            )));
        }
        // The reader ended only after the blob matched its manifest digest: what it decompresses
        // to is the layer's own, whatever it is.
        if let Some(hasher) = uncompressed {
            *lock(&inner.uncompressed) = Some(hasher.finish().await);
        }
        METRICS
            .layer_complete
            .with_label_values(&[&inner.blob.short()])
            .set(1);
        tracing::info!(layer = %inner.blob.short(), "layer complete and verified against its manifest digest");
        Ok(())
    }
}

/// The delay after the `failures`-th failed background attempt (0-based): doubling, capped.
fn retry_delay(failures: u32) -> Duration {
    RETRY_BASE
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(RETRY_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_retries_back_off_doubling_up_to_the_cap() {
        assert_eq!(retry_delay(0), RETRY_BASE);
        assert_eq!(retry_delay(1), RETRY_BASE * 2);
        assert_eq!(retry_delay(3), RETRY_BASE * 8);
        assert_eq!(retry_delay(20), RETRY_CAP);
        assert_eq!(retry_delay(u32::MAX), RETRY_CAP);
    }
}

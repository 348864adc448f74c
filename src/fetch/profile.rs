//! Prefetching a start-up profile: the chunks a container read first, fetched ahead of its reads.
//!
//! A profile lists each layer's chunks by digest in first-read order. It is only a hint: a digest
//! the layer's TOC does not hold is ignored (and counted), chunks already cached are skipped, and
//! what is fetched is verified against the TOC like any other chunk. The rest is ordering:
//!
//! - The access order is cut into windows whose sizes grow (512 KiB, 1 MiB, ... up to 16 MiB of
//!   compressed chunks): the first chunks the container needs come in small requests that arrive
//!   soon, the later bulk in large ones that cost few round trips.
//! - Within a window, chunks are sorted by blob offset and neighbours coalesced into range
//!   requests ([`plan_ranges`]); the window's requests go out in the order of their first access.
//! - Requests go out on a few connections at once ([`super::ScheduleConfig::profile_requests`]),
//!   and none starts while an on-demand request is on the wire. A read of a chunk whose prefetch
//!   request is already in flight joins that request (the in-flight map), so it never waits twice.

use std::collections::{HashMap, HashSet};

use super::{lock, plan_ranges, Kind, LayerFetcher, SharedRange, Span};
use crate::format::{Chunk, Toc};
use crate::fs::ChunkError;
use crate::metrics::METRICS;
use crate::oci::Digest;
use crate::profile::lookup::Lookup;
use crate::profile::LayerProfile;

/// Compressed bytes of the first window of the access order; each next window doubles.
pub const FIRST_WINDOW: u64 = 512 << 10;
/// The largest window, and so the largest profile range request (plus gaps).
pub const MAX_WINDOW: u64 = 16 << 20;

/// What one layer's profile prefetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProfilePrefetch {
    /// Accesses the layer's profile lists.
    pub accesses: usize,
    /// Accesses whose chunk digest the TOC does not hold: ignored.
    pub unknown: usize,
    /// Accesses that repeat a digest listed before (a profile lists each chunk once): ignored.
    pub repeated: usize,
    /// Chunks already cached, or on their way for a read, when their turn came.
    pub held: usize,
    /// Chunks this prefetch fetched, in how many range requests, and their compressed bytes
    /// (plus the small gaps coalescing spans).
    pub fetched: usize,
    pub requests: usize,
    pub bytes: u64,
}

/// The range requests for a profile, in the order they go out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProfilePlan {
    pub spans: Vec<Span>,
    /// For each span, when start-up first read one of its chunks (`at_ms`): its place in the
    /// node's queue of profile requests.
    pub at_ms: Vec<u64>,
    pub unknown: usize,
    pub repeated: usize,
    pub held: usize,
}

/// Plans the requests for the chunks `accesses` names (digests with their `at_ms`, in first-read
/// order) among the layer's `chunks`: unknown digests and those `held` (cached) are left out; the
/// rest is cut into growing windows of the access order, each coalesced in blob order with gaps of
/// at most `max_gap`.
pub fn plan_profile<'a>(
    chunks: &[Chunk],
    accesses: impl IntoIterator<Item = (&'a Digest, u64)>,
    held: impl Fn(&Digest) -> bool,
    max_gap: u64,
) -> ProfilePlan {
    // The first place (in blob order) of each distinct digest: any copy verifies the same bytes.
    let mut by_digest: HashMap<Digest, &Chunk> = HashMap::with_capacity(chunks.len());
    for c in chunks.iter().filter(|c| !c.zeros) {
        by_digest
            .entry(c.digest)
            .and_modify(|known| {
                if (c.compressed_start, c.inner_offset)
                    < (known.compressed_start, known.inner_offset)
                {
                    *known = c;
                }
            })
            .or_insert(c);
    }
    let mut plan = ProfilePlan::default();
    let mut seen = HashSet::new();
    let mut wanted: Vec<&Chunk> = Vec::new();
    let mut times: Vec<u64> = Vec::new();
    for (digest, at_ms) in accesses {
        if !seen.insert(*digest) {
            plan.repeated += 1;
            continue;
        }
        match by_digest.get(digest) {
            None => plan.unknown += 1,
            Some(_) if held(digest) => plan.held += 1,
            Some(c) => {
                wanted.push(c);
                times.push(at_ms);
            }
        }
    }
    let mut window = FIRST_WINDOW;
    let mut rest = wanted.as_slice();
    let mut first_access = 0usize;
    while !rest.is_empty() {
        // At least one chunk per window, however large.
        let mut taken = 0usize;
        let mut bytes = 0u64;
        for c in rest {
            let len = c.compressed_end.saturating_sub(c.compressed_start);
            if taken > 0 && bytes.saturating_add(len) > window {
                break;
            }
            bytes = bytes.saturating_add(len);
            taken += 1;
        }
        let (this, next) = rest.split_at(taken);
        // Where each chunk of the window comes in the access order, to order its requests.
        let order: HashMap<(u64, u64), usize> = this
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.compressed_start, c.inner_offset), first_access + i))
            .collect();
        let mut sorted: Vec<Chunk> = this.iter().map(|c| (*c).clone()).collect();
        sorted.sort_by_key(|c| (c.compressed_start, c.inner_offset));
        let mut spans: Vec<(usize, Span)> = plan_ranges(&sorted, MAX_WINDOW, max_gap)
            .into_iter()
            .map(|s| {
                let first = s
                    .chunks
                    .iter()
                    .filter_map(|c| order.get(&(c.compressed_start, c.inner_offset)))
                    .min()
                    .copied()
                    .unwrap_or(usize::MAX);
                (first, s)
            })
            .collect();
        spans.sort_by_key(|(first, _)| *first);
        for (first, span) in spans {
            plan.at_ms
                .push(times.get(first).copied().unwrap_or(u64::MAX));
            plan.spans.push(span);
        }
        first_access += taken;
        rest = next;
        window = window.saturating_mul(2).min(MAX_WINDOW);
    }
    plan
}

impl LayerFetcher {
    /// What a layer fetches as soon as it is found: its account files (`fetch::accounts`)
    /// and, beside them, its part of the image's start-up profile once `profile` (looked up
    /// while the TOC was read) is known. A failure is logged: reads then fetch on demand.
    pub async fn prefetch_startup(&self, toc: &Toc, profile: Lookup) {
        let profiled = async {
            let Some(profile) = profile.await else {
                return;
            };
            let Some(part) = profile.layer(&self.blob()) else {
                return;
            };
            if let Err(e) = self.prefetch_profile(toc, part).await {
                let layer = self.blob().short();
                tracing::warn!(%layer, "start-up profile prefetch failed (reads fetch on demand): {e}");
            }
        };
        tokio::join!(self.prefetch_account_files(toc), profiled);
    }

    /// Fetches the chunks `layer` (this layer's part of a start-up profile) lists, looked up by
    /// digest in `toc` (this layer's TOC), ahead of the container's reads: in access order, as
    /// a few large range requests on several connections at once, each chunk verified as always.
    /// Returns once every request is done; the first failed request's error, if any, after the
    /// others finished (their chunks are cached). Background completion waits while it runs.
    pub async fn prefetch_profile(
        &self,
        toc: &Toc,
        layer: &LayerProfile,
    ) -> Result<ProfilePrefetch, ChunkError> {
        let inner = &self.inner;
        let scheduler = inner.config.scheduler.clone();
        let _active = scheduler.begin_profile();
        let chunks: Vec<Chunk> = toc
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().cloned())
            .collect();
        let plan = plan_profile(
            &chunks,
            layer.accesses.iter().map(|a| (&a.chunk, a.at_ms)),
            |d| inner.cache.contains(d),
            inner.config.max_gap,
        );
        let mut report = ProfilePrefetch {
            accesses: layer.accesses.len(),
            unknown: plan.unknown,
            repeated: plan.repeated,
            held: plan.held,
            ..ProfilePrefetch::default()
        };
        let label = inner.blob.short();
        if plan.unknown > 0 || plan.repeated > 0 {
            tracing::info!(layer = %label, unknown = plan.unknown, repeated = plan.repeated, "profile entries that the layer's TOC does not hold, or that repeat, are ignored");
        }
        tracing::info!(layer = %label, chunks = plan.spans.iter().map(|s| s.chunks.len()).sum::<usize>(), held = plan.held, "prefetching the start-up profile's chunks");
        let mut running = Vec::new();
        for (span, at_ms) in plan.spans.into_iter().zip(plan.at_ms) {
            let permit = scheduler.profile_turn(at_ms).await;
            // A read may have fetched (or be fetching) some of the span's chunks while it
            // waited: plan again with what is left, under the lock that readers plan under.
            let started: Vec<SharedRange> = {
                let mut inflight = lock(&inner.inflight);
                let before = span.chunks.len();
                let left: Vec<Chunk> = span
                    .chunks
                    .into_iter()
                    .filter(|c| !inner.held(&inflight, &c.digest))
                    .collect();
                report.held += before - left.len();
                plan_ranges(&left, MAX_WINDOW, inner.config.max_gap)
                    .into_iter()
                    .map(|s| {
                        report.fetched += s.chunks.len();
                        report.requests += 1;
                        report.bytes += s.end - s.start;
                        self.start_range_locked(&mut inflight, s, Kind::Profile)
                    })
                    .collect()
            };
            running.push(tokio::spawn(async move {
                let _permit = permit;
                let mut first = None;
                for range in started {
                    if let Err(e) = range.await {
                        first.get_or_insert(e);
                    }
                }
                first.map_or(Ok(()), Err)
            }));
        }
        let mut first_error = None;
        for task in running {
            let outcome = task
                .await
                .map_err(|e| {
                    ChunkError(format!("layer {label}: profile prefetch task failed: {e}"))
                })
                .and_then(|r| r);
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        let chunks = &METRICS.profile_chunks;
        chunks
            .with_label_values(&["unknown"])
            .inc_by(report.unknown as u64);
        chunks
            .with_label_values(&["held"])
            .inc_by(report.held as u64);
        chunks
            .with_label_values(&["fetched"])
            .inc_by(report.fetched as u64);
        tracing::info!(layer = %label, accesses = report.accesses, fetched = report.fetched, held = report.held, requests = report.requests, bytes = report.bytes, "profile prefetched");
        first_error.map_or(Ok(report), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk of `len` compressed bytes at `start`, named by `id`.
    fn chunk(id: u64, start: u64, len: u64) -> Chunk {
        Chunk {
            file_offset: 1,
            size: len,
            compressed_start: start,
            compressed_end: start + len,
            inner_offset: 0,
            digest: Digest::of(&id.to_le_bytes()),
            zeros: false,
        }
    }

    fn starts(span: &Span) -> Vec<u64> {
        span.chunks.iter().map(|c| c.compressed_start).collect()
    }

    #[test]
    fn unknown_repeated_and_held_digests_are_left_out_and_counted() {
        let chunks = [chunk(0, 0, 100), chunk(1, 100, 100), chunk(2, 200, 100)];
        let stranger = Digest::of(b"not in the toc");
        let accesses = [
            chunks[2].digest,
            stranger,
            chunks[0].digest,
            chunks[2].digest,
            chunks[1].digest,
        ];
        let plan = plan_profile(
            &chunks,
            accesses.iter().map(|d| (d, 0)),
            |d| *d == chunks[1].digest,
            0,
        );
        assert_eq!((plan.unknown, plan.repeated, plan.held), (1, 1, 1));
        let planned: Vec<u64> = plan.spans.iter().flat_map(starts).collect();
        assert_eq!(
            planned,
            [200, 0],
            "access order; the held chunk between them is not fetched"
        );
    }

    #[test]
    fn a_window_coalesces_in_blob_order_and_goes_out_in_access_order() {
        // Two runs of neighbours, read interleaved: within the first window both runs coalesce,
        // and the run holding the first access goes first.
        let chunks: Vec<Chunk> = (0..6)
            .map(|i| chunk(i, if i < 3 { i * 10 } else { 1000 + i * 10 }, 10))
            .collect();
        let order = [3, 0, 4, 1, 5, 2].map(|i| chunks[i].digest);
        let plan = plan_profile(&chunks, order.iter().map(|d| (d, 0)), |_| false, 0);
        assert_eq!(plan.spans.len(), 2, "{plan:?}");
        assert_eq!(starts(&plan.spans[0]), [1030, 1040, 1050]);
        assert_eq!(starts(&plan.spans[1]), [0, 10, 20]);
        // Each request's place in the node's queue: when start-up first read one of its chunks.
        let timed = order.iter().zip([5u64, 6, 7, 8, 9, 10]);
        let plan = plan_profile(&chunks, timed, |_| false, 0);
        assert_eq!(plan.at_ms, [5, 6]);
    }

    #[test]
    fn windows_grow_so_the_first_chunks_come_in_small_requests() {
        // 64 contiguous chunks of 256 KiB read in blob order: windows of 512 KiB, 1, 2, 4, 8 MiB
        // (2 + 4 + 8 + 16 + 32 = 62 chunks), then the 2 left.
        let len = 256 << 10;
        let chunks: Vec<Chunk> = (0..64).map(|i| chunk(i, i * len, len)).collect();
        let plan = plan_profile(&chunks, chunks.iter().map(|c| (&c.digest, 0)), |_| false, 0);
        let sizes: Vec<u64> = plan.spans.iter().map(|s| s.end - s.start).collect();
        assert_eq!(
            sizes,
            [512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 512 << 10]
        );
        let again: Vec<u64> = plan.spans.iter().flat_map(starts).collect();
        let expected: Vec<u64> = chunks.iter().map(|c| c.compressed_start).collect();
        assert_eq!(again, expected, "every chunk once, in access order");
    }

    #[test]
    fn requests_never_exceed_the_largest_window_and_a_large_chunk_stands_alone() {
        let big = MAX_WINDOW + 1;
        let chunks = [chunk(0, 0, 10), chunk(1, 10, big), chunk(2, 10 + big, 10)];
        let plan = plan_profile(&chunks, chunks.iter().map(|c| (&c.digest, 0)), |_| false, 0);
        for s in &plan.spans {
            assert!(
                s.chunks.len() == 1 || s.end - s.start <= MAX_WINDOW,
                "{s:?}"
            );
        }
        assert_eq!(plan.spans.iter().map(|s| s.chunks.len()).sum::<usize>(), 3);
    }

    #[test]
    fn zero_runs_and_duplicate_copies_are_fetched_from_one_place() {
        let mut zeros = chunk(9, 0, 0);
        zeros.zeros = true;
        let first = chunk(1, 50, 10);
        let mut copy = chunk(1, 500, 10);
        copy.file_offset = 0;
        let chunks = [zeros.clone(), copy, first.clone()];
        let plan = plan_profile(
            &chunks,
            [(&zeros.digest, 0), (&first.digest, 0)],
            |_| false,
            0,
        );
        assert_eq!(plan.unknown, 1, "a zero run is never fetched");
        assert_eq!(plan.spans.len(), 1);
        assert_eq!(starts(&plan.spans[0]), [50], "the first copy in the blob");
    }
}

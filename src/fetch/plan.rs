//! Planning range requests: which neighbouring chunks ride along with a miss.

use crate::format::Chunk;
use crate::oci::Digest;

use super::FetchConfig;

/// One range request `[start, end)` of the blob and the chunks it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
    pub chunks: Vec<Chunk>,
}

/// Groups `chunks` (sorted by blob offset) into requests of at most `max_request` bytes whose
/// chunks are at most `max_gap` apart. A single chunk larger than `max_request` gets its own.
pub fn plan_ranges(chunks: &[Chunk], max_request: u64, max_gap: u64) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for c in chunks {
        match spans.last_mut() {
            Some(s)
                if c.compressed_start >= s.start
                    && c.compressed_start <= s.end.saturating_add(max_gap)
                    && c.compressed_end.max(s.end) - s.start <= max_request =>
            {
                s.end = s.end.max(c.compressed_end);
                s.chunks.push(c.clone());
            }
            _ => spans.push(Span {
                start: c.compressed_start,
                end: c.compressed_end,
                chunks: vec![c.clone()],
            }),
        }
    }
    spans
}

/// The request for an on-demand miss of `wanted`: `wanted` plus the chunks that follow it in the
/// blob and are not `held` (cached or already on their way): read-ahead of the rest of the file
/// and of small neighbouring files, within the configured request size.
pub fn span_around(
    chunks: &[Chunk],
    wanted: &Chunk,
    config: &FetchConfig,
    held: impl Fn(&Digest) -> bool,
) -> Span {
    let at = chunks.partition_point(|c| {
        (c.compressed_start, c.inner_offset) < (wanted.compressed_start, wanted.inner_offset)
    });
    let mut span = Span {
        start: wanted.compressed_start,
        end: wanted.compressed_end,
        chunks: vec![wanted.clone()],
    };
    for c in chunks.iter().skip(at) {
        if c.digest == wanted.digest && c.compressed_start == wanted.compressed_start {
            continue;
        }
        // A chunk at file offset 0 starts another file: neighbours ride along only within the
        // smaller read-ahead budget, the missed file's own later chunks within the request size.
        let limit = if c.file_offset == 0 {
            config.max_neighbours.min(config.max_request)
        } else {
            config.max_request
        };
        if c.compressed_start > span.end.saturating_add(config.max_gap)
            || c.compressed_end.max(span.end) - span.start > limit
        {
            break;
        }
        if held(&c.digest) {
            continue;
        }
        span.end = span.end.max(c.compressed_end);
        span.chunks.push(c.clone());
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk in the middle of one large file.
    fn chunk(start: u64, end: u64) -> Chunk {
        Chunk {
            file_offset: 1 + start,
            size: end - start,
            compressed_start: start,
            compressed_end: end,
            inner_offset: 0,
            digest: Digest::of(&start.to_le_bytes()),
            zeros: false,
        }
    }

    #[test]
    fn neighbours_coalesce_up_to_the_request_size() {
        let chunks = [
            chunk(0, 100),
            chunk(120, 300),
            chunk(300, 900),
            chunk(5000, 5100),
        ];
        let spans = plan_ranges(&chunks, 1000, 64);
        assert_eq!(spans.len(), 2, "{spans:?}");
        assert_eq!(
            (spans[0].start, spans[0].end, spans[0].chunks.len()),
            (0, 900, 3)
        );
        assert_eq!((spans[1].start, spans[1].end), (5000, 5100));
        let spans = plan_ranges(&chunks, 500, 64);
        assert_eq!(
            spans.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(),
            vec![(0, 300), (300, 900), (5000, 5100)]
        );
    }

    #[test]
    fn read_ahead_skips_held_chunks_within_the_gap_and_stops_at_the_limit() {
        let chunks = [
            chunk(0, 100),
            chunk(100, 200),
            chunk(200, 300),
            chunk(300, 400),
            chunk(400, 500),
        ];
        let held = chunks[1].digest;
        let starts = |config: &FetchConfig| -> Vec<u64> {
            let span = span_around(&chunks, &chunks[0], config, |d| *d == held);
            span.chunks.iter().map(|c| c.compressed_start).collect()
        };
        // A held chunk leaves a 100-byte hole: spanned when the gap allows it, up to the limit.
        assert_eq!(
            starts(&FetchConfig {
                max_request: 350,
                max_gap: 100,
                max_neighbours: 350,
                ..FetchConfig::default()
            }),
            vec![0, 200]
        );
        assert_eq!(
            starts(&FetchConfig {
                max_request: 500,
                max_gap: 100,
                max_neighbours: 500,
                ..FetchConfig::default()
            }),
            vec![0, 200, 300, 400]
        );
        // Otherwise the read-ahead stops at the hole rather than fetch the held bytes again.
        assert_eq!(
            starts(&FetchConfig {
                max_request: 500,
                max_gap: 0,
                max_neighbours: 500,
                ..FetchConfig::default()
            }),
            vec![0]
        );
    }

    #[test]
    fn other_files_ride_along_only_within_the_neighbour_budget() {
        let mut small: Vec<Chunk> = (0..10).map(|i| chunk(i * 100, i * 100 + 100)).collect();
        for c in &mut small {
            c.file_offset = 0; // ten one-chunk files
        }
        let config = FetchConfig {
            max_request: 1000,
            max_gap: 0,
            max_neighbours: 300,
            ..FetchConfig::default()
        };
        let span = span_around(&small, &small[0], &config, |_| false);
        assert_eq!(
            (span.start, span.end),
            (0, 300),
            "the missed file and two neighbours"
        );
        let big: Vec<Chunk> = (0..10).map(|i| chunk(i * 100, i * 100 + 100)).collect();
        let span = span_around(&big, &big[0], &config, |_| false);
        assert_eq!(
            (span.start, span.end),
            (0, 1000),
            "the rest of one file, up to the request size"
        );
    }

    #[test]
    fn a_chunk_larger_than_the_limit_stands_alone() {
        let spans = plan_ranges(&[chunk(0, 10), chunk(10, 5000), chunk(5000, 5010)], 100, 0);
        assert_eq!(
            spans.iter().map(|s| (s.start, s.end)).collect::<Vec<_>>(),
            vec![(0, 10), (10, 5000), (5000, 5010)]
        );
    }
}

//! The TOC JSON both formats share (`{"version":1,"entries":[...]}`), its encoding from and decoding
//! into the normalised [`TocEntry`] model, and RFC 3339 times.
//!
//! Decoding is lenient on unknown fields and missing optional ones, strict on names (no absolute
//! or escaping paths) and on digests (every chunk must be verifiable).

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::FormatError;
use super::limits::Limits;
use super::toc_stream::{Decoder, TocSeed};
use super::{Chunk, EntryKind, LayerFormat, Toc, TocEntry};
use crate::oci::Digest;

/// Landmark file: entries before it are start-up data (eStargz).
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark file: prefetch nothing (eStargz).
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Top-level zstd:chunked TOC field (lazysnap's own; other readers ignore unknown fields): the
/// names of the start-up set, in access order, which the writer put first in the layer.
pub const PREFETCH_FIELD: &str = "lazysnap.prefetch";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonToc {
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    entries: Option<Vec<JsonEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tar_split_digest: Option<String>,
    /// [`PREFETCH_FIELD`] (zstd:chunked only; eStargz marks the set with its landmark).
    #[serde(
        rename = "lazysnap.prefetch",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    prefetch: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct JsonEntry {
    #[serde(rename = "type", default)]
    pub(super) kind: Option<String>,
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) link_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) mode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) uid: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) gid: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) user_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) group_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) modtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dev_major: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dev_minor: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) xattrs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) end_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) inner_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) chunk_type: Option<String>,
}

fn kind_str(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Dir => "dir",
        EntryKind::Reg => "reg",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::Char => "char",
        EntryKind::Block => "block",
        EntryKind::Fifo => "fifo",
    }
}

fn nz(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

fn ne(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Encodes entries (with their chunks) as TOC JSON. Deterministic: same entries, same bytes.
/// `prefetch` (the start-up set) goes into [`PREFETCH_FIELD`] for zstd:chunked; eStargz records
/// it with a landmark entry in the tar instead.
pub(crate) fn encode(
    format: LayerFormat,
    entries: &[TocEntry],
    prefetch: &[String],
) -> Result<Vec<u8>, FormatError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::with_capacity(entries.len() + 16);
    for e in entries {
        let xattrs = (!e.xattrs.is_empty()).then(|| {
            e.xattrs
                .iter()
                .map(|(k, v)| (k.clone(), b64.encode(v)))
                .collect()
        });
        let mut j = JsonEntry {
            kind: Some(kind_str(e.kind).into()),
            name: Some(e.name.clone()),
            link_name: ne(&e.link_name),
            mode: nz(u64::from(e.mode)),
            size: if e.kind == EntryKind::Reg {
                nz(e.size)
            } else {
                None
            },
            uid: nz(u64::from(e.uid)),
            gid: nz(u64::from(e.gid)),
            user_name: ne(&e.uname),
            group_name: ne(&e.gname),
            modtime: Some(format_time(e.mtime, e.mtime_nsec)),
            dev_major: nz(u64::from(e.dev_major)),
            dev_minor: nz(u64::from(e.dev_minor)),
            xattrs,
            digest: if e.kind == EntryKind::Reg {
                e.digest.map(|d| d.to_string())
            } else {
                None
            },
            ..Default::default()
        };
        let mut chunks = e.chunks.iter();
        if e.kind == EntryKind::Reg {
            if let Some(c) = chunks.next() {
                fill_chunk(format, &mut j, c);
            }
        }
        out.push(j);
        if e.kind == EntryKind::Reg {
            for c in chunks {
                let mut cj = JsonEntry {
                    kind: Some("chunk".into()),
                    name: Some(e.name.clone()),
                    ..Default::default()
                };
                fill_chunk(format, &mut cj, c);
                out.push(cj);
            }
        }
    }
    let toc = JsonToc {
        version: Some(1),
        entries: Some(out),
        tar_split_digest: None,
        prefetch: match format {
            LayerFormat::ZstdChunked => prefetch.to_vec(),
            LayerFormat::Estargz => Vec::new(),
        },
    };
    serde_json::to_vec(&toc).map_err(|e| FormatError::Toc(format!("cannot encode: {e}")))
}

fn fill_chunk(format: LayerFormat, j: &mut JsonEntry, c: &Chunk) {
    j.offset = Some(c.compressed_start);
    j.end_offset = Some(c.compressed_end);
    j.inner_offset = nz(c.inner_offset);
    j.chunk_offset = nz(c.file_offset);
    j.chunk_size = Some(c.size);
    j.chunk_digest = Some(c.digest.to_string());
    if c.zeros && format == LayerFormat::ZstdChunked {
        j.chunk_type = Some("zeros".into());
    }
}

pub(super) struct RawChunk {
    pub(super) file_offset: u64,
    pub(super) size: Option<u64>,
    pub(super) start: u64,
    pub(super) end: Option<u64>,
    pub(super) inner: u64,
    pub(super) digest: Option<Digest>,
    pub(super) zeros: bool,
}

pub(super) fn parse_digest(
    name: &str,
    what: &str,
    s: &Option<String>,
) -> Result<Option<Digest>, FormatError> {
    match s.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| FormatError::entry(name, format!("invalid {what}: {e}"))),
    }
}

/// Decodes TOC JSON into the normalised model with the default [`Limits`].
#[cfg(test)]
pub(crate) fn decode(
    format: LayerFormat,
    json: &[u8],
    toc_offset: u64,
) -> Result<Toc, FormatError> {
    decode_limited(format, json, toc_offset, &Limits::default())
}

/// Decodes TOC JSON into the normalised model. `toc_offset` bounds the last chunk's range when the
/// TOC does not record chunk end offsets.
///
/// Memory stays proportional to what the limits allow: the JSON's size is checked before parsing,
/// entries are normalised one by one as the parser yields them (no array of raw JSON entries is
/// ever built), and the entry count, names, xattrs and chunk sizes are checked per entry.
pub(crate) fn decode_limited(
    format: LayerFormat,
    json: &[u8],
    toc_offset: u64,
    limits: &Limits,
) -> Result<Toc, FormatError> {
    if json.len() as u64 > limits.max_toc_json {
        return Err(FormatError::Toc(Limits::exceeded(
            "JSON size",
            json.len() as u64,
            limits.max_toc_json,
            "max_toc_json_bytes",
        )));
    }
    let mut state = Decoder::new(limits);
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed = serde::de::DeserializeSeed::deserialize(TocSeed::new(&mut state), &mut de)
        .and_then(|version| de.end().map(|()| version));
    let version = match parsed {
        Ok(v) => v,
        Err(e) => {
            return Err(state
                .failure
                .take()
                .unwrap_or_else(|| FormatError::Toc(format!("invalid JSON: {e}"))))
        }
    };
    match version {
        None | Some(1) => {}
        Some(v) => return Err(FormatError::Toc(format!("unsupported version {v}"))),
    }
    let mut entries = std::mem::take(&mut state.entries);
    let raw_chunks = std::mem::take(&mut state.raw_chunks);
    let listed = std::mem::take(&mut state.prefetch);
    // The streaming state (the last regular file) is not needed past the parse.
    drop(state);

    // Distinct compressed start offsets, to bound chunks whose end the TOC does not record.
    let mut starts: Vec<u64> = raw_chunks
        .iter()
        .filter(|(_, c)| !c.zeros)
        .map(|(_, c)| c.start)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    // One flat list for all files (no vector per entry), grouped by entry, in file order.
    let mut raw_chunks = raw_chunks;
    raw_chunks.sort_by_key(|(i, c)| (*i, c.file_offset));
    let mut groups = raw_chunks.chunk_by(|a, b| a.0 == b.0).peekable();
    for (index, entry) in entries.iter_mut().enumerate() {
        let raw: &[(usize, RawChunk)] = match groups.peek() {
            Some(g) if g[0].0 == index => groups.next().unwrap_or_default(),
            _ => &[],
        };
        if entry.kind != EntryKind::Reg || entry.size == 0 {
            continue;
        }
        let raw: Vec<&RawChunk> = raw.iter().map(|(_, c)| c).collect();
        let n = raw.len();
        let mut chunks = Vec::with_capacity(n);
        let mut expect = 0u64;
        for i in 0..n {
            let c = &raw[i];
            let bad = |r: String| {
                FormatError::entry(&entry.name, format!("chunk at {}: {r}", c.file_offset))
            };
            if c.file_offset != expect {
                return Err(bad(format!(
                    "chunks do not cover the file (expected a chunk at {expect})"
                )));
            }
            let limit = if i + 1 < n {
                raw[i + 1].file_offset
            } else {
                entry.size
            };
            let size = match c.size {
                Some(s) if i + 1 == n && c.file_offset.checked_add(s) == Some(entry.size) => s,
                Some(s) if c.file_offset.checked_add(s) == Some(limit) => s,
                Some(_) => {
                    return Err(bad(
                        "chunkSize does not match the next chunk or the file size".into(),
                    ))
                }
                None => limit.saturating_sub(c.file_offset),
            };
            if size == 0 {
                return Err(bad("empty chunk".into()));
            }
            // A zero run is served without being materialised, so only chunks whose bytes are
            // decompressed into memory are bounded by the chunk limit.
            let held = size.saturating_add(c.inner);
            if !c.zeros && held > limits.max_chunk {
                return Err(bad(Limits::exceeded(
                    "chunk size plus inner offset",
                    held,
                    limits.max_chunk,
                    "max_chunk_bytes",
                )));
            }
            let digest = match (c.digest, n == 1, entry.digest) {
                (Some(d), _, _) => d,
                (None, true, Some(d)) => d,
                _ => return Err(bad("no chunkDigest: the chunk cannot be verified".into())),
            };
            // Any later chunk start is a frame/member boundary. skopeo 1.9 records on a file's
            // first chunk the end of its *last* frame, so take the nearer of the two.
            let next = starts
                .get(starts.partition_point(|&s| s <= c.start))
                .copied()
                .unwrap_or(toc_offset);
            let end = c.end.map_or(next, |e| e.min(next));
            if !c.zeros && end <= c.start {
                return Err(bad(format!("empty compressed range {}..{end}", c.start)));
            }
            // No frame or member holding `held` bytes is longer than its worst-case compressed
            // size: a longer stated range would only make fetches read (and hold) bytes the
            // decompressor never needs.
            let end = end.min(
                c.start
                    .saturating_add(compressed_bound(held.min(limits.max_chunk))),
            );
            chunks.push(Chunk {
                file_offset: c.file_offset,
                size,
                compressed_start: c.start,
                compressed_end: end.max(c.start),
                inner_offset: c.inner,
                digest,
                zeros: c.zeros,
            });
            expect = c.file_offset + size;
        }
        if expect != entry.size {
            return Err(FormatError::entry(
                &entry.name,
                format!("chunks cover {expect} of {} bytes", entry.size),
            ));
        }
        entry.chunks = chunks;
    }

    // Hard links share their target's content (a target named before the link). Their copies
    // of its chunk list count against the entry limit too: a file of many chunks and many links
    // to it would otherwise multiply. The name index borrows the names, it copies none.
    let links: Vec<(usize, usize)> = {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut links = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.kind == EntryKind::Hardlink {
                if let Some(&t) = by_name.get(e.link_name.as_str()) {
                    if matches!(entries[t].kind, EntryKind::Reg | EntryKind::Hardlink) {
                        links.push((i, t));
                    }
                }
            }
            by_name.insert(&e.name, i);
        }
        links
    };
    let mut total_chunks: u64 = entries.iter().map(|e| e.chunks.len() as u64).sum();
    for (i, t) in links {
        total_chunks += entries[t].chunks.len() as u64;
        if total_chunks > limits.max_entries {
            return Err(FormatError::entry(
                &entries[i].name,
                Limits::exceeded(
                    "chunks counting those hard links share",
                    total_chunks,
                    limits.max_entries,
                    "max_toc_entries",
                ),
            ));
        }
        let (size, digest, chunks) = (
            entries[t].size,
            entries[t].digest,
            entries[t].chunks.clone(),
        );
        let e = &mut entries[i];
        (e.size, e.digest, e.chunks) = (size, digest, chunks);
    }

    let mut prefetch = Vec::new();
    if format == LayerFormat::ZstdChunked && !listed.is_empty() {
        // Only names of files the TOC holds, each once: the list is a hint, not content.
        let files: std::collections::HashSet<&str> = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Reg | EntryKind::Hardlink))
            .map(|e| e.name.as_str())
            .collect();
        let mut seen = std::collections::HashSet::new();
        prefetch = listed
            .into_iter()
            .filter(|n| files.contains(n.as_str()) && seen.insert(n.clone()))
            .collect();
    }
    if format == LayerFormat::Estargz && !entries.iter().any(|e| e.name == NO_PREFETCH_LANDMARK) {
        if let Some(i) = entries.iter().position(|e| e.name == PREFETCH_LANDMARK) {
            prefetch = entries[..i].iter().map(|e| e.name.clone()).collect();
        }
    }
    Ok(Toc {
        format,
        entries,
        prefetch,
    })
}

/// The most compressed bytes a zstd frame or gzip member needs to yield `n` bytes: stored (raw)
/// blocks add a few bytes per block, plus headers; the slack covers one more block (zstd's are at
/// most 128 KiB) and a gzip header's optional fields.
pub(crate) fn compressed_bound(n: u64) -> u64 {
    n.saturating_add(n / 64).saturating_add(256 << 10)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 in UTC with nanoseconds when non-zero (Go's `RFC3339Nano`).
pub(crate) fn format_time(secs: i64, nsec: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if nsec > 0 {
        let f = format!("{:09}", nsec.min(999_999_999));
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) into seconds and nanoseconds.
pub(crate) fn parse_time(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nsec: u32 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nsec += u32::from(b[i] - b'0') * 10u32.pow(8 - (i - start) as u32);
            }
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let d = |c: u8| c.is_ascii_digit().then(|| i64::from(c - b'0'));
            let off = (d(*h1)? * 10 + d(*h2)?) * 3600 + (d(*m1)? * 10 + d(*m2)?) * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for (secs, nsec) in [
            (0, 0),
            (1_700_000_000, 123_456_789),
            (-1, 5),
            (951_782_400, 0),
            (253_402_300_799, 0),
        ] {
            let s = format_time(secs, nsec);
            assert_eq!(parse_time(&s), Some((secs, nsec)), "{s}");
        }
        assert_eq!(format_time(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_time(1_700_000_000, 500_000_000),
            "2023-11-14T22:13:20.5Z"
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20+01:00"),
            Some((1_700_000_000, 0))
        );
        assert_eq!(parse_time("garbage"), None);
    }

    #[test]
    fn decodes_foreign_toc_leniently() {
        // Shaped like ctr-remote's output: trailing-slash dirs, chunkSize 0, unknown fields.
        let d = Digest::of(b"hello");
        let json = format!(
            r#"{{"version":1,"entries":[
            {{"name":"etc/","type":"dir","modtime":"2020-01-01T00:00:00Z","mode":16877,"NumLink":0}},
            {{"name":"./etc/a","type":"reg","size":5,"offset":100,"digest":"{d}","chunkDigest":"{d}"}},
            {{"name":"etc/b","type":"hardlink","linkName":"etc/a"}},
            {{"name":"etc/c","type":"reg","size":5,"offset":200,"digest":"{d}"}}
            ]}}"#
        );
        let toc = decode(LayerFormat::Estargz, json.as_bytes(), 300).unwrap();
        assert_eq!(toc.entries[0].name, "etc");
        assert_eq!(toc.entries[0].mode, 0o755);
        let a = &toc.entries[1];
        assert_eq!(a.chunks.len(), 1);
        assert_eq!(
            (
                a.chunks[0].compressed_start,
                a.chunks[0].compressed_end,
                a.chunks[0].size
            ),
            (100, 200, 5)
        );
        assert_eq!(toc.entries[2].chunks, a.chunks);
        assert_eq!(toc.entries[3].chunks[0].compressed_end, 300);
    }

    #[test]
    fn rejects_hostile_or_unverifiable_tocs() {
        for json in [
            r#"{"version":1,"entries":[{"name":"../x","type":"reg"}]}"#,
            r#"{"version":1,"entries":[{"name":"a/l","type":"symlink","linkName":"../../x"}]}"#,
            r#"{"version":1,"entries":[{"name":"x","type":"reg","size":5,"offset":1}]}"#,
            r#"{"version":1,"entries":[{"name":"x","type":"chunk"}]}"#,
            r#"{"version":2,"entries":[]}"#,
            r#"{"version":1,"entries":[{"name":"x","type":"weird"}]}"#,
        ] {
            assert!(
                decode(LayerFormat::ZstdChunked, json.as_bytes(), 10).is_err(),
                "{json}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(LayerFormat::Estargz, &data, 100);
        }

        #[test]
        fn times_in_range_round_trip(secs in super::super::tar::MIN_TIME..=super::super::tar::MAX_TIME, nsec in 0u32..1_000_000_000) {
            proptest::prop_assert_eq!(parse_time(&format_time(secs, nsec)), Some((secs, nsec)));
        }

        #[test]
        fn parse_time_never_panics(s in ".{0,40}") {
            let _ = parse_time(&s);
        }
    }
}

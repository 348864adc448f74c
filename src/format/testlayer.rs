//! Test-only: a *real* layer written by our writer from a small tree with every kind of entry,
//! its TOC as JSON, and helpers that re-pin a mutated TOC and check what decoded within limits.

use std::io::Cursor;

use serde_json::Value;

use super::limits::{Limits, MAX_CHUNK_CEILING};
use super::testalloc::peak_of;
use super::testtar::{TestEntry, TestTar};
use super::toc::compressed_bound;
use super::*;

pub(super) fn entry(name: &str, typeflag: u8, link: &str, data: Vec<u8>) -> TestEntry {
    TestEntry {
        name: name.into(),
        typeflag,
        mode: 0o644,
        link: link.into(),
        data,
        xattrs: vec![],
    }
}

/// A small tree with every kind of entry the TOC carries: dirs, multi-chunk files, a zero run,
/// xattrs, a long name, symlinks, a hard link, a fifo.
pub(super) fn real_tar() -> Vec<u8> {
    let mut t = TestTar::default();
    let mut big = entry(
        "usr/lib/big",
        b'0',
        "",
        (0..9000u32).map(|i| (i * 7 % 251) as u8).collect(),
    );
    big.xattrs.push(("user.k".into(), b"v".to_vec()));
    let mut sparse = vec![0u8; 4096];
    sparse[3000] = 9;
    for e in [
        entry("usr/", b'5', "", vec![]),
        entry("usr/lib/", b'5', "", vec![]),
        big,
        entry("usr/lib/sparse", b'0', "", sparse),
        entry(
            &format!("usr/{}", "n".repeat(150)),
            b'0',
            "",
            b"long".to_vec(),
        ),
        entry("usr/lib/link", b'2', "big", vec![]),
        entry("usr/lib/hard", b'1', "usr/lib/big", vec![]),
        entry("usr/fifo", b'6', "", vec![]),
        entry("etc/small", b'0', "", b"hello".to_vec()),
    ] {
        t.add(&e);
    }
    t.finish()
}

#[derive(Clone)]
pub(super) struct Real {
    pub format: LayerFormat,
    pub blob: Vec<u8>,
    pub toc: Toc,
    pub json: Value,
    pub position: TocPosition,
}

pub(super) fn real(format: LayerFormat) -> Real {
    let opts = WriteOptions {
        format,
        chunk_size: 1024,
        level: 1,
        threads: 1,
    };
    let mut blob = Vec::new();
    let w = write_layer(&real_tar()[..], &mut blob, &opts, &mut |_| {}).unwrap();
    let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
    let tail = &blob[blob.len() - tail_len(format) as usize..];
    let position = parse_tail(format, tail, blob.len() as u64).unwrap();
    let json = serde_json::from_slice(&toc::encode(format, &toc.entries, &[]).unwrap()).unwrap();
    Real {
        format,
        blob,
        toc,
        json,
        position,
    }
}

/// Small limits, so the mutations cross them often.
pub(super) fn small() -> Limits {
    Limits {
        max_toc_compressed: 64 << 10,
        max_toc_json: 256 << 10,
        max_entries: 200,
        max_name_len: 300,
        max_depth: 16,
        max_chunk: 64 << 10,
        max_xattrs: 4,
        max_xattr_value: 1024,
    }
}

/// Re-pins `json` as a TOC of `real`'s format (the digest an attacker would put in the manifest)
/// and parses it through the same path a mount takes.
pub(super) fn parse_pinned(
    real: &Real,
    json: &[u8],
    declared_len: Option<u64>,
    limits: &Limits,
) -> Result<Toc, FormatError> {
    let (raw, digest) = match real.format {
        LayerFormat::ZstdChunked => {
            let raw = zstd::bulk::compress(json, 1).unwrap();
            let d = crate::oci::Digest::of(&raw);
            (raw, d)
        }
        LayerFormat::Estargz => {
            let mut t = TestTar::default();
            t.add(&entry(ESTARGZ_TOC_NAME, b'0', "", json.to_vec()));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &t.finish()).unwrap();
            (gz.finish().unwrap(), crate::oci::Digest::of(json))
        }
    };
    let layer = LazyLayer {
        format: real.format,
        toc_digest: digest,
        toc_position: None,
    };
    let position = TocPosition {
        offset: real.position.offset,
        compressed_len: raw.len() as u64,
        uncompressed_len: match real.format {
            LayerFormat::ZstdChunked => declared_len.unwrap_or(json.len() as u64),
            LayerFormat::Estargz => 0,
        },
    };
    parse_toc_limited(&layer, position, &raw, limits)
}

/// What every TOC that decodes under `limits` must satisfy.
pub(super) fn check_within(toc: &Toc, limits: &Limits) {
    assert!(toc.entries.len() as u64 <= limits.max_entries);
    let mut chunks = 0u64;
    for e in &toc.entries {
        assert!(e.name.len() <= limits.max_name_len, "{}", e.name);
        assert!(e.name.split('/').count() <= limits.max_depth, "{}", e.name);
        assert!(e.link_name.len() <= limits.max_name_len);
        assert!(e.xattrs.len() <= limits.max_xattrs);
        assert!(e.xattrs.values().all(|v| v.len() <= limits.max_xattr_value));
        for c in &e.chunks {
            chunks += 1;
            if !c.zeros {
                assert!(c.size + c.inner_offset <= limits.max_chunk, "{c:?}");
            }
            assert!(
                c.compressed_end - c.compressed_start <= compressed_bound(limits.max_chunk),
                "{c:?}"
            );
        }
    }
    assert!(chunks <= limits.max_entries);
}

/// Decodes every chunk of `toc` from `blob`: may fail, must not panic, and holds at most the
/// chunk (and the decompressor's own state) in memory.
pub(super) fn decode_all(format: LayerFormat, toc: &Toc, blob: &[u8]) {
    for e in &toc.entries {
        for c in &e.chunks {
            let start = (c.compressed_start as usize).min(blob.len());
            let end = (c.compressed_end as usize).clamp(start, blob.len());
            let (res, peak) = peak_of(|| decode_chunk(format, c, &blob[start..end]));
            if let Ok(data) = res {
                assert_eq!(data.len() as u64, c.size);
            }
            let held = if c.zeros {
                c.size
            } else {
                c.size + c.inner_offset
            };
            // The output, plus the decoder's window and buffers.
            assert!(
                peak <= held.min(MAX_CHUNK_CEILING) * 2 + (4 << 20),
                "{c:?}: peak {peak}"
            );
        }
    }
}

pub(super) fn zstd_real() -> Real {
    real(LayerFormat::ZstdChunked)
}

/// The real TOC with the first chunk of `usr/lib/big` changed by `f`.
pub(super) fn with_big_chunk(
    real: &Real,
    f: impl Fn(&mut serde_json::Map<String, Value>),
) -> Vec<u8> {
    let mut json = real.json.clone();
    let big = json["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"] == "usr/lib/big" && e["type"] == "reg")
        .unwrap();
    f(big.as_object_mut().unwrap());
    serde_json::to_vec(&json).unwrap()
}

//! Hostile layers: TOCs and tar streams that state sizes, counts and depths no real layer needs.
//! Each case is built from a *real* layer (written by our writer from a small tree) and then
//! mutated, so the mutations reach the decoders past the JSON parser and the tar checksums.
//! Decoding must never panic, and what it builds, and allocates, must stay within the limits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Cursor, Read};

use proptest::prelude::*;
use serde_json::{json, Value};

use super::limits::{Limits, MAX_CHUNK_CEILING};
use super::tar::{padding, TarItem, TarParser, BLOCK};
use super::testtar::{TestEntry, TestTar};
use super::toc::compressed_bound;
use super::*;

// ---- allocation accounting: the peak of live heap bytes of the current thread ----

/// Counts each thread's live heap bytes, so a test can ask how much one call allocated at its
/// peak. Decoding is synchronous, so a thread's own counter sees all of it.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged;
// the counting touches only `const`-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (all our allocations are).
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns its result with the peak of heap bytes it held above what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as u64)
}

// ---- a real layer ----

fn entry(name: &str, typeflag: u8, link: &str, data: Vec<u8>) -> TestEntry {
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
fn real_tar() -> Vec<u8> {
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
struct Real {
    format: LayerFormat,
    blob: Vec<u8>,
    toc: Toc,
    json: Value,
    position: TocPosition,
}

fn real(format: LayerFormat) -> Real {
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
    let json = serde_json::from_slice(&toc::encode(format, &toc.entries).unwrap()).unwrap();
    Real {
        format,
        blob,
        toc,
        json,
        position,
    }
}

/// Small limits, so the mutations cross them often.
fn small() -> Limits {
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
fn parse_pinned(
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
fn check_within(toc: &Toc, limits: &Limits) {
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
fn decode_all(format: LayerFormat, toc: &Toc, blob: &[u8]) {
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

// ---- fixed hostile cases ----

fn zstd_real() -> Real {
    real(LayerFormat::ZstdChunked)
}

/// The real TOC with the first chunk of `usr/lib/big` changed by `f`.
fn with_big_chunk(real: &Real, f: impl Fn(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
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

#[test]
fn the_real_layers_decode_under_the_small_limits() {
    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        let real = real(format);
        let json = serde_json::to_vec(&real.json).unwrap();
        let toc = parse_pinned(&real, &json, None, &small()).unwrap();
        assert_eq!(toc.entries, real.toc.entries);
        check_within(&toc, &small());
        decode_all(format, &toc, &real.blob);
    }
}

#[test]
fn a_zero_run_of_a_terabyte_is_never_allocated() {
    let real = zstd_real();
    // One zero chunk covering a 2^40-byte file.
    let json = with_big_chunk(&real, |e| {
        e.insert("size".into(), json!(1u64 << 40));
        e.insert("chunkSize".into(), json!(1u64 << 40));
        e.insert("chunkType".into(), json!("zeros"));
    });
    let mut v: Value = serde_json::from_slice(&json).unwrap();
    v["entries"]
        .as_array_mut()
        .unwrap()
        .retain(|e| !(e["name"] == "usr/lib/big" && e["type"] == "chunk"));
    let json = serde_json::to_vec(&v).unwrap();
    let toc = parse_pinned(&real, &json, None, &Limits::default()).unwrap();
    let big = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/lib/big")
        .unwrap();
    assert_eq!(big.size, 1 << 40);
    let chunk = &big.chunks[0];
    assert!(chunk.zeros);
    let (res, peak) = peak_of(|| decode_chunk(LayerFormat::ZstdChunked, chunk, &[]));
    let err = res.unwrap_err().to_string();
    assert!(err.contains("without being materialised"), "{err}");
    assert!(peak < 1 << 20, "allocated {peak} bytes");
}

#[test]
fn a_four_gib_chunk_is_refused_by_the_toc_and_by_decode_chunk() {
    let real = zstd_real();
    let json = with_big_chunk(&real, |e| {
        e.insert("size".into(), json!(4u64 << 30));
        e.insert("chunkSize".into(), json!(4u64 << 30));
    });
    let mut v: Value = serde_json::from_slice(&json).unwrap();
    v["entries"]
        .as_array_mut()
        .unwrap()
        .retain(|e| !(e["name"] == "usr/lib/big" && e["type"] == "chunk"));
    let json = serde_json::to_vec(&v).unwrap();
    let err = parse_pinned(&real, &json, None, &Limits::default())
        .map(|t| t.entries.len())
        .unwrap_err()
        .to_string();
    assert!(err.contains("usr/lib/big"), "{err}");
    assert!(err.contains("limits.max_chunk_bytes"), "{err}");

    // decode_chunk on its own refuses before any work, whatever the bytes.
    let mut chunk = real.toc.entries[2].chunks[0].clone();
    chunk.size = 4 << 30;
    let (res, peak) = peak_of(|| decode_chunk(LayerFormat::ZstdChunked, &chunk, &real.blob));
    assert!(res.unwrap_err().to_string().contains("ceiling"));
    assert!(peak < 1 << 20, "allocated {peak} bytes");
}

#[test]
fn a_frame_that_inflates_past_the_declared_size_is_read_only_to_it() {
    // A frame of 64 MiB of zeros, for a chunk that says 1000 bytes.
    let frame = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    let chunk = Chunk {
        file_offset: 0,
        size: 1000,
        compressed_start: 0,
        compressed_end: frame.len() as u64,
        inner_offset: 0,
        digest: crate::oci::Digest::of(&[0u8; 1000]),
        zeros: false,
    };
    let (res, peak) = peak_of(|| decode_chunk(LayerFormat::ZstdChunked, &chunk, &frame));
    assert_eq!(res.unwrap().len(), 1000);
    assert!(
        peak < 16 << 20,
        "allocated {peak} bytes for a 1000-byte chunk"
    );
    // The same through gzip, with an inner offset.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &vec![0u8; 64 << 20]).unwrap();
    let member = gz.finish().unwrap();
    let chunk = Chunk {
        inner_offset: 5000,
        compressed_end: member.len() as u64,
        ..chunk
    };
    let (res, peak) = peak_of(|| decode_chunk(LayerFormat::Estargz, &chunk, &member));
    assert_eq!(res.unwrap().len(), 1000);
    assert!(
        peak < 16 << 20,
        "allocated {peak} bytes for a 1000-byte chunk"
    );
}

#[test]
fn too_many_entries_deep_names_and_big_xattrs_name_their_limit() {
    let real = zstd_real();
    let limits = Limits {
        max_toc_json: 1 << 20,
        ..small()
    };
    let deep = "d/".repeat(200_000);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"version":1,"entries": vec![json!({"name":"x","type":"dir"}); 201]}),
            "limits.max_toc_entries",
        ),
        (
            json!({"version":1,"entries":[{"name": deep, "type":"dir"}]}),
            "limits.max_name_bytes",
        ),
        (
            json!({"version":1,"entries":[{"name": "a/".repeat(17), "type":"dir"}]}),
            "limits.max_path_depth",
        ),
        (
            json!({"version":1,"entries":[{"name":"l","type":"symlink","linkName": "x".repeat(301)}]}),
            "limits.max_name_bytes",
        ),
        (
            json!({"version":1,"entries":[{"name":"x","type":"dir",
                "xattrs": {"user.a":"", "user.b":"", "user.c":"", "user.d":"", "user.e":""}}]}),
            "limits.max_xattrs_per_entry",
        ),
        (
            json!({"version":1,"entries":[{"name":"x","type":"dir",
                "xattrs": {"user.a": "QUFB".repeat(400)}}]}),
            "limits.max_xattr_value_bytes",
        ),
    ];
    for (json, key) in cases {
        let bytes = serde_json::to_vec(&json).unwrap();
        let err = parse_pinned(&real, &bytes, None, &limits)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert!(
            err.len() < 1000,
            "the error quotes too much: {} bytes",
            err.len()
        );
    }
}

#[test]
fn the_toc_sizes_are_checked_before_decompression() {
    let real = zstd_real();
    let json = serde_json::to_vec(&real.json).unwrap();
    let limits = Limits {
        max_toc_json: 1000,
        ..small()
    };
    let err = parse_pinned(&real, &json, None, &limits)
        .map(|t| t.entries.len())
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.max_toc_json_bytes"), "{err}");
    // A footer that understates the size: decompression stops there.
    let err = parse_pinned(&real, &json, Some(100), &small())
        .map(|t| t.entries.len())
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the 100 bytes"), "{err}");
    // A JSON of 4 MiB of whitespace, compressed to a few KiB, declared honestly: refused unread.
    let mut padded = json.clone();
    padded.extend(std::iter::repeat_n(b' ', 4 << 20));
    let (res, peak) = peak_of(|| parse_pinned(&real, &padded, None, &small()));
    assert!(res
        .map(|t| t.entries.len())
        .unwrap_err()
        .to_string()
        .contains("limits.max_toc_json_bytes"));
    // (compressing the input is part of what was measured)
    assert!(peak < 24 << 20, "allocated {peak}");
}

#[test]
fn hard_links_cannot_multiply_chunk_lists() {
    let real = zstd_real();
    let mut v = real.json.clone();
    let entries = v["entries"].as_array_mut().unwrap();
    for i in 0..150 {
        entries
            .push(json!({"name": format!("h{i}"), "type": "hardlink", "linkName": "usr/lib/big"}));
    }
    let bytes = serde_json::to_vec(&v).unwrap();
    let limits = Limits {
        max_entries: 1000,
        ..small()
    };
    let err = parse_pinned(&real, &bytes, None, &limits)
        .map(|t| t.entries.len())
        .unwrap_err()
        .to_string();
    assert!(err.contains("hard links share"), "{err}");
}

#[test]
fn a_toc_at_the_entry_limit_decodes_in_bounded_memory() {
    // Many small entries right at the limit: the heap the decode holds at its peak stays a
    // small multiple of the JSON (no array of raw JSON entries is ever built).
    let n = 20_000;
    let entries: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("d/f{i}"), "type": "dir", "modtime": "2020-01-01T00:00:00Z"}))
        .collect();
    let json = serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap();
    let limits = Limits {
        max_entries: n,
        ..Limits::default()
    };
    let (toc, peak) = peak_of(|| toc::decode_limited(LayerFormat::Estargz, &json, 0, &limits));
    assert_eq!(toc.unwrap().entries.len() as u64, n);
    let per_entry = peak / n;
    assert!(
        per_entry < 600,
        "{per_entry} bytes per entry ({} of JSON)",
        json.len() as u64 / n
    );
}

// ---- property tests over mutated real TOCs ----

/// Values that stress sizes, offsets and counts.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(1u64 << 40)),
        Just(json!(4u64 << 30)),
        Just(json!(u32::MAX)),
        Just(json!(1.5)),
        Just(json!("12")),
        Just(Value::Null),
        (0u64..20_000).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
    ]
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("")),
        Just(json!("..")),
        Just(json!("/")),
        Just(json!("/abs/x")),
        Just(json!("usr/lib/big")),
        Just(json!("../../etc/passwd")),
        Just(json!("a/".repeat(40))),
        Just(json!("x".repeat(400))),
        Just(json!("zeros")),
        Just(json!("chunk")),
        Just(json!("reg")),
        Just(json!("hardlink")),
        Just(json!("sha256:0000")),
        Just(json!(format!("sha256:{}", "0".repeat(64)))),
        Just(json!({"user.x": "AAAA"})),
        "[a-z./]{0,12}".prop_map(|s| json!(s)),
    ]
}

const FIELDS: &[&str] = &[
    "name",
    "type",
    "linkName",
    "size",
    "mode",
    "uid",
    "offset",
    "endOffset",
    "innerOffset",
    "chunkSize",
    "chunkOffset",
    "chunkDigest",
    "chunkType",
    "digest",
    "xattrs",
    "modtime",
    "devMajor",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, usize, Value),
    Remove(usize, usize),
    Duplicate(usize, u16),
    Swap(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![number(), text()];
    prop_oneof![
        4 => (any::<usize>(), 0..FIELDS.len(), value).prop_map(|(e, f, v)| Mutation::Set(e, f, v)),
        1 => (any::<usize>(), 0..FIELDS.len()).prop_map(|(e, f)| Mutation::Remove(e, f)),
        1 => (any::<usize>(), 0u16..300).prop_map(|(e, n)| Mutation::Duplicate(e, n)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

fn apply(json: &mut Value, m: &Mutation) {
    let entries = json["entries"].as_array_mut().unwrap();
    let n = entries.len();
    match m {
        Mutation::Set(e, f, v) => {
            entries[e % n][FIELDS[*f]] = v.clone();
        }
        Mutation::Remove(e, f) => {
            entries[e % n].as_object_mut().unwrap().remove(FIELDS[*f]);
        }
        Mutation::Duplicate(e, k) => {
            let copy = entries[e % n].clone();
            for _ in 0..*k {
                entries.push(copy.clone());
            }
        }
        Mutation::Swap(a, b) => entries.swap(a % n, b % n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_tocs_decode_within_their_limits(
        zstd: bool,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let format = if zstd { LayerFormat::ZstdChunked } else { LayerFormat::Estargz };
        let real = REAL.with(|r| r[usize::from(!zstd)].clone());
        let mut json = real.json.clone();
        for m in &mutations {
            apply(&mut json, m);
        }
        let bytes = serde_json::to_vec(&json).unwrap();
        let limits = small();
        let (res, peak) = peak_of(|| parse_pinned(&real, &bytes, None, &limits));
        // What the TOC path held at its peak: compression in the test, the JSON, the model.
        prop_assert!(peak < 48 * bytes.len() as u64 + (8 << 20), "peak {peak} for {} bytes", bytes.len());
        if let Ok(toc) = res {
            check_within(&toc, &limits);
            decode_all(format, &toc, &real.blob);
        }
    }

    #[test]
    fn mutated_footers_of_real_layers_never_panic(zstd: bool, pos in 0usize..64, val: u8) {
        let real = REAL.with(|r| r[usize::from(!zstd)].clone());
        let mut blob = real.blob.clone();
        let n = blob.len();
        let tail = tail_len(real.format) as usize;
        blob[n - tail + pos % tail] = val;
        let media = match real.format {
            LayerFormat::ZstdChunked => MEDIA_TYPE_ZSTD,
            LayerFormat::Estargz => MEDIA_TYPE_GZIP,
        };
        let mut annotations = std::collections::BTreeMap::new();
        let key = match real.format {
            LayerFormat::ZstdChunked => ANNOTATION_ZSTD_CHECKSUM,
            LayerFormat::Estargz => ANNOTATION_ESTARGZ_TOC_DIGEST,
        };
        let pinned = match real.format {
            LayerFormat::ZstdChunked => {
                let p = real.position;
                crate::oci::Digest::of(&real.blob[p.offset as usize..(p.offset + p.compressed_len) as usize])
            }
            LayerFormat::Estargz => crate::oci::Digest::of(&serde_json::to_vec(&real.json).unwrap()),
        };
        annotations.insert(key.to_owned(), pinned.to_string());
        let (res, peak) = peak_of(|| read_toc_limited(Cursor::new(&blob), media, &annotations, &small()));
        prop_assert!(peak < 8 << 20, "peak {peak}");
        if let Ok((_, toc)) = res {
            check_within(&toc, &small());
        }
    }
}

thread_local! {
    /// The two real layers, written once per test thread.
    static REAL: [Real; 2] = [real(LayerFormat::ZstdChunked), real(LayerFormat::Estargz)];
}

// ---- property tests over mutated real tar streams ----

/// Offsets of the header blocks (not payloads) of a tar stream.
fn header_blocks(tar: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + BLOCK <= tar.len() {
        let h = &tar[at..at + BLOCK];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        out.push(at);
        let size = tar::parse_numeric(&h[124..136]).unwrap_or(0) as u64;
        at += BLOCK + size as usize + padding(size);
    }
    out
}

/// Recomputes a header block's checksum, so a mutation is judged on its content.
fn fix_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"77777777777\0".to_vec()),
        Just(vec![
            0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
        ]),
        Just(vec![0xff; 12]),
        Just(b"0\0".to_vec()),
        Just(b"../../x\0".to_vec()),
        Just(b"/abs\0".to_vec()),
        Just(vec![b'a'; 100]),
        Just(b"x".to_vec()),
        Just(b"L".to_vec()),
        Just(b"K".to_vec()),
        Just(b"S".to_vec()),
        Just(b"g".to_vec()),
        prop::collection::vec(any::<u8>(), 1..12),
    ]
}

/// Header fields: name, mode, uid, size, mtime, typeflag, linkname, magic, devmajor, prefix.
const TAR_FIELDS: &[usize] = &[0, 100, 108, 124, 136, 156, 157, 257, 329, 345];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_tar_headers_parse_within_bounds(
        edits in prop::collection::vec((any::<usize>(), 0..TAR_FIELDS.len(), field_value(), any::<bool>()), 1..4),
    ) {
        let mut tar = real_tar();
        let blocks = header_blocks(&tar);
        for (b, f, value, fix) in &edits {
            let at = blocks[b % blocks.len()];
            let off = at + TAR_FIELDS[*f];
            let end = (off + value.len()).min(at + BLOCK);
            tar[off..end].copy_from_slice(&value[..end - off]);
            if *fix {
                fix_checksum(&mut tar[at..at + BLOCK]);
            }
        }
        let limits = Limits::default();
        let (res, peak) = peak_of(|| {
            let mut p = TarParser::new(&tar[..]);
            let mut names = Vec::new();
            loop {
                match p.next_item() {
                    Ok(Some(TarItem::Entry(e))) => {
                        names.push(e.meta.name.clone());
                        p.skip_payload(e.size + padding(e.size) as u64)?;
                    }
                    Ok(Some(TarItem::Global(_))) => {}
                    Ok(None) => return Ok(names),
                    Err(e) => return Err(e),
                }
            }
        });
        // Extended headers are buffered up to 4 × 16 MiB; this stream is far smaller.
        prop_assert!(peak < 4 << 20, "peak {peak}");
        if let Ok(names) = res {
            for n in names {
                prop_assert!(limits.check_name("name", &n).is_ok());
            }
        }
        // The writer takes the same stream without panicking either.
        let opts = WriteOptions { format: LayerFormat::ZstdChunked, chunk_size: 1024, level: 1, threads: 1 };
        let mut out = Vec::new();
        if let Ok(w) = write_layer(&tar[..], &mut out, &opts, &mut |_| {}) {
            let (_, toc) = read_toc(Cursor::new(&out), w.media_type, &w.annotations).unwrap();
            check_within(&toc, &Limits::default());
            let mut plain = Vec::new();
            zstd::stream::read::Decoder::new(&out[..]).unwrap().read_to_end(&mut plain).unwrap();
        }
    }
}

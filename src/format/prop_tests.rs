//! Property tests that mutate a *real* TOC (fields, counts, duplicated and swapped entries) and a
//! real tar stream (header fields, with checksums fixed up so the mutation is judged on its
//! content): decoding never panics, and what it builds and allocates stays within the limits.

use std::io::{Cursor, Read};

use proptest::prelude::*;
use serde_json::{json, Value};

use super::limits::Limits;
use super::tar::{padding, TarItem, TarParser, BLOCK};
use super::testalloc::peak_of;
use super::testlayer::*;
use super::*;

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

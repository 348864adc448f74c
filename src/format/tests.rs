//! Round trips through both writers and readers, and the reader's defences.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use proptest::prelude::*;

use super::testtar::{TestEntry, TestTar};
use super::*;

fn opts(format: LayerFormat, chunk_size: u64, threads: usize) -> WriteOptions {
    WriteOptions {
        format,
        chunk_size,
        level: 3,
        threads,
    }
}

fn write(tar: &[u8], o: &WriteOptions) -> (Vec<u8>, WrittenLayer) {
    let mut out = Vec::new();
    let mut last = 0;
    let w = write_layer(tar, &mut out, o, &mut |n| last = n).unwrap();
    assert_eq!(last, tar.len() as u64, "progress ends at the input size");
    (out, w)
}

fn decompress(format: LayerFormat, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        LayerFormat::ZstdChunked => {
            zstd::stream::read::Decoder::new(blob)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
        LayerFormat::Estargz => {
            flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

fn file(name: &str, data: Vec<u8>) -> TestEntry {
    TestEntry {
        name: name.into(),
        typeflag: b'0',
        mode: 0o644,
        link: String::new(),
        data,
        xattrs: vec![],
    }
}

/// Writes `entries` in both formats, reads the TOC back and checks every file's content.
fn round_trip(entries: &[TestEntry], chunk_size: u64) {
    let mut t = TestTar::default();
    for e in entries {
        t.add(e);
    }
    let tar = t.finish();
    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        let (blob, w) = write(&tar, &opts(format, chunk_size, 2));
        assert_eq!(w.size, blob.len() as u64);
        assert_eq!(w.digest, crate::oci::Digest::of(&blob));
        let plain = decompress(format, &blob);
        assert_eq!(w.diff_id, crate::oci::Digest::of(&plain));
        assert_eq!(w.uncompressed_size, plain.len() as u64);
        assert_eq!(w.entries, entries.len() as u64);
        let (layer, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
        assert_eq!(layer.format, format);
        assert_eq!(layer.toc_digest, w.toc_digest);
        assert_eq!(toc.entries.len(), entries.len());
        let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (e, got) in entries.iter().zip(&toc.entries) {
            let name = names::normalise_name(&e.name).unwrap();
            assert_eq!(got.name, name);
            match e.typeflag {
                b'0' => {
                    assert_eq!(got.kind, EntryKind::Reg);
                    assert_eq!(got.size, e.data.len() as u64);
                    assert_eq!(got.digest, Some(crate::oci::Digest::of(&e.data)));
                    assert_eq!(got.mode, e.mode);
                    assert!(got.chunks.iter().all(|c| c.size <= chunk_size));
                    let content = read_file(Cursor::new(&blob), format, got).unwrap();
                    assert_eq!(content, e.data, "{name}");
                    contents.insert(name.clone(), content);
                }
                b'1' => {
                    assert_eq!(got.kind, EntryKind::Hardlink);
                    assert_eq!(got.link_name, e.link);
                    let content = read_file(Cursor::new(&blob), format, got).unwrap();
                    assert_eq!(Some(&content), contents.get(&e.link));
                }
                b'2' => {
                    assert_eq!(got.kind, EntryKind::Symlink);
                    assert_eq!(got.link_name, e.link);
                }
                b'5' => assert_eq!(got.kind, EntryKind::Dir),
                _ => {}
            }
            let xattrs: BTreeMap<String, Vec<u8>> = e.xattrs.iter().cloned().collect();
            assert_eq!(got.xattrs, xattrs);
            assert_eq!((got.uid, got.gid, got.mtime), (1000, 1000, 1_700_000_000));
        }
    }
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,12}",
        "[a-zé日本ü ]{1,20}",
        "[a-z]{60,70}/[a-z]{60,70}",
    ]
}

#[derive(Debug, Clone)]
enum Spec {
    File(Vec<u8>, u32),
    Zeros(usize),
    Symlink(String),
    Hardlink,
    Dir,
}

fn spec_strategy(chunk: usize) -> impl Strategy<Value = Spec> {
    prop_oneof![
        4 => (prop::collection::vec(any::<u8>(), 0..3 * chunk), prop_oneof![Just(0o644u32), Just(0o755), Just(0o4755), Just(0o2700), Just(0o1777)])
            .prop_map(|(d, m)| Spec::File(d, m)),
        1 => (0..3 * chunk).prop_map(Spec::Zeros),
        1 => "(/[a-z]{1,8}){1,3}|[a-z]{1,8}".prop_map(Spec::Symlink),
        1 => Just(Spec::Hardlink),
        1 => Just(Spec::Dir),
    ]
}

const CHUNK: u64 = 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_layers_round_trip(specs in prop::collection::vec((name_strategy(), spec_strategy(CHUNK as usize)), 1..12)) {
        let mut entries: Vec<TestEntry> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut last_file: Option<String> = None;
        for (i, (name, spec)) in specs.into_iter().enumerate() {
            let name = format!("{i}-{name}");
            if !seen.insert(name.clone()) { continue; }
            let e = match spec {
                Spec::File(d, mode) => { last_file = Some(name.clone()); TestEntry { mode, ..file(&name, d) } }
                Spec::Zeros(n) => { last_file = Some(name.clone()); file(&name, vec![0; n]) }
                Spec::Symlink(t) => TestEntry { typeflag: b'2', link: t, ..file(&name, vec![]) },
                Spec::Hardlink => match &last_file {
                    Some(t) => TestEntry { typeflag: b'1', link: t.clone(), ..file(&name, vec![]) },
                    None => continue,
                },
                Spec::Dir => TestEntry { typeflag: b'5', mode: 0o755, ..file(&name, vec![]) },
            };
            entries.push(e);
        }
        prop_assume!(!entries.is_empty());
        round_trip(&entries, CHUNK);
    }

    #[test]
    fn parse_tail_and_toc_never_panic(data in prop::collection::vec(any::<u8>(), 0..400), size in any::<u64>()) {
        for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
            let _ = parse_tail(format, &data, size);
            let layer = LazyLayer { format, toc_digest: crate::oci::Digest::of(&data), toc_position: None };
            let pos = TocPosition { offset: 0, compressed_len: data.len() as u64, uncompressed_len: 0 };
            let _ = parse_toc(&layer, pos, &data);
        }
    }

    #[test]
    fn decode_chunk_never_panics(data in prop::collection::vec(any::<u8>(), 0..200), size in 0u64..5000, inner in 0u64..100, zeros: bool) {
        let chunk = Chunk { file_offset: 0, size, compressed_start: 0, compressed_end: data.len() as u64,
            inner_offset: inner, digest: crate::oci::Digest::of(b""), zeros };
        for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
            let _ = decode_chunk(format, &chunk, &data);
        }
    }
}

#[test]
fn xattrs_long_names_and_multi_chunk_files_round_trip() {
    let mut big = file("dir/big", (0..5000u32).map(|i| (i % 251) as u8).collect());
    big.xattrs.push(("user.a".into(), b"1".to_vec()));
    big.xattrs
        .push(("security.capability".into(), vec![1, 0, 0, 2, 0, 0, 0, 0]));
    round_trip(
        &[
            TestEntry {
                typeflag: b'5',
                mode: 0o755,
                ..file("./dir/", vec![])
            },
            big,
            file(&format!("dir/{}", "l".repeat(150)), b"long".to_vec()),
            file("dir/empty", vec![]),
            file("dir/zeros", vec![0; 4096]),
            TestEntry {
                typeflag: b'1',
                link: "dir/big".into(),
                ..file("dir/hard", vec![])
            },
        ],
        1024,
    );
}

#[test]
fn output_is_reproducible_across_thread_counts() {
    let mut t = TestTar::default();
    for i in 0..50 {
        t.add(&file(&format!("f{i}"), vec![i as u8; i * 300]));
    }
    let tar = t.finish();
    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        let (a, wa) = write(&tar, &opts(format, 512, 1));
        let (b, wb) = write(&tar, &opts(format, 512, 2));
        let (c, _) = write(&tar, &opts(format, 512, 7));
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(wa.digest, wb.digest);
    }
}

#[test]
fn zero_chunks_are_marked_in_zstd_chunked() {
    let mut t = TestTar::default();
    let mut data = vec![0u8; 4096];
    data[2048] = 1;
    t.add(&file("sparse", data));
    let (blob, w) = write(&t.finish(), &opts(LayerFormat::ZstdChunked, 1024, 2));
    let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
    let zeros: Vec<bool> = toc.entries[0].chunks.iter().map(|c| c.zeros).collect();
    assert_eq!(zeros, [true, true, false, true]);
    let content = read_file(
        Cursor::new(&blob),
        LayerFormat::ZstdChunked,
        &toc.entries[0],
    )
    .unwrap();
    assert_eq!(content[2048], 1);
    assert_eq!(content.len(), 4096);
}

#[test]
fn empty_and_marker_only_inputs_give_valid_layers() {
    let marker_and_padding = vec![0u8; 10240];
    for input in [Vec::new(), marker_and_padding] {
        for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
            let (blob, w) = write(&input, &opts(format, 1024, 2));
            assert_eq!(w.entries, 0);
            let plain = decompress(format, &blob);
            assert!(plain.ends_with(&[0u8; 1024]));
            let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
            assert!(toc.entries.is_empty());
        }
    }
}

#[test]
fn options_are_validated() {
    let mut out = Vec::new();
    let o = WriteOptions {
        chunk_size: 0,
        ..WriteOptions::default()
    };
    let err = write_layer(&[][..], &mut out, &o, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FormatError::Options(_)), "{err}");
}

#[test]
fn estargz_prefetch_landmark_lists_the_entries_before_it() {
    let mut t = TestTar::default();
    t.add(&file("a", b"1".to_vec()));
    t.add(&file("b", b"2".to_vec()));
    t.add(&file(PREFETCH_LANDMARK, vec![0xf]));
    t.add(&file("c", b"3".to_vec()));
    let (blob, w) = write(&t.finish(), &opts(LayerFormat::Estargz, 1024, 1));
    let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
    assert_eq!(toc.prefetch, ["a", "b"]);
}

#[test]
fn zstd_chunked_start_up_field_fills_prefetch_with_the_files_it_holds() {
    let mut t = TestTar::default();
    for n in ["a", "b", "c"] {
        t.add(&file(n, n.as_bytes().to_vec()));
    }
    let tar = t.finish();
    let o = opts(LayerFormat::ZstdChunked, 1024, 1);
    let listed: Vec<String> = ["c", "a", "nope", "c", "../x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut blob = Vec::new();
    let w = write_layer_with_prefetch(&tar[..], &mut blob, &o, &listed, &mut |_| {}).unwrap();
    let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
    assert_eq!(toc.prefetch, ["c", "a"], "known files, once each, in order");
    // The field is the only difference: the stream (and so the diff_id) is the same.
    let (plain, pw) = write(&tar, &o);
    assert_eq!(pw.diff_id, w.diff_id);
    let (_, toc) = read_toc(Cursor::new(&plain), pw.media_type, &pw.annotations).unwrap();
    assert!(toc.prefetch.is_empty());
    // eStargz records its start-up set with the landmark, never with the field.
    let mut blob = Vec::new();
    let o = opts(LayerFormat::Estargz, 1024, 1);
    let w = write_layer_with_prefetch(&tar[..], &mut blob, &o, &listed, &mut |_| {}).unwrap();
    let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
    assert!(toc.prefetch.is_empty());
}

#[test]
fn a_hostile_start_up_field_is_bounded_or_ignored() {
    let limits = Limits {
        max_entries: 4,
        ..Limits::default()
    };
    let many = format!(
        r#"{{"version":1,"entries":[],"lazysnap.prefetch":[{}]}}"#,
        ["\"a\""; 5].join(",")
    );
    let err = toc::decode_limited(LayerFormat::ZstdChunked, many.as_bytes(), 0, &limits);
    assert!(err.is_err(), "more names than entries allowed is refused");
    let odd = r#"{"version":1,"entries":[],"lazysnap.prefetch":["/etc/x","../../y",""]}"#;
    let toc = toc::decode_limited(LayerFormat::ZstdChunked, odd.as_bytes(), 0, &limits).unwrap();
    assert!(toc.prefetch.is_empty(), "names no entry has are dropped");
    let wrong = r#"{"version":1,"entries":[],"lazysnap.prefetch":{"a":1}}"#;
    assert!(toc::decode_limited(LayerFormat::ZstdChunked, wrong.as_bytes(), 0, &limits).is_err());
}

#[test]
fn corrupt_chunk_is_never_served() {
    let mut t = TestTar::default();
    t.add(&file("f", (0..3000u32).map(|i| (i * 7) as u8).collect()));
    let tar = t.finish();
    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        let (blob, w) = write(&tar, &opts(format, 1024, 1));
        let (_, toc) = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap();
        let c = &toc.entries[0].chunks[1];
        let range = c.compressed_start as usize..c.compressed_end as usize;
        assert!(decode_chunk(format, c, &blob[range.clone()]).is_ok());
        let mut bad = blob[range.clone()].to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(decode_chunk(format, c, &bad).is_err(), "{format:?}");
        // A digest that does not match is reported with both digests.
        let mut wrong = c.clone();
        wrong.digest = crate::oci::Digest::of(b"other");
        let err = decode_chunk(format, &wrong, &blob[range.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("digest mismatch") && err.contains("file offset 1024"),
            "{err}"
        );
        let mut corrupt = blob.clone();
        corrupt[range.start + (range.end - range.start) / 2] ^= 0x40;
        let err = read_file(Cursor::new(&corrupt), format, &toc.entries[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry \"f\""), "{err}");
    }
}

#[test]
fn toc_is_checked_against_the_pinned_digest() {
    let mut t = TestTar::default();
    t.add(&file("f", b"x".to_vec()));
    let tar = t.finish();
    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        let (blob, mut w) = write(&tar, &opts(format, 1024, 1));
        for v in w.annotations.values_mut() {
            if v.starts_with("sha256:") {
                *v = crate::oci::Digest::of(b"nope").to_string();
            }
        }
        let err = read_toc(Cursor::new(&blob), w.media_type, &w.annotations).unwrap_err();
        assert!(matches!(err, FormatError::TocDigest { .. }), "{err}");
    }
}

#[test]
fn detect_reads_new_and_old_zstd_keys_and_estargz() {
    let d = crate::oci::Digest::of(b"t").to_string();
    let mut a = BTreeMap::new();
    assert_eq!(detect(MEDIA_TYPE_ZSTD, &a), None);
    a.insert(ANNOTATION_ZSTD_CHECKSUM_OLD.to_owned(), d.clone());
    a.insert(
        ANNOTATION_ZSTD_POSITION_OLD.to_owned(),
        "10:20:30:1".to_owned(),
    );
    let l = detect(MEDIA_TYPE_ZSTD, &a).unwrap();
    assert_eq!(l.format, LayerFormat::ZstdChunked);
    assert_eq!(
        l.toc_position,
        Some(TocPosition {
            offset: 10,
            compressed_len: 20,
            uncompressed_len: 30
        })
    );
    assert_eq!(detect(MEDIA_TYPE_GZIP, &a), None);
    let mut e = BTreeMap::new();
    e.insert(ANNOTATION_ESTARGZ_TOC_DIGEST.to_owned(), d);
    assert_eq!(
        detect(MEDIA_TYPE_GZIP, &e).unwrap().format,
        LayerFormat::Estargz
    );
    assert_eq!(
        detect(MEDIA_TYPE_DOCKER_GZIP, &e).unwrap().format,
        LayerFormat::Estargz
    );
    assert_eq!(detect(MEDIA_TYPE_ZSTD, &e), None);
}

#[test]
fn hostile_input_is_rejected_by_the_writer() {
    let mut t = TestTar::default();
    t.add(&file("ok", b"1".to_vec()));
    t.add(&file("../evil", b"2".to_vec()));
    let mut out = Vec::new();
    let err = write_layer(
        &t.finish()[..],
        &mut out,
        &opts(LayerFormat::ZstdChunked, 1024, 2),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("\"../evil\""), "{err}");
}

/// A tar (GNU headers holding the raw bytes, unchecked) of one regular file `name`, and a
/// symlink to `target` when given.
fn byte_name_tar(name: &[u8], target: Option<&[u8]>) -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut header = |kind, field: &[u8], link: &[u8], data: &[u8]| {
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..field.len()].copy_from_slice(field);
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    header(::tar::EntryType::Regular, name, b"", b"hello");
    if let Some(target) = target {
        header(::tar::EntryType::Symlink, b"sl", target, b"");
    }
    b.into_inner().unwrap()
}

#[test]
fn a_name_a_toc_cannot_hold_is_parsed_as_bytes_and_refused_as_unrepresentable() {
    let tar = byte_name_tar(b"./d/caf\xe9.txt", Some(b"../\xfe"));
    let mut parser = super::tar::TarParser::new(&tar[..]);
    let mut metas = Vec::new();
    while let Some(item) = parser.next_item().unwrap() {
        if let super::tar::TarItem::Entry(e) = item {
            parser
                .skip_payload(e.size + super::tar::padding(e.size) as u64)
                .unwrap();
            metas.push(e.meta);
        }
    }
    assert_eq!(metas[0].name, b"d/caf\xe9.txt");
    assert_eq!(metas[1].link_name, b"../\xfe");
    let err = metas[0].toc_name().unwrap_err();
    assert!(err.is_unrepresentable(), "{err}");
    assert!(err.to_string().contains(r"d/caf\\xe9.txt"), "{err}");
    assert!(metas[1].check_toc().unwrap_err().is_unrepresentable());

    for format in [LayerFormat::ZstdChunked, LayerFormat::Estargz] {
        for tar in [
            byte_name_tar(b"caf\xe9.txt", None),
            byte_name_tar(b"ok", Some(b"caf\xe9.txt")),
        ] {
            let err =
                write_layer(&tar[..], Vec::new(), &opts(format, 1024, 1), &mut |_| {}).unwrap_err();
            assert!(err.is_unrepresentable(), "{format:?}: {err}");
        }
    }
    // Hostile stays hostile, not unrepresentable.
    let hostile = byte_name_tar(b"\xe9/../../x", None);
    let err = write_layer(
        &hostile[..],
        Vec::new(),
        &opts(LayerFormat::ZstdChunked, 1024, 1),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        !err.is_unrepresentable() && err.to_string().contains(".."),
        "{err}"
    );
}

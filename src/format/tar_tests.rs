//! Unit tests of the tar parser (split from `tar.rs` to keep it one thing).

use super::*;
use crate::format::testtar::{TestEntry, TestTar};

fn entries(data: &[u8]) -> Result<Vec<(EntryMeta, Vec<u8>)>, FormatError> {
    let mut p = TarParser::new(data);
    let mut v = Vec::new();
    while let Some(item) = p.next_item()? {
        if let TarItem::Entry(e) = item {
            let mut buf = vec![0u8; e.size as usize];
            p.read_payload(&mut buf)?;
            let mut pad = vec![0u8; padding(e.size)];
            p.read_payload(&mut pad)?;
            v.push((e.meta, buf));
        }
    }
    Ok(v)
}

fn file(name: &str, data: &[u8]) -> TestEntry {
    TestEntry {
        name: name.into(),
        typeflag: b'0',
        mode: 0o644,
        link: String::new(),
        data: data.into(),
        xattrs: vec![],
    }
}

#[test]
fn parses_pax_long_names_and_xattrs() {
    let long = format!("{}/ünïcode-{}", "d".repeat(120), "x".repeat(50));
    let mut t = TestTar::default();
    let mut e = file(&format!("./{long}"), b"hello");
    e.xattrs.push(("user.k".into(), vec![0, 1, 2, 255]));
    t.add(&e);
    let got = entries(&t.finish()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.name, long.as_bytes());
    assert_eq!(got[0].0.toc_name().unwrap(), long);
    assert_eq!(got[0].0.xattrs.get("user.k").unwrap(), &vec![0, 1, 2, 255]);
    assert_eq!(got[0].1, b"hello");
    assert_eq!((got[0].0.uid, got[0].0.mtime), (1000, 1_700_000_000));
}

#[test]
fn rejects_hostile_names_naming_the_entry() {
    for (e, want) in [
        (file("../x", b""), "\"../x\""),
        (file("/abs", b""), "\"/abs\""),
        (file("a/../../b", b""), "a/../../b"),
        (
            TestEntry {
                typeflag: b'1',
                link: "../../etc/passwd".into(),
                ..file("hl", b"")
            },
            "\"hl\"",
        ),
        (
            TestEntry {
                typeflag: b'1',
                link: "/etc/passwd".into(),
                ..file("hl2", b"")
            },
            "\"hl2\"",
        ),
    ] {
        let mut t = TestTar::default();
        t.add(&e);
        let err = entries(&t.finish()).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    // Every symlink target is data, kept as written: inside, absolute, or climbing above the
    // root (where `..` stays at the root in the container).
    let mut t = TestTar::default();
    t.add(&TestEntry {
        typeflag: b'2',
        link: "../x".into(),
        ..file("a/sl", b"")
    });
    t.add(&TestEntry {
        typeflag: b'2',
        link: "/../../etc".into(),
        ..file("b/sl", b"")
    });
    t.add(&TestEntry {
        typeflag: b'2',
        link: "../../../../etc/x".into(),
        ..file("c/d/sl", b"")
    });
    let got = entries(&t.finish()).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].0.link_name, b"../../../../etc/x");
}

#[test]
fn truncation_and_bad_checksum_are_errors() {
    let mut t = TestTar::default();
    t.add(&file("f", &[7u8; 1000]));
    let full = t.finish();
    for cut in [100, 600, 1100] {
        let err = entries(&full[..cut]).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }
    let mut bad = full.clone();
    bad[10] ^= 1;
    let err = entries(&bad).unwrap_err();
    assert!(matches!(err, FormatError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("\"f"), "{err}");
}

#[test]
fn base256_fields_and_unrepresentable_times() {
    let mut t = TestTar::default();
    t.add(&file("f", b""));
    let mut data = t.finish();
    let set = |data: &mut Vec<u8>, mtime: [u8; 12]| {
        data[136..148].copy_from_slice(&mtime);
        data[148..156].fill(b' ');
        let sum: u64 = data[..512].iter().map(|&b| u64::from(b)).sum();
        data[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    };
    let mut ok = [0u8; 12];
    ok[0] = 0x80;
    ok[8..].copy_from_slice(&1_700_000_000u32.to_be_bytes());
    set(&mut data, ok);
    assert_eq!(entries(&data).unwrap()[0].0.mtime, 1_700_000_000);
    let mut huge = [0u8; 12];
    huge[0] = 0x80;
    huge[4] = 0x7f;
    set(&mut data, huge);
    // A valid tar entry (a plain unpack may take it), but not one a TOC can hold.
    let got = entries(&data).unwrap();
    let err = got[0].0.check_toc().unwrap_err();
    assert!(err.is_unrepresentable(), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("\"f\"") && err.contains("outside years"),
        "{err}"
    );
}

#[test]
fn numeric_fields() {
    assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
    assert_eq!(parse_numeric(b"  644 \0"), Some(0o644));
    assert_eq!(parse_numeric(b"\0\0\0"), Some(0));
    let mut b256 = [0u8; 12];
    b256[0] = 0x80;
    b256[11] = 5;
    b256[10] = 1;
    assert_eq!(parse_numeric(&b256), Some(261));
    let neg = [0xffu8; 12];
    assert_eq!(parse_numeric(&neg), Some(-1));
    assert_eq!(parse_pax_time("1.5"), Some((1, 500_000_000)));
    assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
}

proptest::proptest! {
    #[test]
    fn parser_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
        let _ = entries(&data);
    }

    #[test]
    fn parser_never_panics_on_mutated_headers(pos in 0usize..1536, val in proptest::num::u8::ANY) {
        let mut t = TestTar::default();
        t.add(&file(&"n".repeat(150), b"abc"));
        let mut data = t.finish();
        if pos < data.len() { data[pos] = val; }
        let _ = entries(&data);
    }
}

//! Footers: where each format says its TOC lies, in the last bytes of the blob.
//!
//! - zstd:chunked, new layout: a skippable frame holding 64 bytes: little-endian u64 TOC offset,
//!   compressed length, uncompressed length, type (1), tar-split offset, compressed length,
//!   uncompressed length, then `GNUlInUx`.
//! - zstd:chunked, old layout (skopeo 1.9): 40 bytes: TOC offset, lengths, type, `GnUlInUx`.
//! - eStargz: a 51-byte empty gzip member whose FEXTRA subfield `SG` holds `%016x` of the TOC
//!   offset then `STARGZ`; the legacy 47-byte footer holds the same 22 bytes without a subfield.

use super::error::FormatError;
use super::limits::MAX_TOC_CEILING;
use super::TocPosition;

pub(crate) const ZSTD_FOOTER_LEN: usize = 64;
pub(crate) const ZSTD_OLD_FOOTER_LEN: usize = 40;
pub(crate) const ESTARGZ_FOOTER_LEN: usize = 51;
pub(crate) const ESTARGZ_LEGACY_FOOTER_LEN: usize = 47;
const ZSTD_MAGIC: &[u8; 8] = b"GNUlInUx";
const ZSTD_OLD_MAGIC: &[u8; 8] = b"GnUlInUx";
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2A, 0x4D, 0x18];

/// The 8-byte header of a zstd skippable frame of `len` bytes.
pub(crate) fn skippable_header(len: usize) -> Result<[u8; 8], FormatError> {
    let len = u32::try_from(len).map_err(|_| {
        FormatError::Toc(format!(
            "{len} bytes is too large for a zstd skippable frame"
        ))
    })?;
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&SKIPPABLE_MAGIC);
    h[4..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// The 64-byte zstd:chunked footer (no tar-split: its fields are zero).
pub(crate) fn zstd_footer(offset: u64, len: u64, ulen: u64) -> [u8; ZSTD_FOOTER_LEN] {
    let mut f = [0u8; ZSTD_FOOTER_LEN];
    for (i, v) in [offset, len, ulen, 1, 0, 0, 0].into_iter().enumerate() {
        f[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    f[56..].copy_from_slice(ZSTD_MAGIC);
    f
}

/// The 51-byte eStargz footer pointing at the TOC member at `toc_offset`.
pub(crate) fn estargz_footer(toc_offset: u64) -> [u8; ESTARGZ_FOOTER_LEN] {
    let mut f = [0u8; ESTARGZ_FOOTER_LEN];
    // gzip header: magic, deflate, FEXTRA, mtime 0, XFL 0, OS unknown.
    f[..10].copy_from_slice(&[0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12] = b'S';
    f[13] = b'G';
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 and ISIZE of nothing (both zero).
    f[38..43].copy_from_slice(&[1, 0, 0, 0xff, 0xff]);
    f
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

fn check_range(offset: u64, len: u64, ulen: u64, limit: u64) -> Result<(), FormatError> {
    match offset.checked_add(len) {
        Some(end) if end <= limit && len > 0 => {}
        _ => {
            return Err(FormatError::Footer(format!(
                "TOC range {offset}+{len} lies outside the blob's first {limit} bytes"
            )))
        }
    }
    // The configured limits are checked where the TOC is read; this is only the hard ceiling.
    if len > MAX_TOC_CEILING || ulen > MAX_TOC_CEILING {
        return Err(FormatError::Footer(format!(
            "TOC of {len} ({ulen} uncompressed) bytes is larger than the ceiling of {MAX_TOC_CEILING} bytes"
        )));
    }
    Ok(())
}

/// Reads a zstd:chunked footer (either layout) from the blob's tail.
pub(crate) fn parse_zstd(tail: &[u8], blob_size: u64) -> Result<TocPosition, FormatError> {
    let n = tail.len();
    let magic = tail.get(n.saturating_sub(8)..).filter(|m| m.len() == 8);
    let (f, flen) = match magic {
        Some(m) if m == ZSTD_MAGIC && n >= ZSTD_FOOTER_LEN => {
            (&tail[n - ZSTD_FOOTER_LEN..], ZSTD_FOOTER_LEN)
        }
        Some(m) if m == ZSTD_OLD_MAGIC && n >= ZSTD_OLD_FOOTER_LEN => {
            (&tail[n - ZSTD_OLD_FOOTER_LEN..], ZSTD_OLD_FOOTER_LEN)
        }
        _ => return Err(FormatError::Footer(
            "no zstd:chunked footer at the end of the blob (magic GNUlInUx or GnUlInUx not found)"
                .into(),
        )),
    };
    let (offset, len, ulen, kind) = (u64_at(f, 0), u64_at(f, 8), u64_at(f, 16), u64_at(f, 24));
    if kind != 1 {
        return Err(FormatError::Footer(format!(
            "unsupported zstd:chunked manifest type {kind} (expected 1)"
        )));
    }
    let limit = blob_size.saturating_sub(flen as u64);
    check_range(offset, len, ulen, limit)?;
    Ok(TocPosition {
        offset,
        compressed_len: len,
        uncompressed_len: ulen,
    })
}

fn hex_offset(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Reads an eStargz footer (51-byte or legacy 47-byte) from the blob's tail.
pub(crate) fn parse_estargz(tail: &[u8], blob_size: u64) -> Result<TocPosition, FormatError> {
    let n = tail.len();
    let gz = |f: &[u8]| f[0] == 0x1f && f[1] == 0x8b && f[2] == 8 && f[3] & 0x04 != 0;
    let mut found = None;
    if n >= ESTARGZ_FOOTER_LEN {
        let f = &tail[n - ESTARGZ_FOOTER_LEN..];
        if gz(f)
            && f[10..12] == 26u16.to_le_bytes()
            && &f[12..14] == b"SG"
            && f[14..16] == 22u16.to_le_bytes()
            && &f[32..38] == b"STARGZ"
        {
            found = hex_offset(&f[16..32]).map(|o| (o, ESTARGZ_FOOTER_LEN));
        }
    }
    if found.is_none() && n >= ESTARGZ_LEGACY_FOOTER_LEN {
        let f = &tail[n - ESTARGZ_LEGACY_FOOTER_LEN..];
        if gz(f) && f[10..12] == 22u16.to_le_bytes() && &f[28..34] == b"STARGZ" {
            found = hex_offset(&f[12..28]).map(|o| (o, ESTARGZ_LEGACY_FOOTER_LEN));
        }
    }
    let Some((offset, flen)) = found else {
        return Err(FormatError::Footer(
            "no eStargz footer at the end of the blob (STARGZ marker not found)".into(),
        ));
    };
    let limit = blob_size.saturating_sub(flen as u64);
    let len = limit.checked_sub(offset).ok_or_else(|| {
        FormatError::Footer(format!(
            "TOC offset {offset} lies beyond the footer at {limit}"
        ))
    })?;
    check_range(offset, len, 0, limit)?;
    Ok(TocPosition {
        offset,
        compressed_len: len,
        uncompressed_len: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footers_round_trip() {
        let z = zstd_footer(100, 20, 50);
        let mut blob = vec![0u8; 200];
        blob.extend_from_slice(&z);
        assert_eq!(
            parse_zstd(&blob[blob.len() - 64..], blob.len() as u64).unwrap(),
            TocPosition {
                offset: 100,
                compressed_len: 20,
                uncompressed_len: 50
            }
        );
        let e = estargz_footer(0x1234);
        let mut blob = vec![0u8; 0x2000];
        blob.extend_from_slice(&e);
        let p = parse_estargz(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!((p.offset, p.compressed_len), (0x1234, 0x2000 - 0x1234));
    }

    #[test]
    fn old_zstd_footer_and_legacy_estargz_footer() {
        let mut old = Vec::new();
        for v in [10u64, 5, 9, 1] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        old.extend_from_slice(b"GnUlInUx");
        let mut blob = vec![0u8; 72];
        blob.extend_from_slice(&old);
        let tail = &blob[blob.len() - 64..];
        assert_eq!(parse_zstd(tail, blob.len() as u64).unwrap().offset, 10);

        let mut legacy = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0];
        legacy.extend_from_slice(format!("{:016x}STARGZ", 7).as_bytes());
        legacy.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(legacy.len(), 47);
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&legacy);
        let p = parse_estargz(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
        assert_eq!((p.offset, p.compressed_len), (7, 93));
    }

    #[test]
    fn estargz_footer_is_a_valid_empty_gzip_member() {
        use std::io::Read;
        let f = estargz_footer(42);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn footer_parsers_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..80), size in proptest::num::u64::ANY) {
            let _ = parse_zstd(&tail, size);
            let _ = parse_estargz(&tail, size);
        }

        #[test]
        fn mutated_footers_never_panic(pos in 0usize..64, val in proptest::num::u8::ANY, size in 0u64..1000) {
            let mut z = zstd_footer(10, 20, 30);
            z[pos] = val;
            let _ = parse_zstd(&z, size);
            let mut e = estargz_footer(10);
            e[pos % 51] = val;
            let _ = parse_estargz(&e, size);
        }
    }
}

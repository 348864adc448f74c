//! Keeping a layer plain when the lazy format cannot represent it.
//!
//! A tar may hold what no lazy TOC can: a file name or link target that is not UTF-8 (a TOC is
//! JSON, whose strings are Unicode), a time outside the years RFC 3339 can write. Such a layer is
//! still a valid layer that every runtime unpacks, and lazysnap's own plain-layer path unpacks it
//! byte for byte. So instead of failing the whole image, `convert` carries that layer's stored
//! blob over unchanged: same bytes, same digest (the manifest still verifies it), same `diff_id`
//! (the config stays right), and says which layer stayed plain and why. The other layers convert.
//!
//! Only representability falls back. The kept layer is read once more with the same tar parser
//! the writer uses, so an entry that is hostile (a name or hard link leaving the root, a size over
//! a limit, a corrupt header) fails the conversion as it would have if it came first; and the
//! stream is checked against the stored digest and the config's `diff_id`.

use std::io::{self, BufWriter, Seek, Write};

use tempfile::NamedTempFile;

use crate::format::tar::{padding, TarItem, TarParser};
use crate::format::{self, Compression, FormatError, WrittenLayer};
use crate::oci::{Digest, HashingReader};

use super::destination::Destination;
use super::{ConvertError, SourceImage, SourceLayer};

/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Annotation keys that declare a layer lazy: dropped from a layer kept plain, so no reader takes
/// it for a lazy layer of a format it was not written in.
const LAZY_ANNOTATIONS: [&str; 8] = [
    format::ANNOTATION_ZSTD_CHECKSUM,
    format::ANNOTATION_ZSTD_POSITION,
    format::ANNOTATION_LABEL_ZSTD_CHECKSUM,
    format::ANNOTATION_LABEL_ZSTD_POSITION,
    format::ANNOTATION_ZSTD_TARSPLIT_POSITION,
    format::ANNOTATION_ZSTD_CHECKSUM_OLD,
    format::ANNOTATION_ZSTD_POSITION_OLD,
    format::ANNOTATION_ESTARGZ_TOC_DIGEST,
];

/// Stages `layer`'s stored blob unchanged for the destination, after checking it (digest, tar
/// entries, `diff_id`); returns the staged file and what the manifest and config need.
pub(super) async fn keep(
    source: &SourceImage,
    layer: &SourceLayer,
    dest: &Destination,
    label: &str,
) -> Result<(Option<NamedTempFile>, WrittenLayer), ConvertError> {
    let stored = source.open_layer(layer).await?;
    let out = dest.new_blob()?;
    let (expected, diff_id) = (layer.digest, layer.diff_id);
    let task_label = label.to_owned();
    let (out, checked) = tokio::task::spawn_blocking(move || {
        check_and_stage(stored, out, expected, &diff_id, &task_label)
    })
    .await
    .map_err(|e| ConvertError::Source(format!("layer {label}: copy task failed: {e}")))??;
    let mut annotations = layer.annotations.clone();
    annotations.retain(|k, _| !LAZY_ANNOTATIONS.contains(&k.as_str()));
    Ok((
        Some(out),
        WrittenLayer {
            media_type: match checked.compression {
                Compression::Gzip => format::MEDIA_TYPE_GZIP,
                Compression::Zstd => format::MEDIA_TYPE_ZSTD,
                Compression::None => MEDIA_TYPE_TAR,
            },
            digest: checked.digest,
            size: checked.size,
            diff_id,
            uncompressed_size: checked.uncompressed_size,
            toc_digest: checked.digest,
            annotations,
            entries: checked.entries,
        },
    ))
}

/// What checking a kept layer found.
#[derive(Debug)]
struct Checked {
    compression: Compression,
    digest: Digest,
    size: u64,
    uncompressed_size: u64,
    entries: u64,
}

/// Copies `stored` into `out` while hashing it, then reads the copy back through the tar parser
/// (every entry's name and link checked, payloads skipped) while hashing the uncompressed stream.
fn check_and_stage(
    stored: Box<dyn io::Read + Send>,
    mut out: NamedTempFile,
    expected: Option<Digest>,
    diff_id: &Digest,
    label: &str,
) -> Result<(NamedTempFile, Checked), ConvertError> {
    let mut hashing = HashingReader::new(stored);
    {
        let mut file = BufWriter::with_capacity(1 << 20, out.as_file_mut());
        io::copy(&mut hashing, &mut file)
            .and_then(|_| file.flush())
            .map_err(|e| ConvertError::io(format!("layer {label}: copying"), e))?;
    }
    let (_, digest, size) = hashing.finish();
    if let Some(expected) = expected.filter(|e| *e != digest) {
        return Err(ConvertError::DigestMismatch {
            what: format!("layer {label}: stored blob"),
            expected,
            got: digest,
        });
    }
    let reread = |e| ConvertError::io(format!("layer {label}: reading the copy back"), e);
    let mut copy = out.as_file().try_clone().map_err(reread)?;
    copy.rewind().map_err(reread)?;
    let (compression, decoded) = format::decoder(Box::new(copy)).map_err(reread)?;
    let mut plain = HashingReader::new(decoded);
    let entries = count_entries(&mut plain).map_err(|error| match error {
        FormatError::Io(e) => ConvertError::io(format!("layer {label}"), e),
        error => ConvertError::Format {
            layer: label.to_owned(),
            error,
        },
    })?;
    // The parser stops at the end-of-archive marker; whatever follows counts for the diff_id.
    io::copy(&mut plain, &mut io::sink()).map_err(reread)?;
    let (_, got, uncompressed_size) = plain.finish();
    if got != *diff_id {
        return Err(ConvertError::DigestMismatch {
            what: format!("layer {label}: uncompressed tar (the config's diff_id)"),
            expected: *diff_id,
            got,
        });
    }
    Ok((
        out,
        Checked {
            compression,
            digest,
            size,
            uncompressed_size,
            entries,
        },
    ))
}

/// Parses every entry of a tar stream (names, links and sizes checked as the writer checks them,
/// nothing about TOCs), skipping payloads; returns the count.
fn count_entries(tar: impl io::Read) -> Result<u64, FormatError> {
    let mut parser = TarParser::new(tar);
    let mut entries = 0;
    while let Some(item) = parser.next_item()? {
        if let TarItem::Entry(e) = item {
            entries += 1;
            parser.skip_payload(e.size + padding(e.size) as u64)?;
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of empty files, or hard links where a target is given, with byte names.
    fn tar(entries: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, link) in entries {
            let mut h = ::tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(0);
            match link {
                Some(l) => {
                    h.set_entry_type(::tar::EntryType::Link);
                    h.set_link_name(OsStr::from_bytes(l)).unwrap();
                }
                None => h.set_entry_type(::tar::EntryType::Regular),
            }
            h.set_path(OsStr::from_bytes(name)).unwrap();
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn check(tar: &[u8], diff_id: &Digest) -> Result<(NamedTempFile, Checked), ConvertError> {
        let stage = tempfile::NamedTempFile::new().unwrap();
        let stored = Box::new(io::Cursor::new(tar.to_vec()));
        check_and_stage(stored, stage, None, diff_id, "l")
    }

    #[test]
    fn a_kept_layer_is_copied_unchanged_and_checked_against_its_diff_id() {
        let good = tar(&[(b"caf\xe9.txt", None)]);
        let (out, checked) = check(&good, &Digest::of(&good)).unwrap();
        assert_eq!(std::fs::read(out.path()).unwrap(), good);
        assert_eq!(checked.digest, Digest::of(&good));
        assert_eq!(checked.entries, 1);
        assert!(matches!(checked.compression, Compression::None));
        let err = check(&good, &Digest::of(b"other")).unwrap_err();
        assert!(err.to_string().contains("diff_id"), "{err}");
    }

    #[test]
    fn a_hostile_entry_after_an_unrepresentable_one_is_still_an_error() {
        let hostile = tar(&[(b"caf\xe9.txt", None), (b"hl", Some(b"../../etc/passwd"))]);
        let err = check(&hostile, &Digest::of(&hostile)).unwrap_err();
        assert!(err.to_string().contains("escapes the layer root"), "{err}");
    }
}

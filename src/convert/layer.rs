//! Converting one layer: detect the source compression, decompress, rewrite into the lazy format,
//! and check the uncompressed stream against the config's `diff_id` (and, through the source
//! reader, the stored bytes against the manifest digest) before the result may be used.

use std::io::{self, BufRead, BufReader, Read, Write};

use crate::format::{self, FormatError, WriteOptions, WrittenLayer};
use crate::oci::{Digest, HashingReader};

use super::ConvertError;

/// How a source layer's bytes are compressed, told from its first bytes (media types lie, and
/// docker archives carry none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::None,
        }
    }
}

/// Rewrites the layer read from `stored` (compressed as it was stored) into `out`.
///
/// `label` names the layer in errors. The conversion fails, and `out` must be discarded, if the
/// stored bytes do not match their digest or the uncompressed tar does not match `diff_id`.
pub fn convert_layer<W: Write>(
    stored: Box<dyn Read + Send>,
    diff_id: &Digest,
    out: W,
    options: &WriteOptions,
    label: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenLayer, ConvertError> {
    let mut buffered = BufReader::with_capacity(1 << 20, stored);
    let head = buffered
        .fill_buf()
        .map_err(|e| ConvertError::io(format!("layer {label}: reading"), e))?;
    let compression = Compression::sniff(head);
    let decoded: Box<dyn Read + Send> = match compression {
        // Multi-member: an eStargz source is a concatenation of gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| ConvertError::io(format!("layer {label}: starting zstd"), e))?,
        ),
        Compression::None => Box::new(buffered),
    };
    let mut tar = HashingReader::new(decoded);
    let written =
        format::write_layer(&mut tar, out, options, progress).map_err(|source| match source {
            FormatError::Io(e) => ConvertError::io(format!("layer {label}"), e),
            source => ConvertError::Format {
                layer: label.to_owned(),
                error: source,
            },
        })?;
    // The writer stops at the end-of-archive marker; read the rest so that the whole stream is
    // hashed and the source's own digest check at EOF runs.
    io::copy(&mut tar, &mut io::sink())
        .map_err(|e| ConvertError::io(format!("layer {label}: reading to the end"), e))?;
    let (_, got, _) = tar.finish();
    if got != *diff_id {
        return Err(ConvertError::DigestMismatch {
            what: format!("layer {label}: uncompressed tar (the config's diff_id)"),
            expected: *diff_id,
            got,
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_compression_from_magic_bytes() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/\0\0"), Compression::None);
        assert_eq!(Compression::sniff(b""), Compression::None);
    }
}

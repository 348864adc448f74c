//! How a plain layer blob is compressed, told from its first bytes (media types lie, and docker
//! archives carry none), and the matching streaming decoder.

use std::io::{self, BufRead, BufReader, Read};

/// A layer blob's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// Tells the compression from a blob's first bytes.
    pub fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::None,
        }
    }
}

/// Wraps a stored layer blob in the decoder its first bytes call for, yielding the tar stream.
/// Gzip is decoded multi-member (an eStargz blob is a concatenation of gzip members); zstd skips
/// skippable frames (a zstd:chunked TOC).
pub fn decoder(stored: Box<dyn Read + Send>) -> io::Result<(Compression, Box<dyn Read + Send>)> {
    let mut buffered = BufReader::with_capacity(1 << 20, stored);
    let compression = Compression::sniff(buffered.fill_buf()?);
    let decoded: Box<dyn Read + Send> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        Compression::None => Box::new(buffered),
    };
    Ok((compression, decoded))
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

    #[test]
    fn decodes_each_kind_to_the_same_bytes() {
        let data = b"a tar stream, or anything".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&data[..], 3).unwrap();
        for blob in [gz, zst, data.clone()] {
            let (_, mut r) = decoder(Box::new(io::Cursor::new(blob))).unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}

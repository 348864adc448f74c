//! The reader side: footer → TOC position, TOC bytes → verified [`Toc`], chunk bytes → verified
//! content. Digests are checked before anything is parsed or returned.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use flate2::read::MultiGzDecoder;

use super::error::FormatError;
use super::footer::{self, MAX_TOC_LEN};
use super::tar::{padding, TarItem, TarParser};
use super::{
    detect, tail_len, toc, Chunk, LayerFormat, LazyLayer, Toc, TocEntry, TocPosition,
    ESTARGZ_TOC_NAME,
};
use crate::oci::Digest;

/// Largest chunk this reader decompresses (a whole file for TOCs without chunking).
const MAX_CHUNK_LEN: u64 = 4 << 30;

pub(crate) fn parse_tail(
    format: LayerFormat,
    tail: &[u8],
    blob_size: u64,
) -> Result<TocPosition, FormatError> {
    match format {
        LayerFormat::ZstdChunked => footer::parse_zstd(tail, blob_size),
        LayerFormat::Estargz => footer::parse_estargz(tail, blob_size),
    }
}

fn read_limited<R: Read>(r: R, limit: u64, what: &str) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    r.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::Toc(format!("cannot decompress {what}: {e}")))?;
    if out.len() as u64 > limit {
        return Err(FormatError::Toc(format!(
            "{what} is larger than {limit} bytes"
        )));
    }
    Ok(out)
}

fn check_digest(expected: Digest, bytes: &[u8]) -> Result<(), FormatError> {
    let actual = Digest::of(bytes);
    if actual != expected {
        return Err(FormatError::TocDigest { expected, actual });
    }
    Ok(())
}

pub(crate) fn parse_toc(
    layer: &LazyLayer,
    position: TocPosition,
    raw: &[u8],
) -> Result<Toc, FormatError> {
    match layer.format {
        LayerFormat::ZstdChunked => {
            // The pinned digest covers the compressed bytes: check before decompressing.
            check_digest(layer.toc_digest, raw)?;
            let decoder = zstd::stream::read::Decoder::new(raw)
                .map_err(|e| FormatError::Toc(format!("cannot decompress: {e}")))?;
            let json = read_limited(decoder, MAX_TOC_LEN, "TOC")?;
            if position.uncompressed_len != 0 && json.len() as u64 != position.uncompressed_len {
                return Err(FormatError::Toc(format!(
                    "decompressed to {} bytes, the footer says {}",
                    json.len(),
                    position.uncompressed_len
                )));
            }
            toc::decode(LayerFormat::ZstdChunked, &json, position.offset)
        }
        LayerFormat::Estargz => {
            let plain = MultiGzDecoder::new(raw);
            let mut tar = TarParser::new(plain.take(MAX_TOC_LEN + 4096));
            loop {
                let item = tar
                    .next_item()
                    .map_err(|e| FormatError::Toc(format!("reading the TOC member: {e}")))?;
                let entry = match item {
                    None => {
                        return Err(FormatError::Toc(format!(
                            "no {ESTARGZ_TOC_NAME} entry in the TOC member"
                        )))
                    }
                    Some(TarItem::Global(_)) => continue,
                    Some(TarItem::Entry(e)) => e,
                };
                if entry.meta.name != ESTARGZ_TOC_NAME {
                    tar.skip_payload(entry.size + padding(entry.size) as u64)?;
                    continue;
                }
                if entry.size > MAX_TOC_LEN {
                    return Err(FormatError::Toc(format!(
                        "{} bytes is too large",
                        entry.size
                    )));
                }
                let mut json = vec![0u8; entry.size as usize];
                tar.read_payload(&mut json)?;
                check_digest(layer.toc_digest, &json)?;
                return toc::decode(LayerFormat::Estargz, &json, position.offset);
            }
        }
    }
}

fn label(chunk: &Chunk) -> String {
    format!(
        "chunk at file offset {} ({}, blob bytes {}..{})",
        chunk.file_offset,
        chunk.digest.short(),
        chunk.compressed_start,
        chunk.compressed_end
    )
}

pub(crate) fn decode_chunk(
    format: LayerFormat,
    chunk: &Chunk,
    compressed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let fail = |reason: String| FormatError::Chunk {
        chunk: label(chunk),
        reason,
    };
    if chunk.size > MAX_CHUNK_LEN {
        return Err(fail(format!("{} bytes is too large", chunk.size)));
    }
    let data = if chunk.zeros {
        vec![0u8; chunk.size as usize]
    } else {
        let want = chunk
            .inner_offset
            .checked_add(chunk.size)
            .filter(|&w| w <= MAX_CHUNK_LEN)
            .ok_or_else(|| fail("inner offset out of range".into()))?;
        let mut out = Vec::new();
        let res = match format {
            LayerFormat::ZstdChunked => zstd::stream::read::Decoder::new(compressed)
                .and_then(|d| d.take(want).read_to_end(&mut out)),
            LayerFormat::Estargz => MultiGzDecoder::new(compressed)
                .take(want)
                .read_to_end(&mut out),
        };
        res.map_err(|e| fail(format!("cannot decompress: {e}")))?;
        if (out.len() as u64) < want {
            return Err(fail(format!(
                "decompressed to {} bytes, expected {want}",
                out.len()
            )));
        }
        out.drain(..chunk.inner_offset as usize);
        out
    };
    let actual = Digest::of(&data);
    if actual != chunk.digest {
        return Err(FormatError::ChunkDigest {
            chunk: label(chunk),
            expected: chunk.digest,
            actual,
        });
    }
    Ok(data)
}

/// Reads a blob's footer and TOC, checking the TOC against the descriptor's annotations.
pub fn read_toc<R: Read + Seek>(
    mut blob: R,
    media_type: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(LazyLayer, Toc), FormatError> {
    let layer = detect(media_type, annotations).ok_or_else(|| FormatError::NotLazy {
        media_type: media_type.to_owned(),
    })?;
    let size = blob.seek(SeekFrom::End(0))?;
    let n = tail_len(layer.format).min(size);
    blob.seek(SeekFrom::Start(size - n))?;
    let mut tail = vec![0u8; n as usize];
    blob.read_exact(&mut tail)?;
    let position = parse_tail(layer.format, &tail, size)?;
    blob.seek(SeekFrom::Start(position.offset))?;
    let mut raw = vec![0u8; position.compressed_len as usize];
    blob.read_exact(&mut raw)?;
    let toc = parse_toc(&layer, position, &raw)?;
    Ok((layer, toc))
}

/// Reads, decompresses and verifies the whole content of a regular file (or hard link to one).
/// Errors name the entry and the chunk.
pub fn read_file<R: Read + Seek>(
    mut blob: R,
    format: LayerFormat,
    entry: &TocEntry,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(entry.size.min(64 << 20) as usize);
    for chunk in &entry.chunks {
        let mut compressed = Vec::new();
        if !chunk.zeros {
            let len = chunk.compressed_end.saturating_sub(chunk.compressed_start);
            blob.seek(SeekFrom::Start(chunk.compressed_start))?;
            (&mut blob).take(len).read_to_end(&mut compressed)?;
        }
        let data = decode_chunk(format, chunk, &compressed).map_err(|e| match e {
            FormatError::Chunk { chunk, reason } => FormatError::Chunk {
                chunk: format!("entry {:?} {chunk}", entry.name),
                reason,
            },
            FormatError::ChunkDigest {
                chunk,
                expected,
                actual,
            } => FormatError::ChunkDigest {
                chunk: format!("entry {:?} {chunk}", entry.name),
                expected,
                actual,
            },
            other => other,
        })?;
        out.extend_from_slice(&data);
    }
    Ok(out)
}

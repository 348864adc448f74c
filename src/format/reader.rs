//! The reader side: footer → TOC position, TOC bytes → verified [`Toc`], chunk bytes → verified
//! content. Digests are checked before anything is parsed or returned.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

use flate2::read::MultiGzDecoder;

use super::error::FormatError;
use super::footer;
use super::limits::{Limits, MAX_CHUNK_CEILING};
use super::tar::{padding, TarItem, TarParser};
use super::{
    detect, tail_len, toc, Chunk, LayerFormat, LazyLayer, Toc, TocEntry, TocPosition,
    ESTARGZ_TOC_NAME,
};
use crate::oci::Digest;

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

/// Decompresses at most `limit` bytes (one more is read to notice a longer stream, then it stops).
/// `expected` preallocates when the footer states the size, so the buffer never doubles past it.
fn read_limited<R: Read>(
    r: R,
    limit: u64,
    expected: u64,
    too_large: impl FnOnce() -> String,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(expected.min(limit).saturating_add(1) as usize);
    r.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| FormatError::Toc(format!("cannot decompress: {e}")))?;
    if out.len() as u64 > limit {
        return Err(FormatError::Toc(too_large()));
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
    limits: &Limits,
) -> Result<Toc, FormatError> {
    limits.check_toc_size(raw.len() as u64, position.uncompressed_len)?;
    match layer.format {
        LayerFormat::ZstdChunked => {
            // The pinned digest covers the compressed bytes: check before decompressing.
            check_digest(layer.toc_digest, raw)?;
            let decoder = zstd::stream::read::Decoder::new(raw)
                .map_err(|e| FormatError::Toc(format!("cannot decompress: {e}")))?;
            // Stop at the size the footer declares (or the limit when it declares none).
            let declared = position.uncompressed_len;
            let limit = if declared != 0 {
                declared
            } else {
                limits.max_toc_json
            };
            let json = read_limited(decoder, limit, declared, || {
                if declared != 0 {
                    format!("decompresses to more than the {declared} bytes the footer says")
                } else {
                    Limits::exceeded("uncompressed size", limit + 1, limit, "max_toc_json_bytes")
                }
            })?;
            if declared != 0 && json.len() as u64 != declared {
                return Err(FormatError::Toc(format!(
                    "decompressed to {} bytes, the footer says {declared}",
                    json.len(),
                )));
            }
            toc::decode_limited(LayerFormat::ZstdChunked, &json, position.offset, limits)
        }
        LayerFormat::Estargz => {
            let plain = MultiGzDecoder::new(raw);
            // The TOC member holds the TOC's tar header(s) and the JSON: stop inflating past them.
            let mut tar = TarParser::new(plain.take(limits.max_toc_json + (64 << 10)));
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
                if entry.meta.name != ESTARGZ_TOC_NAME.as_bytes() {
                    tar.skip_payload(entry.size + padding(entry.size) as u64)?;
                    continue;
                }
                if entry.size > limits.max_toc_json {
                    return Err(FormatError::Toc(Limits::exceeded(
                        "uncompressed size",
                        entry.size,
                        limits.max_toc_json,
                        "max_toc_json_bytes",
                    )));
                }
                let mut json = vec![0u8; entry.size as usize];
                tar.read_payload(&mut json)?;
                check_digest(layer.toc_digest, &json)?;
                return toc::decode_limited(LayerFormat::Estargz, &json, position.offset, limits);
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
    // Checked before any allocation or decompression: the TOC states these sizes.
    if chunk.size > MAX_CHUNK_CEILING {
        return Err(fail(format!(
            "{} bytes is larger than the ceiling of {MAX_CHUNK_CEILING} bytes a chunk may be \
             decoded to{}",
            chunk.size,
            if chunk.zeros {
                " (a zero run that large must be served without being materialised)"
            } else {
                ""
            }
        )));
    }
    let data = if chunk.zeros {
        vec![0u8; chunk.size as usize]
    } else {
        let want = chunk
            .inner_offset
            .checked_add(chunk.size)
            .filter(|&w| w <= MAX_CHUNK_CEILING)
            .ok_or_else(|| {
                fail(format!(
                    "inner offset {} plus size {} is larger than the ceiling of \
                     {MAX_CHUNK_CEILING} bytes",
                    chunk.inner_offset, chunk.size
                ))
            })?;
        // Both decoders stop at `want`: a stream that inflates further is never read past it.
        let mut out = Vec::with_capacity(want as usize);
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

/// Reads a blob's footer and TOC, checking the TOC against the descriptor's annotations, with
/// the default [`Limits`].
pub fn read_toc<R: Read + Seek>(
    blob: R,
    media_type: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(LazyLayer, Toc), FormatError> {
    read_toc_limited(blob, media_type, annotations, &Limits::default())
}

/// Reads a blob's footer and TOC, checking the TOC against the descriptor's annotations and every
/// size it states against `limits` before reading or decoding it.
pub fn read_toc_limited<R: Read + Seek>(
    mut blob: R,
    media_type: &str,
    annotations: &BTreeMap<String, String>,
    limits: &Limits,
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
    limits.check_toc_size(position.compressed_len, position.uncompressed_len)?;
    blob.seek(SeekFrom::Start(position.offset))?;
    let mut raw = vec![0u8; position.compressed_len as usize];
    blob.read_exact(&mut raw)?;
    let toc = parse_toc(&layer, position, &raw, limits)?;
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

//! The uncompressed digest (`diff_id`) of a layer, computed from the compressed stream that
//! background completion reads anyway.
//!
//! containerd's overlayfs snapshotter checks every layer it unpacks against the `diff_id` its
//! image config claims; a lazy layer is never unpacked, so this is where that claim gets checked
//! (the snapshotter compares the result with the chain ID the layer is committed under). The
//! compressed blocks go through a bounded channel to one blocking thread that decompresses and
//! hashes them: the async workers never decompress, and memory stays at the channel's blocks plus
//! the decoder's window, whatever the layer's size.

use std::io::{BufReader, Read};

use bytes::Bytes;

use crate::format::LayerFormat;
use crate::oci::{Digest, Hasher};

/// Compressed blocks queued for the hashing thread (each up to one read block, 256 KiB).
const QUEUE: usize = 8;
/// The largest zstd window accepted, as a power of two: 128 MiB, the `zstd` tool's own default
/// limit. A frame asking for more is refused rather than allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Bytes of tar headers, padding and metadata entries (the eStargz TOC) allowed per TOC entry
/// and in all, on top of the file sizes the TOC declares.
const PER_ENTRY_SLACK: u64 = 64 << 10;
const SLACK: u64 = 64 << 20;

/// The most an honest layer with these entries can decompress to: its files rounded up to tar
/// blocks, plus headers. A stream that goes past it is refused before it costs more CPU.
pub(super) fn bound(sizes: impl Iterator<Item = u64>) -> u64 {
    sizes.fold(SLACK, |total, size| {
        total
            .saturating_add(size.div_ceil(512).saturating_mul(512))
            .saturating_add(PER_ENTRY_SLACK)
    })
}

/// Hashes the uncompressed stream of the compressed bytes fed to it, on a blocking thread.
pub(super) struct UncompressedDigest {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    task: tokio::task::JoinHandle<Result<Digest, String>>,
}

impl UncompressedDigest {
    /// Starts the thread for a layer of `format` that may decompress to at most `bound` bytes.
    pub(super) fn start(format: LayerFormat, bound: u64) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let reader = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let task = tokio::task::spawn_blocking(move || hash(format, reader, bound));
        Self { tx: Some(tx), task }
    }

    /// Queues the next compressed bytes, waiting while the queue is full. If the thread has
    /// stopped (the stream does not decompress), the bytes are dropped: `finish` says why.
    pub(super) async fn feed(&mut self, bytes: Bytes) {
        if let Some(tx) = &self.tx {
            if tx.send(bytes).await.is_err() {
                self.tx = None;
            }
        }
    }

    /// Ends the stream and returns the digest of everything it decompressed to.
    pub(super) async fn finish(mut self) -> Result<Digest, String> {
        self.tx = None;
        (&mut self.task)
            .await
            .map_err(|e| format!("the hashing thread failed: {e}"))?
    }
}

/// The receiving end as a `Read`: end of stream when the sender is dropped.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(bytes) => self.current = bytes,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Decompresses `reader` as a whole layer of `format` (zstd: every frame, skippable ones
/// skipped, as `zstd -d` does; eStargz: every gzip member) and hashes the result.
fn hash(format: LayerFormat, reader: impl Read, bound: u64) -> Result<Digest, String> {
    let reader = BufReader::with_capacity(128 << 10, reader);
    let mut decoder: Box<dyn Read> = match format {
        LayerFormat::ZstdChunked => {
            let mut d = zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| format!("starting the zstd decoder: {e}"))?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| format!("limiting the zstd window: {e}"))?;
            Box::new(d)
        }
        LayerFormat::Estargz => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
    };
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = decoder
            .read(&mut buf)
            .map_err(|e| format!("the layer does not decompress: {e}"))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
        if hasher.len() > bound {
            return Err(format!(
                "the layer decompresses to more than {bound} bytes, more than its TOC declares"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn digest_of(format: LayerFormat, blob: &[u8], bound: u64) -> Result<Digest, String> {
        let mut hasher = UncompressedDigest::start(format, bound);
        for piece in blob.chunks(7) {
            hasher.feed(Bytes::copy_from_slice(piece)).await;
        }
        hasher.finish().await
    }

    #[tokio::test]
    async fn zstd_frames_and_skippable_frames_hash_like_zstd_d() {
        let (a, b) = (b"first frame ".repeat(100), b"second frame".repeat(50));
        let mut blob = zstd::bulk::compress(&a, 3).unwrap();
        // A skippable frame (magic 0x184D2A50, little-endian length) between data frames, as
        // zstd:chunked stores its TOC.
        blob.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        blob.extend_from_slice(&5u32.to_le_bytes());
        blob.extend_from_slice(b"hello");
        blob.extend_from_slice(&zstd::bulk::compress(&b, 3).unwrap());
        let want = Digest::of(&[a.as_slice(), b.as_slice()].concat());
        let got = digest_of(LayerFormat::ZstdChunked, &blob, 1 << 20).await;
        assert_eq!(got, Ok(want));
    }

    #[tokio::test]
    async fn gzip_members_hash_as_one_stream() {
        let mut blob = Vec::new();
        for part in [&b"one "[..], b"two ", b""] {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(part).unwrap();
            blob.extend(enc.finish().unwrap());
        }
        let got = digest_of(LayerFormat::Estargz, &blob, 1 << 20).await;
        assert_eq!(got, Ok(Digest::of(b"one two ")));
    }

    #[tokio::test]
    async fn garbage_and_bombs_are_errors_not_digests() {
        let got = digest_of(LayerFormat::ZstdChunked, b"not zstd at all", 1 << 20).await;
        assert!(got.unwrap_err().contains("does not decompress"));
        let bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 3).unwrap();
        let got = digest_of(LayerFormat::ZstdChunked, &bomb, 1 << 20).await;
        assert!(got.unwrap_err().contains("more than 1048576 bytes"));
    }

    #[test]
    fn the_bound_covers_tar_blocks_and_headers() {
        assert_eq!(
            bound([1u64, 512].into_iter()),
            SLACK + 512 + 512 + 2 * PER_ENTRY_SLACK
        );
        assert_eq!(bound([u64::MAX].into_iter()), u64::MAX);
    }
}

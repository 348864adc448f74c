//! Whole local files for FUSE passthrough, made only from chunks already verified and cached:
//! preparing one never fetches, so a file becomes eligible once all its chunks are local (after
//! background completion, or after it was read through once).
//!
//! A TOC may declare runs of zeros of any length at no cost to its image (a 491-byte layer can
//! hold a 3 GiB file of zeros). Those runs are holes in an assembled file, never written blocks,
//! but they must still be hashed to check the whole-file digest: a file with more than
//! [`MAX_PASSTHROUGH_ZEROS`] of them is served through FUSE only, where zeros cost nothing.

use std::fs::File;

use crate::cache::FilePart;
use crate::format::TocEntry;
use crate::metrics::METRICS;
use crate::oci::Digest;

use super::{lock, LayerFetcher};

/// Most bytes of zero runs a file assembled for passthrough may hold (hashing them is the cost).
pub const MAX_PASSTHROUGH_ZEROS: u64 = 256 << 20;

impl LayerFetcher {
    /// The checked local file of `entry`, if ready; otherwise starts preparing it (once, in the
    /// background) when every chunk is local, so that a later open finds it.
    pub(super) fn local_file_of(&self, entry: &TocEntry) -> Option<File> {
        let inner = &self.inner;
        let (digest, parts) = whole_file(entry)?;
        if let Some(file) = inner.cache.open_checked(&digest) {
            return Some(file);
        }
        let all_local = parts.iter().all(|p| match p {
            FilePart::Chunk { digest, .. } => inner.cache.contains(digest),
            FilePart::Zeros(_) => true,
        });
        let runtime = inner.runtime.as_ref()?;
        if !all_local
            || lock(&inner.refused).contains(&digest)
            || !lock(&inner.preparing).insert(digest)
        {
            return None;
        }
        let this = self.clone();
        let name = entry.name.clone();
        runtime.spawn(async move {
            let inner = &this.inner;
            // Preparing reads and hashes whole files: one at a time per layer, off the workers.
            let permit = inner.prepare_slots.acquire().await;
            let cache = inner.cache.clone();
            let result =
                tokio::task::spawn_blocking(move || cache.assemble(&digest, &parts)).await;
            drop(permit);
            match result {
                Ok(Ok(true)) => METRICS.passthrough_files.inc(),
                // The chunks do not make the file the TOC names (or one just went): reads stay
                // in FUSE, and the work is not repeated on every open.
                Ok(Ok(false)) => {
                    lock(&inner.refused).insert(digest);
                }
                Ok(Err(e)) => {
                    tracing::warn!(layer = %inner.blob.short(), file = %name, "cannot prepare a passthrough file: {e}")
                }
                Err(e) => {
                    tracing::warn!(layer = %inner.blob.short(), file = %name, "passthrough task failed: {e}")
                }
            }
            lock(&inner.preparing).remove(&digest);
        });
        None
    }
}

/// The content digest under which `entry`'s bytes are stored whole, and its parts in file order.
/// A file that is one chunk is that chunk; a longer one needs the whole-file digest of the TOC
/// (without one, it is served through FUSE only).
fn whole_file(entry: &TocEntry) -> Option<(Digest, Vec<FilePart>)> {
    if entry.size == 0 {
        return None;
    }
    let zeros = entry
        .chunks
        .iter()
        .filter(|c| c.zeros)
        .fold(0u64, |sum, c| sum.saturating_add(c.size));
    if zeros > MAX_PASSTHROUGH_ZEROS {
        return None;
    }
    let parts: Vec<FilePart> = entry
        .chunks
        .iter()
        .map(|c| {
            if c.zeros {
                FilePart::Zeros(c.size)
            } else {
                FilePart::Chunk {
                    digest: c.digest,
                    size: c.size,
                }
            }
        })
        .collect();
    let digest = match entry.chunks.as_slice() {
        [only] if !only.zeros && only.size == entry.size => only.digest,
        _ => entry.digest?,
    };
    Some((digest, parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Chunk, EntryKind};

    fn entry(size: u64, digest: Option<Digest>, chunks: Vec<Chunk>) -> TocEntry {
        TocEntry {
            size,
            digest,
            chunks,
            ..TocEntry::new("f", EntryKind::Reg)
        }
    }

    fn chunk(file_offset: u64, size: u64, zeros: bool) -> Chunk {
        Chunk {
            file_offset,
            size,
            compressed_start: 0,
            compressed_end: 0,
            inner_offset: 0,
            digest: Digest::of(&file_offset.to_le_bytes()),
            zeros,
        }
    }

    #[test]
    fn a_one_chunk_file_is_its_chunk_and_longer_files_need_the_file_digest() {
        let one = entry(10, None, vec![chunk(0, 10, false)]);
        assert_eq!(whole_file(&one).map(|w| w.0), Some(one.chunks[0].digest));
        let file_digest = Digest::of(b"whole");
        let two = vec![chunk(0, 10, false), chunk(10, 5, true)];
        let (digest, parts) = whole_file(&entry(15, Some(file_digest), two.clone())).unwrap();
        assert_eq!(digest, file_digest);
        assert_eq!(
            parts,
            vec![
                FilePart::Chunk {
                    digest: two[0].digest,
                    size: 10
                },
                FilePart::Zeros(5)
            ]
        );
        assert!(whole_file(&entry(15, None, two)).is_none());
        let sparse = vec![
            chunk(0, 10, false),
            chunk(10, MAX_PASSTHROUGH_ZEROS + 1, true),
        ];
        assert!(
            whole_file(&entry(
                MAX_PASSTHROUGH_ZEROS + 11,
                Some(file_digest),
                sparse
            ))
            .is_none(),
            "a file of more zeros than the bound stays in FUSE"
        );
        assert!(whole_file(&entry(0, None, vec![])).is_none());
    }
}

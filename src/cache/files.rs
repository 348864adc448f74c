//! Whole files for FUSE passthrough: a file's plain bytes in one local file, so the kernel can
//! read it directly at native speed.
//!
//! A file that is one chunk needs nothing new: its chunk file already holds exactly its bytes. A
//! file of several chunks is assembled once, from verified chunks, into the same content-addressed
//! store under the file's own digest (a chunk and a file with one digest have the same bytes), so
//! it counts in the disk budget, is evicted like a chunk, and survives a restart.
//!
//! The kernel reads a passthrough file without asking us, so the bytes are checked before it may:
//! a file assembled here is hashed as it is written and must match the digest the TOC gives; a
//! stored file is re-hashed the first time this process offers it. Files are written once,
//! atomically, and never modified, so a check holds for as long as the process runs.
//!
//! Zero runs are holes: assembling seeks over them, so a file of zeros takes no disk blocks for
//! them, and the budget counts the blocks a file takes, not its length.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

use super::{chunk_path, disk_usage, lock, now, CacheError, ChunkCache, ChunkInfo};
use crate::oci::{Digest, Hasher};

/// One piece of a file, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePart {
    /// A stored chunk of `size` bytes.
    Chunk { digest: Digest, size: u64 },
    /// A run of zero bytes the TOC does not store.
    Zeros(u64),
}

/// Read and write block size while hashing or assembling.
const BLOCK: usize = 1 << 20;

impl ChunkCache {
    /// The stored blob `digest` (a chunk or an assembled file), opened read-only, if it has been
    /// checked by this process; `None` otherwise (see [`Self::check_file`]). Cheap: for the open
    /// path of a file system.
    pub fn open_checked(&self, digest: &Digest) -> Option<File> {
        if !lock(&self.inner.checked).contains(digest) || !self.contains(digest) {
            return None;
        }
        match File::open(chunk_path(&self.inner.chunks_dir, digest)) {
            Ok(file) => {
                self.touch(digest);
                Some(file)
            }
            Err(_) => {
                // Evicted between the two looks, or removed from outside: forget it.
                lock(&self.inner.checked).remove(digest);
                None
            }
        }
    }

    /// Hashes the stored blob `digest` once per process so [`Self::open_checked`] may offer it;
    /// a blob that does not match is removed. Returns whether it is now offered.
    pub fn check_file(&self, digest: &Digest) -> Result<bool, CacheError> {
        if lock(&self.inner.checked).contains(digest) {
            return Ok(true);
        }
        if !self.contains(digest) {
            return Ok(false);
        }
        let path = chunk_path(&self.inner.chunks_dir, digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest)?;
                return Ok(false);
            }
            Err(e) => return Err(CacheError::io(format!("opening {}", path.display()), e)),
        };
        let mut hasher = Hasher::new();
        let mut block = vec![0u8; BLOCK];
        loop {
            let n = file
                .read(&mut block)
                .map_err(|e| CacheError::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&block[..n]);
        }
        let got = hasher.finish();
        if got != *digest {
            tracing::warn!(blob = %digest, got = %got, "stored file is damaged on disk; dropping it");
            let _ = std::fs::remove_file(&path);
            self.forget(digest)?;
            return Ok(false);
        }
        lock(&self.inner.checked).insert(*digest);
        Ok(true)
    }

    /// Writes the file made of `parts` under its content digest `digest`, from stored chunks
    /// (each re-verified as it is read), and offers it to [`Self::open_checked`]. Returns false,
    /// storing nothing, when a chunk is missing or damaged or the bytes do not hash to `digest`.
    pub fn assemble(&self, digest: &Digest, parts: &[FilePart]) -> Result<bool, CacheError> {
        if self.contains(digest) {
            return self.check_file(digest);
        }
        let started = Instant::now();
        let path = chunk_path(&self.inner.chunks_dir, digest);
        let dir = path.parent().unwrap_or(&self.inner.chunks_dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| CacheError::io(format!("creating {}", dir.display()), e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| CacheError::io(format!("creating a file in {}", dir.display()), e))?;
        let write_error = |e| CacheError::io(format!("writing file {digest}"), e);
        let mut hasher = Hasher::new();
        let zeros = vec![0u8; BLOCK];
        for part in parts {
            match *part {
                FilePart::Chunk {
                    digest: chunk,
                    size,
                } => {
                    let Some(data) = self.read_disk(&chunk)? else {
                        return Ok(false);
                    };
                    if data.len() as u64 != size {
                        return Ok(false);
                    }
                    hasher.update(&data);
                    tmp.write_all(&data).map_err(write_error)?;
                }
                FilePart::Zeros(run) => {
                    let mut left = run;
                    while left > 0 {
                        let n = left.min(BLOCK as u64) as usize;
                        hasher.update(&zeros[..n]);
                        left -= n as u64;
                    }
                    // A hole, not written zeros; `set_len` below covers a hole at the end.
                    let skip = i64::try_from(run).map_err(|_| {
                        write_error(std::io::Error::other("zero run too large for a file"))
                    })?;
                    tmp.seek(SeekFrom::Current(skip)).map_err(write_error)?;
                }
            }
        }
        let size = hasher.len();
        tmp.as_file().set_len(size).map_err(write_error)?;
        let disk = tmp
            .as_file()
            .metadata()
            .map(|m| disk_usage(&m))
            .map_err(write_error)?;
        let got = hasher.finish();
        if got != *digest {
            // Every chunk was right, so the TOC's whole-file digest is not: serve the chunks only.
            tracing::warn!(file = %digest, got = %got, "verified chunks do not hash to the file digest the TOC gives; no passthrough for it");
            return Ok(false);
        }
        tmp.persist(&path)
            .map_err(|e| CacheError::io(format!("storing file {}", path.display()), e.error))?;
        let t = now();
        let over = {
            let mut state = lock(&self.inner.state);
            let info = ChunkInfo {
                size,
                disk,
                last_use: t,
                persisted_use: t,
            };
            if state.chunks.insert(*digest, info).is_none() {
                state.disk_bytes += disk;
            }
            self.inner.config.disk_budget > 0 && state.disk_bytes > self.inner.config.disk_budget
        };
        self.inner.meta.put_chunk(digest, size, t)?;
        lock(&self.inner.checked).insert(*digest);
        tracing::debug!(file = %digest.short(), size, disk, seconds = started.elapsed().as_secs_f64(), "assembled a file for passthrough");
        if over {
            self.evict()?;
        }
        Ok(true)
    }

    /// A stored chunk read from disk and verified, without passing through the memory LRU (a
    /// file being assembled would only push hot chunks out of it).
    fn read_disk(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        if let Some(data) = lock(&self.inner.memory).lru.peek(digest).cloned() {
            return Ok(Some(data.to_vec()));
        }
        if !self.contains(digest) {
            return Ok(None);
        }
        let path = chunk_path(&self.inner.chunks_dir, digest);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest)?;
                return Ok(None);
            }
            Err(e) => return Err(CacheError::io(format!("reading {}", path.display()), e)),
        };
        if Digest::of(&data) != *digest {
            tracing::warn!(chunk = %digest, "cached chunk is damaged on disk; dropping it");
            let _ = std::fs::remove_file(&path);
            self.forget(digest)?;
            return Ok(None);
        }
        Ok(Some(data))
    }
}

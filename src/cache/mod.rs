//! The local chunk cache: verified chunks on disk keyed by their digest (so identical chunks in
//! different layers and images are stored and fetched once), a memory LRU for hot chunks, and
//! metadata in RocksDB (chunk sizes and last use, pins, and a small record store for other
//! modules' state).
//!
//! Owns: what is stored locally and when it may be evicted. Does not own: fetching (`fetch`) or
//! verification of new bytes (callers put only verified chunks; disk reads are re-checked, so a
//! chunk damaged on disk is dropped, never served). Whole files offered to the kernel for FUSE
//! passthrough live in the same store and are checked whole once per process (`files`).
//!
//! Lock order: `state` before `memory`; `checked` is taken alone; none is held across file I/O.

mod files;
mod meta;

pub use files::FilePart;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lru::LruCache;

use crate::oci::Digest;
use meta::Meta;

/// Errors name the chunk or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache metadata in {path}: {message}")]
    Meta { path: PathBuf, message: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

impl CacheError {
    fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        let mut context = context.into();
        if error.raw_os_error() == Some(28) {
            context.push_str(" (the disk is full: free space or lower the cache's disk budget)");
        }
        Self::Io { context, error }
    }
}

/// Where and how big.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Holds `chunks/` and `meta/` (RocksDB).
    pub dir: PathBuf,
    /// Disk budget in bytes for chunk data; 0 means unlimited.
    pub disk_budget: u64,
    /// Memory LRU budget in bytes.
    pub memory_budget: u64,
}

/// What the cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub disk_bytes: u64,
    pub disk_chunks: u64,
    pub memory_bytes: u64,
}

/// Last-use times are persisted at most this often per chunk (seconds): reads stay free of
/// metadata writes, and eviction order survives a restart to within this resolution.
const LAST_USE_PERSIST_SECS: u64 = 60;

#[derive(Debug, Clone, Copy)]
struct ChunkInfo {
    /// Bytes of content (what the metadata records, and a file on disk must have).
    size: u64,
    /// Bytes the file takes on disk, which the budget counts: less than `size` for an assembled
    /// file with holes where its zero runs are (see `files`).
    disk: u64,
    last_use: u64,
    persisted_use: u64,
}

#[derive(Debug, Default)]
struct State {
    chunks: HashMap<Digest, ChunkInfo>,
    /// Pin counts: how many owners protect each chunk.
    pins: HashMap<Digest, u32>,
    disk_bytes: u64,
}

struct Memory {
    lru: LruCache<Digest, Bytes>,
    bytes: u64,
}

struct Inner {
    config: CacheConfig,
    chunks_dir: PathBuf,
    meta: Meta,
    state: Mutex<State>,
    memory: Mutex<Memory>,
    /// Stored blobs this process has hashed whole and may offer for passthrough (`files`).
    checked: Mutex<HashSet<Digest>>,
}

/// The chunk cache. Cheap to clone; safe to share between threads and tasks.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.inner.config.dir)
            .field("usage", &self.usage())
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChunkCache {
    /// Opens (or creates) the cache in `config.dir`, restoring what it held: chunk files without
    /// metadata are adopted, metadata without a file is dropped, leftover temporary files removed.
    pub fn open(config: CacheConfig) -> Result<Self, CacheError> {
        let chunks_dir = config.dir.join("chunks");
        {
            // Root-only (0700, whatever the umask): chunks and assembled files are image content.
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&chunks_dir)
                .and_then(|()| {
                    std::fs::set_permissions(&config.dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| CacheError::io(format!("creating {}", chunks_dir.display()), e))?;
        }
        let meta = Meta::open(&config.dir.join("meta"))?;
        let mut state = State::default();
        for (digest, size, last_use) in meta.chunks()? {
            state.chunks.insert(
                digest,
                ChunkInfo {
                    size,
                    disk: size,
                    last_use,
                    persisted_use: last_use,
                },
            );
        }
        for digest in meta.pinned()? {
            *state.pins.entry(digest).or_default() += 1;
        }
        let on_disk = scan(&chunks_dir)?;
        let mut dropped = Vec::new();
        state.chunks.retain(|d, info| match on_disk.get(d) {
            Some(&(size, disk)) if size == info.size => {
                info.disk = disk;
                true
            }
            _ => {
                dropped.push(*d);
                false
            }
        });
        for d in &dropped {
            meta.delete_chunk(d)?;
            let _ = std::fs::remove_file(chunk_path(&chunks_dir, d));
        }
        let t = now();
        for (d, &(size, disk)) in &on_disk {
            if !state.chunks.contains_key(d) {
                // Adopted without reading it: `get` verifies every disk read anyway.
                meta.put_chunk(d, size, t)?;
                state.chunks.insert(
                    *d,
                    ChunkInfo {
                        size,
                        disk,
                        last_use: t,
                        persisted_use: t,
                    },
                );
            }
        }
        state.disk_bytes = state.chunks.values().map(|c| c.disk).sum();
        let memory = Memory {
            lru: LruCache::unbounded(),
            bytes: 0,
        };
        let cache = Self {
            inner: Arc::new(Inner {
                config,
                chunks_dir,
                meta,
                state: Mutex::new(state),
                memory: Mutex::new(memory),
                checked: Mutex::new(HashSet::new()),
            }),
        };
        cache.evict()?;
        Ok(cache)
    }

    /// The chunk's bytes if held (memory first, then disk, re-verified when read from disk; a
    /// corrupt file is removed and reported as a miss).
    pub fn get(&self, digest: &Digest) -> Result<Option<Bytes>, CacheError> {
        let inner = &self.inner;
        if let Some(data) = lock(&inner.memory).lru.get(digest).cloned() {
            self.touch(digest);
            return Ok(Some(data));
        }
        if !lock(&inner.state).chunks.contains_key(digest) {
            return Ok(None);
        }
        let path = chunk_path(&inner.chunks_dir, digest);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest)?;
                return Ok(None);
            }
            Err(e) => {
                return Err(CacheError::io(
                    format!("reading chunk {}", path.display()),
                    e,
                ))
            }
        };
        let got = Digest::of(&data);
        if got != *digest {
            tracing::warn!(chunk = %digest, got = %got, "cached chunk is damaged on disk; dropping it");
            let _ = std::fs::remove_file(&path);
            self.forget(digest)?;
            return Ok(None);
        }
        let data = Bytes::from(data);
        self.remember(digest, data.clone());
        self.touch(digest);
        Ok(Some(data))
    }

    /// Stores a verified chunk (atomically; a second put of the same digest is a no-op).
    pub fn put(&self, digest: &Digest, data: Bytes) -> Result<(), CacheError> {
        let inner = &self.inner;
        if lock(&inner.state).chunks.contains_key(digest) {
            self.remember(digest, data);
            return Ok(());
        }
        let path = chunk_path(&inner.chunks_dir, digest);
        let dir = path.parent().unwrap_or(&inner.chunks_dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| CacheError::io(format!("creating {}", dir.display()), e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| {
                CacheError::io(format!("creating a chunk file in {}", dir.display()), e)
            })?;
        tmp.write_all(&data)
            .map_err(|e| CacheError::io(format!("writing chunk {digest}"), e))?;
        tmp.persist(&path)
            .map_err(|e| CacheError::io(format!("storing chunk {}", path.display()), e.error))?;
        let t = now();
        let size = data.len() as u64;
        let over = {
            let mut state = lock(&inner.state);
            if state
                .chunks
                .insert(
                    *digest,
                    ChunkInfo {
                        size,
                        disk: size,
                        last_use: t,
                        persisted_use: t,
                    },
                )
                .is_none()
            {
                state.disk_bytes += size;
            }
            inner.config.disk_budget > 0 && state.disk_bytes > inner.config.disk_budget
        };
        inner.meta.put_chunk(digest, size, t)?;
        self.remember(digest, data);
        if over {
            self.evict()?;
        }
        Ok(())
    }

    /// Whether the chunk is held on disk.
    pub fn contains(&self, digest: &Digest) -> bool {
        lock(&self.inner.state).chunks.contains_key(digest)
    }

    /// Protects `chunks` from eviction on behalf of `owner` (e.g. a mounted layer), persistently.
    pub fn pin(&self, owner: &str, chunks: &[Digest]) -> Result<(), CacheError> {
        let fresh = self.inner.meta.pin(owner, chunks)?;
        let mut state = lock(&self.inner.state);
        for d in fresh {
            *state.pins.entry(d).or_default() += 1;
        }
        Ok(())
    }

    /// Drops `owner`'s pins.
    pub fn unpin(&self, owner: &str) -> Result<(), CacheError> {
        let released = self.inner.meta.unpin(owner)?;
        let mut state = lock(&self.inner.state);
        for d in released {
            if let Some(n) = state.pins.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    state.pins.remove(&d);
                }
            }
        }
        Ok(())
    }

    /// Owners that hold pins.
    pub fn pin_owners(&self) -> Result<Vec<String>, CacheError> {
        self.inner.meta.pin_owners()
    }

    pub fn usage(&self) -> CacheUsage {
        let (disk_bytes, disk_chunks) = {
            let state = lock(&self.inner.state);
            (state.disk_bytes, state.chunks.len() as u64)
        };
        CacheUsage {
            disk_bytes,
            disk_chunks,
            memory_bytes: lock(&self.inner.memory).bytes,
        }
    }

    /// Evicts least-recently-used unpinned chunks until the disk budget holds; returns bytes freed.
    pub fn evict(&self) -> Result<u64, CacheError> {
        let inner = &self.inner;
        let budget = inner.config.disk_budget;
        if budget == 0 {
            return Ok(0);
        }
        let victims: Vec<(Digest, u64)> = {
            let state = lock(&inner.state);
            if state.disk_bytes <= budget {
                return Ok(0);
            }
            let mut candidates: Vec<(u64, Digest, u64)> = state
                .chunks
                .iter()
                .filter(|(d, _)| !state.pins.contains_key(*d))
                .map(|(d, c)| (c.last_use, *d, c.disk))
                .collect();
            candidates.sort();
            let mut excess = state.disk_bytes - budget;
            let mut out = Vec::new();
            for (_, d, size) in candidates {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(size);
                out.push((d, size));
            }
            out
        };
        let mut freed = 0;
        for (d, size) in victims {
            let _ = std::fs::remove_file(chunk_path(&inner.chunks_dir, &d));
            self.forget(&d)?;
            freed += size;
        }
        let left = lock(&inner.state).disk_bytes;
        if left > budget {
            tracing::warn!(
                budget,
                used = left,
                "pinned chunks keep the cache over its disk budget"
            );
        }
        Ok(freed)
    }

    /// Stores a small record of another module's state under `namespace`/`key`.
    pub fn put_record(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), CacheError> {
        self.inner.meta.put_record(namespace, key, value)
    }

    pub fn get_record(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.inner.meta.get_record(namespace, key)
    }

    pub fn delete_record(&self, namespace: &str, key: &str) -> Result<(), CacheError> {
        self.inner.meta.delete_record(namespace, key)
    }

    /// Every record of `namespace`, by key.
    pub fn records(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, CacheError> {
        self.inner.meta.records(namespace)
    }

    fn forget(&self, digest: &Digest) -> Result<(), CacheError> {
        {
            let mut state = lock(&self.inner.state);
            if let Some(info) = state.chunks.remove(digest) {
                state.disk_bytes -= info.disk;
            }
        }
        {
            let mut memory = lock(&self.inner.memory);
            if let Some(data) = memory.lru.pop(digest) {
                memory.bytes -= data.len() as u64;
            }
        }
        lock(&self.inner.checked).remove(digest);
        self.inner.meta.delete_chunk(digest)
    }

    /// Keeps `data` in the memory LRU within its byte budget.
    fn remember(&self, digest: &Digest, data: Bytes) {
        let budget = self.inner.config.memory_budget;
        let len = data.len() as u64;
        if len > budget {
            return;
        }
        let mut memory = lock(&self.inner.memory);
        if let Some(old) = memory.lru.put(*digest, data) {
            memory.bytes -= old.len() as u64;
        }
        memory.bytes += len;
        while memory.bytes > budget {
            match memory.lru.pop_lru() {
                Some((_, old)) => memory.bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// Records a use; persists it when the stored time is older than [`LAST_USE_PERSIST_SECS`].
    fn touch(&self, digest: &Digest) {
        let t = now();
        let persist = {
            let mut state = lock(&self.inner.state);
            match state.chunks.get_mut(digest) {
                Some(info) => {
                    info.last_use = t;
                    if t.saturating_sub(info.persisted_use) >= LAST_USE_PERSIST_SECS {
                        info.persisted_use = t;
                        Some(info.size)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        if let Some(size) = persist {
            if let Err(e) = self.inner.meta.put_chunk(digest, size, t) {
                tracing::warn!(chunk = %digest.short(), "cannot record a chunk's last use: {e}");
            }
        }
    }
}

fn chunk_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join(&hex[..2]).join(hex)
}

/// The bytes a file takes on disk: its allocated blocks, but never more than its length (a small
/// file's last block is not counted whole, so a chunk counts exactly its size).
fn disk_usage(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.len().min(meta.blocks().saturating_mul(512))
}

/// The chunk files on disk, their sizes and the bytes they take ([`disk_usage`]); removes
/// leftover temporary files.
fn scan(dir: &Path) -> Result<HashMap<Digest, (u64, u64)>, CacheError> {
    let mut out = HashMap::new();
    let read = |d: &Path| {
        std::fs::read_dir(d).map_err(|e| CacheError::io(format!("reading {}", d.display()), e))
    };
    for sub in read(dir)? {
        let sub = sub
            .map_err(|e| CacheError::io(format!("reading {}", dir.display()), e))?
            .path();
        if !sub.is_dir() {
            continue;
        }
        for entry in read(&sub)? {
            let entry =
                entry.map_err(|e| CacheError::io(format!("reading {}", sub.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let (Ok(digest), Ok(meta)) =
                (format!("sha256:{name}").parse::<Digest>(), entry.metadata())
            {
                out.insert(digest, (meta.len(), disk_usage(&meta)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

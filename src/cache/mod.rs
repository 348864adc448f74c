//! The local chunk cache: verified chunks on disk keyed by their digest (so identical chunks in
//! different layers and images are stored and fetched once), a memory LRU for hot chunks, and
//! metadata in RocksDB (chunk presence and last use, pins, layer records).
//!
//! Owns: what is stored locally and when it may be evicted. Does not own: fetching (`fetch`) or
//! verification of new bytes (callers put only verified chunks; disk reads are re-checked).

use std::path::PathBuf;

use bytes::Bytes;

use crate::oci::Digest;

/// Errors name the chunk or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    Other(String),
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

/// The chunk cache. Cheap to clone; safe to share between threads and tasks.
#[derive(Debug, Clone)]
pub struct ChunkCache {}

impl ChunkCache {
    /// Opens (or creates) the cache in `config.dir`, restoring what it held.
    pub fn open(config: CacheConfig) -> Result<Self, CacheError> {
        let _ = config;
        todo!("cache helper")
    }

    /// The chunk's bytes if held (memory first, then disk, re-verified when read from disk; a
    /// corrupt file is removed and reported as a miss).
    pub fn get(&self, digest: &Digest) -> Result<Option<Bytes>, CacheError> {
        let _ = digest;
        todo!("cache helper")
    }

    /// Stores a verified chunk (atomically; a second put of the same digest is a no-op).
    pub fn put(&self, digest: &Digest, data: Bytes) -> Result<(), CacheError> {
        let _ = (digest, data);
        todo!("cache helper")
    }

    /// Whether the chunk is held on disk.
    pub fn contains(&self, digest: &Digest) -> bool {
        let _ = digest;
        todo!("cache helper")
    }

    /// Protects `chunks` from eviction on behalf of `owner` (e.g. a mounted layer), persistently.
    pub fn pin(&self, owner: &str, chunks: &[Digest]) -> Result<(), CacheError> {
        let _ = (owner, chunks);
        todo!("cache helper")
    }

    /// Drops `owner`'s pins.
    pub fn unpin(&self, owner: &str) -> Result<(), CacheError> {
        let _ = owner;
        todo!("cache helper")
    }

    pub fn usage(&self) -> CacheUsage {
        todo!("cache helper")
    }

    /// Evicts least-recently-used unpinned chunks until the disk budget holds; returns bytes freed.
    pub fn evict(&self) -> Result<u64, CacheError> {
        todo!("cache helper")
    }
}

//! The access log: which chunks reads asked for, each once, in the order of its first read.
//!
//! What `lazysnap profile record` keeps while a container starts. A fetcher made with
//! [`super::FetchConfig::access`] set registers its layer here and notes every chunk a read asks
//! for, whatever serves it (the cache or the registry): a profile must list what start-up reads,
//! not what happened to be missing. Off (`None`), it costs a fetcher one branch per read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;
use crate::format::{Chunk, Toc};
use crate::oci::Digest;
use crate::profile::{Access, MAX_ACCESSES, MAX_NAME};

/// An image's access log, shared by the fetchers of its layers (cheap to clone).
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<LogInner>,
}

struct LogInner {
    start: Instant,
    /// When the last chunk was read for the first time (or [`AccessLog::touch`] was called).
    last_new: Mutex<Instant>,
    layers: Mutex<Vec<Arc<LayerLog>>>,
    /// Accesses kept over all layers; past [`MAX_ACCESSES`] more are counted, not kept.
    kept: AtomicUsize,
    dropped: AtomicU64,
}

/// One layer's part of the log: its chunks' names from the TOC, and what was read.
pub(super) struct LayerLog {
    log: Arc<LogInner>,
    blob: Digest,
    /// Chunk digest → (entry name, offset in the file), of the first entry holding it.
    names: HashMap<Digest, (Arc<str>, u64)>,
    read: Mutex<LayerReads>,
}

#[derive(Default)]
struct LayerReads {
    seen: HashSet<Digest>,
    accesses: Vec<Access>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("kept", &self.inner.kept.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessLog {
    /// A log whose times count from now.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            inner: Arc::new(LogInner {
                start: now,
                last_new: Mutex::new(now),
                layers: Mutex::new(Vec::new()),
                kept: AtomicUsize::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Restarts the quiet period, as if a new chunk had just been read (when the container
    /// starts: mounting and creating it read little, and that is not quiet).
    pub fn touch(&self) {
        *lock(&self.inner.last_new) = Instant::now();
    }

    /// How long no chunk has been read for the first time.
    pub fn quiet_for(&self) -> Duration {
        lock(&self.inner.last_new).elapsed()
    }

    /// Time since the log began.
    pub fn elapsed(&self) -> Duration {
        self.inner.start.elapsed()
    }

    /// Accesses past [`MAX_ACCESSES`], counted but not kept.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// The accesses of each layer that was read from, by blob digest, in first-read order.
    pub fn layers(&self) -> Vec<(Digest, Vec<Access>)> {
        lock(&self.inner.layers)
            .iter()
            .map(|l| (l.blob, lock(&l.read).accesses.clone()))
            .filter(|(_, a)| !a.is_empty())
            .collect()
    }

    /// Registers layer `blob` (its chunks named from `toc`); the same blob twice shares one part.
    pub(super) fn layer(&self, blob: Digest, toc: &Toc) -> Arc<LayerLog> {
        let mut layers = lock(&self.inner.layers);
        if let Some(existing) = layers.iter().find(|l| l.blob == blob) {
            return existing.clone();
        }
        let mut names = HashMap::new();
        for entry in &toc.entries {
            // A name past the profile's bound could not be stored; its chunks go unrecorded.
            if entry.name.len() > MAX_NAME || entry.chunks.is_empty() {
                continue;
            }
            let name: Arc<str> = Arc::from(entry.name.as_str());
            for c in entry.chunks.iter().filter(|c| !c.zeros) {
                names
                    .entry(c.digest)
                    .or_insert_with(|| (name.clone(), c.file_offset));
            }
        }
        let layer = Arc::new(LayerLog {
            log: self.inner.clone(),
            blob,
            names,
            read: Mutex::new(LayerReads::default()),
        });
        layers.push(layer.clone());
        layer
    }
}

impl LayerLog {
    /// Notes a read of `chunk`: kept if it is the chunk's first.
    pub(super) fn note(&self, chunk: &Chunk) {
        let Some((name, offset)) = self.names.get(&chunk.digest) else {
            return;
        };
        let mut read = lock(&self.read);
        if !read.seen.insert(chunk.digest) {
            return;
        }
        if self.log.kept.fetch_add(1, Ordering::Relaxed) >= MAX_ACCESSES {
            self.log.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let at_ms = u64::try_from(self.log.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        read.accesses.push(Access {
            name: name.to_string(),
            offset: *offset,
            chunk: chunk.digest,
            at_ms,
        });
        drop(read);
        *lock(&self.log.last_new) = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{EntryKind, LayerFormat, TocEntry};

    fn chunk(data: &[u8], file_offset: u64) -> Chunk {
        Chunk {
            file_offset,
            size: data.len() as u64,
            compressed_start: 0,
            compressed_end: 1,
            inner_offset: 0,
            digest: Digest::of(data),
            zeros: false,
        }
    }

    fn entry(name: &str, chunks: Vec<Chunk>) -> TocEntry {
        TocEntry {
            chunks,
            ..TocEntry::new(name, EntryKind::Reg)
        }
    }

    #[test]
    fn each_chunk_is_kept_once_in_first_read_order_with_its_file() {
        let (a0, a1, b0) = (chunk(b"a0", 0), chunk(b"a1", 4096), chunk(b"b0", 0));
        let toc = Toc {
            format: LayerFormat::ZstdChunked,
            entries: vec![
                entry("usr/bin/a", vec![a0.clone(), a1.clone()]),
                entry("etc/b", vec![b0.clone()]),
            ],
            prefetch: Vec::new(),
        };
        let log = AccessLog::new();
        let blob = Digest::of(b"blob");
        let layer = log.layer(blob, &toc);
        assert!(Arc::ptr_eq(&layer, &log.layer(blob, &toc)));
        assert!(log.layers().is_empty(), "a layer nobody read is left out");
        for c in [&b0, &a1, &b0, &a0, &a1] {
            layer.note(c);
        }
        layer.note(&chunk(b"not in the toc", 0));
        let layers = log.layers();
        assert_eq!(layers.len(), 1);
        let (digest, accesses) = &layers[0];
        assert_eq!(*digest, blob);
        let seen: Vec<(&str, u64, Digest)> = accesses
            .iter()
            .map(|a| (a.name.as_str(), a.offset, a.chunk))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("etc/b", 0, b0.digest),
                ("usr/bin/a", 4096, a1.digest),
                ("usr/bin/a", 0, a0.digest)
            ]
        );
        assert!(accesses.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(log.quiet_for() < Duration::from_secs(5));
    }
}

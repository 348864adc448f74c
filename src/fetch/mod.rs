//! Turning chunk misses into few, large range requests, and completing layers in the background.
//!
//! Owns: the path from "the file system needs chunk X" to verified bytes in the cache. A miss asks
//! the registry for one range covering the chunk and its uncached neighbours (up to
//! [`FetchConfig::max_request`]); concurrent readers of a chunk share one request; every chunk is
//! verified against its TOC digest by [`format::decode_chunk`] before it is cached or served. The
//! prefetch list is fetched in one batch, then the rest of the layer streams in the background as
//! one whole-blob read that is checked against the manifest digest at its end (and, if asked,
//! decompressed and hashed on the side: the layer's `diff_id`, see `uncompressed`; the stream
//! and its retries are `complete`, the TOC's read `toc`).
//! Does not own: the wire protocol (`registry`), storage (`cache`), or the file system (`fs`).

mod access;
mod accounts;
mod complete;
mod directory;
mod loader;
mod local;
mod plan;
mod profile;
mod request;
mod schedule;
mod stall;
mod toc;
mod turns;
mod uncompressed;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::cache::ChunkCache;
use crate::format::{self, Chunk, LayerFormat, Toc, TocEntry};
use crate::fs::{ChunkError, ChunkSource};
use crate::metrics::METRICS;
use crate::oci::{Digest, Reference};
use crate::registry::Client;

pub use access::AccessLog;
pub use accounts::ACCOUNT_FILES;
pub use loader::LoaderPrefetch;
pub use plan::{plan_ranges, Span};
pub use profile::{plan_profile, ProfilePrefetch};
use request::EarlyChunk;
pub use schedule::{
    DemandGuard, DemandRequest, ProfileGuard, ScheduleConfig, Scheduler, StreamSlot,
};
pub use toc::{read_toc, read_toc_at};

/// How long the chunks of a failed range request keep answering with its error. The kernel
/// retries a failed read at once (readahead, then a synchronous read of the page, within a
/// millisecond or so); that retry must get the first request's error, not ask the registry again
/// and double the reader's wait. Short, so that a registry back a moment later is used at once.
const FAILED_GRACE: Duration = Duration::from_millis(50);
/// [`FAILED_GRACE`] for a request abandoned at its deadline, wider because a retry that misses it
/// waits a whole second timeout.
const ABANDONED_GRACE: Duration = Duration::from_millis(250);

/// Fetch tuning.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Largest single range request built by coalescing neighbouring misses.
    pub max_request: u64,
    /// Largest gap of already-held or non-chunk bytes (tar headers) a coalesced request spans.
    pub max_gap: u64,
    /// How far a miss reads ahead into *other* files (small neighbours, likely read next); the
    /// rest of the missed file itself may come along up to `max_request`.
    pub max_neighbours: u64,
    /// How long one range request may take from its start before it is abandoned (the HTTP
    /// request dropped) and every reader waiting for it gets an error; also how long a background
    /// stream may go without a byte. Set to the read timeout, so that a read the kernel retries
    /// after a timeout joins the first request and fails at its deadline, instead of waiting a
    /// second timeout; a read after the deadline starts a new request.
    pub deadline: Duration,
    /// The node's link policy, shared by every fetcher made with (a clone of) this config.
    pub scheduler: Scheduler,
    /// Where to note every chunk read (`lazysnap profile record`); none otherwise.
    pub access: Option<AccessLog>,
    /// When reads miss two files of one directory, fetch the rest of its small files at once
    /// (see `fetch::directory`).
    pub directory_read_ahead: bool,
    /// Whether mounts give their fetchers a [`LoaderPrefetch`] (see [`Self::loader`]).
    pub loader_prefetch: bool,
    /// Fetch a layer's `/etc/passwd` and `/etc/group` when it is found (see `fetch::accounts`).
    pub account_files: bool,
    /// The image's loader prefetch, placed at this layer ([`LoaderPrefetch::at`]): the
    /// libraries a program links are fetched as soon as a read reaches its head. None: off.
    pub loader: Option<LoaderPrefetch>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_request: 4 << 20,
            max_gap: 64 << 10,
            max_neighbours: 256 << 10,
            deadline: Duration::from_secs(30),
            scheduler: Scheduler::default(),
            access: None,
            directory_read_ahead: true,
            loader_prefetch: true,
            account_files: true,
            loader: None,
        }
    }
}

/// Why a layer could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },
}

/// Counters of what one layer fetched.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Bytes received from the registry for on-demand reads, prefetch and background completion.
    pub on_demand_bytes: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    pub background_bytes: AtomicU64,
    /// Registry requests of every kind, and of the two kinds that are range reads.
    pub requests: AtomicU64,
    pub on_demand_requests: AtomicU64,
    pub prefetch_requests: AtomicU64,
    /// Bytes and range requests of start-up profile prefetch ([`LayerFetcher::prefetch_profile`]).
    pub profile_bytes: AtomicU64,
    pub profile_requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub verify_failures: AtomicU64,
    /// Background completions that failed and were tried again.
    pub background_retries: AtomicU64,
}

impl FetchStats {
    /// All bytes received from the registry.
    pub fn bytes(&self) -> u64 {
        self.on_demand_bytes.load(Ordering::Relaxed)
            + self.prefetch_bytes.load(Ordering::Relaxed)
            + self.profile_bytes.load(Ordering::Relaxed)
            + self.background_bytes.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OnDemand,
    Prefetch,
    /// A start-up profile's chunks (see `profile`).
    Profile,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Prefetch => "prefetch",
            Self::Profile => "profile",
        }
    }
}

type RangeResult = Result<Arc<HashMap<Digest, Bytes>>, ChunkError>;
type SharedRange = Shared<BoxFuture<'static, RangeResult>>;

/// A range request in flight (or failed within [`FAILED_GRACE`]), as its chunks' readers see it.
#[derive(Clone)]
struct Inflight {
    /// Which request this is: only its own task removes its entries.
    id: u64,
    /// The whole request: every chunk it verified, or why it failed.
    range: SharedRange,
    /// This chunk alone, as soon as its bytes are in and verified (see [`request`]).
    early: EarlyChunk,
}

/// Serves one layer's chunks from the cache, or from its registry blob.
#[derive(Clone)]
pub struct LayerFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    reference: Reference,
    blob: Digest,
    blob_size: u64,
    format: LayerFormat,
    cache: ChunkCache,
    config: FetchConfig,
    /// The layer's distinct chunks in blob order: what coalescing may add to a request.
    chunks: Vec<Chunk>,
    /// Chunks being fetched, by digest: a second reader joins the first one's request.
    inflight: Mutex<HashMap<Digest, Inflight>>,
    next_request: AtomicU64,
    /// The range requests running now, by id: a reader is answered as soon as its chunk is in,
    /// so a request may still be reading its read-ahead when the layer is unmounted
    /// ([`LayerFetcher::abort_requests`]).
    requests: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    stats: FetchStats,
    /// Where passthrough files are prepared; none outside a runtime (no passthrough then).
    runtime: Option<tokio::runtime::Handle>,
    /// Whole files being prepared for passthrough, by content digest.
    preparing: Mutex<HashSet<Digest>>,
    /// Whole files that could not be made from their chunks; not tried again.
    refused: Mutex<HashSet<Digest>>,
    prepare_slots: tokio::sync::Semaphore,
    /// Frames (by blob offset) that reads asked for: what an ideal fetcher must transfer.
    needed: Mutex<NeededFrames>,
    /// Set by [`LayerFetcher::hash_uncompressed`]: [`LayerFetcher::complete`] also hashes the
    /// decompressed stream (the layer's `diff_id`).
    hash_uncompressed: AtomicBool,
    /// The most the layer may decompress to, from its TOC (a bomb stops there).
    uncompressed_bound: u64,
    /// What the last successful `complete` found: the uncompressed digest, or why there is none.
    uncompressed: Mutex<Option<Result<Digest, String>>>,
    /// This layer's part of [`FetchConfig::access`], when recording.
    access: Option<Arc<access::LayerLog>>,
    /// This layer's part of [`FetchConfig::loader`].
    loader: Option<loader::LoaderLayer>,
    /// With [`FetchConfig::directory_read_ahead`]: the layer's directories of small files.
    directories: Option<directory::Directories>,
}

/// The distinct compressed frames reads needed, and their total size.
#[derive(Debug, Default)]
struct NeededFrames {
    starts: HashSet<u64>,
    bytes: u64,
}

impl std::fmt::Debug for LayerFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFetcher")
            .field("blob", &self.inner.blob)
            .field("format", &self.inner.format)
            .finish()
    }
}

impl LayerFetcher {
    /// A fetcher for the blob `blob` (of `blob_size` bytes) of `reference`'s repository.
    pub fn new(
        client: Client,
        reference: Reference,
        blob: Digest,
        blob_size: u64,
        toc: &Arc<Toc>,
        cache: ChunkCache,
        config: FetchConfig,
    ) -> Self {
        let mut chunks: Vec<Chunk> = toc
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().cloned())
            .filter(|c| !c.zeros)
            .collect();
        chunks.sort_by_key(|c| (c.compressed_start, c.inner_offset));
        chunks.dedup_by_key(|c| (c.compressed_start, c.inner_offset));
        METRICS
            .layer_size_bytes
            .with_label_values(&[&blob.short()])
            .set(blob_size as i64);
        // A layer is mounted to be read: its container's start-up goes before any stream.
        config.scheduler.touch();
        let access = config.access.as_ref().map(|log| log.layer(blob, toc));
        Self {
            inner: Arc::new_cyclic(|me| Inner {
                loader: config
                    .loader
                    .as_ref()
                    .map(|l| l.layer(blob, toc, me.clone())),
                directories: config
                    .directory_read_ahead
                    .then(|| directory::Directories::new(toc, &chunks)),
                client,
                reference,
                blob,
                blob_size,
                format: toc.format,
                cache,
                config,
                chunks,
                inflight: Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(0),
                requests: Mutex::new(HashMap::new()),
                stats: FetchStats::default(),
                runtime: tokio::runtime::Handle::try_current().ok(),
                preparing: Mutex::new(HashSet::new()),
                refused: Mutex::new(HashSet::new()),
                prepare_slots: tokio::sync::Semaphore::new(1),
                needed: Mutex::default(),
                hash_uncompressed: AtomicBool::new(false),
                uncompressed_bound: uncompressed::bound(toc.entries.iter().map(|e| e.size)),
                uncompressed: Mutex::new(None),
                access,
            }),
        }
    }

    pub fn stats(&self) -> &FetchStats {
        &self.inner.stats
    }

    /// Compressed bytes of the distinct frames that reads asked for, whether they came from the
    /// cache or the registry: the least any fetcher could have transferred for those reads
    /// (the benchmark's oracle).
    pub fn needed_bytes(&self) -> u64 {
        lock(&self.inner.needed).bytes
    }

    /// The layer's blob digest.
    pub fn blob(&self) -> Digest {
        self.inner.blob
    }

    /// The digests of every chunk of the layer (what pinning a complete layer protects).
    pub fn chunk_digests(&self) -> Vec<Digest> {
        self.inner.chunks.iter().map(|c| c.digest).collect()
    }

    /// From now on [`Self::complete`] also decompresses the blob as it streams and hashes the
    /// result (off the async workers); [`Self::uncompressed_digest`] gives it afterwards.
    pub fn hash_uncompressed(&self) {
        self.inner.hash_uncompressed.store(true, Ordering::Relaxed);
    }

    /// The layer's uncompressed digest (its `diff_id`) from the last `complete` that verified
    /// the whole blob, or why the verified blob has none (it does not decompress, or
    /// decompresses past what its TOC declares); `None` before that or without
    /// [`Self::hash_uncompressed`].
    pub fn uncompressed_digest(&self) -> Option<Result<Digest, String>> {
        lock(&self.inner.uncompressed).clone()
    }

    /// Whether every chunk of the layer is in the cache.
    pub fn is_complete(&self) -> bool {
        self.inner
            .chunks
            .iter()
            .all(|c| self.inner.cache.contains(&c.digest))
    }

    /// Fetches the chunks of the TOC entries named in `names` (the start-up set), in as few
    /// requests as coalescing allows; chunks cached or already on their way are not asked again.
    pub async fn prefetch(&self, toc: &Toc, names: &[impl AsRef<str>]) -> Result<(), ChunkError> {
        let wanted: HashSet<&str> = names.iter().map(AsRef::as_ref).collect();
        let entries = toc.entries.iter();
        self.prefetch_entries(entries.filter(|e| wanted.contains(e.name.as_str())))
            .await
    }

    /// [`Self::prefetch`] of the chunks of `entries`.
    async fn prefetch_entries<'a>(
        &self,
        entries: impl Iterator<Item = &'a TocEntry>,
    ) -> Result<(), ChunkError> {
        let inner = &self.inner;
        let mut chunks: Vec<Chunk> = entries
            .flat_map(|e| e.chunks.iter().cloned())
            .filter(|c| !c.zeros)
            .collect();
        chunks.sort_by_key(|c| (c.compressed_start, c.inner_offset));
        chunks.dedup_by_key(|c| (c.compressed_start, c.inner_offset));
        let fetches: Vec<SharedRange> = {
            let mut inflight = lock(&inner.inflight);
            chunks.retain(|c| !inner.held(&inflight, &c.digest));
            plan_ranges(
                &chunks,
                inner.config.max_request.max(16 << 20),
                inner.config.max_gap,
            )
            .into_iter()
            .map(|span| self.start_range_locked(&mut inflight, span, Kind::Prefetch))
            .collect()
        };
        for f in fetches {
            f.await?;
        }
        Ok(())
    }

    /// Stops every range request still running (their readers get an error; what they verified
    /// is cached), for an unmount, and returns their handles: a request is gone, and its hold on
    /// the cache with it, once its handle `is_finished`.
    pub fn abort_requests(&self) -> Vec<tokio::task::AbortHandle> {
        let requests: Vec<_> = lock(&self.inner.requests).drain().map(|(_, h)| h).collect();
        for request in &requests {
            request.abort();
        }
        requests
    }

    /// A read asked for `chunk`: the loader prefetch looks at it, unless a profile is being
    /// prefetched (see [`Scheduler::profiling`]).
    fn note_for_loader(&self, chunk: &Chunk) {
        if let Some(loader) = &self.inner.loader {
            if !self.inner.config.scheduler.profiling() {
                loader.note(chunk);
            }
        }
    }

    /// A read missed `chunk` (its request just planned): start its directory's read-ahead if
    /// that makes two missed files there (see [`directory`]), unless a profile is being
    /// prefetched.
    fn read_ahead_directory(&self, inflight: &mut HashMap<Digest, Inflight>, chunk: &Chunk) {
        let inner = &self.inner;
        let Some(directories) = &inner.directories else {
            return;
        };
        if inner.config.scheduler.profiling() {
            return;
        }
        let wanted: Vec<Chunk> = directories
            .missed(chunk, &inner.chunks)
            .into_iter()
            .map(|i| inner.chunks[i as usize].clone())
            .filter(|c| !inner.held(inflight, &c.digest))
            .collect();
        for span in plan_ranges(&wanted, inner.config.max_request, inner.config.max_gap) {
            // Readers of these chunks join the request through the in-flight map.
            drop(self.start_range_locked(inflight, span, Kind::Prefetch));
        }
    }

    /// Starts the fetch of one planned range and registers its chunks as in flight, with the
    /// in-flight map already locked, so that planning and registering are one step and two
    /// readers never plan the same chunk.
    fn start_range_locked(
        &self,
        inflight: &mut HashMap<Digest, Inflight>,
        span: Span,
        kind: Kind,
    ) -> SharedRange {
        let inner = self.inner.clone();
        let digests: Vec<Digest> = span.chunks.iter().map(|c| c.digest).collect();
        let (senders, early) = request::early_chunks(span.chunks.len());
        let id = inner.next_request.fetch_add(1, Ordering::Relaxed);
        let limit = inner.config.deadline;
        let deadline = tokio::time::Instant::now() + limit;
        // Profile prefetch starts nothing new while an on-demand request is on the wire.
        let on_wire =
            (kind == Kind::OnDemand).then(|| inner.config.scheduler.begin_demand_request());
        // The task removes its chunks from the map when done; it cannot do so before they are
        // inserted below, because the caller holds the map's lock until then.
        let task = async move {
            // Dropping the request at the deadline closes its connection: a stalled registry
            // holds no reader, and no socket, past it.
            let fetched = request::fetch_span(&inner, &span, kind, senders);
            let result = tokio::time::timeout_at(deadline, fetched).await;
            drop(on_wire);
            lock(&inner.requests).remove(&id);
            let (result, grace) = match result {
                Ok(Ok(map)) => {
                    forget(&inner, &span.chunks, id);
                    return Ok(map);
                }
                Ok(Err(e)) => (Err(e), FAILED_GRACE),
                Err(_) => {
                    let layer = inner.blob.short();
                    tracing::warn!(%layer, start = span.start, end = span.end, "range request abandoned: no complete answer within {limit:?}");
                    let e = ChunkError(format!(
                        "layer {layer}: range {}-{}: no complete answer from the registry within {limit:?}",
                        span.start, span.end
                    ));
                    (Err(e), ABANDONED_GRACE)
                }
            };
            // Readers arriving just after the failure (the kernel's retry of the read that
            // failed) get this error rather than ask again and wait a second time.
            let forget_later = inner.clone();
            let chunks = span.chunks.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                forget(&forget_later, &chunks, id);
            });
            result
        };
        // Registered under the lock the task takes to unregister itself: never in that order.
        let handle = {
            let mut requests = lock(&self.inner.requests);
            let handle = tokio::spawn(task);
            requests.insert(id, handle.abort_handle());
            handle
        };
        let shared = async move {
            handle
                .await
                .map_err(|e| ChunkError(format!("fetch task failed: {e}")))?
        }
        .boxed()
        .shared();
        for (d, early) in digests.into_iter().zip(early) {
            inflight.insert(
                d,
                Inflight {
                    id,
                    range: shared.clone(),
                    early,
                },
            );
        }
        shared
    }
}

/// Removes request `id`'s entries for `chunks` from the in-flight map (not a later request's).
fn forget(inner: &Inner, chunks: &[Chunk], id: u64) {
    let mut inflight = lock(&inner.inflight);
    for c in chunks {
        if inflight.get(&c.digest).is_some_and(|f| f.id == id) {
            inflight.remove(&c.digest);
        }
    }
}

impl Inner {
    /// Whether `digest` is cached or already on its way (in `inflight`): no request needs it.
    fn held(&self, inflight: &HashMap<Digest, Inflight>, digest: &Digest) -> bool {
        inflight.contains_key(digest) || self.cache.contains(digest)
    }

    /// Adds `n` fetched bytes of `kind` to the counters and the layer's gauge.
    fn record(&self, kind: &str, n: u64) {
        METRICS.fetch_bytes.with_label_values(&[kind]).inc_by(n);
        METRICS
            .layer_fetched_bytes
            .with_label_values(&[&self.blob.short()])
            .add(n as i64);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChunkSource for LayerFetcher {
    fn local_file(&self, entry: &TocEntry) -> Option<std::fs::File> {
        self.local_file_of(entry)
    }

    fn read_chunk(&self, chunk: &Chunk) -> BoxFuture<'static, Result<Bytes, ChunkError>> {
        let this = self.clone();
        let chunk = chunk.clone();
        async move {
            let inner = &this.inner;
            // The file system writes zero runs itself (a run may be terabytes); a caller that
            // asks anyway gets them only up to the chunk ceiling, never the run's stated size.
            if chunk.zeros {
                if chunk.size > format::MAX_CHUNK_CEILING {
                    return Err(ChunkError(format!(
                        "layer {}: a zero run of {} bytes is not materialised",
                        inner.blob.short(),
                        chunk.size
                    )));
                }
                return Ok(Bytes::from(vec![0u8; chunk.size as usize]));
            }
            if let Some(log) = &inner.access {
                log.note(&chunk);
            }
            {
                let mut needed = lock(&inner.needed);
                if needed.starts.insert(chunk.compressed_start) {
                    needed.bytes += chunk.compressed_end - chunk.compressed_start;
                }
            }
            match inner.cache.get(&chunk.digest) {
                Ok(Some(data)) => {
                    inner.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    METRICS.cache_hits.inc();
                    this.note_for_loader(&chunk);
                    return Ok(data);
                }
                Ok(None) => METRICS.cache_misses.inc(),
                Err(e) => tracing::warn!(chunk = %chunk.digest.short(), "cache read failed, fetching: {e}"),
            }
            let _demand = inner.config.scheduler.begin_demand();
            let (range, early) = {
                let mut inflight = lock(&inner.inflight);
                match inflight.get(&chunk.digest) {
                    Some(f) => (f.range.clone(), f.early.clone()),
                    None => {
                        let held = |d: &Digest| inner.held(&inflight, d);
                        let span = plan::span_around(&inner.chunks, &chunk, &inner.config, held);
                        let range = this.start_range_locked(&mut inflight, span, Kind::OnDemand);
                        this.read_ahead_directory(&mut inflight, &chunk);
                        // The span starts with this chunk, so it was just registered.
                        let Some(early) = inflight.get(&chunk.digest).map(|f| f.early.clone())
                        else {
                            return Err(ChunkError(format!(
                                "layer {}: chunk {} was planned but is not in flight",
                                inner.blob.short(),
                                chunk.digest
                            )));
                        };
                        (range, early)
                    }
                }
            };
            // Noted once the read's own request is planned, so that the loader prefetch joins it.
            this.note_for_loader(&chunk);
            // The chunk as soon as its own bytes are in, not when the read-ahead riding along
            // with it is; else (it failed, or the request did) the request's verdict below.
            if let Some(data) = early.await {
                return Ok(data);
            }
            let map = range.await?;
            match map.get(&chunk.digest) {
                Some(data) => Ok(data.clone()),
                // A joined request may have been planned without this chunk's verified bytes
                // (it failed verification): report that chunk's failure precisely.
                None => Err(ChunkError(format!(
                    "layer {}: chunk {} (at {} in the blob) failed verification",
                    inner.blob.short(),
                    chunk.digest,
                    chunk.compressed_start
                ))),
            }
        }
        .boxed()
    }
}

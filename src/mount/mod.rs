//! Mounting a whole image: resolve it, mount each layer (lazy layers as FUSE file systems over
//! their TOC, plain layers fetched, verified and unpacked once), and compose them with overlayfs.
//!
//! Owns: the order of those steps, where their state lives under the root directory, finding the
//! image's start-up profile (`profile`), and tearing everything down in reverse. Does not own: how
//! a layer is served (`fs`, `fetch`, `cache`).

mod profile;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{try_join_all, BoxFuture, Shared};
use futures_util::FutureExt;
use serde::Serialize;
use serde_json::Value;

use crate::cache::{CacheConfig, ChunkCache};
use crate::fetch::{FetchConfig, LayerFetcher, LoaderPrefetch};
use crate::format::{self, Toc};
use crate::fs::{self, LayerMount, LayerSession, MountOptions, OverlayMount};
use crate::oci::{self, Digest, ImageDocument, Platform, Reference};
use crate::registry::{Client, ClientConfig};

pub use profile::{from_file as profile_from_file, ProfileLookups, ProfileSource, SharedProfile};

/// Why an image could not be mounted. Messages name the image or layer.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Image(String),
    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

fn layer_error(layer: &Digest, e: impl std::fmt::Display) -> MountError {
    MountError::Layer {
        layer: layer.short(),
        message: e.to_string(),
    }
}

/// Everything `mount` can be told.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Holds all state: `cache/`, `layers/` (unpacked plain layers), `run/` (mount points).
    pub root: PathBuf,
    /// After the prefetch set, fetch the rest of each lazy layer at low priority.
    pub background_fetch: bool,
    pub platform: Platform,
    pub registry: ClientConfig,
    pub disk_budget: u64,
    pub memory_budget: u64,
    pub fetch: FetchConfig,
    pub fs: MountOptions,
    /// Bounds on what a layer's TOC may state.
    pub limits: format::Limits,
    /// Mount the overlay `nosuid`: a setuid file or file capability in the image grants nothing
    /// to whoever runs it through the mount point. On for a user-chosen mount point (`lazysnap
    /// mount` unless `--allow-suid`); off for a container's root, which runc needs as it is.
    pub nosuid: bool,
    /// Mount the overlay `nodev`: a device node in the image cannot be opened through it.
    pub nodev: bool,
    /// Where the image's start-up profile comes from; its chunks are fetched ahead of the
    /// container's reads, before the TOC's prefetch set and background completion.
    pub profile: ProfileSource,
    /// Registry lookups of profiles, remembered per manifest digest (clones share them).
    pub profiles: ProfileLookups,
}

impl MountConfig {
    /// Defaults: state under `root`, background fetch on, no disk budget, 16 MiB memory cache.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            background_fetch: true,
            platform: Platform::host(),
            registry: ClientConfig::default(),
            disk_budget: 0,
            memory_budget: 16 << 20,
            fetch: FetchConfig::default(),
            fs: MountOptions::default(),
            limits: format::Limits::default(),
            nosuid: true,
            nodev: true,
            profile: ProfileSource::default(),
            profiles: ProfileLookups::default(),
        }
    }

    /// The overlay's mount flags from [`Self::nosuid`] and [`Self::nodev`].
    fn overlay_flags(&self) -> nix::mount::MsFlags {
        let mut flags = nix::mount::MsFlags::empty();
        flags.set(nix::mount::MsFlags::MS_NOSUID, self.nosuid);
        flags.set(nix::mount::MsFlags::MS_NODEV, self.nodev);
        flags
    }
}

/// Creates `path` (and missing parents) with mode 0700 and sets `path` itself to 0700 whatever
/// it was and whatever the umask, as containerd does for its snapshotter roots.
///
/// Everything under a state root (unpacked layers with their setuid files and device nodes,
/// FUSE layer mounts, which carry `dev,suid` because a root file system needs them, container
/// roots, the chunk cache) is image content: only root may reach it, and this is the one
/// boundary that keeps a host user from executing or opening it.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// How one layer was mounted.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub digest: Digest,
    pub size: u64,
    /// `zstd:chunked`, `estargz`, or `unpacked` for a plain layer.
    pub mode: &'static str,
    pub entries: Option<usize>,
    pub seconds: f64,
}

enum Layer {
    Lazy {
        _mount: LayerMount,
        fetcher: LayerFetcher,
    },
    Unpacked,
}

/// A mounted image. Dropping it unmounts the overlay, then every layer.
pub struct ImageMount {
    // Field order is drop order: the overlay goes before the layers under it.
    overlay: Option<OverlayMount>,
    layers: Vec<Layer>,
    background: Vec<tokio::task::JoinHandle<()>>,
    run_dir: Option<tempfile::TempDir>,
    cache: Option<ChunkCache>,
    pub manifest_digest: Digest,
    pub config: Value,
    pub layer_info: Vec<LayerInfo>,
    pub seconds: f64,
}

impl std::fmt::Debug for ImageMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageMount")
            .field("manifest_digest", &self.manifest_digest)
            .field("layers", &self.layer_info)
            .finish()
    }
}

impl ImageMount {
    /// Bytes fetched from the registry so far by the lazy layers.
    pub fn fetched_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Lazy { fetcher, .. } => fetcher.stats().bytes(),
                Layer::Unpacked => 0,
            })
            .sum()
    }

    /// Compressed bytes of the frames that reads needed (see [`LayerFetcher::needed_bytes`]).
    pub fn needed_bytes(&self) -> u64 {
        self.fetchers().map(LayerFetcher::needed_bytes).sum()
    }

    /// What the chunk cache holds now.
    pub fn cache_usage(&self) -> Option<crate::cache::CacheUsage> {
        self.cache.as_ref().map(ChunkCache::usage)
    }

    /// The lazy layers' fetchers (for their counters).
    pub fn fetchers(&self) -> impl Iterator<Item = &LayerFetcher> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Lazy { fetcher, .. } => Some(fetcher),
            Layer::Unpacked => None,
        })
    }

    /// Stops the background fetches and the range requests still reading read-ahead, and waits
    /// (up to [`STOP_WAIT`]) until they are gone: a task is dropped by the runtime only after its
    /// abort, and until then it holds the cache, which a mount of the same root in this process
    /// could not open again.
    fn stop_fetching(&mut self) {
        let mut stopped: Vec<tokio::task::AbortHandle> = Vec::new();
        for task in self.background.drain(..) {
            task.abort();
            stopped.push(task.abort_handle());
        }
        for fetcher in self.fetchers() {
            stopped.extend(fetcher.abort_requests());
        }
        let deadline = Instant::now() + STOP_WAIT;
        while stopped.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Unmounts the overlay and every layer, and removes the mount points. Every step is tried
    /// even if an earlier one failed; the first failure is reported.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.stop_fetching();
        let mut first = None;
        if let Some(overlay) = self.overlay.take() {
            if let Err(e) = overlay.unmount() {
                first.get_or_insert(MountError::Image(format!("unmounting the overlay: {e}")));
            }
        }
        self.layers.clear();
        if let (Some(dir), Some(cache)) = (&self.run_dir, &self.cache) {
            release_pins(cache, dir.path());
        }
        if let Some(dir) = self.run_dir.take() {
            if let Err(e) = dir.close() {
                first.get_or_insert(MountError::Io {
                    context: "removing the mount points".into(),
                    error: e,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        self.stop_fetching();
    }
}

/// Mounts the image `reference` read-only at `target`.
pub async fn mount_image(
    reference: &Reference,
    target: &Path,
    config: &MountConfig,
) -> Result<ImageMount, MountError> {
    mount_image_with_upper(reference, target, config, None).await
}

/// Mounts the image `reference` at `target`, writable through `upper` when one is given (a
/// container's root): writes land in the upper directory, the layers stay read-only.
pub async fn mount_image_with_upper(
    reference: &Reference,
    target: &Path,
    config: &MountConfig,
    upper: Option<&fs::UpperDir>,
) -> Result<ImageMount, MountError> {
    let start = Instant::now();
    private_dir(&config.root).map_err(|e| MountError::Io {
        context: format!("creating {} (mode 0700)", config.root.display()),
        error: e,
    })?;
    let client =
        Client::new(config.registry.clone()).map_err(|e| MountError::Image(e.to_string()))?;
    // Connections for the TOC reads and the profile lookup that follow the manifest side by
    // side, opened while it is fetched.
    client.preconnect(reference, PRECONNECT);
    let (manifest_digest, manifest) =
        resolve_manifest(&client, reference, &config.platform).await?;
    // Fetched while the layers' TOCs are read: lazy layers do not need it, only plain layers
    // (their diff_ids) and what the container runs.
    let image_config: ImageConfig = {
        let (client, reference, platform) =
            (client.clone(), reference.clone(), config.platform.clone());
        let manifest = manifest.clone();
        // Spawned, so it goes out now: a shared future only runs once something awaits it.
        let task = tokio::spawn(async move {
            fetch_config(&client, &reference, &manifest, &platform)
                .await
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        async move {
            task.await
                .map_err(|e| format!("fetching the image config: {e}"))?
        }
        .boxed()
        .shared()
    };
    // Looked up while the layers' TOCs are read: it adds no round trip in series.
    let profile = config
        .profiles
        .lookup(&config.profile, &client, reference, &manifest_digest);
    let cache = ChunkCache::open(CacheConfig {
        dir: config.root.join("cache"),
        disk_budget: config.disk_budget,
        memory_budget: config.memory_budget,
    })
    .map_err(|e| {
        MountError::Image(format!(
            "opening the cache under {}: {e}",
            config.root.display()
        ))
    })?;
    let run = config.root.join("run");
    // Mount directories are made by `tempfile`, 0700 too.
    private_dir(&run).map_err(|e| MountError::Io {
        context: format!("creating {}", run.display()),
        error: e,
    })?;
    release_stale_pins(&cache, &run);
    let run_dir = tempfile::Builder::new()
        .prefix(MOUNT_DIR_PREFIX)
        .tempdir_in(&run)
        .map_err(|e| MountError::Io {
            context: format!("creating a mount directory in {}", run.display()),
            error: e,
        })?;

    // One FUSE session serves every lazy layer of the image, each bind-mounted at its own
    // directory; the session goes when the last layer mount is dropped.
    let session = LayerSession::mount(&run_dir.path().join("fuse"), &config.fs)
        .map_err(|e| MountError::Image(e.to_string()))?;

    let descriptors = manifest["layers"].as_array().cloned().unwrap_or_default();
    let loader = LoaderPrefetch::new();
    // Every layer at once: a lazy layer costs two small range reads, so the image mounts in
    // about one round trip whatever its size.
    let prepared = try_join_all(descriptors.iter().enumerate().map(|(i, d)| {
        let client = client.clone();
        let cache = cache.clone();
        let mount_dir = run_dir.path().join(format!("layer-{i}"));
        let session = &session;
        let (profile, run_dir) = (&profile, run_dir.path());
        let loader = loader.at(i);
        let diff_id = DiffId {
            config: &image_config,
            index: i,
        };
        async move {
            let place = LayerPlace {
                session,
                dir: &mount_dir,
                run_dir,
                profile,
                loader: &loader,
            };
            prepare_layer(&client, reference, d, diff_id, &cache, place, config).await
        }
    }))
    .await?;
    let image_config = image_config.await.map_err(MountError::Image)?;
    let diff_ids = image_config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if diff_ids != descriptors.len() {
        return Err(MountError::Image(format!(
            "{reference}: the manifest has {} layers but the config {diff_ids} diff_ids",
            descriptors.len(),
        )));
    }

    let mut layers = Vec::new();
    let mut lowers = Vec::new();
    let mut layer_info = Vec::new();
    let mut background = Vec::new();
    for p in prepared {
        lowers.push(p.dir);
        layer_info.push(p.info);
        match p.lazy {
            Some((mount, fetcher, task)) => {
                background.push(task.into_inner());
                layers.push(Layer::Lazy {
                    _mount: mount,
                    fetcher,
                });
            }
            None => layers.push(Layer::Unpacked),
        }
    }
    lowers.reverse(); // overlayfs wants the topmost layer first
    let lowers = if lowers.is_empty() {
        let empty = run_dir.path().join("empty");
        std::fs::create_dir_all(&empty).map_err(|e| MountError::Io {
            context: "creating an empty layer".into(),
            error: e,
        })?;
        vec![empty]
    } else {
        lowers
    };
    let overlay =
        fs::mount_overlay(&lowers, upper, target, config.overlay_flags()).map_err(|e| {
            MountError::Image(format!("mounting the overlay at {}: {e}", target.display()))
        })?;
    Ok(ImageMount {
        overlay: Some(overlay),
        layers,
        background,
        run_dir: Some(run_dir),
        cache: Some(cache),
        manifest_digest,
        config: (*image_config).clone(),
        layer_info,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Mount directories under `ROOT/run`, and so the first part of this module's pin owners.
const MOUNT_DIR_PREFIX: &str = "mount-";
/// How long an unmount waits for its aborted fetch tasks to be dropped (they are within a
/// millisecond on a multi-threaded runtime; on a single-threaded one, the wait runs out).
const STOP_WAIT: Duration = Duration::from_secs(1);
/// Connections opened while the manifest is fetched: typical images have a few layers, whose
/// TOCs are read at once, beside the profile lookup's two requests.
const PRECONNECT: usize = 4;

/// Pins are owned by `<mount directory name>/<layer hex>`, so a mount releases its own and a
/// crashed process's pins can be recognised by their missing mount directory.
fn pin_owner(run_dir: &Path, layer: &Digest) -> String {
    let name = run_dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    format!("{name}/{}", layer.hex())
}

fn release_pins(cache: &ChunkCache, run_dir: &Path) {
    let prefix = pin_owner(run_dir, &Digest::of(b""))
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
        + "/";
    for owner in cache
        .pin_owners()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.starts_with(&prefix))
    {
        if let Err(e) = cache.unpin(&owner) {
            tracing::warn!("cannot release pins of {owner}: {e}");
        }
    }
}

/// Releases pins whose mount directory under `run` is gone (left by a process that died).
/// Only owners of this module's shape (`mount-…/<hex>`) are considered: other owners (lazysnapd's
/// `snapshot/<id>` on a shared cache) have their own lifetimes.
fn release_stale_pins(cache: &ChunkCache, run: &Path) {
    for owner in cache.pin_owners().unwrap_or_default() {
        let dir = owner.split('/').next().unwrap_or_default();
        if dir.starts_with(MOUNT_DIR_PREFIX) && !run.join(dir).exists() {
            tracing::info!("releasing stale pins of {owner}");
            let _ = cache.unpin(&owner);
        }
    }
}

/// The image config, fetched once per mount while the layers are prepared (see [`DiffId`]); its
/// error as text, so that every layer waiting on it can have it.
type ImageConfig = Shared<BoxFuture<'static, Result<Arc<Value>, String>>>;

/// Where a layer's `diff_id` comes from: the image config being fetched, at the layer's index.
/// Only a plain layer waits for it.
#[derive(Clone, Copy)]
struct DiffId<'a> {
    config: &'a ImageConfig,
    index: usize,
}

impl DiffId<'_> {
    async fn get(self) -> Result<Value, MountError> {
        let config = self.config.clone().await.map_err(MountError::Image)?;
        Ok(config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .and_then(|ids| ids.get(self.index))
            .cloned()
            .unwrap_or(Value::Null))
    }
}

/// The manifest (chosen for `platform` from an index) and config of `reference`.
pub(crate) async fn resolve(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
) -> Result<(Digest, Value, Value), MountError> {
    let (digest, manifest) = resolve_manifest(client, reference, platform).await?;
    let config = fetch_config(client, reference, &manifest, platform).await?;
    Ok((digest, manifest, config))
}

/// The manifest of `reference` (chosen for `platform` from an index) and its digest.
async fn resolve_manifest(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
) -> Result<(Digest, Value), MountError> {
    // Callers name the image in their context; registry errors name the reference themselves.
    let image = |e: &dyn std::fmt::Display| MountError::Image(e.to_string());
    let mut fetched = client
        .get_manifest(reference)
        .await
        .map_err(|e| image(&e))?;
    if let ImageDocument::Index(index) =
        oci::parse_document(fetched.media_type.as_deref(), &fetched.bytes).map_err(|e| image(&e))?
    {
        let chosen = oci::select_platform(&index, platform).map_err(|e| image(&e))?;
        let digest: Digest = chosen.digest().to_string().parse().map_err(|e| image(&e))?;
        fetched = client
            .get_manifest(&reference.with_digest(digest))
            .await
            .map_err(|e| image(&e))?;
    }
    let manifest: Value = serde_json::from_slice(&fetched.bytes).map_err(|e| image(&e))?;
    Ok((fetched.digest, manifest))
}

/// The config `manifest` names, checked against `platform`.
async fn fetch_config(
    client: &Client,
    reference: &Reference,
    manifest: &Value,
    platform: &Platform,
) -> Result<Value, MountError> {
    let image = |e: &dyn std::fmt::Display| MountError::Image(e.to_string());
    let config_digest: Digest = manifest
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .ok_or_else(|| image(&"manifest has no config"))?
        .parse()
        .map_err(|e| image(&e))?;
    let config_bytes = client
        .get_blob(reference, &config_digest)
        .await
        .map_err(|e| image(&e))?;
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| image(&e))?;
    if let (Some(os), Some(arch)) = (
        config.get("os").and_then(Value::as_str),
        config.get("architecture").and_then(Value::as_str),
    ) {
        if os != platform.os || arch != platform.architecture {
            return Err(image(&format!(
                "image is {os}/{arch}, this host is {platform}"
            )));
        }
    }
    Ok(config)
}

struct Prepared {
    dir: PathBuf,
    info: LayerInfo,
    lazy: Option<(LayerMount, LayerFetcher, LayerTask)>,
}

/// Where a lazy layer goes: served by `session`, bind-mounted at `dir` (in the mount's `run_dir`),
/// its start-up profile from `profile`.
#[derive(Clone, Copy)]
struct LayerPlace<'a> {
    session: &'a Arc<LayerSession>,
    dir: &'a Path,
    run_dir: &'a Path,
    profile: &'a SharedProfile,
    /// The image's loader prefetch, at this layer's position.
    loader: &'a LoaderPrefetch,
}

/// A lazy layer's fetching task, aborted if dropped before the mount owns it (another layer failed).
struct LayerTask(Option<tokio::task::JoinHandle<()>>);

impl LayerTask {
    fn into_inner(mut self) -> tokio::task::JoinHandle<()> {
        match self.0.take() {
            Some(h) => h,
            None => tokio::spawn(async {}),
        }
    }
}

impl Drop for LayerTask {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Starts what a lazy layer fetches on its own, in order: its account files and, beside them,
/// its chunks in the start-up profile (as soon as the profile is known); the TOC's prefetch
/// set; then, with background fetch on, the rest of the layer.
fn start_layer_task(
    fetcher: &LayerFetcher,
    toc: Arc<Toc>,
    place: LayerPlace<'_>,
    cache: &ChunkCache,
    config: &MountConfig,
) -> LayerTask {
    let fetcher = fetcher.clone();
    let background_fetch = config.background_fetch;
    let cache = cache.clone();
    let owner = pin_owner(place.run_dir, &fetcher.blob());
    let profile = place.profile.clone();
    LayerTask(Some(tokio::spawn(async move {
        let layer = fetcher.blob().short();
        fetcher.prefetch_startup(&toc, profile).await;
        if !toc.prefetch.is_empty() {
            if let Err(e) = fetcher.prefetch(&toc, &toc.prefetch).await {
                tracing::warn!(%layer, "prefetch failed: {e}");
            }
        }
        if !background_fetch {
            return;
        }
        // A layer being completed needs every chunk, and once complete it no longer needs the
        // registry: pin its chunks before fetching them, so eviction cannot undo the work while
        // it is mounted, whatever the disk budget.
        if let Err(e) = cache.pin(&owner, &fetcher.chunk_digests()) {
            tracing::warn!("cannot pin the layer's chunks: {e}");
        }
        if !fetcher.is_complete() {
            fetcher.complete_retrying().await;
        }
    })))
}

async fn prepare_layer(
    client: &Client,
    reference: &Reference,
    descriptor: &Value,
    diff_id: DiffId<'_>,
    cache: &ChunkCache,
    place: LayerPlace<'_>,
    config: &MountConfig,
) -> Result<Prepared, MountError> {
    let mount_dir = place.dir;
    let start = Instant::now();
    let digest: Digest = descriptor
        .get("digest")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .parse()
        .map_err(|e| MountError::Image(format!("{reference}: layer descriptor: {e}")))?;
    let size = descriptor.get("size").and_then(Value::as_u64).unwrap_or(0);
    let media_type = descriptor
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let annotations = oci::string_map(descriptor.get("annotations"));
    if let Some(lazy) = format::detect(media_type, &annotations) {
        let toc = Arc::new(
            crate::fetch::read_toc_at(
                client,
                reference,
                &digest,
                &lazy,
                size,
                &config.limits,
                &config.fetch.scheduler,
            )
            .await
            .map_err(|e| MountError::Image(e.to_string()))?,
        );
        let fetcher = LayerFetcher::new(
            client.clone(),
            reference.clone(),
            digest,
            size,
            &toc,
            cache.clone(),
            // A range request lives as long as a read may wait for it (see `FetchConfig`).
            FetchConfig {
                deadline: config.fs.read_timeout,
                loader: config.fetch.loader_prefetch.then(|| place.loader.clone()),
                ..config.fetch.clone()
            },
        );
        std::fs::create_dir_all(mount_dir).map_err(|e| MountError::Io {
            context: format!("creating {}", mount_dir.display()),
            error: e,
        })?;
        let mount = fs::mount_layer(
            place.session,
            toc.clone(),
            Arc::new(fetcher.clone()),
            tokio::runtime::Handle::current(),
            mount_dir,
        )
        .map_err(|e| layer_error(&digest, e))?;
        let info = LayerInfo {
            digest,
            size,
            mode: crate::inspect::format_name(lazy.format),
            entries: Some(toc.entries.len()),
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::info!(layer = %digest.short(), entries = toc.entries.len(), "mounted lazily");
        let task = start_layer_task(&fetcher, toc, place, cache, config);
        return Ok(Prepared {
            dir: mount_dir.to_owned(),
            info,
            lazy: Some((mount, fetcher, task)),
        });
    }
    let diff_id: Digest = diff_id
        .get()
        .await?
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e| layer_error(&digest, format!("config diff_id: {e}")))?;
    let dir = unpacked_layer(client, reference, (&digest, size), &diff_id, &config.root).await?;
    let info = LayerInfo {
        digest,
        size,
        mode: "unpacked",
        entries: None,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Prepared {
        dir,
        info,
        lazy: None,
    })
}

/// A plain layer, fetched whole, checked against its digest and `diff_id`, and unpacked once
/// into `ROOT/layers/<hex>/fs` (reused by later mounts).
async fn unpacked_layer(
    client: &Client,
    reference: &Reference,
    (digest, size): (&Digest, u64),
    diff_id: &Digest,
    root: &Path,
) -> Result<PathBuf, MountError> {
    let base = root.join("layers").join(digest.hex());
    let dir = base.join("fs");
    if dir.is_dir() {
        return Ok(dir);
    }
    private_dir(&base).map_err(|e| MountError::Io {
        context: format!("creating {}", base.display()),
        error: e,
    })?;
    let partial = tempfile::Builder::new()
        .prefix(".partial-")
        .tempdir_in(&base)
        .map_err(|e| MountError::Io {
            context: format!("creating a directory in {}", base.display()),
            error: e,
        })?;
    fetch_and_unpack(client, reference, (digest, size), diff_id, partial.path()).await?;
    let kept = partial.keep();
    std::fs::rename(&kept, &dir).map_err(|e| MountError::Io {
        context: format!("moving the unpacked layer to {}", dir.display()),
        error: e,
    })?;
    Ok(dir)
}

/// Fetches the plain layer `digest` (`size` bytes, as its descriptor says) whole, unpacks it into
/// the empty directory `target` (without following any symlink in it), and checks the blob
/// against `digest` and the uncompressed tar against `diff_id`. A mismatch is an error; `target`
/// is then the caller's to remove. A blob that runs past `size` fails there.
pub async fn fetch_and_unpack(
    client: &Client,
    reference: &Reference,
    (digest, size): (&Digest, u64),
    diff_id: &Digest,
    target: &Path,
) -> Result<(), MountError> {
    let stored = client
        .blob_reader_sized(reference, digest, size)
        .await
        .map_err(|e| layer_error(digest, e))?;
    let stored: Box<dyn std::io::Read + Send> = Box::new(tokio_util::io::SyncIoBridge::new(stored));
    let target = target.to_owned();
    let expected = *diff_id;
    let label = *digest;
    tokio::task::spawn_blocking(move || -> Result<(), MountError> {
        let (_, tar) = format::decoder(stored).map_err(|e| layer_error(&label, e))?;
        let mut tar = oci::HashingReader::new(tar);
        fs::unpack::unpack_layer(&mut tar, &target).map_err(|e| layer_error(&label, e))?;
        std::io::copy(&mut tar, &mut std::io::sink()).map_err(|e| layer_error(&label, e))?;
        let (_, got, _) = tar.finish();
        if got != expected {
            return Err(layer_error(&label, format!("uncompressed tar does not match the config's diff_id (expected {expected}, got {got})")));
        }
        Ok(())
    })
    .await
    .map_err(|e| layer_error(digest, format!("unpack task failed: {e}")))??;
    Ok(())
}

/// Waits up to `timeout` for every background fetch to finish (used by tests and benchmarks).
pub async fn wait_background(mount: &mut ImageMount, timeout: Duration) -> bool {
    let tasks = std::mem::take(&mut mount.background);
    tokio::time::timeout(timeout, futures_util::future::join_all(tasks))
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_modules_dead_pins_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(CacheConfig {
            dir: dir.path().join("cache"),
            disk_budget: 0,
            memory_budget: 1 << 20,
        })
        .unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("mount-alive")).unwrap();
        let chunk = [Digest::of(b"chunk")];
        for owner in ["mount-dead/aa", "mount-alive/bb", "snapshot/7"] {
            cache.pin(owner, &chunk).unwrap();
        }
        release_stale_pins(&cache, &run);
        let mut left = cache.pin_owners().unwrap();
        left.sort();
        assert_eq!(left, ["mount-alive/bb", "snapshot/7"]);
    }
}

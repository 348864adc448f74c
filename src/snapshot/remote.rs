//! The remote half of the handshake: from the labels containerd sends with a layer's Prepare to
//! a mounted lazy layer, or to the reason it cannot be one.
//!
//! The manifest is fetched by the digest the labels name (so it is verified), the layer's
//! descriptor taken from it, and the TOC checked against the digest the descriptor's annotation
//! pins before it is parsed; every chunk is verified by the fetcher before it is served. A layer
//! that is not in a lazy format, or whose registry or TOC fails, is a [`Fallback`]: containerd
//! then downloads and unpacks it as usual.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::hosts::Hosts;
use super::locate::{Found, Locator, StartupPrefetch};
use super::verify::{self, Expected, Verification};
use super::{
    Usage, LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
};
use crate::cache::ChunkCache;
use crate::fetch::{FetchConfig, LayerFetcher};
use crate::fs::{self, LayerMount, LayerSession, MountOptions};
use crate::oci::Digest;
use crate::registry::{Client, ClientConfig};
use crate::{format, inspect};

/// The same facts under stargz-snapshotter's own label names, which `ctr-remote` also sends
/// (`ctr-remote image rpull` sends only these).
const STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const STARGZ_IMAGE_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Layers of one image found ahead for one Prepare, at most (containerd allows 127 layers; the
/// label lists are cut to fit containerd's label size anyway).
const MAX_IMAGE_LAYERS: usize = 128;

/// How lazy layers are fetched and served.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Off: every layer falls back and containerd unpacks it.
    pub enabled: bool,
    pub registry: ClientConfig,
    pub fetch: FetchConfig,
    pub fs: MountOptions,
    /// After the prefetch set, fetch the rest of each lazy layer at low priority (and pin it).
    pub background_fetch: bool,
    /// Bounds on what a layer's TOC may state (`[limits]` in lazysnapd's config).
    pub limits: format::Limits,
    /// containerd's registry `config_path`: `<registry>/hosts.toml` files naming mirrors.
    pub hosts_dir: Option<std::path::PathBuf>,
    /// Where the FUSE session serving every lazy layer is mounted (root-only); `None`: a private
    /// temporary directory.
    pub session_dir: Option<std::path::PathBuf>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            registry: ClientConfig::default(),
            fetch: FetchConfig::default(),
            fs: MountOptions::default(),
            background_fetch: true,
            limits: format::Limits::default(),
            hosts_dir: None,
            session_dir: None,
        }
    }
}

/// What a lazily mounted layer was made from: enough to mount it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The image reference as the labels gave it (`host/repo:tag`).
    pub image: String,
    /// The image manifest's digest; empty when the labels did not name it (stargz-snapshotter's
    /// own labels), and the manifest is then resolved from `image` for this host's platform.
    pub manifest: String,
    pub layer: String,
    /// The chain of compressed blobs the snapshot was made from (see `verify`): a Prepare for
    /// the same chain ID with another compressed chain does not get this snapshot while it is
    /// unverified. Empty in records written before it existed.
    #[serde(default)]
    pub compressed_chain: String,
    /// What the layer must decompress to; set while it still has to be verified (the layer host
    /// then hashes it during background completion and writes the verdict).
    #[serde(default)]
    pub expected: Option<Expected>,
    /// Where the layer's TOC lies and its digest, when the Prepare's labels say (containerd
    /// passes lazysnap's `containerd.io/snapshot/lazysnap/...` layer annotations on): a head
    /// start, not a fact. The TOC is read while the manifest is fetched and used only if the
    /// manifest's descriptor pins the same TOC (see `locate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toc_hint: Option<TocHint>,
}

/// A zstd:chunked TOC's digest and position as labels state them (the annotations' text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocHint {
    pub checksum: String,
    pub position: String,
}

impl TocHint {
    fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        Some(Self {
            checksum: labels.get(format::ANNOTATION_LABEL_ZSTD_CHECKSUM)?.clone(),
            position: labels.get(format::ANNOTATION_LABEL_ZSTD_POSITION)?.clone(),
        })
    }

    /// The layer as the hint describes it: zstd:chunked with a stated position, or `None` for a
    /// hint that does not parse.
    pub fn layer(&self) -> Option<format::LazyLayer> {
        let annotations = [
            (format::ANNOTATION_ZSTD_CHECKSUM, &self.checksum),
            (format::ANNOTATION_ZSTD_POSITION, &self.position),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
        format::detect(format::MEDIA_TYPE_ZSTD, &annotations).filter(|l| l.toc_position.is_some())
    }
}

/// Why a layer is not mounted lazily. `reason` is a bounded metric label.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub reason: &'static str,
    pub message: String,
}

/// Every fallback reason (the metric's label values).
pub const FALLBACK_REASONS: &[&str] = &[
    "no_labels",
    "labels",
    "registry",
    "manifest",
    "not_lazy",
    "toc",
    "timeout",
    "mount",
    "disabled",
    "verify",
    "internal",
];

impl Fallback {
    /// The reason named `text`, as one of [`FALLBACK_REASONS`] (`internal` for anything else).
    pub fn reason_named(text: &str) -> &'static str {
        FALLBACK_REASONS
            .iter()
            .find(|r| **r == text)
            .copied()
            .unwrap_or("internal")
    }

    pub fn new(reason: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            reason,
            message: message.to_string(),
        }
    }
}

impl RemoteLayer {
    /// The layer the labels of a Prepare name, or why they name none.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<Self, Fallback> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
        let image = get(&[LABEL_IMAGE_REF, STARGZ_IMAGE_REF]);
        let layer = get(&[LABEL_LAYER_DIGEST, STARGZ_LAYER_DIGEST]);
        match (image, layer) {
            (Some(image), Some(layer)) => Ok(Self {
                image,
                manifest: get(&[LABEL_MANIFEST_DIGEST]).unwrap_or_default(),
                layer,
                compressed_chain: String::new(),
                expected: None,
                toc_hint: TocHint::from_labels(labels),
            }),
            _ => Err(Fallback::new(
                "no_labels",
                format!(
                    "the Prepare has no {LABEL_IMAGE_REF} and {LABEL_LAYER_DIGEST} labels (CRI \
                     sends them with disable_snapshot_annotations = false; ctr-remote rpull \
                     sends them)"
                ),
            )),
        }
    }
}

/// The image's layers a Prepare's labels list (this layer and those above it, as CRI and
/// `ctr-remote` send them), at most [`MAX_IMAGE_LAYERS`]; empty when they list none.
pub fn image_layers(labels: &HashMap<String, String>) -> Vec<String> {
    [LABEL_IMAGE_LAYERS, STARGZ_IMAGE_LAYERS]
        .iter()
        .find_map(|k| labels.get(*k))
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .take(MAX_IMAGE_LAYERS)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A mounted lazy layer: its FUSE session, its start-up prefetch and its background fetch (both
/// stopped when dropped, before the unmount).
pub(super) struct Mounted {
    background: tokio::task::JoinHandle<()>,
    startup: StartupPrefetch,
    _mount: LayerMount,
    pub(super) pin_owner: String,
    /// The layer's digest: an image pulled again finds it mounted, not to be found ahead.
    pub(super) digest: Digest,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("pin_owner", &self.pin_owner)
            .finish_non_exhaustive()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.startup.abort();
        self.background.abort();
    }
}

/// Mounts lazy layers.
#[derive(Debug)]
pub(super) struct Remote {
    config: RemoteConfig,
    /// Finds layers (manifest, descriptor, TOC), ahead of their Prepare when it can.
    locator: Arc<Locator>,
    cache: ChunkCache,
    /// The FUSE session serving this process's lazy layers while any is mounted (its layer
    /// mounts hold it; with the last one gone it is unmounted, and the next layer mounts anew).
    session: std::sync::Mutex<std::sync::Weak<LayerSession>>,
    /// Sessions are mounted at `<session_dir>/<pid>-<n>`: a new one never shares the path of
    /// one still winding down.
    session_dir: std::path::PathBuf,
    sessions: std::sync::atomic::AtomicU64,
    /// Holds the session's directory when the config names none.
    _session_temp: Option<tempfile::TempDir>,
}

impl Remote {
    pub(super) fn new(
        config: RemoteConfig,
        cache: ChunkCache,
    ) -> Result<Self, super::SnapshotError> {
        let client_for = |plain_http: bool| {
            Client::new(ClientConfig {
                plain_http: config.registry.plain_http || plain_http,
                ..config.registry.clone()
            })
            .map_err(|e| super::SnapshotError::InvalidArgument(format!("registry client: {e}")))
        };
        let (session_dir, session_temp) = match &config.session_dir {
            Some(dir) => {
                fs::remove_dead_sessions(dir);
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("lazysnap-session-")
                    .tempdir()
                    .map_err(|e| {
                        super::SnapshotError::io("creating a FUSE session directory", e)
                    })?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let locator = Locator::new(
            client_for(false)?,
            client_for(true)?,
            Hosts::new(config.hosts_dir.clone()),
            config.limits,
            cache.clone(),
            // A range request lives as long as a read may wait for it (see `FetchConfig`).
            FetchConfig {
                deadline: config.fs.read_timeout,
                ..config.fetch.clone()
            },
            config.fs.read_timeout,
        );
        Ok(Self {
            locator: Arc::new(locator),
            config,
            cache,
            session: std::sync::Mutex::new(std::sync::Weak::new()),
            sessions: std::sync::atomic::AtomicU64::new(0),
            session_dir,
            _session_temp: session_temp,
        })
    }

    /// The FUSE session lazy layers are served in, mounted on first use.
    fn session(&self) -> Result<Arc<LayerSession>, fs::FsError> {
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = session.upgrade() {
            return Ok(s);
        }
        let n = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.session_dir.join(format!("{}-{n}", std::process::id()));
        let mounted = LayerSession::mount(&dir, &self.config.fs)?;
        *session = Arc::downgrade(&mounted);
        Ok(mounted)
    }

    pub(super) fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The credentials pulls handed over, which every registry client of this remote uses.
    pub(super) fn pull_secrets(&self) -> &crate::registry::PullSecrets {
        &self.config.registry.pull_secrets
    }

    /// Starts finding `layers` of `image` ahead of their Prepare calls (see `locate`).
    pub(super) fn warm(&self, image: &str, manifest: &str, layers: &[String]) {
        if self.config.enabled {
            self.locator.warm(image, manifest, layers);
        }
    }

    /// Starts finding the lazy layers of `image` ahead of containerd's pull (see `locate`), but
    /// those in `mounted`.
    pub(super) fn warm_image(&self, image: &str, mounted: HashSet<Digest>) {
        if self.config.enabled {
            self.locator.warm_image(image, mounted);
        }
    }

    /// [`Self::mount`] bounded by the read timeout: a registry that hangs must not hold up
    /// containerd's pull for the client's full retry budget; the layer falls back instead.
    pub(super) async fn mount_in_time(
        &self,
        layer: &RemoteLayer,
        dir: &Path,
        pin_owner: String,
    ) -> Result<(Mounted, Usage), Fallback> {
        let limit = self.config.fs.read_timeout;
        tokio::time::timeout(limit, self.mount(layer, dir, pin_owner))
            .await
            .unwrap_or_else(|_| {
                Err(Fallback::new(
                    "timeout",
                    format!("the registry did not give the layer's TOC within {limit:?}"),
                ))
            })
    }

    pub(super) fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Mounts `layer` at `dir` (an empty directory), pinning its chunks under `pin_owner` while
    /// the background fetch completes it. Must run inside the tokio runtime that will serve reads.
    pub(super) async fn mount(
        &self,
        layer: &RemoteLayer,
        dir: &Path,
        pin_owner: String,
    ) -> Result<(Mounted, Usage), Fallback> {
        let started = std::time::Instant::now();
        let Found {
            reference,
            digest,
            lazy,
            toc,
            fetcher,
            startup,
        } = self.locator.find(layer).await?;
        let found_in = started.elapsed();
        let session = self.session().map_err(|e| Fallback::new("mount", e))?;
        let mount = fs::mount_layer(
            &session,
            toc.clone(),
            Arc::new(fetcher.clone()),
            tokio::runtime::Handle::current(),
            dir,
        )
        .map_err(|e| Fallback::new("mount", e))?;
        tracing::info!(
            layer = %digest.short(),
            host = %reference.registry,
            format = inspect::format_name(lazy.format),
            entries = toc.entries.len(),
            dir = %dir.display(),
            found_ms = found_in.as_millis() as u64,
            mount_ms = (started.elapsed() - found_in).as_millis() as u64,
            "layer mounted lazily"
        );
        let usage = Usage {
            // Its bytes live in the shared chunk cache, not in the snapshot.
            size: 0,
            inodes: toc.entries.len() as i64,
        };
        let verify = layer.expected.clone().map(|e| (e, dir.to_owned()));
        if verify.is_some() {
            fetcher.hash_uncompressed();
        }
        let background = tokio::spawn(background(
            fetcher,
            toc,
            startup.clone(),
            self.cache.clone(),
            pin_owner.clone(),
            self.config.background_fetch,
            verify,
        ));
        Ok((
            Mounted {
                background,
                startup,
                _mount: mount,
                pin_owner,
                digest,
            },
            usage,
        ))
    }
}

/// The image's start-up profile's part for this layer first (started when the layer was found;
/// waited for here), then the TOC's prefetch set; then, if asked, the whole layer, pinned so
/// eviction cannot undo it while it is mounted (once complete it no longer needs the registry).
/// With `verify`, the whole blob is streamed even if every chunk is cached, and the verdict on its
/// uncompressed digest is written for the snapshot mounted at the given `fs` dir.
async fn background(
    fetcher: LayerFetcher,
    toc: Arc<format::Toc>,
    startup: StartupPrefetch,
    cache: ChunkCache,
    owner: String,
    complete: bool,
    verify: Option<(Expected, std::path::PathBuf)>,
) {
    let layer = fetcher.blob().short();
    startup.finished().await;
    if !toc.prefetch.is_empty() {
        if let Err(e) = fetcher.prefetch(&toc, &toc.prefetch).await {
            tracing::warn!(%layer, "prefetch failed: {e}");
        }
    }
    if !complete {
        return;
    }
    if let Err(e) = cache.pin(&owner, &fetcher.chunk_digests()) {
        tracing::warn!(%layer, "cannot pin the layer's chunks: {e}");
    }
    if !fetcher.is_complete() || verify.is_some() {
        fetcher.complete_retrying().await;
        tracing::info!(%layer, "layer complete in the cache");
    }
    let (Some((expected, dir)), Some(found)) = (verify, fetcher.uncompressed_digest()) else {
        return;
    };
    let verdict = expected.judge(found);
    match &verdict {
        Verification::Mismatch { message } => tracing::error!(
            %layer,
            chain_id = %expected.chain_id,
            "lazy layer FAILED verification, its snapshot will not be used again: {message}"
        ),
        _ => {
            tracing::info!(%layer, chain_id = %expected.chain_id, "lazy layer verified against its chain ID")
        }
    }
    if let Err(e) = verify::write_verdict(&dir, &verdict) {
        tracing::error!(%layer, dir = %dir.display(), "cannot record the layer's verdict: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_labels_name_the_layer_and_missing_ones_fall_back() {
        let mut labels: HashMap<String, String> = [
            (LABEL_IMAGE_REF, "127.0.0.1:5000/app:v1"),
            (LABEL_MANIFEST_DIGEST, "sha256:aa"),
            (LABEL_LAYER_DIGEST, "sha256:bb"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let layer = RemoteLayer::from_labels(&labels).unwrap();
        assert_eq!(layer.image, "127.0.0.1:5000/app:v1");
        assert_eq!(layer.layer, "sha256:bb");
        labels.remove(LABEL_MANIFEST_DIGEST);
        assert_eq!(RemoteLayer::from_labels(&labels).unwrap().manifest, "");
        labels.remove(LABEL_LAYER_DIGEST);
        let fallback = RemoteLayer::from_labels(&labels).unwrap_err();
        assert_eq!(fallback.reason, "no_labels");
    }

    #[test]
    fn a_toc_hint_needs_both_labels_and_a_position_that_parses() {
        let digest = "sha256:".to_owned() + &"ab".repeat(32);
        let mut labels: HashMap<String, String> = [
            (LABEL_IMAGE_REF, "127.0.0.1:5000/app:v1"),
            (LABEL_LAYER_DIGEST, "sha256:bb"),
            (format::ANNOTATION_LABEL_ZSTD_CHECKSUM, digest.as_str()),
            (format::ANNOTATION_LABEL_ZSTD_POSITION, "100:20:80:1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let hint = RemoteLayer::from_labels(&labels).unwrap().toc_hint.unwrap();
        let layer = hint.layer().unwrap();
        assert_eq!(layer.format, format::LayerFormat::ZstdChunked);
        assert_eq!(layer.toc_digest.to_string(), digest);
        let position = layer.toc_position.unwrap();
        assert_eq!(
            (
                position.offset,
                position.compressed_len,
                position.uncompressed_len
            ),
            (100, 20, 80)
        );
        labels.insert(
            format::ANNOTATION_LABEL_ZSTD_POSITION.to_owned(),
            "100:20".to_owned(),
        );
        let hint = RemoteLayer::from_labels(&labels).unwrap().toc_hint.unwrap();
        assert!(hint.layer().is_none(), "a position that does not parse");
        labels.remove(format::ANNOTATION_LABEL_ZSTD_CHECKSUM);
        assert!(RemoteLayer::from_labels(&labels)
            .unwrap()
            .toc_hint
            .is_none());
    }

    #[test]
    fn the_image_layers_come_from_cri_or_stargz_labels_and_are_bounded() {
        let mut labels = HashMap::new();
        assert!(image_layers(&labels).is_empty());
        labels.insert(
            STARGZ_IMAGE_LAYERS.to_owned(),
            "sha256:a, sha256:b,,".to_owned(),
        );
        assert_eq!(image_layers(&labels), ["sha256:a", "sha256:b"]);
        // CRI's own label wins when both are sent.
        labels.insert(LABEL_IMAGE_LAYERS.to_owned(), "sha256:c".to_owned());
        assert_eq!(image_layers(&labels), ["sha256:c"]);
        let many = vec!["sha256:d"; MAX_IMAGE_LAYERS + 50].join(",");
        labels.insert(LABEL_IMAGE_LAYERS.to_owned(), many);
        assert_eq!(image_layers(&labels).len(), MAX_IMAGE_LAYERS);
    }
}

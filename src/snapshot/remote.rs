//! The remote half of the handshake: from the labels containerd sends with a layer's Prepare to
//! a mounted lazy layer, or to the reason it cannot be one.
//!
//! The manifest is fetched by the digest the labels name (so it is verified), the layer's
//! descriptor taken from it, and the TOC checked against the digest the descriptor's annotation
//! pins before it is parsed; every chunk is verified by the fetcher before it is served. A layer
//! that is not in a lazy format, or whose registry or TOC fails, is a [`Fallback`]: containerd
//! then downloads and unpacks it as usual.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hosts::Hosts;
use super::verify::{self, Expected, Verification};
use super::{Usage, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST};
use crate::cache::ChunkCache;
use crate::fetch::{FetchConfig, LayerFetcher};
use crate::fs::{self, LayerMount, LayerSession, MountOptions};
use crate::oci::{self, Digest, Reference};
use crate::registry::{Client, ClientConfig};
use crate::{format, inspect};

/// The same facts under stargz-snapshotter's own label names, which `ctr-remote` also sends.
const STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

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

/// A mounted lazy layer: its FUSE session and its background fetch (stopped when dropped, before
/// the unmount).
#[derive(Debug)]
pub(super) struct Mounted {
    background: tokio::task::JoinHandle<()>,
    _mount: LayerMount,
    pub(super) pin_owner: String,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.background.abort();
    }
}

/// Mounts lazy layers.
#[derive(Debug)]
pub(super) struct Remote {
    config: RemoteConfig,
    client: Client,
    /// For mirrors that `hosts.toml` names with `http://`.
    plain_client: Client,
    hosts: Hosts,
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

/// A lazy layer found at one host: its blob size, layout and verified TOC.
struct Located {
    size: u64,
    lazy: format::LazyLayer,
    toc: Arc<format::Toc>,
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
        Ok(Self {
            client: client_for(false)?,
            plain_client: client_for(true)?,
            hosts: Hosts::new(config.hosts_dir.clone()),
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
        let reference: Reference = layer
            .image
            .parse()
            .map_err(|e| Fallback::new("labels", format!("image {}: {e}", layer.image)))?;
        let digest: Digest = layer
            .layer
            .parse()
            .map_err(|e| Fallback::new("labels", format!("layer {}: {e}", layer.layer)))?;
        // Mirrors first, as hosts.toml orders them; a host that fails moves on to the next.
        let mut failure = None;
        let mut found = None;
        for host in self.hosts.candidates(&reference.registry) {
            let at = Reference {
                registry: host.host.clone(),
                ..reference.clone()
            };
            let client = if host.plain_http {
                &self.plain_client
            } else {
                &self.client
            };
            match self.locate(client, &at, &layer.manifest, digest).await {
                Ok(located) => {
                    found = Some((client.clone(), at, located));
                    break;
                }
                Err(f) if matches!(f.reason, "registry" | "toc") => {
                    tracing::debug!(host = %host.host, reason = f.reason, "{}", f.message);
                    failure = Some(f);
                }
                Err(f) => return Err(f),
            }
        }
        let Some((client, reference, Located { size, lazy, toc })) = found else {
            return Err(failure.unwrap_or_else(|| Fallback::new("registry", "no host to try")));
        };
        let fetcher = LayerFetcher::new(
            client,
            reference.clone(),
            digest,
            size,
            &toc,
            self.cache.clone(),
            // A range request lives as long as a read may wait for it (see `FetchConfig`).
            FetchConfig {
                deadline: self.config.fs.read_timeout,
                ..self.config.fetch.clone()
            },
        );
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
            self.cache.clone(),
            pin_owner.clone(),
            self.config.background_fetch,
            verify,
        ));
        Ok((
            Mounted {
                background,
                _mount: mount,
                pin_owner,
            },
            usage,
        ))
    }
}

impl Remote {
    /// Finds the layer `digest` of `reference`'s manifest at one host and reads its TOC.
    async fn locate(
        &self,
        client: &Client,
        reference: &Reference,
        manifest_digest: &str,
        digest: Digest,
    ) -> Result<Located, Fallback> {
        let manifest = self.manifest(client, reference, manifest_digest).await?;
        let descriptor = manifest["layers"]
            .as_array()
            .and_then(|layers| {
                layers
                    .iter()
                    .find(|d| d["digest"].as_str() == Some(digest.to_string().as_str()))
            })
            .ok_or_else(|| {
                Fallback::new(
                    "manifest",
                    format!("the manifest of {reference} has no layer {digest}"),
                )
            })?;
        let size = descriptor["size"].as_u64().unwrap_or(0);
        let media_type = descriptor["mediaType"].as_str().unwrap_or_default();
        let annotations = oci::string_map(descriptor.get("annotations"));
        let lazy = format::detect(media_type, &annotations).ok_or_else(|| {
            Fallback::new(
                "not_lazy",
                format!(
                    "layer {} ({media_type}) is not in a lazy format",
                    digest.short()
                ),
            )
        })?;
        let read = |start: u64, end: u64| async move {
            client
                .get_blob_range(reference, &digest, start..end)
                .await
                .map(|b| b.to_vec())
        };
        let toc = crate::fetch::read_toc(&digest, &lazy, size, &self.config.limits, read)
            .await
            .map_err(|e| Fallback::new("toc", e))?;
        Ok(Located {
            size,
            lazy,
            toc: Arc::new(toc),
        })
    }

    /// The image manifest: fetched by `digest` (and so verified) when the labels name it, else
    /// resolved from the reference, through an index to this host's platform.
    async fn manifest(
        &self,
        client: &Client,
        reference: &Reference,
        digest: &str,
    ) -> Result<Value, Fallback> {
        let fetched = if digest.is_empty() {
            let fetched = client
                .get_manifest(reference)
                .await
                .map_err(|e| Fallback::new("registry", e))?;
            let document = oci::parse_document(fetched.media_type.as_deref(), &fetched.bytes)
                .map_err(|e| Fallback::new("manifest", format!("{reference}: {e}")))?;
            match document {
                oci::ImageDocument::Index(index) => {
                    let chosen = oci::select_platform(&index, &oci::Platform::host())
                        .map_err(|e| Fallback::new("manifest", format!("{reference}: {e}")))?;
                    let digest: Digest = chosen
                        .digest()
                        .to_string()
                        .parse()
                        .map_err(|e| Fallback::new("manifest", format!("{reference}: {e}")))?;
                    client
                        .get_manifest(&reference.with_digest(digest))
                        .await
                        .map_err(|e| Fallback::new("registry", e))?
                }
                _ => fetched,
            }
        } else {
            let digest: Digest = digest
                .parse()
                .map_err(|e| Fallback::new("labels", format!("manifest {digest}: {e}")))?;
            // Asked for by digest, so the registry client verifies the bytes.
            client
                .get_manifest(&reference.with_digest(digest))
                .await
                .map_err(|e| Fallback::new("registry", e))?
        };
        serde_json::from_slice(&fetched.bytes)
            .map_err(|e| Fallback::new("manifest", format!("{reference}: {e}")))
    }
}

/// Prefetch set first; then, if asked, the whole layer, pinned so eviction cannot undo it while
/// it is mounted (once complete it no longer needs the registry). With `verify`, the whole blob is
/// streamed even if every chunk is cached, and the verdict on its uncompressed digest is written
/// for the snapshot mounted at the given `fs` dir.
async fn background(
    fetcher: LayerFetcher,
    toc: Arc<format::Toc>,
    cache: ChunkCache,
    owner: String,
    complete: bool,
    verify: Option<(Expected, std::path::PathBuf)>,
) {
    let layer = fetcher.blob().short();
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
}

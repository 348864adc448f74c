//! Finding a lazy layer in its registry: the image manifest, the layer's descriptor in it, and
//! its TOC, checked against the digest the descriptor's annotation pins before it is parsed; and
//! finding all of an image's layers at once, ahead of containerd's Prepare calls.
//!
//! containerd prepares an image's layers one after another, each Prepare waiting for the one
//! below. Were each layer found only when its own Prepare came, a pull would pay the manifest and
//! TOC round trips once per layer, in series. Instead the first Prepare names the image's layers
//! (CRI's `cri.image-layers` label, `ctr-remote`'s `stargz.layers`): every one of them is found
//! at once ([`Locator::warm`], a few at a time), and each later Prepare takes its layer from
//! there. The manifest is fetched once per image and shared (single flight, kept a while), so a
//! pull fetches it once, not once per layer. Nothing is trusted more for having been found early:
//! the same checks run, in the same order, and what a Prepare gets is what it would have found.
//!
//! A layer found is also a layer whose start-up profile can be fetched: its fetcher is made, and
//! the profile's chunks for it requested, as soon as its TOC is read ([`StartupPrefetch`]), not
//! when its Prepare comes. A pull's layers are found side by side but prepared one after another,
//! so the layers above the first would otherwise leave the link idle while the ones below are
//! mounted; what is fetched early is only what the profile names, each chunk verified and cached.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use serde_json::Value;

use super::hosts::{Host, Hosts};
use super::metrics::METRICS;
use super::remote::{Fallback, RemoteLayer};
use crate::cache::ChunkCache;
use crate::fetch::{FetchConfig, LayerFetcher, LoaderPrefetch};
use crate::format;
use crate::oci::{self, Digest, Reference};
use crate::profile::lookup::{Lookup, Lookups};
use crate::registry::Client;

/// Layers found ahead at once (each holds a connection or two and, after, its TOC).
const AHEAD_SLOTS: usize = 8;
/// Layers found ahead and not yet taken, at most (their TOCs are held in memory meanwhile).
const MAX_AHEAD: usize = 128;
/// How long a layer found ahead waits for its Prepare (containerd may be downloading a layer
/// that is not lazy meanwhile); after that it is dropped and found again if it is asked for.
const AHEAD_TTL: Duration = Duration::from_secs(600);
/// Manifests kept at once, and how long: long enough for one pull to prepare all its layers.
const MAX_MANIFESTS: usize = 64;
/// The most connections opened ahead for one image (see [`Locator::preconnect`]).
const PRECONNECT: usize = 6;
const MANIFEST_TTL: Duration = Duration::from_secs(60);

/// A lazy layer found at one host: where, its layout and verified TOC, the fetcher its mount
/// will read through, and the prefetch of its image's start-up profile (already started).
#[derive(Clone)]
pub(super) struct Found {
    /// The reference at the host that answered (a mirror, or the image's own registry).
    pub reference: Reference,
    pub digest: Digest,
    pub lazy: format::LazyLayer,
    pub toc: Arc<format::Toc>,
    pub fetcher: LayerFetcher,
    pub startup: StartupPrefetch,
}

/// The prefetch of a layer's account files and its part of its image's start-up profile,
/// started when the layer is found. The mount's background work waits for it before it fetches anything else; unmounting
/// aborts it. A layer found ahead whose Prepare never comes lets it run out: it fetches at most
/// the profile's (bounded) part for the layer, into the shared cache.
#[derive(Clone)]
pub(super) struct StartupPrefetch {
    abort: tokio::task::AbortHandle,
    done: Shared<BoxFuture<'static, ()>>,
}

impl StartupPrefetch {
    /// Starts [`LayerFetcher::prefetch_startup`]: the layer's account files and its part of
    /// `profile`. Must run inside a tokio runtime.
    fn start(fetcher: LayerFetcher, toc: Arc<format::Toc>, profile: Lookup) -> Self {
        let task = tokio::spawn(async move { fetcher.prefetch_startup(&toc, profile).await });
        let abort = task.abort_handle();
        Self {
            abort,
            done: async move {
                let _ = task.await;
            }
            .boxed()
            .shared(),
        }
    }

    /// Resolves once the prefetch has ended (done, failed, found nothing to do, or aborted).
    pub(super) fn finished(&self) -> Shared<BoxFuture<'static, ()>> {
        self.done.clone()
    }

    pub(super) fn abort(&self) {
        self.abort.abort();
    }
}

/// An image manifest and its digest (what its start-up profile is found by), and the loader
/// prefetch its layers share.
struct Manifest {
    digest: Digest,
    json: Value,
    loader: LoaderPrefetch,
}

type Pending<T> = Shared<BoxFuture<'static, Result<T, Fallback>>>;
/// (image or registry, manifest or repository, layer or tag-or-digest): see the maps' docs.
type Key = (String, String, String);
/// A manifest fetched (or being fetched) for several layers, and since when.
type Kept = (Instant, Pending<Arc<Manifest>>);

/// A layer being found (or found) ahead of its Prepare; `None` once taken, so that a later
/// Prepare's label list naming it again does not start it again.
struct Ahead {
    at: Instant,
    pending: Option<Pending<Arc<Found>>>,
}

/// Finds lazy layers (see the module docs). Shared by every mount of one layer host.
pub(super) struct Locator {
    client: Client,
    /// For mirrors that `hosts.toml` names with `http://`.
    plain_client: Client,
    hosts: Hosts,
    limits: format::Limits,
    /// What a found layer's fetcher reads into, and how (its deadline is the read timeout).
    cache: ChunkCache,
    fetch: FetchConfig,
    /// Bounds one layer found ahead (the read timeout, as for a layer found at its Prepare).
    timeout: Duration,
    /// By (registry, repository, tag or digest): manifests fetched, or being fetched.
    manifests: Mutex<HashMap<Key, Kept>>,
    /// By (image, manifest digest, layer digest) as the labels name them.
    ahead: Mutex<HashMap<Key, Ahead>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Start-up profiles, looked up once per image manifest.
    profiles: Lookups,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator")
            .field("hosts", &self.hosts)
            .field("ahead", &lock(&self.ahead).len())
            .field("manifests", &lock(&self.manifests).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn key(layer: &RemoteLayer) -> Key {
    (
        image_key(&layer.image),
        layer.manifest.clone(),
        layer.layer.clone(),
    )
}

/// `image` as containerd's CRI plugin names it in its labels (`ParseDockerRef`): registry and
/// repository spelled out, `latest` when neither tag nor digest is given (both as the parser
/// does), the tag dropped when a digest is; so that kubelet's `PullImage("python")` and CRI's
/// label `docker.io/library/python:latest` find the same layers. Left as it is when it does not
/// parse.
fn image_key(image: &str) -> String {
    match image.parse::<Reference>() {
        Ok(mut r) => {
            if r.digest.is_some() {
                r.tag = None;
            }
            r.to_string()
        }
        Err(_) => image.to_owned(),
    }
}

impl Locator {
    pub(super) fn new(
        client: Client,
        plain_client: Client,
        hosts: Hosts,
        limits: format::Limits,
        cache: ChunkCache,
        fetch: FetchConfig,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            plain_client,
            hosts,
            limits,
            cache,
            fetch,
            timeout,
            manifests: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(AHEAD_SLOTS)),
            profiles: Lookups::new(timeout),
        }
    }

    /// Starts finding `layers` (digests) of `image` (whose manifest digest is `manifest`, or
    /// empty: resolved from the tag) in the background, a few at a time, unless they are being
    /// found already. Digests that do not parse are skipped (their own Prepare reports them).
    /// Must run inside a tokio runtime.
    pub(super) fn warm(self: &Arc<Self>, image: &str, manifest: &str, layers: &[String]) {
        let started = self.ahead(image, manifest, layers);
        if started > 0 {
            tracing::debug!(image, layers = started, "finding the image's layers ahead");
            self.preconnect(image, started);
        }
    }

    /// [`Self::warm`] without the connections opened ahead: how many layers it started.
    fn ahead(self: &Arc<Self>, image: &str, manifest: &str, layers: &[String]) -> usize {
        let now = Instant::now();
        let mut ahead = lock(&self.ahead);
        ahead.retain(|_, a| now.duration_since(a.at) < AHEAD_TTL);
        let mut started = 0;
        for digest in layers.iter().filter(|d| d.parse::<Digest>().is_ok()) {
            let layer = RemoteLayer {
                image: image.to_owned(),
                manifest: manifest.to_owned(),
                layer: digest.clone(),
                compressed_chain: String::new(),
                expected: None,
                toc_hint: None,
            };
            let k = key(&layer);
            if ahead.contains_key(&k) {
                continue;
            }
            if ahead.len() >= MAX_AHEAD {
                tracing::debug!(
                    image,
                    "{MAX_AHEAD} layers are being found ahead already; the rest wait for their Prepare"
                );
                break;
            }
            let me = self.clone();
            let task = tokio::spawn(async move {
                let _slot = me.slots.clone().acquire_owned().await;
                let limit = me.timeout;
                tokio::time::timeout(limit, me.find_now(&layer))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Fallback::new(
                            "timeout",
                            format!("the registry did not give the layer's TOC within {limit:?}"),
                        ))
                    })
                    .map(Arc::new)
            });
            let pending = async move {
                task.await.unwrap_or_else(|e| {
                    Err(Fallback::new(
                        "internal",
                        format!("finding a layer ahead: {e}"),
                    ))
                })
            }
            .boxed()
            .shared();
            ahead.insert(
                k,
                Ahead {
                    at: now,
                    pending: Some(pending),
                },
            );
            started += 1;
        }
        started
    }

    /// Starts finding the lazy layers of `image` from its reference alone, before containerd
    /// has resolved it: CRI's `PullImage` reaches lazysnapd's proxy some round trips (HEAD,
    /// manifest, config, content ingestion) before containerd's first Prepare, which then finds
    /// its layer's TOC read already. The manifest is resolved once (through an index to this
    /// host's platform) and kept under its digest too, where the layers' own lookups, and CRI's
    /// Prepare labels, name it; its lazy layers are then found as [`Self::warm`] finds them
    /// (under the resolved digest; a tag moved meanwhile makes containerd name another digest, and
    /// its Prepares find their layers themselves). Layers not in a lazy format cost nothing more
    /// than the manifest, and layers in `mounted` (an image pulled again, which containerd does
    /// not prepare again) nothing. Only the first host `hosts.toml` names is asked. Returns at
    /// once; must run inside a tokio runtime.
    pub(super) fn warm_image(self: &Arc<Self>, image: &str, mounted: HashSet<Digest>) {
        let Ok(reference) = image.parse::<Reference>() else {
            tracing::debug!(image, "not a reference: nothing found ahead of its pull");
            return;
        };
        let Some(host) = self.first_host(&reference) else {
            return;
        };
        let me = self.clone();
        let image = image_key(image);
        tokio::spawn(async move {
            let (client, at) = me.at_host(&host, &reference);
            client.preconnect(&at, PRECONNECT);
            // Resolved as from a tag even when pinned by digest: a pinned multi-platform image
            // names its index, whose platform manifest is what containerd's labels name (the
            // client checks the bytes against the pinned digest).
            let manifest =
                match tokio::time::timeout(me.timeout, me.manifest(client, &at, "")).await {
                    Ok(Ok(manifest)) => manifest,
                    Ok(Err(f)) => {
                        tracing::debug!(
                            image,
                            reason = f.reason,
                            "not found ahead of its pull: {}",
                            f.message
                        );
                        return;
                    }
                    Err(_) => return,
                };
            me.keep_manifest(&at, &manifest);
            let layers: Vec<String> = manifest.json["layers"]
                .as_array()
                .map(|layers| {
                    layers
                        .iter()
                        .filter(|d| {
                            let media_type = d["mediaType"].as_str().unwrap_or_default();
                            let annotations = oci::string_map(d.get("annotations"));
                            format::detect(media_type, &annotations).is_some()
                        })
                        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
                        .filter(|d| d.parse().map_or(true, |d| !mounted.contains(&d)))
                        .take(MAX_AHEAD)
                        .collect()
                })
                .unwrap_or_default();
            if layers.is_empty() {
                tracing::debug!(
                    image,
                    "no lazy layer to find ahead of its pull (none, or all mounted already)"
                );
                return;
            }
            tracing::info!(image, manifest = %manifest.digest, layers = layers.len(), "finding the image's lazy layers ahead of containerd's pull");
            me.ahead(&image, &manifest.digest.to_string(), &layers);
        });
    }

    /// Keeps `manifest`, resolved from `at`'s tag, under its digest as well, where lookups by
    /// digest (each layer's, and CRI's Prepare labels) ask for it.
    fn keep_manifest(&self, at: &Reference, manifest: &Arc<Manifest>) {
        let k = (
            at.registry.clone(),
            at.repository.clone(),
            manifest.digest.to_string(),
        );
        let ready: Pending<Arc<Manifest>> = futures_util::future::ready(Ok(manifest.clone()))
            .boxed()
            .shared();
        lock(&self.manifests)
            .entry(k)
            .or_insert_with(|| (Instant::now(), ready));
    }

    /// Opens connections to the first host to try for `image` while its manifest is fetched: one
    /// per layer whose TOC is about to be read at once, plus two for the profile lookup (API and
    /// tag), at most [`PRECONNECT`].
    fn preconnect(&self, image: &str, layers: usize) {
        let Ok(reference) = image.parse::<Reference>() else {
            return;
        };
        let Some(host) = self.first_host(&reference) else {
            return;
        };
        let (client, at) = self.at_host(&host, &reference);
        client.preconnect(&at, (layers + 2).min(PRECONNECT));
    }

    /// The first host to try for `reference`: its first mirror, or its own registry.
    fn first_host(&self, reference: &Reference) -> Option<Host> {
        self.hosts
            .candidates(&reference.registry)
            .into_iter()
            .next()
    }

    /// The client that speaks to `host` (plain HTTP or not, as `hosts.toml` says) and
    /// `reference` as found there.
    fn at_host(&self, host: &Host, reference: &Reference) -> (&Client, Reference) {
        let client = if host.plain_http {
            &self.plain_client
        } else {
            &self.client
        };
        let at = Reference {
            registry: host.host.clone(),
            ..reference.clone()
        };
        (client, at)
    }

    /// Finds `layer`: taken from what [`Self::warm`] started if it did, else found now.
    pub(super) async fn find(self: &Arc<Self>, layer: &RemoteLayer) -> Result<Found, Fallback> {
        let pending = lock(&self.ahead)
            .get_mut(&key(layer))
            .and_then(|a| a.pending.take());
        let Some(pending) = pending else {
            return self.find_now(layer).await;
        };
        match pending.await {
            Ok(found) => {
                METRICS.located_ahead.inc();
                Ok((*found).clone())
            }
            // Not a verdict on the layer (a task that died): try once more, now.
            Err(f) if f.reason == "internal" => self.find_now(layer).await,
            // The same attempt the Prepare would have made, made earlier: its answer stands.
            Err(f) => Err(f),
        }
    }

    /// Finds `layer` at the first host that has it: mirrors first, as `hosts.toml` orders them;
    /// a host that fails moves on to the next.
    async fn find_now(&self, layer: &RemoteLayer) -> Result<Found, Fallback> {
        let reference: Reference = layer
            .image
            .parse()
            .map_err(|e| Fallback::new("labels", format!("image {}: {e}", layer.image)))?;
        let digest: Digest = layer
            .layer
            .parse()
            .map_err(|e| Fallback::new("labels", format!("layer {}: {e}", layer.layer)))?;
        let mut failure = None;
        for host in self.hosts.candidates(&reference.registry) {
            let (client, at) = self.at_host(&host, &reference);
            let hint = layer.toc_hint.as_ref().and_then(|h| h.layer());
            match self.locate(client, at, &layer.manifest, digest, hint).await {
                Ok(found) => return Ok(found),
                Err(f) if matches!(f.reason, "registry" | "toc") => {
                    tracing::debug!(host = %host.host, reason = f.reason, "{}", f.message);
                    failure = Some(f);
                }
                Err(f) => return Err(f),
            }
        }
        Err(failure.unwrap_or_else(|| Fallback::new("registry", "no host to try")))
    }

    /// Finds the layer `digest` of `reference`'s manifest at one host and reads its TOC. With a
    /// `hint` (where the labels say the TOC lies), the TOC is read while the manifest is fetched,
    /// and kept only if the manifest's descriptor pins that same TOC; otherwise it is read again
    /// as the descriptor says. The TOC is checked against the hint's digest before it is parsed,
    /// as against the descriptor's.
    async fn locate(
        &self,
        client: &Client,
        reference: Reference,
        manifest_digest: &str,
        digest: Digest,
        hint: Option<format::LazyLayer>,
    ) -> Result<Found, Fallback> {
        // The image's profile is looked up while this layer's TOC is read (once per image); when
        // the labels name the manifest's digest, while the manifest itself is fetched too.
        let early = manifest_digest
            .parse::<Digest>()
            .ok()
            .map(|d| self.profiles.lookup(client, &reference, d));
        let early_toc = async {
            match &hint {
                // The blob's size comes with the manifest: checked below, before use.
                Some(h) => Some(self.read_toc(client, &reference, digest, h, u64::MAX).await),
                None => None,
            }
        };
        let (manifest, early_toc) = tokio::join!(
            self.manifest(client, &reference, manifest_digest),
            early_toc
        );
        let manifest = manifest?;
        let profile =
            early.unwrap_or_else(|| self.profiles.lookup(client, &reference, manifest.digest));
        let (position, descriptor) = manifest.json["layers"]
            .as_array()
            .and_then(|layers| {
                layers
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d["digest"].as_str() == Some(digest.to_string().as_str()))
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
        let confirmed = early_toc.and_then(|toc| {
            let end = lazy.toc_position.map(|p| p.offset.saturating_add(p.compressed_len));
            let pinned = hint.as_ref() == Some(&lazy) && end.is_some_and(|e| e <= size);
            if !pinned {
                tracing::debug!(layer = %digest.short(), "the labels' TOC is not the one the manifest pins: read again");
            }
            pinned.then_some(toc).and_then(Result::ok)
        });
        let toc = match confirmed {
            Some(toc) => toc,
            None => {
                self.read_toc(client, &reference, digest, &lazy, size)
                    .await?
            }
        };
        let toc = Arc::new(toc);
        let fetcher = LayerFetcher::new(
            client.clone(),
            reference.clone(),
            digest,
            size,
            &toc,
            self.cache.clone(),
            FetchConfig {
                loader: self
                    .fetch
                    .loader_prefetch
                    .then(|| manifest.loader.at(position)),
                ..self.fetch.clone()
            },
        );
        let startup = StartupPrefetch::start(fetcher.clone(), toc.clone(), profile);
        Ok(Found {
            reference,
            digest,
            lazy,
            toc,
            fetcher,
            startup,
        })
    }

    /// Reads and checks the TOC of `lazy`, the layer `digest` (`size` bytes) at `reference`: one
    /// range read when the TOC's position is stated (lazysnap's and zstd:chunked's annotations),
    /// two (footer, then TOC) otherwise.
    async fn read_toc(
        &self,
        client: &Client,
        reference: &Reference,
        digest: Digest,
        lazy: &format::LazyLayer,
        size: u64,
    ) -> Result<format::Toc, Fallback> {
        crate::fetch::read_toc_at(
            client,
            reference,
            &digest,
            lazy,
            size,
            &self.limits,
            &self.fetch.scheduler,
        )
        .await
        .map_err(|e| Fallback::new("toc", e))
    }

    /// The image manifest, fetched once for every layer of a pull: by `digest` (and so verified)
    /// when the labels name it, else resolved from the reference, through an index to this
    /// host's platform. A failure is not kept: the next layer asks again.
    async fn manifest(
        &self,
        client: &Client,
        reference: &Reference,
        digest: &str,
    ) -> Result<Arc<Manifest>, Fallback> {
        let k = (
            reference.registry.clone(),
            reference.repository.clone(),
            if digest.is_empty() {
                reference.tag_or_digest()
            } else {
                digest.to_owned()
            },
        );
        let pending = {
            let now = Instant::now();
            let mut manifests = lock(&self.manifests);
            manifests.retain(|_, (at, _)| now.duration_since(*at) < MANIFEST_TTL);
            if manifests.len() >= MAX_MANIFESTS && !manifests.contains_key(&k) {
                manifests.clear();
            }
            manifests
                .entry(k.clone())
                .or_insert_with(|| {
                    let fetch =
                        fetch_manifest(client.clone(), reference.clone(), digest.to_owned());
                    (now, fetch.boxed().shared())
                })
                .1
                .clone()
        };
        let result = pending.await;
        if result.is_err() {
            lock(&self.manifests).remove(&k);
        }
        result
    }
}

async fn fetch_manifest(
    client: Client,
    reference: Reference,
    digest: String,
) -> Result<Arc<Manifest>, Fallback> {
    let fetched = if digest.is_empty() {
        let fetched = client
            .get_manifest(&reference)
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
    let json = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| Fallback::new("manifest", format!("{reference}: {e}")))?;
    Ok(Arc::new(Manifest {
        digest: fetched.digest,
        json,
        loader: LoaderPrefetch::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::image_key;

    #[test]
    fn an_image_is_keyed_as_cri_names_it() {
        assert_eq!(image_key("python"), "docker.io/library/python:latest");
        assert_eq!(
            image_key("docker.io/library/python:latest"),
            "docker.io/library/python:latest"
        );
        assert_eq!(
            image_key("127.0.0.1:5000/big:lazy"),
            "127.0.0.1:5000/big:lazy"
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            image_key(&format!("127.0.0.1:5000/big:lazy@{digest}")),
            format!("127.0.0.1:5000/big@{digest}")
        );
        assert_eq!(image_key("not a reference"), "not a reference");
    }
}

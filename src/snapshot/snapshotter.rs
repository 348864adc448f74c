//! The snapshotter: the [`Store`]'s semantics plus lazily mounted layers.
//!
//! Prepare with a target (`containerd.io/snapshot.ref`) and the layer labels tries the remote
//! handshake: the layer is mounted lazily at a new snapshot's `fs` dir, committed under the target
//! name with the Prepare's parent and labels, and Prepare answers `ALREADY_EXISTS`. containerd then
//! finds it with Walk (`labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`) and never
//! downloads the layer. Anything that stops the handshake is logged and counted, and Prepare goes
//! on as overlayfs's would. The layers themselves are served by a [`LayerHost`].
//!
//! A chain ID is only what an image config claims, so an existing lazy snapshot is handed to a
//! Prepare of its name only as `verify` allows (verified, or made from the same compressed chain),
//! and one that failed verification is refused to every later use.
//!
//! No lock is held across an await.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::host::LayerHost;
use super::metrics::METRICS;
use super::remote::{self, Fallback};
use super::verify;
use super::{Info, Kind, Mount, RemoteLayer, SnapshotError, Store, Usage, LABEL_TARGET};

/// The snapshotter (see the module docs).
#[derive(Debug)]
pub struct Snapshotter {
    store: Arc<Store>,
    host: Arc<dyn LayerHost>,
    /// Records the verdicts the layer host writes (`verify::watch`); stopped on drop.
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
    }
}

impl Snapshotter {
    /// Opens the store under `root`; lazy layers are served by `host`. Call [`Self::restore`]
    /// next. Inside a tokio runtime, a task records the verdicts on lazy layers as they come.
    pub fn open(root: &Path, host: Arc<dyn LayerHost>) -> Result<Self, SnapshotError> {
        let store = Arc::new(Store::open(root)?);
        let watcher = tokio::runtime::Handle::try_current()
            .ok()
            .map(|rt| rt.spawn(verify::watch(Arc::downgrade(&store))));
        Ok(Self {
            store,
            host,
            watcher,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Mounts every committed lazy layer the host does not serve (after a restart of a local
    /// host, all of them), releases pins of snapshots that are gone, and removes orphaned
    /// directories. A layer that cannot be mounted is logged and counted; its snapshot stays, so
    /// containerd's view of the images does not change under it, and the next Prepare that
    /// wants it tries again.
    pub async fn restore(&self) {
        let records = self.store.records();
        self.host
            .release_stale_pins(records.iter().map(|(_, r)| r.id).collect())
            .await;
        let mounted = self.host.mounted().await;
        // All at once: each costs a round trip or two to the registry.
        let restores = records.into_iter().filter_map(|(name, record)| {
            let record = verify::current(&self.store, &name).unwrap_or(record);
            let layer = verify::to_mount(&self.store, &name, &record)?;
            (!mounted.contains(&record.id)).then(|| self.restore_one(name, record.id, layer))
        });
        futures_util::future::join_all(restores).await;
        let mounted = self.host.mounted().await;
        METRICS.mounted.set(mounted.len() as i64);
        match self.store.cleanup() {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed orphaned snapshot directories"),
            Err(e) => tracing::warn!("cleanup: {e}"),
        }
    }

    async fn restore_one(&self, name: String, id: u64, layer: RemoteLayer) {
        match self.host.mount(id, layer, self.store.fs_dir(id)).await {
            Ok(_) => {
                METRICS.restored.inc();
                METRICS.mounted.inc();
            }
            Err(f) => {
                tracing::error!(snapshot = %name, reason = f.reason, "cannot restore lazy layer: {}", f.message);
                METRICS.restore_failures.inc();
            }
        }
    }

    /// Mounts again any lazy layer in `parent`'s chain that its host does not serve (the layer
    /// host died and a new one started empty, or a restore failed), so the mounts handed out
    /// never name a dead or empty lower.
    async fn ensure_chain_mounted(&self, parent: &str) {
        let mut missing = Vec::new();
        let mut next = parent.to_owned();
        while !next.is_empty() {
            let Ok(record) = self.store.record(&next) else {
                break;
            };
            if let Some(layer) = verify::to_mount(&self.store, &next, &record) {
                missing.push((next.clone(), record.id, layer));
            }
            next = record.parent;
        }
        if missing.is_empty() {
            return;
        }
        let mounted = self.host.mounted().await;
        for (name, id, layer) in missing {
            if !mounted.contains(&id) {
                self.restore_one(name, id, layer).await;
            }
        }
    }

    /// Prepare, with the remote handshake when the labels ask for it. An existing lazy snapshot
    /// of the target is handed out only if `verify` allows it; otherwise containerd unpacks (and
    /// verifies) the layer as usual.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.check_usable(parent)?;
        if let Some(target) = labels.get(LABEL_TARGET).cloned() {
            let existing = verify::current(&self.store, &target)
                .ok()
                .filter(|e| e.kind == Kind::Committed && e.parent == parent);
            let outcome = match existing {
                Some(existing) => {
                    match verify::reusable(&self.store, &target, &existing, &labels) {
                        Ok(()) => {
                            // A lazy layer whose mount could not be restored at start gets another
                            // try now that it is wanted again.
                            if let Some(layer) = verify::to_mount(&self.store, &target, &existing) {
                                if !self.host.mounted().await.contains(&existing.id) {
                                    self.restore_one(target.clone(), existing.id, layer).await;
                                }
                            }
                            return Err(SnapshotError::AlreadyExists(target));
                        }
                        Err(f) => Err(f),
                    }
                }
                None => self.try_lazy(&target, parent, &labels).await,
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(key, target = %target, "committed a lazy layer; containerd skips it");
                    return Err(SnapshotError::AlreadyExists(target));
                }
                Err(f) if f.reason == "verify" => {
                    tracing::warn!(key, target = %target, "not reusing a lazy snapshot, containerd unpacks the layer: {}", f.message);
                    METRICS.fallbacks.with_label_values(&[f.reason]).inc();
                }
                Err(f) => {
                    tracing::info!(key, target = %target, reason = f.reason, "layer not lazy, containerd unpacks it: {}", f.message);
                    METRICS.fallbacks.with_label_values(&[f.reason]).inc();
                }
            }
        }
        self.ensure_chain_mounted(parent).await;
        self.store.prepare(key, parent, labels, Kind::Active)
    }

    /// Refuses `key` if it is (or lies on) a lazy layer that failed verification.
    fn check_usable(&self, key: &str) -> Result<(), SnapshotError> {
        match verify::refused(&self.store, key) {
            None => Ok(()),
            Some(why) => {
                tracing::warn!(snapshot = key, "refused: {why}");
                Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key}: {why}"
                )))
            }
        }
    }

    async fn try_lazy(
        &self,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), Fallback> {
        if !self.host.enabled() {
            return Err(Fallback::new(
                "disabled",
                "lazy loading is off in the config",
            ));
        }
        let layer = RemoteLayer::from_labels(labels)?;
        if self.store.stat(target).is_ok() {
            // Same chain, differently named parent (see below): not worth a mount.
            return Err(Fallback::new(
                "internal",
                format!("{target} exists with another parent"),
            ));
        }
        // containerd prepares the image's layers one after another: have them all found now, so
        // that each later Prepare finds its layer ready instead of paying its round trips.
        let mut layers = remote::image_layers(labels);
        if layer.toc_hint.is_some() {
            // Found by its own Prepare instead, which reads the TOC the labels locate while the
            // manifest is fetched: a round trip sooner than finding it ahead from the manifest.
            layers.retain(|d| *d != layer.layer);
        }
        if !layers.is_empty() {
            self.host
                .warm(layer.image.clone(), layer.manifest.clone(), layers)
                .await;
        }
        let layer = verify::with_facts(&self.store, target, parent, layer)?;
        let id = self
            .store
            .reserve(false)
            .map_err(|e| Fallback::new("internal", e))?;
        let usage = match self
            .host
            .mount(id, layer.clone(), self.store.fs_dir(id))
            .await
        {
            Ok(usage) => usage,
            Err(f) => {
                self.store.remove_dir(id);
                return Err(f);
            }
        };
        match self
            .store
            .insert_committed(target, parent, labels.clone(), id, usage, Some(layer))
        {
            Ok(()) => {
                METRICS.lazy_layers.inc();
                METRICS.mounted.inc();
                Ok(())
            }
            Err(e) => {
                self.host.unmount(id).await;
                self.store.remove_dir(id);
                match e {
                    // Another Prepare of the same chain won the race: containerd uses that one,
                    // if it may.
                    SnapshotError::AlreadyExists(_) => match verify::current(&self.store, target) {
                        Ok(winner) if winner.parent == parent => {
                            verify::reusable(&self.store, target, &winner, labels)
                        }
                        // The name is taken by the same chain over a differently named parent
                        // (its lower layer was unpacked in another containerd namespace):
                        // containerd would not find ours, so let it unpack this one as usual.
                        _ => Err(Fallback::new(
                            "internal",
                            format!("{target} exists with another parent"),
                        )),
                    },
                    e => Err(Fallback::new("internal", e)),
                }
            }
        }
    }

    /// A read-only view of `parent`.
    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.check_usable(parent)?;
        self.ensure_chain_mounted(parent).await;
        self.store.prepare(key, parent, labels, Kind::View)
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let parent = self.store.record(key)?.parent;
        self.check_usable(&parent)?;
        self.ensure_chain_mounted(&parent).await;
        self.store.mounts(key)
    }

    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        self.store.commit(name, key, labels)
    }

    /// Removes a snapshot; a lazy layer is unmounted and its pins released first.
    pub async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let record = self.store.remove(key)?;
        if record.remote.is_some() {
            self.host.unmount(record.id).await;
            METRICS.mounted.dec();
        }
        self.store.remove_dir(record.id);
        Ok(())
    }

    /// A snapshot that is (or lies on) a lazy layer that failed verification is not found: so
    /// containerd's unpacker does not take it for the layer it wants, and containerd's Walk (which
    /// Stats every snapshot and stops at any other error) skips it rather than failing.
    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        if let Some(why) = verify::refused(&self.store, key) {
            tracing::warn!(snapshot = key, "refused to Stat: {why}");
            return Err(SnapshotError::NotFound(format!("{key} (refused: {why})")));
        }
        self.store.stat(key)
    }

    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info, SnapshotError> {
        self.store.update(info, fieldpaths)
    }

    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        self.store.usage(key)
    }

    pub fn walk(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        self.store.walk(filters)
    }

    /// containerd's Cleanup: removes directories no snapshot refers to.
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        self.store.cleanup().map(|_| ())
    }

    /// On shutdown: a local host unmounts every lazy layer (a FUSE mount cannot outlive its
    /// process, and a dead one only gives ENOTCONN); a separate layer host keeps them. Records
    /// stay, so the next start mounts whatever is missing.
    pub async fn shutdown(&self) {
        self.host.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, ChunkCache};
    use crate::snapshot::{LocalHost, RemoteConfig, Verification};

    fn open(root: &Path) -> Snapshotter {
        let cache = ChunkCache::open(CacheConfig {
            dir: root.join("cache"),
            disk_budget: 0,
            memory_budget: 1 << 20,
        })
        .unwrap();
        let host = LocalHost::new(RemoteConfig::default(), cache).unwrap();
        Snapshotter::open(root, Arc::new(host)).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_target_without_layer_labels_falls_back_to_an_active_snapshot_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = open(dir.path());
        let before = METRICS.fallbacks.with_label_values(&["no_labels"]).get();
        let mounts = snapshotter
            .prepare(
                "ns/1/extract",
                "",
                labels(&[(LABEL_TARGET, "sha256:chain")]),
            )
            .await
            .unwrap();
        assert_eq!(mounts[0].kind, "bind");
        assert_eq!(snapshotter.stat("ns/1/extract").unwrap().kind, Kind::Active);
        assert!(METRICS.fallbacks.with_label_values(&["no_labels"]).get() > before);
    }

    #[tokio::test]
    async fn a_target_taken_under_another_parent_falls_back_instead_of_answering_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = open(dir.path());
        snapshotter.prepare("k", "", HashMap::new()).await.unwrap();
        snapshotter
            .commit("sha256:chain", "k", HashMap::new())
            .unwrap();
        snapshotter.prepare("b", "", HashMap::new()).await.unwrap();
        snapshotter.commit("ns2/base", "b", HashMap::new()).unwrap();
        let layer_labels = labels(&[
            (LABEL_TARGET, "sha256:chain"),
            (crate::snapshot::LABEL_IMAGE_REF, "127.0.0.1:1/app:v1"),
            (crate::snapshot::LABEL_LAYER_DIGEST, "sha256:00"),
        ]);
        let mounts = snapshotter
            .prepare("ns2/7/extract", "ns2/base", layer_labels)
            .await
            .unwrap();
        assert_eq!(mounts[0].kind, "overlay");
    }

    #[tokio::test]
    async fn an_existing_target_with_the_same_parent_answers_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = open(dir.path());
        snapshotter
            .prepare("ns/1/extract", "", HashMap::new())
            .await
            .unwrap();
        snapshotter
            .commit("sha256:chain", "ns/1/extract", HashMap::new())
            .unwrap();
        let err = snapshotter
            .prepare(
                "ns/2/extract",
                "",
                labels(&[(LABEL_TARGET, "sha256:chain")]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists(_)), "{err}");
        // Under another parent the target is a different layer: prepared as usual.
        snapshotter
            .prepare("ns/1/base", "", HashMap::new())
            .await
            .unwrap();
        snapshotter
            .commit("base", "ns/1/base", HashMap::new())
            .unwrap();
        snapshotter
            .prepare(
                "ns/3/extract",
                "base",
                labels(&[(LABEL_TARGET, "sha256:chain")]),
            )
            .await
            .unwrap();
        snapshotter.remove("ns/3/extract").await.unwrap();
        assert!(matches!(
            snapshotter.stat("ns/3/extract"),
            Err(SnapshotError::NotFound(_))
        ));
    }

    /// A lazy snapshot committed as `target` (no mount: its layer names an unreachable registry).
    fn lazy_record(snapshotter: &Snapshotter, target: &str, layer: &str) -> u64 {
        let store = &snapshotter.store;
        let id = store.reserve(false).unwrap();
        let remote = RemoteLayer {
            image: "127.0.0.1:1/attacker:v1".into(),
            manifest: String::new(),
            layer: layer.into(),
            compressed_chain: String::new(),
            expected: None,
            toc_hint: None,
        };
        let remote = verify::with_facts(store, target, "", remote).unwrap();
        store
            .insert_committed(
                target,
                "",
                HashMap::new(),
                id,
                Usage::default(),
                Some(remote),
            )
            .unwrap();
        id
    }

    fn layer_labels(target: &str, layer: &str) -> HashMap<String, String> {
        labels(&[
            (LABEL_TARGET, target),
            (crate::snapshot::LABEL_IMAGE_REF, "127.0.0.1:1/victim:v1"),
            (crate::snapshot::LABEL_LAYER_DIGEST, layer),
        ])
    }

    #[tokio::test]
    async fn an_unverified_lazy_snapshot_is_reused_only_for_the_same_compressed_layer() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = open(dir.path());
        let chain = crate::oci::Digest::of(b"claimed diff_id").to_string();
        let (ours, theirs) = (
            crate::oci::Digest::of(b"attacker blob").to_string(),
            crate::oci::Digest::of(b"victim blob").to_string(),
        );
        lazy_record(&snapshotter, &chain, &ours);
        let err = snapshotter
            .prepare("ns/1/extract", "", layer_labels(&chain, &ours))
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists(_)), "{err}");
        let before = METRICS.fallbacks.with_label_values(&["verify"]).get();
        let mounts = snapshotter
            .prepare("ns2/1/extract", "", layer_labels(&chain, &theirs))
            .await
            .unwrap();
        assert_eq!(mounts[0].kind, "bind", "containerd unpacks its own layer");
        assert!(METRICS.fallbacks.with_label_values(&["verify"]).get() > before);
    }

    #[tokio::test]
    async fn a_verified_lazy_snapshot_is_reused_and_a_mismatching_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snapshotter = open(dir.path());
        let (good, bad) = (
            crate::oci::Digest::of(b"good").to_string(),
            crate::oci::Digest::of(b"bad").to_string(),
        );
        let blob = crate::oci::Digest::of(b"blob").to_string();
        let other_blob = crate::oci::Digest::of(b"other blob").to_string();
        let good_id = lazy_record(&snapshotter, &good, &blob);
        let bad_id = lazy_record(&snapshotter, &bad, &blob);
        let store = &snapshotter.store;
        let verified = Verification::Verified {
            diff_id: good.clone(),
        };
        verify::write_verdict(&store.fs_dir(good_id), &verified).unwrap();
        let mismatch = Verification::Mismatch {
            message: "decompresses to something else".into(),
        };
        verify::write_verdict(&store.fs_dir(bad_id), &mismatch).unwrap();
        let failures = METRICS.verify_failures.get();

        // Verified: the chain ID is proven, whichever blob the next image has.
        let err = snapshotter
            .prepare("ns/1/extract", "", layer_labels(&good, &other_blob))
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists(_)), "{err}");

        // Failed: not found for Stat (containerd's Walk goes on), refused as a parent, never
        // handed to a Prepare of its chain, and counted once.
        let err = snapshotter.stat(&bad).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::NotFound(m) if m.contains("failed verification")),
            "{err}"
        );
        let err = snapshotter
            .prepare("ns/2/container", &bad, HashMap::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SnapshotError::FailedPrecondition(m) if m.contains("decompresses to something else")),
            "{err}"
        );
        let mounts = snapshotter
            .prepare("ns/3/extract", "", layer_labels(&bad, &blob))
            .await
            .unwrap();
        assert_eq!(mounts[0].kind, "bind");
        assert_eq!(METRICS.verify_failures.get(), failures + 1);
        assert!(matches!(
            store.record(&bad).unwrap().verification,
            Verification::Mismatch { .. }
        ));
        // containerd's GC can still remove it.
        snapshotter.remove(&bad).await.unwrap();
    }
}

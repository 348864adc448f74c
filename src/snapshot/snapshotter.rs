//! The snapshotter: the [`Store`]'s semantics plus lazily mounted layers.
//!
//! Prepare with a target (`containerd.io/snapshot.ref`) and the layer labels tries the remote
//! handshake: the layer is mounted lazily at a new snapshot's `fs` dir, committed under the target
//! name with the Prepare's parent and labels, and Prepare answers `ALREADY_EXISTS`. containerd then
//! finds it with Walk (`labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`) and never
//! downloads the layer. Anything that stops the handshake is logged and counted, and Prepare goes
//! on as overlayfs's would. The layers themselves are served by a [`LayerHost`].
//!
//! No lock is held across an await.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::host::LayerHost;
use super::metrics::METRICS;
use super::remote::Fallback;
use super::{Info, Kind, Mount, RemoteLayer, SnapshotError, Store, Usage, LABEL_TARGET};

/// The snapshotter (see the module docs).
#[derive(Debug)]
pub struct Snapshotter {
    store: Store,
    host: Arc<dyn LayerHost>,
}

impl Snapshotter {
    /// Opens the store under `root`; lazy layers are served by `host`. Call [`Self::restore`]
    /// next.
    pub fn open(root: &Path, host: Arc<dyn LayerHost>) -> Result<Self, SnapshotError> {
        Ok(Self {
            store: Store::open(root)?,
            host,
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
            let layer = record.remote.clone()?;
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
            if let Some(layer) = record.remote.clone() {
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

    /// Prepare, with the remote handshake when the labels ask for it.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if let Some(target) = labels.get(LABEL_TARGET).cloned() {
            if let Ok(existing) = self.store.record(&target) {
                if existing.kind == Kind::Committed && existing.parent == parent {
                    // A lazy layer whose mount could not be restored at start gets another try
                    // now that it is wanted again.
                    if let Some(layer) = existing.remote.clone() {
                        if !self.host.mounted().await.contains(&existing.id) {
                            self.restore_one(target.clone(), existing.id, layer).await;
                        }
                    }
                    return Err(SnapshotError::AlreadyExists(target));
                }
            }
            match self.try_lazy(&target, parent, &labels).await {
                Ok(()) => {
                    tracing::info!(key, target = %target, "committed a lazy layer; containerd skips it");
                    return Err(SnapshotError::AlreadyExists(target));
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
                    // Another Prepare of the same layer won the race: containerd uses that one.
                    SnapshotError::AlreadyExists(_)
                        if self.store.stat(target).is_ok_and(|i| i.parent == parent) =>
                    {
                        Ok(())
                    }
                    // The name is taken by the same chain over a differently named parent (its
                    // lower layer was unpacked in another containerd namespace): containerd
                    // would not find ours, so let it unpack this one as usual.
                    SnapshotError::AlreadyExists(_) => Err(Fallback::new(
                        "internal",
                        format!("{target} exists with another parent"),
                    )),
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
        self.ensure_chain_mounted(parent).await;
        self.store.prepare(key, parent, labels, Kind::View)
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let parent = self.store.record(key)?.parent;
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

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
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
    use crate::snapshot::{LocalHost, RemoteConfig};

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
}

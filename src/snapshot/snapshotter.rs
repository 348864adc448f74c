//! The snapshotter: the [`Store`]'s semantics plus lazily mounted layers.
//!
//! Prepare with a target (`containerd.io/snapshot.ref`) and the layer labels tries the remote
//! handshake: the layer is mounted lazily at a new snapshot's `fs` dir, committed under the target
//! name with the Prepare's parent and labels, and Prepare answers `ALREADY_EXISTS`. containerd then
//! finds it with Walk (`labels."containerd.io/snapshot.ref"==TARGET,parent==PARENT`) and never
//! downloads the layer. Anything that stops the handshake is logged and counted, and Prepare goes
//! on as overlayfs's would.
//!
//! Lock order: the store's lock, then `layers`; no lock is held across an await or an unmount.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::metrics::METRICS;
use super::remote::{Fallback, Mounted, Remote};
use super::{
    Info, Kind, Mount, RemoteConfig, RemoteLayer, SnapshotError, Store, Usage, LABEL_TARGET,
};
use crate::cache::ChunkCache;

/// Pins of a lazy layer's chunks are owned by `snapshot/<id>`.
const PIN_PREFIX: &str = "snapshot/";

/// The snapshotter (see the module docs).
#[derive(Debug)]
pub struct Snapshotter {
    store: Store,
    remote: Remote,
    /// Lazy layers mounted by this process, by snapshot id.
    layers: Mutex<HashMap<u64, Mounted>>,
}

impl Snapshotter {
    /// Opens the store under `root`; lazy layers use `cache`. Call [`Self::restore`] next.
    pub fn open(
        root: &Path,
        config: RemoteConfig,
        cache: ChunkCache,
    ) -> Result<Self, SnapshotError> {
        Ok(Self {
            store: Store::open(root)?,
            remote: Remote::new(config, cache)?,
            layers: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn layers(&self) -> MutexGuard<'_, HashMap<u64, Mounted>> {
        self.layers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mounts every committed lazy layer again (after a restart its mount died with the old
    /// process), releases pins of snapshots that are gone, and removes orphaned directories.
    /// A layer that cannot be mounted is logged and counted; its snapshot stays, so containerd's
    /// view of the images does not change under it.
    pub async fn restore(&self) {
        let records = self.store.records();
        let ids: std::collections::HashSet<String> = records
            .iter()
            .map(|(_, r)| format!("{PIN_PREFIX}{}", r.id))
            .collect();
        let cache = self.remote.cache();
        for owner in cache.pin_owners().unwrap_or_default() {
            if owner.starts_with(PIN_PREFIX) && !ids.contains(&owner) {
                let _ = cache.unpin(&owner);
            }
        }
        // All at once: each costs a round trip or two to the registry.
        let restores = records.into_iter().filter_map(|(name, record)| {
            let layer = record.remote.clone()?;
            (!self.layers().contains_key(&record.id))
                .then(|| self.restore_one(name, record.id, layer))
        });
        futures_util::future::join_all(restores).await;
        match self.store.cleanup() {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed orphaned snapshot directories"),
            Err(e) => tracing::warn!("cleanup: {e}"),
        }
    }

    async fn restore_one(&self, name: String, id: u64, layer: RemoteLayer) {
        let dir = self.store.fs_dir(id);
        // A mount left by the previous process is dead (ENOTCONN): detach it first.
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(snapshot = %name, "cannot restore lazy layer: creating {}: {e}", dir.display());
            METRICS.restore_failures.inc();
            return;
        }
        match self
            .remote
            .mount_in_time(&layer, &dir, format!("{PIN_PREFIX}{id}"))
            .await
        {
            Ok((mounted, _)) => {
                self.layers().insert(id, mounted);
                METRICS.restored.inc();
                METRICS.mounted.inc();
            }
            Err(f) => {
                tracing::error!(snapshot = %name, reason = f.reason, "cannot restore lazy layer: {}", f.message);
                METRICS.restore_failures.inc();
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
                        if !self.layers().contains_key(&existing.id) {
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
        self.store.prepare(key, parent, labels, Kind::Active)
    }

    async fn try_lazy(
        &self,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), Fallback> {
        if !self.remote.enabled() {
            return Err(Fallback::new(
                "disabled",
                "lazy loading is off in the config",
            ));
        }
        let layer = RemoteLayer::from_labels(labels)?;
        let id = self
            .store
            .reserve(false)
            .map_err(|e| Fallback::new("internal", e))?;
        let dir = self.store.fs_dir(id);
        let (mounted, usage) = match self
            .remote
            .mount_in_time(&layer, &dir, format!("{PIN_PREFIX}{id}"))
            .await
        {
            Ok(m) => m,
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
                self.layers().insert(id, mounted);
                METRICS.lazy_layers.inc();
                METRICS.mounted.inc();
                Ok(())
            }
            Err(e) => {
                release(mounted, self.remote.cache().clone()).await;
                self.store.remove_dir(id);
                match e {
                    // Another Prepare of the same layer won the race: containerd uses that one.
                    SnapshotError::AlreadyExists(_) => Ok(()),
                    e => Err(Fallback::new("internal", e)),
                }
            }
        }
    }

    /// A read-only view of `parent`.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.store.prepare(key, parent, labels, Kind::View)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
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
        let mounted = self.layers().remove(&record.id);
        if let Some(mounted) = mounted {
            METRICS.mounted.dec();
            release(mounted, self.remote.cache().clone()).await;
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

    /// Unmounts every lazy layer (on shutdown: a FUSE mount cannot outlive its process, and a
    /// dead one only gives ENOTCONN). Records stay, so the next start mounts them again.
    pub async fn unmount_all(&self) {
        let layers: Vec<Mounted> = self.layers().drain().map(|(_, m)| m).collect();
        let n = layers.len();
        let _ = tokio::task::spawn_blocking(move || drop(layers)).await;
        METRICS.mounted.set(0);
        if n > 0 {
            tracing::info!(layers = n, "unmounted lazy layers");
        }
    }
}

/// Unmounts a lazy layer (off the async threads: an unmount may wait for FUSE to wind down),
/// releases its pins and evicts past the disk budget.
async fn release(mounted: Mounted, cache: ChunkCache) {
    let owner = mounted.pin_owner.clone();
    let _ = tokio::task::spawn_blocking(move || drop(mounted)).await;
    if let Err(e) = cache.unpin(&owner) {
        tracing::warn!("cannot release pins of {owner}: {e}");
    }
    // Its chunks are ordinary cache entries now: trim the cache to its budget right away, so
    // removing an image frees its disk without waiting for the next fetch.
    match tokio::task::spawn_blocking(move || cache.evict()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(freed)) => tracing::info!(freed, "evicted chunks past the disk budget"),
        Ok(Err(e)) => tracing::warn!("eviction after removing a lazy layer: {e}"),
        Err(e) => tracing::warn!("eviction task failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;

    fn open(root: &Path) -> Snapshotter {
        let cache = ChunkCache::open(CacheConfig {
            dir: root.join("cache"),
            disk_budget: 0,
            memory_budget: 1 << 20,
        })
        .unwrap();
        Snapshotter::open(root, RemoteConfig::default(), cache).unwrap()
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

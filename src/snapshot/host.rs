//! Where lazy layers are mounted and served: the process that owns the FUSE sessions and the
//! chunk cache.
//!
//! A FUSE mount lives exactly as long as the process serving it, so whoever hosts the layers
//! decides what survives a restart. [`LocalHost`] serves them in the snapshotter's own process
//! (a restart unmounts them; running containers lose their lazy lowers). `service` also offers a
//! separate, long-lived layer-host process behind the same trait, which the gRPC snapshotter can
//! be restarted without.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::remote::{Fallback, Mounted, Remote};
use super::{RemoteConfig, RemoteLayer, SnapshotError, Usage};
use crate::cache::ChunkCache;
use crate::registry::PullSecret;

/// Pins of a lazy layer's chunks are owned by `snapshot/<id>`.
pub const PIN_PREFIX: &str = "snapshot/";

/// Mounts and unmounts lazy layers by snapshot id.
pub trait LayerHost: Send + Sync + std::fmt::Debug + 'static {
    /// Mounts `layer` at `dir` (an empty directory) for snapshot `id`, within the read timeout.
    fn mount(
        &self,
        id: u64,
        layer: RemoteLayer,
        dir: PathBuf,
    ) -> BoxFuture<'_, Result<Usage, Fallback>>;
    /// Starts finding `layers` (digests) of `image` in the background, so that their Prepare
    /// calls, which containerd makes one after another, find them ready. Returns at once.
    fn warm(&self, image: String, manifest: String, layers: Vec<String>) -> BoxFuture<'_, ()>;
    /// Starts finding the lazy layers of `image` (a reference, as a CRI pull names it) from its
    /// manifest, before containerd has resolved it. Returns at once.
    fn warm_image(&self, image: String) -> BoxFuture<'_, ()>;
    /// Keeps the credentials a pull handed over (through the CRI proxy) for the layers of its
    /// repository, before containerd's pull of that image asks for them.
    fn remember_secret(&self, secret: PullSecret) -> BoxFuture<'_, ()>;
    /// Unmounts snapshot `id`'s layer, releases its pins and trims the cache to its budget.
    fn unmount(&self, id: u64) -> BoxFuture<'_, ()>;
    /// The snapshot ids whose layers are mounted now.
    fn mounted(&self) -> BoxFuture<'_, Vec<u64>>;
    /// Releases the pins of snapshots not in `live` (removed while nobody was watching).
    fn release_stale_pins(&self, live: Vec<u64>) -> BoxFuture<'_, ()>;
    /// What to do when the snapshotter stops: a local host unmounts everything, a separate
    /// layer host keeps serving.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// Whether lazy loading is on at all.
    fn enabled(&self) -> bool;
}

/// Layers served in this process.
#[derive(Debug)]
pub struct LocalHost {
    remote: Remote,
    layers: Mutex<HashMap<u64, Mounted>>,
}

impl LocalHost {
    pub fn new(config: RemoteConfig, cache: ChunkCache) -> Result<Self, SnapshotError> {
        Ok(Self {
            remote: Remote::new(config, cache)?,
            layers: Mutex::new(HashMap::new()),
        })
    }

    fn layers(&self) -> MutexGuard<'_, HashMap<u64, Mounted>> {
        self.layers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Unmounts every layer (used on shutdown by both kinds of host).
    pub async fn unmount_all(&self) {
        let layers: Vec<Mounted> = self.layers().drain().map(|(_, m)| m).collect();
        let n = layers.len();
        let _ = tokio::task::spawn_blocking(move || drop(layers)).await;
        if n > 0 {
            tracing::info!(layers = n, "unmounted lazy layers");
        }
    }
}

impl LayerHost for LocalHost {
    fn mount(
        &self,
        id: u64,
        layer: RemoteLayer,
        dir: PathBuf,
    ) -> BoxFuture<'_, Result<Usage, Fallback>> {
        async move {
            if self.layers().contains_key(&id) {
                return Err(Fallback::new(
                    "internal",
                    format!("snapshot {id} is mounted"),
                ));
            }
            // A mount left by a process that died is dead (ENOTCONN): detach it first.
            let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Fallback::new("internal", format!("{}: {e}", dir.display())))?;
            let (mounted, usage) = self
                .remote
                .mount_in_time(&layer, &dir, format!("{PIN_PREFIX}{id}"))
                .await?;
            self.layers().insert(id, mounted);
            Ok(usage)
        }
        .boxed()
    }

    fn warm(&self, image: String, manifest: String, layers: Vec<String>) -> BoxFuture<'_, ()> {
        self.remote.warm(&image, &manifest, &layers);
        async {}.boxed()
    }

    fn warm_image(&self, image: String) -> BoxFuture<'_, ()> {
        // An image pulled again (kubelet's `imagePullPolicy: Always`) has its layers mounted:
        // containerd will not prepare them, so their TOCs would be read for nothing.
        let mounted = self.layers().values().map(|m| m.digest).collect();
        self.remote.warm_image(&image, mounted);
        async {}.boxed()
    }

    fn remember_secret(&self, secret: PullSecret) -> BoxFuture<'_, ()> {
        self.remote.pull_secrets().remember(secret);
        async {}.boxed()
    }

    fn unmount(&self, id: u64) -> BoxFuture<'_, ()> {
        async move {
            let Some(mounted) = self.layers().remove(&id) else {
                return;
            };
            let cache = self.remote.cache().clone();
            let owner = mounted.pin_owner.clone();
            // Off the async threads: an unmount may wait for FUSE to wind down.
            let _ = tokio::task::spawn_blocking(move || drop(mounted)).await;
            if let Err(e) = cache.unpin(&owner) {
                tracing::warn!("cannot release pins of {owner}: {e}");
            }
            // Its chunks are ordinary cache entries now: trim the cache to its budget right
            // away, so removing an image frees its disk without waiting for the next fetch.
            match tokio::task::spawn_blocking(move || cache.evict()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(freed)) => tracing::info!(freed, "evicted chunks past the disk budget"),
                Ok(Err(e)) => tracing::warn!("eviction after removing a lazy layer: {e}"),
                Err(e) => tracing::warn!("eviction task failed: {e}"),
            }
        }
        .boxed()
    }

    fn mounted(&self) -> BoxFuture<'_, Vec<u64>> {
        let ids = self.layers().keys().copied().collect();
        async move { ids }.boxed()
    }

    fn release_stale_pins(&self, live: Vec<u64>) -> BoxFuture<'_, ()> {
        async move {
            let live: std::collections::HashSet<String> =
                live.iter().map(|id| format!("{PIN_PREFIX}{id}")).collect();
            let cache = self.remote.cache();
            for owner in cache.pin_owners().unwrap_or_default() {
                if owner.starts_with(PIN_PREFIX) && !live.contains(&owner) {
                    let _ = cache.unpin(&owner);
                }
            }
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.unmount_all().boxed()
    }

    fn enabled(&self) -> bool {
        self.remote.enabled()
    }
}

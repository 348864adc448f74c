//! The read-only FUSE file systems of layers, built from their TOCs, served by one FUSE session
//! per process ([`LayerSession`]), and overlayfs composition.
//!
//! Owns: inodes, directory listings and attributes from the TOC, OCI whiteouts translated into
//! overlayfs whiteouts (char 0:0) and opaque directories (`trusted.overlay.opaque`), which opens
//! use FUSE passthrough, mounting and unmounting. Does not own: where file content comes from; it
//! asks a [`ChunkSource`] (for chunks, and for a local copy of a file to pass through).

mod inode;
mod layer;
mod passthrough;
mod session;
pub mod unpack;

pub use inode::{InodeTable, NodeKind, TableError};
pub use session::{remove_dead_sessions, LayerSession};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::format::{Chunk, Toc, TocEntry};

/// Errors name the mount point concerned.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("mounting {path}: {message}")]
    Mount { path: PathBuf, message: String },
    #[error("unmounting {path}: {message}")]
    Unmount { path: PathBuf, message: String },
}

/// Why a chunk could not be served; the file system answers EIO and logs the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

/// Where a layer file system gets file content. Implementations return only verified bytes.
pub trait ChunkSource: Send + Sync + 'static {
    /// The uncompressed, verified bytes of `chunk` (one of the TOC's chunks). Never asked for a
    /// zero run: the file system writes those zeros itself, only as many as a read asks for.
    fn read_chunk(&self, chunk: &Chunk) -> BoxFuture<'static, Result<Bytes, ChunkError>>;

    /// A local file holding exactly the verified content of `entry`, ready now, for the kernel
    /// to read directly (FUSE passthrough). Called on open, so it must be cheap and must never
    /// fetch: an implementation may start preparing the file and offer it to a later open.
    fn local_file(&self, _entry: &TocEntry) -> Option<std::fs::File> {
        None
    }
}

/// How to mount a layer.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// A read that cannot be served within this time fails with EIO instead of hanging.
    pub read_timeout: Duration,
    /// FUSE event-loop threads.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            threads: 2,
        }
    }
}

/// A layer mounted at its mountpoint (a bind mount of its directory in a [`LayerSession`]);
/// unmounted, and dropped from the session, when dropped.
#[derive(Debug)]
pub struct LayerMount {
    session: Arc<LayerSession>,
    id: u64,
    mountpoint: PathBuf,
    mounted: bool,
}

impl LayerMount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts now, reporting failure (dropping unmounts too, but cannot report).
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FsError> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        let result = match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) => Ok(()),
            // Still in use (an overlay over it, an open file): detach now; the kernel finishes
            // when the last user lets go, and those users see errors from here on.
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "layer still in use after unmount; detached");
                detach(&self.mountpoint);
                Ok(())
            }
            Err(e) => {
                detach(&self.mountpoint);
                Err(FsError::Unmount {
                    path: self.mountpoint.clone(),
                    message: format!("{e} (detached instead)"),
                })
            }
        };
        self.session.remove(self.id);
        result
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!("{e}");
        }
    }
}

fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// Allocations at least this large are given back to the system when freed.
const MMAP_THRESHOLD: i32 = 256 << 10;

/// Stops glibc from keeping freed chunk-sized buffers. A process serving layers allocates and
/// frees megabyte buffers (chunks, range responses) from many threads; glibc's default raises its
/// mmap threshold to the largest size freed so far, after which such buffers come from per-thread
/// arenas and stay resident once freed (measured: 45 of 83 MiB RSS serving 10 layers). A fixed
/// threshold maps them instead, and returns them when freed. Process-wide, set once, harmless
/// elsewhere; the cost is a page fault per page of each large buffer.
fn limit_allocator_retention() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes glibc's allocator parameters, under its own lock; any
        // thread may call it at any time, and it takes no pointers.
        let ok = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; freed buffers may stay resident");
        }
    });
}

/// Serves the layer `toc` describes in `session` and bind-mounts it at `mountpoint`. Reads of
/// file content are answered from `source` on `runtime` without blocking the FUSE loop.
pub fn mount_layer(
    session: &Arc<LayerSession>,
    toc: Arc<Toc>,
    source: Arc<dyn ChunkSource>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
) -> Result<LayerMount, FsError> {
    let error = |message: String| FsError::Mount {
        path: mountpoint.to_owned(),
        message,
    };
    let label = mountpoint
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let table = inode::InodeTable::build(&toc)
        .map_err(|e| error(format!("the layer cannot be served: {e}")))?;
    if table.len() > session::MAX_LAYER_INODES {
        return Err(error(format!(
            "the layer has {} inodes, more than the {} one layer may have",
            table.len(),
            session::MAX_LAYER_INODES
        )));
    }
    let read_timeout = session.options().read_timeout;
    let id = session
        .add(|id, caps| layer::LayerFs {
            table,
            toc,
            source,
            runtime,
            read_timeout,
            label,
            passthrough: passthrough::Passthrough::new(caps),
            base: session::base_of(id),
        })
        .map_err(error)?;
    let dir = session.dir().join(id.to_string());
    if let Err(e) = nix::mount::mount(
        Some(&dir),
        mountpoint,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    ) {
        session.remove(id);
        return Err(error(format!("bind-mounting {}: {e}", dir.display())));
    }
    Ok(LayerMount {
        session: session.clone(),
        id,
        mountpoint: mountpoint.to_owned(),
        mounted: true,
    })
}

/// An overlayfs mount; unmounted when dropped.
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
    mounted: bool,
    /// An empty bottom layer, when only one lower was given (overlayfs wants two without upper).
    _empty: Option<tempfile::TempDir>,
}

impl OverlayMount {
    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn unmount(mut self) -> Result<(), FsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FsError> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        match nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()) {
            Ok(()) => Ok(()),
            // Files still open: detach now; the kernel finishes when the last one closes.
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(target = %self.target.display(), "overlay busy; detached lazily");
                nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                    FsError::Unmount {
                        path: self.target.clone(),
                        message: e.to_string(),
                    }
                })
            }
            Err(e) => Err(FsError::Unmount {
                path: self.target.clone(),
                message: e.to_string(),
            }),
        }
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!("{e}");
        }
    }
}

/// Where an overlay's writes go.
#[derive(Debug, Clone)]
pub struct UpperDir {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Mounts overlayfs at `target` over `lowers` (topmost layer first), read-only without `upper`,
/// with `flags` (e.g. `MS_NOSUID | MS_NODEV` for a mount point outside a root-only directory).
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<&UpperDir>,
    target: &Path,
    flags: nix::mount::MsFlags,
) -> Result<OverlayMount, FsError> {
    let error = |message: String| FsError::Mount {
        path: target.to_owned(),
        message,
    };
    if lowers.is_empty() {
        return Err(error("an overlay needs at least one lower layer".into()));
    }
    let mut lowers = lowers.to_vec();
    let empty = if upper.is_none() && lowers.len() == 1 {
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-empty-")
            .tempdir()
            .map_err(|e| error(format!("creating an empty layer: {e}")))?;
        lowers.push(dir.path().to_owned());
        Some(dir)
    } else {
        None
    };
    let mut paths: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    if let Some(u) = upper {
        paths.extend([u.upper.as_path(), u.work.as_path()]);
    }
    if let Some(bad) = paths
        .iter()
        .find(|p| p.to_string_lossy().contains([',', ':']))
    {
        return Err(error(format!(
            "{} contains ',' or ':', which overlayfs options cannot carry",
            bad.display()
        )));
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let mut data = format!("lowerdir={lowerdir},xino=on");
    let mut flags = flags;
    match upper {
        Some(u) => data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.upper.display(),
            u.work.display()
        )),
        None => flags |= nix::mount::MsFlags::MS_RDONLY,
    }
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| {
        error(format!(
            "overlayfs refused the mount: {e} (options: {data})"
        ))
    })?;
    Ok(OverlayMount {
        target: target.to_owned(),
        mounted: true,
        _empty: empty,
    })
}

#[cfg(test)]
mod guard_tests;

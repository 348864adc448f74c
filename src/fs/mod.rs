//! The read-only FUSE file system of one layer, built from its TOC, and overlayfs composition.
//!
//! Owns: inodes, directory listings and attributes from the TOC, OCI whiteouts translated into
//! overlayfs whiteouts (char 0:0) and opaque directories (`trusted.overlay.opaque`), mounting and
//! unmounting. Does not own: where file content comes from; it asks a [`ChunkSource`].

pub mod unpack;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::format::{Chunk, Toc};

/// Errors name the mount point or entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{0}")]
    Other(String),
}

/// Why a chunk could not be served; the file system answers EIO and logs the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ChunkError(pub String);

/// Where a layer file system gets file content. Implementations return only verified bytes.
pub trait ChunkSource: Send + Sync + 'static {
    /// The uncompressed, verified bytes of `chunk` (one of the TOC's chunks).
    fn read_chunk(&self, chunk: &Chunk) -> BoxFuture<'static, Result<Bytes, ChunkError>>;
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

/// A mounted layer; unmounted when dropped.
#[derive(Debug)]
pub struct LayerMount {}

impl LayerMount {
    pub fn mountpoint(&self) -> &Path {
        todo!("fs helper")
    }

    /// Unmounts now, reporting failure (dropping unmounts too, but cannot report).
    pub fn unmount(self) -> Result<(), FsError> {
        todo!("fs helper")
    }
}

/// Mounts the layer `toc` describes at `mountpoint`. Reads of file content are answered from
/// `source` on `runtime` without blocking the FUSE loop.
pub fn mount_layer(
    toc: Arc<Toc>,
    source: Arc<dyn ChunkSource>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<LayerMount, FsError> {
    let _ = (toc, source, runtime, mountpoint, options);
    todo!("fs helper")
}

/// An overlayfs mount; unmounted when dropped.
#[derive(Debug)]
pub struct OverlayMount {}

impl OverlayMount {
    pub fn target(&self) -> &Path {
        todo!("fs helper")
    }

    pub fn unmount(self) -> Result<(), FsError> {
        todo!("fs helper")
    }
}

/// Where an overlay's writes go.
#[derive(Debug, Clone)]
pub struct UpperDir {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// Mounts overlayfs at `target` over `lowers` (topmost layer first), read-only without `upper`.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<&UpperDir>,
    target: &Path,
) -> Result<OverlayMount, FsError> {
    let _ = (lowers, upper, target);
    todo!("fs helper")
}

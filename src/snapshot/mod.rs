//! containerd snapshot semantics, as containerd's own overlayfs snapshotter has them, with lazily
//! mounted layers as committed snapshots.
//!
//! Owns: snapshots (active, view, committed), their parent chains and labels, their directories
//! `ROOT/snapshots/<id>/{fs,work}`, their records in RocksDB (`ROOT/snapshots/meta`), the mount
//! lists containerd gets (a bind mount or an overlay over the parents' `fs` dirs), and the remote
//! handshake: a layer in a lazy format is mounted from its TOC (FUSE) at its snapshot's `fs` dir
//! and committed under the name containerd asked for, so containerd never downloads it.
//! Does not own: gRPC (`service`), serving a layer (`fs`, `fetch`, `cache`).
//!
//! - [`Store`]: the synchronous semantics and persistence (unit-tested without containerd);
//! - [`Snapshotter`]: the store plus lazy layers (the remote handshake, restore on start);
//! - [`LayerHost`]: the process serving lazy layers ([`LocalHost`]: this one);
//! - `locate`: finding a layer's manifest and TOC, and an image's layers ahead of their Prepare;
//! - `profiles`: start-up profiles, looked up once per image, prefetched per layer at mount;
//! - `verify`: what a lazy snapshot was made from, and the check of its `diff_id`;
//! - `filter`: containerd's filter language for Walk/List;
//! - `hosts`: registry mirrors from containerd's `hosts.toml` files.

mod db;
pub mod filter;
mod host;
pub mod hosts;
mod locate;
mod metrics;
mod mounts;
mod remote;
mod snapshotter;
mod store;
mod usage;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use host::{LayerHost, LocalHost, PIN_PREFIX};
pub use remote::{Fallback, RemoteConfig, RemoteLayer, FALLBACK_REASONS};
pub use snapshotter::Snapshotter;
pub use store::Store;
pub use verify::{Expected, Verification};

/// Label holding the name a remote snapshotter commits a layer under (a chain ID).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// CRI labels (also sent by `ctr-remote image rpull`) naming the image and layer being unpacked.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// CRI's label listing the image's layers from the one being prepared upwards (comma-separated
/// digests): the first Prepare of an image has lazysnapd find all of them at once.
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// Errors map one to one onto the gRPC codes containerd acts on.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot metadata in {path}: {message}")]
    Db { path: PathBuf, message: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

impl SnapshotError {
    fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            error,
        }
    }
}

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, for inspection; cannot be committed.
    View,
    /// Writable; becomes committed by `commit`.
    Active,
    /// Immutable; can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The parent's name; empty for none.
    pub parent: String,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// Disk used by a snapshot itself (not its parents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// One mount of a snapshot's mount list, in containerd's terms (the target is the caller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A snapshot's persistent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the directory `ROOT/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured at commit (a committed snapshot does not change).
    pub usage: Option<Usage>,
    /// Set when `fs` is a lazily mounted layer rather than a directory on disk.
    pub remote: Option<RemoteLayer>,
    /// For a lazy layer: whether its content was checked against its chain ID (`verify`).
    /// Snapshots containerd filled were checked by containerd before it committed them.
    #[serde(default)]
    pub verification: Verification,
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

//! The container's root from a running `lazysnapd`, over its snapshots API, so that `run` shares
//! the node's chunk cache and layer mounts with containerd's containers.
//!
//! `run` does what containerd's unpacker does, except that it never takes a snapshot for a layer
//! because its chain ID matches (a chain ID is only what an image config claims): for each layer,
//! bottom up, it Prepares the layer's chain ID with the layer labels of the remote-snapshot
//! handshake, and lazysnapd either answers `ALREADY_EXISTS` (a snapshot it may hand out for this
//! layer exists, or it just mounted the layer lazily), or hands back an empty snapshot that `run`
//! fills (fetch, verify the diff_id, unpack) and commits: under the chain ID, or, if another
//! image's lazy layer holds that name, under `<chain ID>@<layer digest>`. The container then gets an active snapshot on top, removed when it exits. The
//! committed layer snapshots stay, for the next container, as containerd's would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::Code;
use nix::mount::{MntFlags, MsFlags};
use serde_json::Value;

use crate::mount::{self, LayerInfo, MountConfig};
use crate::oci::{Digest, Reference};
use crate::registry::Client;
use crate::snapshot::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET};

/// Where lazysnapd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lazysnap/lazysnapd.sock";
/// The snapshotter name in requests (lazysnapd serves one).
const SNAPSHOTTER: &str = "lazysnap";
const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// Why the daemon could not give us a root.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("lazysnapd at {socket}: {message}")]
    Rpc { socket: String, message: String },
    #[error("mounting the container's root at {target}: {error}")]
    Mount { target: String, error: nix::Error },
    #[error(transparent)]
    Image(#[from] mount::MountError),
}

/// A connection to lazysnapd's snapshots service.
#[derive(Debug, Clone)]
pub struct Daemon {
    client: SnapshotsClient<Channel>,
    pub socket: PathBuf,
}

impl Daemon {
    /// Connects when something listens on `socket`; `None` when nothing does (a stale socket
    /// file included), so the caller can host the service in-process instead.
    pub async fn connect(socket: &Path) -> Option<Self> {
        std::os::unix::net::UnixStream::connect(socket).ok()?;
        let path = socket.to_owned();
        // The URI is a placeholder: the connector dials the unix socket.
        let channel = Endpoint::try_from("http://[::]:50051")
            .ok()?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .ok()?;
        Some(Self {
            client: SnapshotsClient::new(channel),
            socket: socket.to_owned(),
        })
    }

    fn error(&self, what: &str, status: containerd_snapshots::tonic::Status) -> DaemonError {
        DaemonError::Rpc {
            socket: self.socket.display().to_string(),
            message: format!("{what}: {} ({:?})", status.message(), status.code()),
        }
    }

    async fn exists(&self, key: &str) -> bool {
        self.client
            .clone()
            .stat(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await
            .is_ok()
    }

    /// Commits the active snapshot `key` as `name`.
    async fn commit(
        &self,
        name: &str,
        key: &str,
    ) -> Result<(), containerd_snapshots::tonic::Status> {
        self.client
            .clone()
            .commit(CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.into(),
                key: key.into(),
                labels: HashMap::new(),
            })
            .await
            .map(|_| ())
    }

    /// Removes snapshot `key`.
    pub async fn remove(&self, key: &str) -> Result<(), DaemonError> {
        self.client
            .clone()
            .remove(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            })
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("removing {key}"), e))
    }
}

/// The image as lazysnapd holds it, and the container's root mounted at `rootfs`.
#[derive(Debug)]
pub struct DaemonRoot {
    pub manifest_digest: Digest,
    pub config: Value,
    pub layer_info: Vec<LayerInfo>,
    pub seconds: f64,
    /// The container's active snapshot.
    pub key: String,
    pub rootfs: PathBuf,
}

/// Prepares every layer's snapshot and the container's active one on top, and mounts it at
/// `rootfs`. On error nothing of the container is left (committed layers stay, as a cache).
pub async fn prepare_root(
    daemon: &Daemon,
    reference: &Reference,
    config: &MountConfig,
    container: &str,
    rootfs: &Path,
) -> Result<DaemonRoot, DaemonError> {
    let start = Instant::now();
    let client = Client::new(config.registry.clone())
        .map_err(|e| mount::MountError::Image(e.to_string()))?;
    let (manifest_digest, manifest, image_config) =
        mount::resolve(&client, reference, &config.platform).await?;
    let layers: Vec<(Digest, u64)> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let digest = d["digest"].as_str().unwrap_or_default().parse();
            digest.map(|g| (g, d["size"].as_u64().unwrap_or(0)))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| mount::MountError::Image(format!("layer descriptor: {e}")))?;
    let diff_ids: Vec<Digest> = image_config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| d.as_str().unwrap_or_default().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| mount::MountError::Image(format!("config diff_ids: {e}")))?;
    if diff_ids.len() != layers.len() {
        return Err(mount::MountError::Image(format!(
            "the manifest has {} layers but the config {} diff_ids",
            layers.len(),
            diff_ids.len()
        ))
        .into());
    }

    let mut parent = String::new();
    let mut layer_info = Vec::new();
    let mut chain: Option<Digest> = None;
    for (i, ((digest, size), diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        let layer_start = Instant::now();
        // containerd's chain ID: the first diff_id, then sha256("<parent chain> <diff_id>").
        let id = match chain {
            None => *diff_id,
            Some(c) => Digest::of(format!("{c} {diff_id}").as_bytes()),
        };
        chain = Some(id);
        let name = id.to_string();
        let above: Vec<String> = layers[i..].iter().map(|(d, _)| d.to_string()).collect();
        let labels = HashMap::from([
            (LABEL_TARGET.to_owned(), name.clone()),
            (LABEL_IMAGE_REF.to_owned(), reference.to_string()),
            (
                LABEL_MANIFEST_DIGEST.to_owned(),
                manifest_digest.to_string(),
            ),
            (LABEL_LAYER_DIGEST.to_owned(), digest.to_string()),
            (LABEL_IMAGE_LAYERS.to_owned(), above.join(",")),
        ]);
        // A layer this run had to fill because lazysnapd would not hand out the snapshot named
        // by its chain ID (another image's lazy layer, unverified or refused) is committed under
        // this name instead, and found there by the next run.
        let own = format!("{name}@{digest}");
        let (mode, committed) = if daemon.exists(&own).await {
            ("snapshot", own)
        } else {
            // Only for the report: lazysnapd decides what the Prepare gets, by what was
            // verified, never this Stat.
            let existed = daemon.exists(&name).await;
            let key = format!("lazysnap-run/{container}/extract-{i}-{}", id.hex());
            let prepared = daemon
                .client
                .clone()
                .prepare(PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels,
                })
                .await;
            match prepared {
                Err(s) if s.code() == Code::AlreadyExists => {
                    (if existed { "snapshot" } else { "lazy" }, name)
                }
                Err(s) => return Err(daemon.error(&format!("preparing layer {i}"), s)),
                Ok(response) => {
                    let filled = fill_layer(
                        &client,
                        reference,
                        (digest, *size),
                        diff_id,
                        &response.into_inner().mounts,
                    )
                    .await;
                    let committed = match filled {
                        Ok(()) => match daemon.commit(&name, &key).await {
                            Err(s) if s.code() == Code::AlreadyExists => {
                                daemon.commit(&own, &key).await.map(|()| own)
                            }
                            other => other.map(|()| name),
                        }
                        .map_err(|e| daemon.error(&format!("committing layer {i}"), e)),
                        Err(e) => Err(e),
                    };
                    match committed {
                        Ok(committed) => ("unpacked", committed),
                        Err(e) => {
                            let _ = daemon.remove(&key).await;
                            return Err(e);
                        }
                    }
                }
            }
        };
        layer_info.push(LayerInfo {
            digest: *digest,
            size: *size,
            mode,
            entries: None,
            seconds: layer_start.elapsed().as_secs_f64(),
        });
        parent = committed;
    }

    let key = format!("lazysnap-run/{container}");
    let mounts = daemon
        .client
        .clone()
        .prepare(PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
            parent,
            labels: HashMap::new(),
        })
        .await
        .map_err(|e| daemon.error("preparing the container's snapshot", e))?
        .into_inner()
        .mounts;
    if let Err(e) = mount_all(&mounts, rootfs) {
        let _ = daemon.remove(&key).await;
        return Err(e);
    }
    Ok(DaemonRoot {
        manifest_digest,
        config: image_config,
        layer_info,
        seconds: start.elapsed().as_secs_f64(),
        key,
        rootfs: rootfs.to_owned(),
    })
}

/// Mounts the empty snapshot lazysnapd prepared, unpacks the verified layer into it, unmounts.
async fn fill_layer(
    client: &Client,
    reference: &Reference,
    (digest, size): (&Digest, u64),
    diff_id: &Digest,
    mounts: &[Mount],
) -> Result<(), DaemonError> {
    let dir = tempfile::Builder::new()
        .prefix("lazysnap-unpack-")
        .tempdir()
        .map_err(|e| mount::MountError::Io {
            context: "creating a directory to unpack into".into(),
            error: e,
        })?;
    mount_all(mounts, dir.path())?;
    let result =
        mount::fetch_and_unpack(client, reference, (digest, size), diff_id, dir.path()).await;
    unmount(dir.path());
    result.map_err(Into::into)
}

/// Mounts a containerd mount list (a bind of one directory, or an overlay) at `target`.
fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), DaemonError> {
    let error = |error| DaemonError::Mount {
        target: target.display().to_string(),
        error,
    };
    for m in mounts {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                other => data.push(other),
            }
        }
        let data = data.join(",");
        let fstype = (m.r#type != "bind").then_some(m.r#type.as_str());
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(error)?;
        // A bind mount ignores MS_RDONLY until remounted.
        if flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY) {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(error)?;
        }
    }
    Ok(())
}

/// Unmounts `target`, detaching it if it is busy.
pub fn unmount(target: &Path) {
    if nix::mount::umount2(target, MntFlags::empty()).is_err() {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
    }
}

//! The node service `lazysnapd`: containerd's snapshots gRPC API on a unix socket (registered in
//! containerd as `[proxy_plugins.lazysnap] type = "snapshot"`), and the metrics endpoint.
//!
//! Owns: the processes' lifecycle (open the state, find or start the layer host, mount missing
//! lazy layers again, serve; on shutdown stop serving, and unmount only if the layers are served
//! in-process), the sockets, the config file and the metrics page. Does not own: snapshot
//! semantics (`snapshot`).
//!
//! - `grpc`: the snapshots API over a [`Snapshotter`];
//! - `cri`: the CRI image service proxy in front of containerd's (kubelet's pull secrets);
//! - `layer_host`: the separate process serving lazy layers, and its client;
//! - `config`: the TOML file; `metrics`: the endpoint.

pub mod config;
mod cri;
mod grpc;
pub mod layer_host;
mod metrics;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::tonic::transport::Server;
use tokio_stream::wrappers::UnixListenerStream;

pub use config::Config;
pub use grpc::Grpc;

use crate::cache::{CacheConfig, ChunkCache};
use crate::snapshot::{LayerHost, LocalHost, SnapshotError, Snapshotter};
use layer_host::LayerHostClient;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("config file {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("opening the chunk cache under {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("serving gRPC on {path}: {message}")]
    Serve { path: PathBuf, message: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServiceError {
    let context = context.into();
    move |error| ServiceError::Io { context, error }
}

/// The chunk cache under `config.root`, as configured (one process at a time: RocksDB locks it).
pub(crate) fn open_cache(config: &Config) -> Result<ChunkCache, ServiceError> {
    let cache_dir = config.root.join("cache");
    ChunkCache::open(CacheConfig {
        dir: cache_dir.clone(),
        disk_budget: config.cache.disk_budget_bytes,
        memory_budget: config.cache.memory_budget_bytes,
    })
    .map_err(|e| ServiceError::Cache {
        path: cache_dir,
        message: e.to_string(),
    })
}

/// Opens the state under `config.root`, mounts the lazy layers again, and serves until
/// `shutdown` resolves; then stops serving and unmounts every lazy layer.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let root = &config.root;
    crate::mount::private_dir(root)
        .map_err(io(format!("creating {} (mode 0700)", root.display())))?;
    let socket_group = config
        .socket_gid()
        .map_err(|message| ServiceError::Config {
            path: PathBuf::from("(socket_group)"),
            message,
        })?;
    let (host, client): (Arc<dyn LayerHost>, Option<Arc<LayerHostClient>>) =
        if config.separate_layer_host {
            let client = Arc::new(LayerHostClient::connect_or_spawn(config).await?);
            (client.clone(), Some(client))
        } else {
            let cache = open_cache(config)?;
            (Arc::new(LocalHost::new(config.remote(), cache)?), None)
        };
    let snapshotter = Arc::new(Snapshotter::open(root, host.clone())?);
    snapshotter.restore().await;

    let metrics = match config.metrics().map_err(|message| ServiceError::Config {
        path: PathBuf::from("(metrics_address)"),
        message,
    })? {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("binding the metrics endpoint {addr}")))?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(tokio::spawn(metrics::serve(listener, client)))
        }
        None => None,
    };

    // One shutdown for both sockets.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let cri = match config.cri.address() {
        Some(address) => {
            let listener = bind(address, None)?;
            tracing::info!(
                address = %address.display(),
                containerd = %config.cri.containerd_address.display(),
                "CRI image service proxy serving"
            );
            let proxy = cri::ImageProxy::new(
                &config.cri.containerd_address,
                host.clone(),
                config.cri.credentials_ttl(),
            )
            .find_ahead(config.cri.find_ahead);
            let served = Server::builder()
                .add_service(proxy.service())
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
            let address = address.to_owned();
            Some(tokio::spawn(async move {
                if let Err(e) = served.await {
                    tracing::error!(address = %address.display(), "CRI proxy stopped: {e}");
                }
                let _ = std::fs::remove_file(&address);
            }))
        }
        None => None,
    };

    let listener = bind(&config.address, socket_group)?;
    tracing::info!(address = %config.address.display(), root = %root.display(), "lazysnapd serving");
    let served = Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(Grpc::new(
            snapshotter.clone(),
        ))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await;
    let _ = stop.send(true);
    if let Some(task) = cri {
        let _ = task.await;
    }
    if let Some(task) = metrics {
        task.abort();
    }
    snapshotter.shutdown().await;
    let _ = std::fs::remove_file(&config.address);
    tracing::info!("lazysnapd stopped");
    served.map_err(|e| ServiceError::Serve {
        path: config.address.clone(),
        message: e.to_string(),
    })
}

/// Binds the socket at `address` with mode 0600, or 0660 and group `group`, replacing a stale
/// one left by a process that died.
///
/// The socket never exists at `address` with a mode the umask chose: it is bound in a fresh
/// 0700 directory beside `address`, given its owner and mode there, and renamed into place.
/// (Setting the umask around `bind` would race with the other threads of this process.)
pub(crate) fn bind(
    address: &Path,
    group: Option<nix::unistd::Gid>,
) -> Result<tokio::net::UnixListener, ServiceError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = match address.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Like /run/containerd: others may pass through to the socket, not list the directory.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    if std::os::unix::net::UnixStream::connect(address).is_ok() {
        return Err(ServiceError::Serve {
            path: address.to_owned(),
            message: "another process is serving this socket (is lazysnapd already running?)"
                .into(),
        });
    }
    let staging = tempfile::Builder::new()
        .prefix(".bind-")
        .tempdir_in(dir)
        .map_err(io(format!("creating a directory in {}", dir.display())))?;
    let bound = staging.path().join("s");
    let listener = std::os::unix::net::UnixListener::bind(&bound)
        .map_err(io(format!("binding the socket {}", bound.display())))?;
    let mode = match group {
        Some(gid) => {
            nix::unistd::chown(&bound, None, Some(gid)).map_err(|e| ServiceError::Io {
                context: format!("giving the socket {} to group {gid}", address.display()),
                error: e.into(),
            })?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", bound.display())))?;
    // Atomically replaces a stale socket file.
    std::fs::rename(&bound, address)
        .map_err(io(format!("moving the socket to {}", address.display())))?;
    drop(staging);
    listener
        .set_nonblocking(true)
        .map_err(io(format!("the socket {}", address.display())))?;
    tokio::net::UnixListener::from_std(listener)
        .map_err(io(format!("the socket {}", address.display())))
}

/// What `lazysnapd --cleanup` does: stops the layer host (which unmounts its layers), then
/// detaches every mount left below `root/snapshots` (dead FUSE mounts after a crash). Returns
/// the mount points it had to detach.
pub async fn cleanup(root: &Path) -> Result<Vec<PathBuf>, ServiceError> {
    if layer_host::stop(root).await {
        tracing::info!("stopped the layer host");
    }
    unmount_all_under(root)
}

/// Detaches every mount below `root/snapshots`. Returns the mount points.
pub fn unmount_all_under(root: &Path) -> Result<Vec<PathBuf>, ServiceError> {
    let prefix = root.join("snapshots");
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo"))?;
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    // Deepest first, so nothing is detached from under another mount.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &points {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), "cannot unmount: {e}");
        }
    }
    Ok(points)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_are_0600_or_0660_for_the_group_and_replace_stale_ones() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("run/private.sock");
        let _listener = bind(&private, None).unwrap();
        let meta = std::fs::metadata(&private).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("run"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o711
        );
        // A stale socket file (nobody listens) is replaced; a live one is an error.
        let shared = dir.path().join("run/shared.sock");
        drop(std::os::unix::net::UnixListener::bind(&shared).unwrap());
        let _shared = bind(&shared, Some(nix::unistd::Gid::from_raw(4242))).unwrap();
        let meta = std::fs::metadata(&shared).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(meta.gid(), 4242);
        }
        assert!(std::os::unix::net::UnixStream::connect(&shared).is_ok());
        assert!(bind(&shared, None).is_err());
        // Nothing is left of the staging directories.
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["private.sock", "shared.sock"]);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/var/lib/a\040b"),
            PathBuf::from("/var/lib/a b")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path(r"/end\"), PathBuf::from(r"/end\"));
    }
}

//! The layer host: a separate, long-lived `lazysnapd --layer-host` process that owns the chunk
//! cache and every FUSE session, so the gRPC snapshotter can be restarted (upgraded, crash,
//! `systemctl restart`) while containers keep reading their lazy layers.
//!
//! The snapshotter starts it when none answers on `ROOT/layer-host.sock` (in its own process
//! group, so signals to the snapshotter do not reach it; the unit's `KillMode=process` keeps
//! systemd from killing it too) and talks to it with one JSON request and one JSON response per
//! connection. It stops on `lazysnapd --cleanup` (a `shutdown` request) or SIGTERM, unmounting
//! its layers. Its pid is in `ROOT/layer-host.pid` and its log in `ROOT/layer-host.log`.
//!
//! It mounts as root wherever it is asked, so it answers only root and its own user: the socket
//! is 0600 inside the 0700 root, every connection's peer credentials are checked, and a `mount`
//! request is served only for a directory below `ROOT/snapshots`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{io, Config, ServiceError};
use crate::registry::PullSecret;
use crate::snapshot::{Fallback, LayerHost, LocalHost, RemoteLayer, Usage};

/// The environment variable carrying the config (JSON) to a spawned layer host.
pub const CONFIG_ENV: &str = "LAZYSNAPD_LAYER_HOST_CONFIG";
/// How long a spawned layer host may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn socket_path(root: &Path) -> PathBuf {
    root.join("layer-host.sock")
}

pub fn pid_path(root: &Path) -> PathBuf {
    root.join("layer-host.pid")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Mount {
        id: u64,
        layer: RemoteLayer,
        dir: PathBuf,
    },
    Unmount {
        id: u64,
    },
    Warm {
        image: String,
        manifest: String,
        layers: Vec<String>,
    },
    /// An image a CRI pull is about to resolve (an older layer host refuses the op: only a head
    /// start is lost).
    WarmImage {
        image: String,
    },
    Mounted,
    /// A pull's credentials (their `Debug` is redacted: requests are never logged whole).
    RememberSecret {
        secret: PullSecret,
    },
    ReleaseStalePins {
        live: Vec<u64>,
    },
    Metrics,
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Response {
    Mounted { usage: Usage },
    Fallback { reason: String, message: String },
    Ids { ids: Vec<u64> },
    Text { text: String },
    Done,
}

/// Opens the cache and serves layers on `ROOT/layer-host.sock` until SIGTERM or a `shutdown`
/// request; then unmounts every layer.
pub async fn serve(
    config: &Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ServiceError> {
    let root = &config.root;
    crate::mount::private_dir(root)
        .map_err(io(format!("creating {} (mode 0700)", root.display())))?;
    let cache = super::open_cache(config)?;
    let host = Arc::new(LocalHost::new(config.remote(), cache)?);
    let snapshots = root.join("snapshots");
    std::fs::create_dir_all(&snapshots).map_err(io(format!("creating {}", snapshots.display())))?;
    let snapshots: Arc<Path> = std::fs::canonicalize(&snapshots)
        .map_err(io(format!("resolving {}", snapshots.display())))?
        .into();
    let socket = socket_path(root);
    let listener = super::bind(&socket, None)?;
    let own_uid = nix::unistd::geteuid().as_raw();
    std::fs::write(pid_path(root), std::process::id().to_string())
        .map_err(io("writing the layer host's pid file"))?;
    tracing::info!(socket = %socket.display(), "layer host serving");
    let (quit, mut quitting) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = quitting.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if let Err(refused) = admit(&stream, own_uid) {
                    tracing::warn!("layer host: refused a connection: {refused}");
                    continue;
                }
                let host = host.clone();
                let quit = quit.clone();
                let snapshots = snapshots.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &host, &snapshots, quit).await {
                        tracing::warn!("layer host request: {e}");
                    }
                });
            }
        }
    }
    host.unmount_all().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(pid_path(root));
    tracing::info!("layer host stopped");
    Ok(())
}

/// Whether the peer of `stream` may talk to the layer host: root, or the user it runs as.
fn admit(stream: &tokio::net::UnixStream, own_uid: u32) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read its peer credentials: {e}"))?;
    if cred.uid() == 0 || cred.uid() == own_uid {
        return Ok(());
    }
    Err(format!(
        "uid {} (pid {}) is neither root nor uid {own_uid}",
        cred.uid(),
        cred.pid()
            .map_or_else(|| "unknown".into(), |p| p.to_string())
    ))
}

/// `dir` resolved, if it is strictly below `snapshots` (canonical): the layer host mounts as
/// root and must not be made to mount over anything else. The existing part of `dir` is
/// resolved (so a symlink cannot lead out), and the rest may only name plain components.
fn mount_dir_below(snapshots: &Path, dir: &Path) -> Result<PathBuf, String> {
    use std::path::Component;
    let refuse = |why: &str| {
        format!(
            "{} is not a directory below {}: {why}",
            dir.display(),
            snapshots.display()
        )
    };
    if !dir.is_absolute() {
        return Err(refuse("not an absolute path"));
    }
    let mut existing = dir;
    let mut rest = Vec::new();
    let resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(p) => break p,
            Err(_) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(refuse("no part of it exists"));
                };
                rest.push(name);
                existing = parent;
            }
        }
    };
    if dir
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(refuse("it contains '.' or '..'"));
    }
    let full = rest.iter().rev().fold(resolved, |p, name| p.join(name));
    if full == snapshots || !full.starts_with(snapshots) {
        return Err(refuse(&format!("it resolves to {}", full.display())));
    }
    Ok(full)
}

async fn handle(
    stream: tokio::net::UnixStream,
    host: &LocalHost,
    snapshots: &Path,
    quit: tokio::sync::mpsc::Sender<()>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: Request = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let response = match request {
        Request::Mount { id, layer, dir } => match mount_dir_below(snapshots, &dir) {
            Err(message) => {
                tracing::warn!(id, "layer host: refused a mount: {message}");
                Response::Fallback {
                    reason: "internal".into(),
                    message,
                }
            }
            Ok(dir) => match host.mount(id, layer, dir).await {
                Ok(usage) => Response::Mounted { usage },
                Err(f) => Response::Fallback {
                    reason: f.reason.to_owned(),
                    message: f.message,
                },
            },
        },
        Request::Unmount { id } => {
            host.unmount(id).await;
            Response::Done
        }
        Request::Warm {
            image,
            manifest,
            layers,
        } => {
            host.warm(image, manifest, layers).await;
            Response::Done
        }
        Request::WarmImage { image } => {
            host.warm_image(image).await;
            Response::Done
        }
        Request::RememberSecret { secret } => {
            host.remember_secret(secret).await;
            Response::Done
        }
        Request::Mounted => Response::Ids {
            ids: host.mounted().await,
        },
        Request::ReleaseStalePins { live } => {
            host.release_stale_pins(live).await;
            Response::Done
        }
        Request::Metrics => Response::Text {
            text: crate::metrics::render(),
        },
        Request::Shutdown => {
            let _ = quit.try_send(());
            Response::Done
        }
    };
    let mut out = serde_json::to_vec(&response)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// The snapshotter's side: a [`LayerHost`] that asks the layer host process.
#[derive(Debug)]
pub struct LayerHostClient {
    socket: PathBuf,
    enabled: bool,
    /// A request may wait this long (a mount is bounded by the read timeout).
    timeout: Duration,
    /// To start a new layer host if this one died; `None` never starts one.
    config: Option<Config>,
    /// One restart at a time.
    starting: tokio::sync::Mutex<()>,
}

impl LayerHostClient {
    /// Connects to the layer host of `config.root`, starting one if none answers.
    pub async fn connect_or_spawn(config: &Config) -> Result<Self, ServiceError> {
        let client = Self {
            socket: socket_path(&config.root),
            enabled: config.fetch.lazy,
            timeout: Duration::from_secs(config.fetch.read_timeout_secs + 30),
            config: Some(config.clone()),
            starting: tokio::sync::Mutex::new(()),
        };
        if client.exchange(&Request::Mounted).await.is_ok() {
            tracing::info!("using the running layer host");
            return Ok(client);
        }
        client.start().await?;
        Ok(client)
    }

    /// Starts a layer host and waits until it answers.
    async fn start(&self) -> Result<(), ServiceError> {
        let Some(config) = &self.config else {
            return Ok(());
        };
        let client = self;
        spawn(config)?;
        let start = Instant::now();
        loop {
            match client.exchange(&Request::Mounted).await {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > START_TIMEOUT => {
                    return Err(ServiceError::Serve {
                        path: client.socket.clone(),
                        message: format!(
                            "the layer host did not answer within {START_TIMEOUT:?} ({e}); see {}",
                            config.root.join("layer-host.log").display()
                        ),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Sends `request`; if no layer host answers (it died), starts a new one and sends it again.
    /// The new host has no layers: the snapshotter mounts a layer again when it is next wanted.
    async fn request(&self, request: &Request) -> std::io::Result<Response> {
        match self.exchange(request).await {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && self.config.is_some() =>
            {
                let _one = self.starting.lock().await;
                if self.exchange(&Request::Mounted).await.is_err() {
                    tracing::warn!("the layer host is gone ({e}); starting a new one");
                    self.start()
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                }
                self.exchange(request).await
            }
            other => other,
        }
    }

    async fn exchange(&self, request: &Request) -> std::io::Result<Response> {
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await?;
            let (read, mut write) = stream.into_split();
            let mut out = serde_json::to_vec(request)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            out.push(b'\n');
            write.write_all(&out).await?;
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await?;
            serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the layer host did not answer",
                ))
            })
    }

    /// The layer host's metrics text (empty if it does not answer).
    pub async fn metrics(&self) -> String {
        match self.request(&Request::Metrics).await {
            Ok(Response::Text { text }) => text,
            _ => String::new(),
        }
    }
}

/// Asks the layer host of `root` to unmount everything and exit; false if none answered.
pub async fn stop(root: &Path) -> bool {
    let client = LayerHostClient {
        socket: socket_path(root),
        enabled: true,
        timeout: Duration::from_secs(30),
        config: None,
        starting: tokio::sync::Mutex::new(()),
    };
    let pid: Option<i32> = std::fs::read_to_string(pid_path(root))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    if client.request(&Request::Shutdown).await.is_err() {
        return false;
    }
    // Wait for it to unmount and exit.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30)
        && (client.socket.exists() || pid.is_some_and(running))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Whether process `pid` exists and has not exited (a zombie has exited).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Starts `lazysnapd --layer-host` in its own process group, logging to `ROOT/layer-host.log`.
fn spawn(config: &Config) -> Result<(), ServiceError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(io("finding lazysnapd's own executable"))?;
    let log_path = config.root.join("layer-host.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let json = serde_json::to_string(config).map_err(|e| ServiceError::Serve {
        path: log_path.clone(),
        message: format!("encoding the config: {e}"),
    })?;
    let child = std::process::Command::new(exe)
        .arg("--layer-host")
        .env(CONFIG_ENV, json)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io("duplicating the log file"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io("starting the layer host"))?;
    tracing::info!(pid = child.id(), log = %log_path.display(), "started the layer host");
    // It outlives this process by design; while this process lives, a thread reaps it if it
    // exits first (no zombie), and after that init does.
    let mut child = child;
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            tracing::warn!(%status, "the layer host exited");
        }
    });
    Ok(())
}

fn fallback(response: std::io::Result<Response>) -> Result<Usage, Fallback> {
    match response {
        Ok(Response::Mounted { usage }) => Ok(usage),
        Ok(Response::Fallback { reason, message }) => {
            Err(Fallback::new(Fallback::reason_named(&reason), message))
        }
        Ok(other) => Err(Fallback::new(
            "internal",
            format!("unexpected layer host answer {other:?}"),
        )),
        Err(e) => Err(Fallback::new("internal", format!("layer host: {e}"))),
    }
}

impl LayerHost for LayerHostClient {
    fn mount(
        &self,
        id: u64,
        layer: RemoteLayer,
        dir: PathBuf,
    ) -> BoxFuture<'_, Result<Usage, Fallback>> {
        async move { fallback(self.request(&Request::Mount { id, layer, dir }).await) }.boxed()
    }

    fn warm(&self, image: String, manifest: String, layers: Vec<String>) -> BoxFuture<'_, ()> {
        async move {
            let request = Request::Warm {
                image,
                manifest,
                layers,
            };
            // Only a head start: each Prepare still finds its own layer if this did not.
            if let Err(e) = self.exchange(&request).await {
                tracing::debug!("layer host did not start finding layers ahead: {e}");
            }
        }
        .boxed()
    }

    fn warm_image(&self, image: String) -> BoxFuture<'_, ()> {
        async move {
            if let Err(e) = self.exchange(&Request::WarmImage { image }).await {
                tracing::debug!("layer host did not start finding an image ahead: {e}");
            }
        }
        .boxed()
    }

    fn remember_secret(&self, secret: PullSecret) -> BoxFuture<'_, ()> {
        async move {
            let (registry, repository) = (secret.registry.clone(), secret.repository.clone());
            if let Err(e) = self.request(&Request::RememberSecret { secret }).await {
                tracing::warn!(
                    registry,
                    repository,
                    "layer host did not take a pull's credentials (its lazy layers may fall back): {e}"
                );
            }
        }
        .boxed()
    }

    fn unmount(&self, id: u64) -> BoxFuture<'_, ()> {
        async move {
            if let Err(e) = self.request(&Request::Unmount { id }).await {
                tracing::warn!(id, "layer host did not unmount: {e}");
            }
        }
        .boxed()
    }

    fn mounted(&self) -> BoxFuture<'_, Vec<u64>> {
        async move {
            match self.request(&Request::Mounted).await {
                Ok(Response::Ids { ids }) => ids,
                _ => Vec::new(),
            }
        }
        .boxed()
    }

    fn release_stale_pins(&self, live: Vec<u64>) -> BoxFuture<'_, ()> {
        async move {
            let _ = self.request(&Request::ReleaseStalePins { live }).await;
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        // The point of a separate host: its layers stay mounted for running containers.
        async {}.boxed()
    }

    fn enabled(&self) -> bool {
        self.enabled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_below_the_snapshots_are_mounted() {
        let root = tempfile::tempdir().unwrap();
        let snapshots = root.path().join("snapshots");
        std::fs::create_dir_all(snapshots.join("7")).unwrap();
        let snapshots = std::fs::canonicalize(&snapshots).unwrap();
        assert_eq!(
            mount_dir_below(&snapshots, &snapshots.join("7/fs")).unwrap(),
            snapshots.join("7/fs")
        );
        assert_eq!(
            mount_dir_below(&snapshots, &snapshots.join("8/fs")).unwrap(),
            snapshots.join("8/fs")
        );
        // A symlink below the snapshots that leads out of them.
        std::os::unix::fs::symlink(root.path(), snapshots.join("out")).unwrap();
        for bad in [
            snapshots.join("out/x"),
            snapshots.join("7/../../x"),
            snapshots.clone(),
            root.path().join("elsewhere"),
            PathBuf::from("/etc"),
            PathBuf::from("relative/fs"),
        ] {
            assert!(
                mount_dir_below(&snapshots, &bad).is_err(),
                "{} was accepted",
                bad.display()
            );
        }
    }
}

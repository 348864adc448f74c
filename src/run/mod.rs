//! The launcher: `lazysnap run` starts a container from a lazily mounted image with runc.
//!
//! Steps: mount the image with a writable upper layer under `ROOT/containers/<id>`, resolve the
//! user against the image's own passwd and group, write the runtime spec, `runc create`, `runc
//! start` (the moment of first exec), wait for the container's process while forwarding
//! signals to it, then delete the container, unmount, and remove its writable layer. Every exit
//! path, failure included, goes through the same teardown.
//!
//! Where the root comes from: when `lazysnapd` listens on its socket, from its snapshots (see
//! `daemon`), so the node's cache and layer mounts are shared with containerd's containers;
//! otherwise the image is mounted in this process (`mount`) under `--root`.

pub mod daemon;
pub mod runc;
pub mod seccomp;
pub mod spec;
pub mod user;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::fs::UpperDir;
use crate::mount::{self, ImageMount, LayerInfo, MountConfig, MountError};
use crate::oci::{Digest, Reference};
use daemon::{Daemon, DaemonError, DaemonRoot};
use runc::{Runc, RuncError};
use spec::{ImageProcess, Network, Overrides, SpecError, SpecInput};
use user::UserError;

/// Exit status for a failure of lazysnap itself, before or around the container (as docker).
pub const EXIT_LAUNCHER_FAILED: u8 = 125;

/// Why a container could not be run. Every variant means exit status 125.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Runtime(#[from] RuncError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("container name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit")]
    BadName(String),
    #[error("a container named {name:?} exists already ({dir})")]
    NameInUse { name: String, dir: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let context = context.into();
    move |error| RunError::Io { context, error }
}

/// Everything `run` can be told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How the image is mounted; its `root` also holds `containers/<id>`.
    pub mount: MountConfig,
    /// Container name (also its hostname); generated when absent.
    pub name: Option<String>,
    pub overrides: Overrides,
    pub network: Network,
    /// The default seccomp filter (docker's kind, [`seccomp`]); false is `seccomp=unconfined`.
    pub seccomp: bool,
    /// Keep the writable layer and bundle after exit (mounts go regardless).
    pub keep: bool,
    pub runc: Runc,
    /// lazysnapd's socket: used when something listens there, else the image is mounted
    /// in-process. `None`: always in-process.
    pub lazysnapd: Option<PathBuf>,
    /// Kills the container (SIGKILL) when notified, and `run` returns as after any exit: how
    /// `lazysnap profile record` ends a container that has gone quiet or ran out of time.
    pub stop: Option<Arc<tokio::sync::Notify>>,
}

/// What happened, for the person debugging a slow start (and for benchmarks, as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub reference: String,
    /// `in-process`, or `lazysnapd at SOCKET`.
    pub served_by: String,
    /// The resolved manifest digest: the only honest name of what ran.
    pub digest: Digest,
    pub container: String,
    pub layers: Vec<LayerInfo>,
    /// Compressed size of all layers.
    pub image_bytes: u64,
    pub mount_seconds: f64,
    /// From the start of `run` until the container's process was released to exec.
    pub first_exec_seconds: f64,
    /// Bytes the lazy layers had fetched from the registry at first exec (in-process only: with
    /// lazysnapd, its metrics count them).
    pub fetched_at_exec: Option<u64>,
    pub total_seconds: f64,
    pub fetched_at_exit: Option<u64>,
    /// Compressed bytes of the chunks the container's reads needed, cached or not: what an
    /// ideal lazy fetcher must transfer (the cold-start benchmark's oracle).
    pub needed_bytes: Option<u64>,
    pub exit_code: i32,
}

/// Stages reported while the container runs, so the launcher can print them as they happen.
#[derive(Debug)]
pub enum Stage<'a> {
    Mounted {
        digest: Digest,
        layers: &'a [LayerInfo],
        seconds: f64,
        served_by: &'a str,
    },
    Started {
        seconds: f64,
        fetched: Option<u64>,
    },
}

/// Runs `reference` as a container and returns when its process has exited and everything is
/// torn down. `on_stage` is called at mount and at first exec.
pub async fn run(
    reference: &Reference,
    options: &RunOptions,
    on_stage: &mut (dyn FnMut(Stage<'_>) + Send),
) -> Result<RunReport, RunError> {
    let start = Instant::now();
    let id = match &options.name {
        Some(n) => valid_name(n)?,
        None => format!(
            "lazysnap-{}",
            &Digest::of(random_seed().as_bytes()).hex()[..12]
        ),
    };
    let dir = options.mount.root.join("containers").join(&id);
    if dir.exists() {
        return Err(RunError::NameInUse {
            name: id,
            dir: dir.display().to_string(),
        });
    }
    runc::become_subreaper()
        .map_err(|e| io("becoming a child subreaper")(std::io::Error::from(e)))?;
    let mut signals = Signals::catch()?;
    let daemon = match &options.lazysnapd {
        Some(socket) => Daemon::connect(socket).await,
        None => None,
    };
    let mut container = Container::create(id, dir, options)?;
    let result = container
        .run(reference, options, daemon, &mut signals, start, on_stage)
        .await;
    container.remove_snapshot().await;
    let teardown = container.teardown();
    let report = result?;
    teardown?;
    Ok(report)
}

/// A container's directory and whatever of it exists so far; torn down in reverse.
struct Container {
    id: String,
    dir: PathBuf,
    runc: Runc,
    keep: bool,
    created: bool,
    mount: Option<ImageMount>,
    /// With lazysnapd: the daemon and the container's snapshot, mounted at `rootfs`.
    snapshot: Option<(Daemon, DaemonRoot)>,
}

impl Container {
    fn create(id: String, dir: PathBuf, options: &RunOptions) -> Result<Self, RunError> {
        // The root, the container's directory and runc's state are root-only (0700): the
        // container's root is mounted with suid and dev, which is safe only behind them. runc's
        // state is created alone: its parent (/run/lazysnap) also holds lazysnapd's socket.
        if let Some(parent) = options.runc.state.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        for private in [&options.mount.root, &dir, &options.runc.state] {
            mount::private_dir(private)
                .map_err(io(format!("creating {} (mode 0700)", private.display())))?;
        }
        // `upper` keeps the umask's mode: overlayfs shows it as the container's `/`.
        for sub in ["upper", "work", "rootfs", "bundle"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        }
        Ok(Self {
            id,
            dir,
            runc: options.runc.clone(),
            keep: options.keep,
            created: false,
            mount: None,
            snapshot: None,
        })
    }

    async fn run(
        &mut self,
        reference: &Reference,
        options: &RunOptions,
        daemon: Option<Daemon>,
        signals: &mut Signals,
        start: Instant,
        on_stage: &mut (dyn FnMut(Stage<'_>) + Send),
    ) -> Result<RunReport, RunError> {
        let rootfs = self.dir.join("rootfs");
        let (digest, layers, config, served_by) = match daemon {
            Some(d) => {
                if let crate::mount::ProfileSource::File(path) = &options.mount.profile {
                    tracing::warn!(file = %path.display(), "a profile file is used by in-process mounts only: lazysnapd looks the image's profile up itself");
                }
                let root =
                    daemon::prepare_root(&d, reference, &options.mount, &self.id, &rootfs).await?;
                let facts = (
                    root.manifest_digest,
                    root.layer_info.clone(),
                    root.config.clone(),
                    format!("lazysnapd at {}", d.socket.display()),
                );
                self.snapshot = Some((d, root));
                facts
            }
            None => {
                let upper = UpperDir {
                    upper: self.dir.join("upper"),
                    work: self.dir.join("work"),
                };
                // A root file system needs its setuid files and device nodes; the mount point
                // is behind the root-only container directory.
                let config = MountConfig {
                    nosuid: false,
                    nodev: false,
                    ..options.mount.clone()
                };
                let mounted =
                    mount::mount_image_with_upper(reference, &rootfs, &config, Some(&upper))
                        .await?;
                let facts = (
                    mounted.manifest_digest,
                    mounted.layer_info.clone(),
                    mounted.config.clone(),
                    "in-process".to_owned(),
                );
                self.mount = Some(mounted);
                facts
            }
        };
        let mount_seconds = start.elapsed().as_secs_f64();
        on_stage(Stage::Mounted {
            digest,
            layers: &layers,
            seconds: mount_seconds,
            served_by: &served_by,
        });
        let image = ImageProcess::from_config(&config);

        let bundle = self.dir.join("bundle");
        let pid_file = bundle.join("pid");
        self.write_spec(&image, options, &rootfs, &bundle).await?;
        let (runc, id) = (self.runc.clone(), self.id.clone());
        let (bundle_path, pid_path) = (bundle.clone(), pid_file.clone());
        self.created = true; // from here on a failed create may still have left runc state
        blocking(move || runc.create(&id, &bundle_path, &pid_path)).await?;
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .map_err(io("reading runc's pid file"))?
            .trim()
            .parse()
            .map_err(|e| io("reading runc's pid file")(std::io::Error::other(e)))?;
        let (runc, id) = (self.runc.clone(), self.id.clone());
        let init = runc::executable(pid);
        blocking(move || runc.start(&id)).await?;
        // `runc start` returns once the init is released, a moment before it execs: a signal
        // forwarded in between would reach runc's init, not the container's command.
        runc::wait_exec(pid, init).await;
        let first_exec_seconds = start.elapsed().as_secs_f64();
        let fetched_at_exec = self.fetched();
        on_stage(Stage::Started {
            seconds: first_exec_seconds,
            fetched: fetched_at_exec,
        });

        let exit_code = signals
            .forward_until_exit(pid, options.stop.as_deref())
            .await?;
        Ok(RunReport {
            reference: reference.to_string(),
            served_by,
            digest,
            container: self.id.clone(),
            image_bytes: layers.iter().map(|l| l.size).sum(),
            layers,
            mount_seconds,
            first_exec_seconds,
            fetched_at_exec,
            total_seconds: start.elapsed().as_secs_f64(),
            fetched_at_exit: self.fetched(),
            needed_bytes: self.mount.as_ref().map(ImageMount::needed_bytes),
            exit_code,
        })
    }

    fn fetched(&self) -> Option<u64> {
        self.mount.as_ref().map(ImageMount::fetched_bytes)
    }

    /// Unmounts the container's root and removes its snapshot from lazysnapd (async: over gRPC).
    async fn remove_snapshot(&mut self) {
        if let Some((daemon, root)) = self.snapshot.take() {
            if std::mem::take(&mut self.created) {
                if let Err(e) = self.runc.delete(&self.id) {
                    tracing::warn!("deleting container {}: {e}", self.id);
                }
            }
            daemon::unmount(&root.rootfs);
            if let Err(e) = daemon.remove(&root.key).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Resolves the user (reading the image's passwd lazily, off the async threads) and writes
    /// `bundle/config.json`.
    async fn write_spec(
        &self,
        image: &ImageProcess,
        options: &RunOptions,
        rootfs: &Path,
        bundle: &Path,
    ) -> Result<(), RunError> {
        let o = &options.overrides;
        let args = spec::command(image, o)?;
        let user_spec = o.user.clone().unwrap_or_else(|| image.user.clone());
        let root = rootfs.to_owned();
        let user = blocking(move || user::resolve(&root, &user_spec)).await?;
        let hostname: String = self.id.chars().take(63).collect();
        let env = spec::environment(image, o, &hostname, &user.home);
        let cwd = o
            .working_dir
            .clone()
            .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()))
            .unwrap_or_else(|| "/".to_owned());
        let spec = spec::runtime_spec(&SpecInput {
            args,
            env,
            cwd,
            user: &user,
            rootfs,
            hostname: &hostname,
            network: options.network,
            seccomp: options.seccomp,
        })?;
        let json = serde_json::to_vec_pretty(&spec)
            .map_err(|e| io("writing the runtime spec")(std::io::Error::other(e)))?;
        std::fs::write(bundle.join("config.json"), json).map_err(io("writing config.json"))
    }

    /// Deletes the runc container, unmounts, and removes the directory unless kept. Every step
    /// is tried; the first failure is returned.
    fn teardown(&mut self) -> Result<(), RunError> {
        let mut first: Option<RunError> = None;
        if std::mem::take(&mut self.created) {
            if let Err(e) = self.runc.delete(&self.id) {
                first.get_or_insert(e.into());
            }
        }
        if let Some(mount) = self.mount.take() {
            if let Err(e) = mount.unmount() {
                first.get_or_insert(e.into());
            }
        }
        if let Some((daemon, root)) = self.snapshot.take() {
            // Only reached when the async path did not run (a panic or a cancelled run).
            daemon::unmount(&root.rootfs);
            if tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            {
                let removed = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(daemon.remove(&root.key))
                });
                if let Err(e) = removed {
                    first.get_or_insert(e.into());
                }
            } else {
                tracing::warn!("snapshot {} left in lazysnapd", root.key);
            }
        }
        if !self.keep && self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                first.get_or_insert(io(format!("removing {}", self.dir.display()))(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Container {
    /// A panic or a cancelled future still leaves no container, mount or directory behind.
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("cleaning up container {}: {e}", self.id);
        }
    }
}

/// The signals forwarded to the container: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2.
/// Caught from the start of `run`, before the container exists: one that arrives while it is
/// being created must neither kill lazysnap (leaving mounts and a runc container behind) nor be
/// lost; it is delivered as soon as the container's process is there.
struct Signals {
    rx: tokio::sync::mpsc::UnboundedReceiver<nix::sys::signal::Signal>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl Signals {
    fn catch() -> Result<Self, RunError> {
        use nix::sys::signal::Signal;
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            (SignalKind::interrupt(), Signal::SIGINT),
            (SignalKind::terminate(), Signal::SIGTERM),
            (SignalKind::hangup(), Signal::SIGHUP),
            (SignalKind::quit(), Signal::SIGQUIT),
            (SignalKind::user_defined1(), Signal::SIGUSR1),
            (SignalKind::user_defined2(), Signal::SIGUSR2),
        ];
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut listeners = Vec::new();
        for (kind, sig) in kinds {
            let mut stream = signal(kind).map_err(io("installing signal handlers"))?;
            let tx = tx.clone();
            listeners.push(tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            }));
        }
        Ok(Self { rx, listeners })
    }

    /// Waits for `pid` to exit, forwarding every signal caught so far and from now on, and
    /// killing it when `stop` is notified.
    async fn forward_until_exit(
        &mut self,
        pid: i32,
        stop: Option<&tokio::sync::Notify>,
    ) -> Result<i32, RunError> {
        let mut exit = tokio::task::spawn_blocking(move || runc::wait_exit(pid));
        let stopped = async {
            match stop {
                Some(stop) => stop.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        let mut stopping = false;
        loop {
            tokio::select! {
                done = &mut exit => {
                    let waited = done.map_err(|e| io("waiting for the container")(std::io::Error::other(e)))?;
                    return Ok(waited?);
                }
                Some(sig) = self.rx.recv() => runc::forward(pid, sig),
                () = &mut stopped, if !stopping => {
                    // The container's init: killing it ends its PID namespace, so every process.
                    stopping = true;
                    runc::forward(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

async fn blocking<T: Send + 'static, E: Into<RunError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, RunError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io("a blocking task failed")(std::io::Error::other(e)))?
        .map_err(Into::into)
}

fn valid_name(name: &str) -> Result<String, RunError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && name.len() <= 128;
    ok.then(|| name.to_owned())
        .ok_or_else(|| RunError::BadName(name.to_owned()))
}

/// Enough entropy for a unique container name: time, pid and a stack address.
fn random_seed() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let marker = 0u8;
    format!(
        "{}-{}-{:p}",
        now.as_nanos(),
        std::process::id(),
        &marker as *const u8
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", "../x", "a b"] {
            assert!(
                matches!(valid_name(bad), Err(RunError::BadName(_))),
                "{bad}"
            );
        }
    }
}

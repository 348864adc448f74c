//! A real containerd with its own config, root, state and socket in a temp dir, and proxy
//! snapshotters pointing where the test says. Debian 12's containerd 1.6 by default; the
//! environment variable `LAZYSNAP_CONTAINERD` names another release's binary directory (holding
//! `containerd`, `ctr` and `containerd-shim-runc-v2`, as `scripts/containerd-versions.sh` unpacks
//! Debian 13's 1.7 and unstable's 2.x), and the fixture writes the config that release reads
//! (version 2 for 1.x, version 3 for 2.x). Started by hand (PID 1 is not systemd), stopped by its
//! PID in `Drop`, together with the shims it started for this socket and every mount left below its
//! directories, so a failing test leaves nothing behind.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Debian's containerd, used when `LAZYSNAP_CONTAINERD` is unset.
pub const DEFAULT_BIN_DIR: &str = "/usr/bin";
/// The environment variable naming the containerd under test (its directory, or its binary).
pub const CONTAINERD_ENV: &str = "LAZYSNAP_CONTAINERD";
pub const CTR_REMOTE_BIN: &str = "/usr/bin/ctr-remote";
/// How long containerd may take to answer `ctr version`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `ctr` command may take before the test fails (a pull of a small image, a run).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The containerd release under test: its binaries and its version.
#[derive(Debug, Clone)]
pub struct Release {
    /// Holds `containerd`, `ctr` and `containerd-shim-runc-v2` of one release: containerd and
    /// ctr of different releases are never mixed, and this directory comes first on containerd's
    /// `PATH` so it starts its own shim, not Debian's.
    pub bin_dir: PathBuf,
    /// `(major, minor)` from `containerd --version`.
    pub version: (u32, u32),
    /// `containerd --version`, for messages.
    pub banner: String,
}

impl Release {
    /// The release `LAZYSNAP_CONTAINERD` names, or Debian's.
    pub fn under_test() -> Result<Self> {
        let named = std::env::var_os(CONTAINERD_ENV).map(PathBuf::from);
        let bin_dir = match named {
            None => PathBuf::from(DEFAULT_BIN_DIR),
            Some(p) if p.is_dir() => p,
            Some(p) => p
                .parent()
                .with_context(|| format!("{CONTAINERD_ENV}={}: no directory", p.display()))?
                .to_owned(),
        };
        let containerd = bin_dir.join("containerd");
        anyhow::ensure!(
            containerd.exists() && bin_dir.join("ctr").exists(),
            "{} has no containerd and ctr: install Debian's containerd, or point {CONTAINERD_ENV} \
             at a directory from scripts/containerd-versions.sh",
            bin_dir.display()
        );
        let out = Command::new(&containerd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", containerd.display()))?;
        let banner = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let version = parse_version(&banner)
            .with_context(|| format!("no version in `{banner}` of {}", containerd.display()))?;
        Ok(Self {
            bin_dir,
            version,
            banner,
        })
    }

    pub fn containerd(&self) -> PathBuf {
        self.bin_dir.join("containerd")
    }

    pub fn ctr(&self) -> PathBuf {
        self.bin_dir.join("ctr")
    }

    /// containerd 2.x reads a version 3 config; 1.x a version 2 one.
    pub fn is_v2(&self) -> bool {
        self.version.0 >= 2
    }
}

/// `(major, minor)` from `containerd github.com/containerd/containerd[/v2] 1.7.24~ds1 ...`.
fn parse_version(banner: &str) -> Option<(u32, u32)> {
    let word = banner.split_whitespace().nth(2)?;
    let mut parts = word.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// What the CRI plugin is set up with, when it is on.
#[derive(Debug, Clone, Copy)]
struct Cri<'a> {
    /// `None`: the snapshotter setting comes from the shipped snippet.
    snapshotter: Option<&'a str>,
    sandbox_image: &'a str,
}

/// The config snippet `systemd/` ships for `release` (version 2 for 1.x, version 3 for 2.x),
/// pointed at `lazysnapd` instead of `/run/lazysnap/lazysnapd.sock`, with the socket's directory
/// as the exported root instead of `/var/lib/lazysnap`, without its `version` line (the fixture
/// writes that): the CRI test starts containerd with exactly what operators install.
pub fn shipped_snippet(release: &Release, lazysnapd: &Path) -> Result<String> {
    let name = if release.is_v2() {
        "containerd2-lazysnap.toml"
    } else {
        "containerd-lazysnap.toml"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let want = if release.is_v2() { 3 } else { 2 };
    anyhow::ensure!(
        text.lines()
            .any(|l| l.trim() == format!("version = {want}")),
        "{} is not a version {want} config",
        path.display()
    );
    const SHIPPED_ADDRESS: &str = "/run/lazysnap/lazysnapd.sock";
    const SHIPPED_ROOT: &str = "/var/lib/lazysnap";
    anyhow::ensure!(
        text.contains(SHIPPED_ADDRESS),
        "{} does not name {SHIPPED_ADDRESS}",
        path.display()
    );
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with("version"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(SHIPPED_ADDRESS, &lazysnapd.to_string_lossy())
        .replace(
            &format!("\"{SHIPPED_ROOT}\""),
            &format!("\"{}\"", lazysnapd.parent().unwrap_or(lazysnapd).display()),
        )
        + "\n")
}

/// containerd's config for `release`, everything under `d`, with `shipped` (a snippet's tables)
/// appended. Top-level keys come before the first table.
fn config_toml(
    release: &Release,
    d: &Path,
    socket: &Path,
    snapshotters: &[(&str, &Path)],
    cri: Option<Cri<'_>>,
    shipped: &str,
) -> String {
    let mut proxies = String::new();
    for (name, address) in snapshotters {
        proxies.push_str(&format!(
            "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            address.display()
        ));
    }
    let cni = d.join("cni");
    let mut top = String::new();
    let mut plugins = String::new();
    if release.is_v2() {
        // containerd 2.x: CRI is split into an image service (`cri.v1.images`, which owns the
        // snapshotter setting and the layer labels), a runtime (`cri.v1.runtime`) and the gRPC
        // front (`grpc.v1.cri`, the stream server). NRI is on by default and listens on one
        // machine-wide socket: off, so parallel tests do not fight over it.
        plugins.push_str("[plugins.\"io.containerd.nri.v1.nri\"]\n  disable = true\n");
        match cri {
            None => top.push_str(
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \
                 \"io.containerd.cri.v1.runtime\"]\n",
            ),
            Some(Cri {
                snapshotter,
                sandbox_image,
            }) => {
                if let Some(snapshotter) = snapshotter {
                    plugins.push_str(&format!(
                        "[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"{snapshotter}\"\n  \
                         disable_snapshot_annotations = false\n"
                    ));
                }
                // `cni.bin_dirs` replaced `bin_dir` in 2.1.
                let bin = if release.version >= (2, 1) {
                    format!("bin_dirs = [\"{}/bin\"]", cni.display())
                } else {
                    format!("bin_dir = \"{}/bin\"", cni.display())
                };
                plugins.push_str(&format!(
                    "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{sandbox_image}\"\n\
                     [plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true\n\
                     [plugins.\"io.containerd.cri.v1.runtime\".cni]\n  {bin}\n  conf_dir = \"{cni}/conf\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  \
                     stream_server_port = \"0\"\n",
                    cni = cni.display()
                ));
            }
        }
    } else {
        match cri {
            None => top.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"),
            Some(Cri {
                snapshotter,
                sandbox_image,
            }) => {
                plugins.push_str(&format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  \
                     sandbox_image = \"{sandbox_image}\"\n  \
                     stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni}/bin\"\n  \
                     conf_dir = \"{cni}/conf\"\n",
                    cni = cni.display()
                ));
                if let Some(snapshotter) = snapshotter {
                    plugins.push_str(&format!(
                        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{snapshotter}\"\n  \
                         disable_snapshot_annotations = false\n"
                    ));
                }
            }
        }
    }
    format!(
        "version = {version}\n\
         root = \"{root}\"\n\
         state = \"{state}\"\n\
         {top}\
         [grpc]\n  address = \"{sock}\"\n\
         [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
         [debug]\n  address = \"{debug}\"\n  level = \"info\"\n\
         [metrics]\n  address = \"\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
         {plugins}{proxies}{shipped}",
        version = if release.is_v2() { 3 } else { 2 },
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = socket.display(),
        debug = d.join("debug.sock").display(),
        opt = d.join("opt").display(),
    )
}

/// A running containerd.
#[derive(Debug)]
pub struct TestContainerd {
    /// `root/`, `state/`, `config.toml`, `containerd.log`, the sockets.
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The containerd namespace the helpers use (unique per test process, so cgroups and
    /// container ids never collide with another containerd on the machine).
    pub namespace: String,
    /// The release running.
    pub release: Release,
    child: Child,
}

impl TestContainerd {
    /// Starts containerd with `[proxy_plugins.NAME] type = "snapshot"` for each `(NAME, socket)`,
    /// and the CRI plugin off (the tests here talk to containerd's own API).
    pub fn start(snapshotters: &[(&str, &Path)]) -> Result<Self> {
        Self::start_with(snapshotters, None, None)
    }

    /// Like [`Self::start`], with the CRI plugin on and using `snapshotter`, passing the layer
    /// labels (`disable_snapshot_annotations = false`), with `restrict_oom_score_adj` (root here
    /// cannot lower oom_score_adj) and a stream server on a free loopback port.
    /// `sandbox_image` is the pod sandbox ("pause") image.
    pub fn start_cri(
        snapshotters: &[(&str, &Path)],
        snapshotter: &str,
        sandbox_image: &str,
    ) -> Result<Self> {
        let cri = Cri {
            snapshotter: Some(snapshotter),
            sandbox_image,
        };
        Self::start_with(snapshotters, Some(cri), None)
    }

    /// Like [`Self::start_cri`], with the snapshotter `lazysnap` at `lazysnapd` configured by the
    /// snippet `systemd/` ships for this release ([`shipped_snippet`]): its proxy plugin, CRI
    /// snapshotter and `disable_snapshot_annotations`, as an operator installs them.
    pub fn start_cri_shipped(lazysnapd: &Path, sandbox_image: &str) -> Result<Self> {
        let cri = Cri {
            snapshotter: None,
            sandbox_image,
        };
        Self::start_with(&[], Some(cri), Some(lazysnapd))
    }

    /// Like [`Self::start`], with the snapshotter `lazysnap` at `lazysnapd` configured by the
    /// snippet `systemd/` ships for this release, and the CRI plugin off.
    pub fn start_shipped(lazysnapd: &Path) -> Result<Self> {
        Self::start_with(&[], None, Some(lazysnapd))
    }

    fn start_with(
        snapshotters: &[(&str, &Path)],
        cri: Option<Cri<'_>>,
        shipped_for: Option<&Path>,
    ) -> Result<Self> {
        let release = Release::under_test()?;
        let dir = tempfile::Builder::new().prefix("lsctd-").tempdir()?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let shipped = match shipped_for {
            Some(lazysnapd) => shipped_snippet(&release, lazysnapd)?,
            None => String::new(),
        };
        let config = config_toml(&release, d, &socket, snapshotters, cri, &shipped);
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = File::create(d.join("containerd.log"))?;
        // The release's own directory first, so containerd starts its own shim.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(release.bin_dir.clone()).chain(std::env::split_paths(&path)),
        )?;
        let child = Command::new(release.containerd())
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", release.containerd().display()))?;
        // From here on, Drop stops it whatever happens.
        let mut containerd = Self {
            dir,
            socket,
            namespace: format!("lazysnaptest{}", std::process::id()),
            release,
            child,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log:\n{}",
                    self.release.banner,
                    self.log()
                );
            }
            if self.socket.exists() {
                let out = Command::new(self.release.ctr())
                    .arg("-a")
                    .arg(&self.socket)
                    .arg("version")
                    .output()?;
                if out.status.success() {
                    // `Server:` then `  Version:  X.Y.Z...`: the daemon answering is the release
                    // the test asked for, not one left on the machine.
                    let text = String::from_utf8_lossy(&out.stdout);
                    let server = text
                        .split("Server:")
                        .nth(1)
                        .and_then(|s| s.lines().find_map(|l| l.trim().strip_prefix("Version:")))
                        .map(str::trim)
                        .unwrap_or_default();
                    let got = parse_version(&format!("containerd x {server}"));
                    anyhow::ensure!(
                        got == Some(self.release.version),
                        "containerd on {} says version {server:?}, not {}",
                        self.socket.display(),
                        self.release.banner
                    );
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "containerd did not answer within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK -n NS ARGS...`; stdout, or an error with stderr and containerd's log tail.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.run_client(&self.release.ctr(), args, &[])
    }

    /// `ctr` with extra environment variables (ctr 1.6's `images mount` ignores its
    /// `--snapshotter` flag but honours `CONTAINERD_SNAPSHOTTER`).
    pub fn ctr_env(&self, env: &[(&str, &str)], args: &[&str]) -> Result<String> {
        self.run_client(&self.release.ctr(), args, env)
    }

    /// `ctr -a SOCK -n NAMESPACE ARGS...` in another namespace (CRI's is `k8s.io`).
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        self.run_client_in(namespace, &self.release.ctr(), args, &[])
    }

    /// `ctr-remote -a SOCK -n NS ARGS...` (stargz-snapshotter's ctr, for `image rpull`).
    pub fn ctr_remote(&self, args: &[&str]) -> Result<String> {
        self.run_client(Path::new(CTR_REMOTE_BIN), args, &[])
    }

    /// `ctr-remote` in another namespace.
    pub fn ctr_remote_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        self.run_client_in(namespace, Path::new(CTR_REMOTE_BIN), args, &[])
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER REFERENCE ID ARGS...` in `namespace`: the
    /// command's output. An empty output (ctr 1.6 under load sometimes loses a short-lived
    /// container's output) is retried twice; a wrong one never.
    pub fn run_in(
        &self,
        namespace: &str,
        snapshotter: &str,
        reference: &str,
        id: &str,
        args: &[&str],
    ) -> Result<String> {
        for attempt in 0..3 {
            let id = format!("{id}-{}-{attempt}", std::process::id());
            let mut all = vec!["run", "--rm", "--snapshotter", snapshotter, reference, &id];
            all.extend_from_slice(args);
            let output = self.ctr_in(namespace, &all)?;
            if !output.is_empty() {
                return Ok(output);
            }
        }
        bail!("{reference} on {snapshotter}: three runs printed nothing")
    }

    fn run_client(&self, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        self.run_client_in(&self.namespace, bin, args, env)
    }

    fn run_client_in(
        &self,
        namespace: &str,
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<String> {
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().copied());
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(namespace)
            .args(args);
        let (status, stdout, stderr) = run_with_timeout(&mut cmd, COMMAND_TIMEOUT)?;
        if !status {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{} {args:?} failed: {stderr}\nstdout: {stdout}\ncontainerd log (last lines, newest first):\n{}",
                bin.display(),
                tail.join("\n")
            );
        }
        Ok(stdout)
    }

    /// The executables of the shims this containerd runs now (each must be its release's own:
    /// a 1.6 shim under containerd 2.x is a setup error that happens to work until it does not).
    pub fn shim_executables(&self) -> Vec<PathBuf> {
        self.shim_pids()
            .into_iter()
            .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            .collect()
    }

    /// PIDs of the shims this containerd started (their command line names its socket).
    fn shim_pids(&self) -> Vec<i32> {
        let wanted = self.socket.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains("containerd-shim") && cmdline.contains(&wanted)
            })
            .collect()
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        // Shims outlive containerd by design: stop the ones started for this socket (their
        // containers go with them), then containerd itself.
        for pid in self.shim_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stop_child(&mut self.child, Duration::from_secs(10));
        unmount_below(self.dir.path());
    }
}

/// SIGTERM, then SIGKILL after `grace`; always reaped.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while start.elapsed() < grace {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[allow(unused_imports)] // each test file uses some of them
pub use crate::common::{mounts_below, unmount_below, UnmountOnDrop};

/// Runs `cmd` with piped output, killing it after `timeout`. Returns (success, stdout, stderr).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<(bool, String, String)> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{cmd:?} did not finish within {timeout:?}; stderr so far: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        status.success(),
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    ))
}

/// A CRI image service client on the unix socket `socket` (containerd's, or lazysnapd's proxy).
pub async fn cri_images(
    socket: &Path,
) -> Result<
    k8s_cri::v1::image_service_client::ImageServiceClient<
        containerd_snapshots::tonic::transport::Channel,
    >,
> {
    use containerd_snapshots::tonic::transport::{Endpoint, Uri};
    let socket = socket.to_owned();
    // The URI is a placeholder: the connector dials the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
        .context("connecting to containerd's CRI")?;
    Ok(k8s_cri::v1::image_service_client::ImageServiceClient::new(
        channel,
    ))
}

/// kubelet's `PullImage` of `image`, with no credentials, on the CRI socket `socket`.
pub async fn cri_pull(socket: &Path, image: &str) -> Result<()> {
    cri_images(socket)
        .await?
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CRI PullImage {image}"))?;
    Ok(())
}

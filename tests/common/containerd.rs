//! A real containerd 1.6 (Debian's `containerd`) with its own config, root, state and socket in a
//! temp dir, and proxy snapshotters pointing where the test says. Started by hand (PID 1 is not
//! systemd), stopped by its PID in `Drop`, together with the shims it started for this socket and
//! every mount left below its directories, so a failing test leaves nothing behind.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const CONTAINERD_BIN: &str = "/usr/bin/containerd";
pub const CTR_BIN: &str = "/usr/bin/ctr";
pub const CTR_REMOTE_BIN: &str = "/usr/bin/ctr-remote";
/// How long containerd may take to answer `ctr version`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `ctr` command may take before the test fails (a pull of a small image, a run).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A running containerd.
#[derive(Debug)]
pub struct TestContainerd {
    /// `root/`, `state/`, `config.toml`, `containerd.log`, the sockets.
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The containerd namespace the helpers use (unique per test process, so cgroups and
    /// container ids never collide with another containerd on the machine).
    pub namespace: String,
    child: Child,
}

impl TestContainerd {
    /// Starts containerd with `[proxy_plugins.NAME] type = "snapshot"` for each `(NAME, socket)`,
    /// and the CRI plugin off (the tests here talk to containerd's own API).
    pub fn start(snapshotters: &[(&str, &Path)]) -> Result<Self> {
        Self::start_with(snapshotters, None)
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
        Self::start_with(snapshotters, Some((snapshotter, sandbox_image)))
    }

    fn start_with(snapshotters: &[(&str, &Path)], cri: Option<(&str, &str)>) -> Result<Self> {
        anyhow::ensure!(
            Path::new(CONTAINERD_BIN).exists(),
            "{CONTAINERD_BIN} not found: install the Debian package containerd"
        );
        let dir = tempfile::Builder::new().prefix("lsctd-").tempdir()?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let mut proxies = String::new();
        for (name, address) in snapshotters {
            proxies.push_str(&format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                address.display()
            ));
        }
        // Top-level keys must come before the first table.
        let (top, cri) = match cri {
            None => (
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
                String::new(),
            ),
            Some((snapshotter, sandbox_image)) => ("", format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  \
                 sandbox_image = \"{sandbox_image}\"\n  \
                 stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{snapshotter}\"\n  \
                 disable_snapshot_annotations = false\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni}/bin\"\n  conf_dir = \"{cni}/conf\"\n",
                cni = d.join("cni").display()
            )),
        };
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             {top}\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{debug}\"\n  level = \"info\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
             {proxies}{cri}",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            debug = d.join("debug.sock").display(),
            opt = d.join("opt").display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = File::create(d.join("containerd.log"))?;
        let child = Command::new(CONTAINERD_BIN)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {CONTAINERD_BIN}"))?;
        // From here on, Drop stops it whatever happens.
        let mut containerd = Self {
            dir,
            socket,
            namespace: format!("lazysnaptest{}", std::process::id()),
            child,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("containerd exited ({status}); its log:\n{}", self.log());
            }
            if self.socket.exists() {
                let out = Command::new(CTR_BIN)
                    .arg("-a")
                    .arg(&self.socket)
                    .arg("version")
                    .output()?;
                if out.status.success() {
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
        self.run_client(CTR_BIN, args, &[])
    }

    /// `ctr` with extra environment variables (ctr 1.6's `images mount` ignores its
    /// `--snapshotter` flag but honours `CONTAINERD_SNAPSHOTTER`).
    pub fn ctr_env(&self, env: &[(&str, &str)], args: &[&str]) -> Result<String> {
        self.run_client(CTR_BIN, args, env)
    }

    /// `ctr -a SOCK -n NAMESPACE ARGS...` in another namespace (CRI's is `k8s.io`).
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        self.run_client_in(namespace, CTR_BIN, args, &[])
    }

    /// `ctr-remote -a SOCK -n NS ARGS...` (stargz-snapshotter's ctr, for `image rpull`).
    pub fn ctr_remote(&self, args: &[&str]) -> Result<String> {
        self.run_client(CTR_REMOTE_BIN, args, &[])
    }

    /// `ctr-remote` in another namespace.
    pub fn ctr_remote_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        self.run_client_in(namespace, CTR_REMOTE_BIN, args, &[])
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

    fn run_client(&self, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        self.run_client_in(&self.namespace, bin, args, env)
    }

    fn run_client_in(
        &self,
        namespace: &str,
        bin: &str,
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
                "{bin} {args:?} failed: {stderr}\nstdout: {stdout}\ncontainerd log (last lines, newest first):\n{}",
                tail.join("\n")
            );
        }
        Ok(stdout)
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

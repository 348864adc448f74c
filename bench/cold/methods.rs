//! The ways of starting a workload that are compared, each timed from "start" to the workload's
//! ready line, with every cache dropped before the run.
//!
//! - `full-pull`: containerd (Debian's 1.6 unless `--containerd`) and its default overlayfs snapshotter, `ctr image pull` then
//!   `ctr run`: how nodes work today.
//! - `lazysnap`: containerd with lazysnapd as its snapshotter (labelled pull, then run), of an
//!   image that has no start-up profile in the registry.
//! - `lazysnap-profile`: the same, of a copy of the image (same manifest digest, a repository of
//!   its own) whose profile was recorded and pushed before the timed runs ([`record_profile`]).
//! - `lazysnap-run`: the launcher, `lazysnap run`; `lazysnap-run-profile` with the profile.
//! - `lazysnap-cri`, `lazysnap-cri-profile`: the Kubernetes path, through containerd's CRI and
//!   lazysnapd's CRI proxy, the pod's sandbox made first and not timed (`cri.rs`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::workloads::Workload;

/// One timed start.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub seconds: f64,
    /// From lazysnap's report: compressed bytes of the chunks the workload's reads needed.
    pub needed_bytes: Option<u64>,
}

/// Drops the page cache (and dentries, inodes) so every run reads from disk or network.
pub fn drop_page_cache() -> Result<()> {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// Runs `cmd` until a line of its stdout or stderr contains `ready`, then waits for it to exit;
/// returns the seconds from `start` to the ready line.
pub fn time_until_ready(mut cmd: Command, ready: &str, start: Instant) -> Result<f64> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().context("stdout")?) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ]
    .into_iter()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        })
    })
    .collect();
    drop(tx);
    let mut seen = Vec::new();
    let mut ready_at = None;
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_secs(600)) {
        // lazysnap's own report lines (the reference, the fetch summary) are not the workload's.
        if ready_at.is_none() && !line.starts_with("lazysnap:") && line.contains(ready) {
            ready_at = Some(at);
        }
        seen.push(line);
    }
    let status = wait(&mut child, Duration::from_secs(60))?;
    for r in readers {
        let _ = r.join();
    }
    match ready_at {
        Some(at) if status.success() => Ok(at.duration_since(start).as_secs_f64()),
        _ => bail!(
            "{cmd:?} ({status}) never printed {ready:?}:\n{}",
            seen.join("\n")
        ),
    }
}

fn wait(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            bail!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `lazysnap run` from a fresh state root: the launcher's cold start.
pub fn lazysnap_run(lazysnap: &Path, root: &Path, reference: &str, w: &Workload) -> Result<Sample> {
    let report = root.with_extension("report.json");
    let mut cmd = Command::new(lazysnap);
    cmd.arg("--root")
        .arg(root)
        .args([
            "run",
            "--no-lazysnapd",
            "--net",
            "none",
            "--no-background-fetch",
            "--report",
        ])
        .arg(&report)
        .arg(reference)
        .args(&w.command);
    let seconds = time_until_ready(cmd, w.ready, Instant::now())?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    Ok(Sample {
        seconds,
        needed_bytes: report["needed_bytes"].as_u64(),
    })
}

/// Which containerd the runs use: Debian's (on PATH) by default, or another one unpacked from
/// its package (`--containerd DIR|BINARY`), whose own `ctr` and shim then go with it.
#[derive(Debug, Clone)]
pub struct ContainerdBin {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    /// Put first on containerd's PATH so that it starts its own shim, not Debian's.
    pub bin_dir: Option<PathBuf>,
    /// As `containerd --version` prints it (`1.6.20~ds1`, `2.1.9`).
    pub version: String,
    pub major: u32,
}

impl ContainerdBin {
    /// `None`: `containerd` and `ctr` on PATH. A directory: the one holding `containerd` among
    /// DIR, DIR/bin, DIR/usr/bin (a package unpacked by `dpkg-deb -x`). A file: that binary.
    pub fn find(path: Option<&Path>) -> Result<Self> {
        let (containerd, bin_dir) = match path {
            None => (PathBuf::from("containerd"), None),
            Some(p) if p.is_dir() => {
                let dir = ["", "bin", "usr/bin", "usr/local/bin"]
                    .iter()
                    .map(|sub| p.join(sub))
                    .find(|d| d.join("containerd").is_file())
                    .with_context(|| format!("no containerd binary under {}", p.display()))?;
                (dir.join("containerd"), Some(dir))
            }
            Some(p) if p.is_file() => (p.to_owned(), p.parent().map(Path::to_owned)),
            Some(p) => bail!("--containerd {}: no such file or directory", p.display()),
        };
        let ctr = bin_dir
            .as_ref()
            .map(|d| d.join("ctr"))
            .filter(|c| c.is_file())
            .unwrap_or_else(|| PathBuf::from("ctr"));
        let out = Command::new(&containerd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", containerd.display()))?;
        // "containerd github.com/containerd/containerd[/v2] VERSION REVISION"
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = text
            .split_whitespace()
            .nth(2)
            .map(|v| v.trim_start_matches('v').to_owned())
            .with_context(|| format!("{} --version printed {text:?}", containerd.display()))?;
        let major = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("containerd version {version:?}"))?;
        Ok(Self {
            containerd,
            ctr,
            bin_dir,
            version,
            major,
        })
    }

    /// The config for a containerd of this version: its own root, state and socket, the CRI
    /// plugin out of the way (containerd 2.x reads only version 3 configs, and splits CRI into
    /// three plugins), and lazysnapd as the `lazysnap` proxy snapshotter.
    ///
    /// With `cri` (the pod sandbox image), the CRI plugin is on instead, its snapshotter
    /// `lazysnap` with the layer labels (`disable_snapshot_annotations = false`), as
    /// `systemd/`'s snippets set it up; no CNI (pods on the node's network).
    fn config(
        &self,
        dir: &Path,
        socket: &Path,
        lazysnapd: Option<&Path>,
        cri: Option<&str>,
    ) -> String {
        let (root, state, sock) = (
            dir.join("root").display().to_string(),
            dir.join("state").display().to_string(),
            socket.display().to_string(),
        );
        let cni = dir.join("cni").display().to_string();
        let mut config = match (self.major >= 2, cri) {
            (true, None) => format!(
                "version = 3\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \
                 \"io.containerd.cri.v1.runtime\"]\n[grpc]\n  address = \"{sock}\"\n"
            ),
            (true, Some(sandbox)) => format!(
                "version = 3\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.nri.v1.nri\"]\n  disable = true\n\
                 [plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"lazysnap\"\n  \
                 disable_snapshot_annotations = false\n\
                 [plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{sandbox}\"\n\
                 [plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true\n\
                 [plugins.\"io.containerd.cri.v1.runtime\".cni]\n  {bin}\n  conf_dir = \"{cni}/conf\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  \
                 stream_server_port = \"0\"\n",
                // `cni.bin_dirs` replaced `bin_dir` in 2.1.
                bin = if self.version.starts_with("2.0") {
                    format!("bin_dir = \"{cni}/bin\"")
                } else {
                    format!("bin_dirs = [\"{cni}/bin\"]")
                }
            ),
            (false, None) => format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n"
            ),
            (false, Some(sandbox)) => format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  \
                 sandbox_image = \"{sandbox}\"\n  stream_server_address = \"127.0.0.1\"\n  \
                 stream_server_port = \"0\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni}/bin\"\n  \
                 conf_dir = \"{cni}/conf\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lazysnap\"\n  \
                 disable_snapshot_annotations = false\n"
            ),
        };
        if let Some(s) = lazysnapd {
            config.push_str(&format!(
                "[proxy_plugins.lazysnap]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                s.display()
            ));
        }
        config
    }

    /// PATH for containerd and its clients: the other containerd's directory first.
    fn path_env(&self) -> std::ffi::OsString {
        let system = std::env::var_os("PATH").unwrap_or_default();
        match &self.bin_dir {
            None => system,
            Some(dir) => {
                let mut p = dir.clone().into_os_string();
                p.push(":");
                p.push(system);
                p
            }
        }
    }
}

/// `lazysnap profile record REF --push` on a root of its own (fresh, no cache), as a build
/// pipeline or another node would: not timed. Returns a one-line summary of what the registry
/// now holds for `reference` (`lazysnap profile show`), which also proves the profile is found.
pub fn record_profile(
    lazysnap: &Path,
    root: &Path,
    reference: &str,
    w: &Workload,
) -> Result<String> {
    let out = Command::new(lazysnap)
        .arg("--root")
        .arg(root)
        .args(["profile", "record", "--push", reference, "--"])
        .args(&w.command)
        .stdin(Stdio::null())
        .output()
        .context("running lazysnap profile record")?;
    if !out.status.success() {
        bail!(
            "lazysnap profile record {reference} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let _ = std::fs::remove_dir_all(root);
    let show = Command::new(lazysnap)
        .args(["profile", "show", "--json", reference])
        .output()
        .context("running lazysnap profile show")?;
    if !show.status.success() {
        bail!(
            "lazysnap profile show {reference} after a push: {}",
            String::from_utf8_lossy(&show.stderr).trim()
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&show.stdout)
        .with_context(|| format!("lazysnap profile show --json {reference}"))?;
    let layers = doc["layers"].as_array().map_or(&[][..], Vec::as_slice);
    let accesses: usize = layers
        .iter()
        .map(|l| l["accesses"].as_array().map_or(0, Vec::len))
        .sum();
    Ok(format!(
        "{} layers, {accesses} chunk accesses",
        layers.len()
    ))
}

/// A containerd of our own: its own root, state, socket and config, started by hand.
pub struct Containerd {
    child: Child,
    dir: PathBuf,
    bin: ContainerdBin,
    pub socket: PathBuf,
}

impl Containerd {
    /// Starts containerd `bin` under `dir`; with `lazysnapd` set, registers it as the
    /// `lazysnap` proxy snapshotter.
    pub fn start(bin: &ContainerdBin, dir: &Path, lazysnapd: Option<&Path>) -> Result<Self> {
        Self::start_with(bin, dir, lazysnapd, None)
    }

    /// Where [`Self::start`] with `dir` puts containerd's socket.
    pub fn socket_in(dir: &Path) -> PathBuf {
        dir.join("containerd.sock")
    }

    /// Like [`Self::start`] with lazysnapd, the CRI plugin on and using it, `sandbox` the pod
    /// sandbox image.
    pub fn start_cri(
        bin: &ContainerdBin,
        dir: &Path,
        lazysnapd: &Path,
        sandbox: &str,
    ) -> Result<Self> {
        Self::start_with(bin, dir, Some(lazysnapd), Some(sandbox))
    }

    fn start_with(
        bin: &ContainerdBin,
        dir: &Path,
        lazysnapd: Option<&Path>,
        cri: Option<&str>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = Self::socket_in(dir);
        let config = bin.config(dir, &socket, lazysnapd, cri);
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(&bin.containerd)
            .env("PATH", bin.path_env())
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let me = Self {
            child,
            dir: dir.to_owned(),
            bin: bin.clone(),
            socket,
        };
        let start = Instant::now();
        while me
            .ctr(&["version"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd did not start: see {}",
                    me.dir.join("containerd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin.ctr);
        c.env("PATH", self.bin.path_env())
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "bench"])
            .args(args);
        c
    }

    /// `ctr image pull` then `ctr run`: a full pull with containerd's default snapshotter.
    pub fn full_pull(&self, reference: &str, w: &Workload, id: &str) -> Result<Sample> {
        let start = Instant::now();
        let pull = self
            .ctr(&["image", "pull", "--plain-http", reference])
            .output()?;
        if !pull.status.success() {
            bail!(
                "ctr pull {reference}: {}",
                String::from_utf8_lossy(&pull.stderr)
            );
        }
        let mut run = self.ctr(&["run", "--rm", reference, id]);
        run.args(&w.command);
        let seconds = time_until_ready(run, w.ready, start)?;
        Ok(Sample {
            seconds,
            needed_bytes: None,
        })
    }

    /// A labelled pull through lazysnapd (`ctr-remote image rpull`, which sends the labels the
    /// CRI plugin sends), then `ctr run` on the lazysnap snapshotter.
    pub fn lazy_pull(&self, reference: &str, w: &Workload, id: &str) -> Result<Sample> {
        let start = Instant::now();
        let pull = Command::new("ctr-remote")
            .env("PATH", self.bin.path_env())
            .arg("-a")
            .arg(&self.socket)
            .args([
                "-n",
                "bench",
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "lazysnap",
            ])
            .arg(reference)
            .output()?;
        if !pull.status.success() {
            bail!(
                "ctr-remote rpull {reference}: {}",
                String::from_utf8_lossy(&pull.stderr)
            );
        }
        let mut run = self.ctr(&["run", "--rm", "--snapshotter", "lazysnap", reference, id]);
        run.args(&w.command);
        let seconds = time_until_ready(run, w.ready, start)?;
        Ok(Sample {
            seconds,
            needed_bytes: None,
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // containerd leaves its shims' and snapshots' mounts when killed: undo them.
        let prefix = self.dir.to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A lazysnapd of our own (`--root`, `--address` under `dir`), stopped and cleaned up on drop.
pub struct Lazysnapd {
    child: Child,
    binary: PathBuf,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Lazysnapd {
    /// Started with `config` (a lazysnapd config file) if given; `--root` and `--address`
    /// override it.
    pub fn start(binary: &Path, config: Option<&Path>, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("lazysnapd.sock");
        let log = std::fs::File::create(dir.join("lazysnapd.log"))?;
        let mut command = Command::new(binary);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let child = command
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--address")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lazysnapd")?;
        let mut me = Self {
            child,
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            socket,
        };
        let start = Instant::now();
        while !me.socket.exists() {
            if me.child.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "lazysnapd did not start: see {}",
                    me.dir.join("lazysnapd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }
}

impl Lazysnapd {
    /// Like [`Self::start`], with lazysnapd's CRI image proxy on, at `DIR/cri.sock` (returned),
    /// forwarding to containerd's socket `containerd`: `config`'s contents with the two keys
    /// added to its `[cri]` table (made if it has none; one that sets either key itself is
    /// refused by lazysnapd as a duplicate key), so that `[cri] find_ahead` can be measured.
    pub fn start_cri(
        binary: &Path,
        config: Option<&Path>,
        dir: &Path,
        containerd: &Path,
    ) -> Result<(Self, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let text = match config {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
            None => String::new(),
        };
        let cri = dir.join("cri.sock");
        let keys = format!(
            "address = \"{}\"\ncontainerd_address = \"{}\"",
            cri.display(),
            containerd.display()
        );
        let mut lines: Vec<&str> = text.lines().collect();
        match lines.iter().position(|l| l.trim() == "[cri]") {
            Some(at) => lines.insert(at + 1, &keys),
            None => lines.extend(["[cri]", &keys]),
        }
        let text = lines.join("\n") + "\n";
        let merged = dir.join("lazysnapd-cri.toml");
        std::fs::write(&merged, text)?;
        Ok((Self::start(binary, Some(&merged), dir)?, cri))
    }
}

impl Drop for Lazysnapd {
    /// SIGTERM leaves the layer mounts for a quick restart; `--cleanup` then removes them.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if wait(&mut self.child, Duration::from_secs(10)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new(&self.binary)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--cleanup")
            .output();
    }
}

//! `lazysnapd` as containerd's remote snapshotter, with real parts: a containerd with its own
//! config and a `[proxy_plugins.lazysnap]` entry (Debian's 1.6 by default; `LAZYSNAP_CONTAINERD`
//! names another release's binaries, and `scripts/test.sh` runs this file again with Debian 13's
//! 1.7 and unstable's 2.x), a real registry, runc, kernel FUSE and overlayfs. The oracle is
//! containerd's own overlayfs snapshotter unpacking the plain image. Every daemon is stopped by
//! its PID and every mount detached by a guard, even when a test fails.

mod common;
#[path = "common/containerd.rs"]
mod containerd;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::image;
use common::registry::TestRegistry;
use common::tree;
use containerd::{cri_images, cri_pull, mounts_below, stop_child, unmount_below, TestContainerd};

const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const SNAPSHOTTER: &str = "lazysnap";
/// What the tests run in each container: file content, tree shape and identity, all of which
/// must come out the same from every snapshotter (`-A`: not `..`, the container's own root,
/// whose time is its start).
const PROBE: &str =
    "echo ok; md5sum /bin/busybox /etc/passwd /etc/group; ls -lAn /etc | grep -v '^total'; ls /bin | wc -l; id";

/// A `lazysnapd` child with its own root, socket and metrics port.
struct Lazysnapd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    metrics_addr: String,
    /// A directory put first on its PATH (credential helpers).
    path_first: Option<PathBuf>,
}

impl Lazysnapd {
    fn start() -> Result<Self> {
        Self::start_with("")
    }

    /// Starts with `extra` appended to the config file (TOML tables).
    fn start_with(extra: &str) -> Result<Self> {
        Self::start_with_path(extra, None)
    }

    /// [`Self::start_with`], with `path_first` first on its PATH (and its layer host's).
    fn start_with_path(extra: &str, path_first: Option<&Path>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("lssd-").tempdir()?;
        let socket = dir.path().join("lazysnapd.sock");
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"{metrics_addr}\"\n[fetch]\nread_timeout_secs = 20\n{extra}",
                dir.path().join("root").display(),
                socket.display()
            ),
        )?;
        let child = Self::spawn(dir.path(), path_first)?;
        let mut daemon = Self {
            child,
            dir,
            socket,
            metrics_addr,
            path_first: path_first.map(Path::to_owned),
        };
        daemon.wait_serving()?;
        Ok(daemon)
    }

    fn spawn(dir: &Path, path_first: Option<&Path>) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("lazysnapd.log"))?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            path_first
                .map(Path::to_owned)
                .into_iter()
                .chain(std::env::split_paths(&path)),
        )?;
        Command::new(LAZYSNAPD)
            .env("PATH", path)
            .arg("--config")
            .arg(dir.join("lazysnapd.toml"))
            .env("LAZYSNAP_LOG", "info,lazysnap=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning lazysnapd")
    }

    fn wait_serving(&mut self) -> Result<()> {
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("lazysnapd exited ({status}): {}", self.log());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "lazysnapd not serving after 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGTERM (must exit 0 with nothing left mounted), then start again on the same root.
    /// SIGTERM to the gRPC service only (it must exit 0), then start it again: the layer host
    /// keeps serving the layers meanwhile.
    fn restart(&mut self) -> Result<()> {
        stop_child(&mut self.child, Duration::from_secs(20));
        let status = self.child.wait()?;
        ensure!(status.success(), "lazysnapd exit {status}: {}", self.log());
        self.child = Self::spawn(self.dir.path(), self.path_first.as_deref())?;
        self.wait_serving()
    }

    /// Everything stopped (the service by SIGTERM, the layer host by `lazysnapd --cleanup`),
    /// then started again: the layers must be mounted again from the records.
    fn restart_cold(&mut self) -> Result<()> {
        self.stop_in_place()?;
        self.child = Self::spawn(self.dir.path(), self.path_first.as_deref())?;
        self.wait_serving()
    }

    /// The layer host's pid, from its pid file, if that process is this daemon's layer host
    /// (a pid file left by a killed host may name a reused pid).
    fn layer_host_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.root().join("layer-host.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let root = self.root().to_string_lossy().into_owned();
        (String::from_utf8_lossy(&cmdline).contains("--layer-host")
            && String::from_utf8_lossy(&environ).contains(&root))
        .then_some(pid)
    }

    fn stop_in_place(&mut self) -> Result<()> {
        stop_child(&mut self.child, Duration::from_secs(20));
        let status = self.child.wait()?;
        ensure!(status.success(), "lazysnapd exit {status}: {}", self.log());
        let host = self.layer_host_pid();
        image::run(
            Command::new(LAZYSNAPD)
                .arg("--config")
                .arg(self.dir.path().join("lazysnapd.toml"))
                .arg("--cleanup"),
        )?;
        if let Some(pid) = host {
            ensure!(
                !Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .unwrap_or_default()
                        .contains(") Z "),
                "the layer host {pid} still runs after --cleanup:\n{}",
                self.host_log()
            );
        }
        let left = mounts_below(&self.root());
        ensure!(left.is_empty(), "left mounted after --cleanup: {left:?}");
        Ok(())
    }

    fn host_log(&self) -> String {
        std::fs::read_to_string(self.root().join("layer-host.log")).unwrap_or_default()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The service's log, then the layer host's.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lazysnapd.log")).unwrap_or_default()
            + "\n--- layer host ---\n"
            + &self.host_log()
    }

    /// Chunk files in the cache (`ROOT/cache/chunks/**`, temporary files excluded).
    fn cached_chunks(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![self.root().join("cache/chunks")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if !entry.file_name().to_string_lossy().starts_with('.') {
                    count += 1;
                }
            }
        }
        count
    }

    /// The metrics endpoint's text.
    fn metrics(&self) -> Result<String> {
        let mut stream = TcpStream::connect(&self.metrics_addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The value of a counter line `NAME` (labels included), 0 if absent.
    fn metric(&self, name: &str) -> Result<f64> {
        Ok(self
            .metrics()?
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// SIGTERM: must exit 0 with every lazy layer unmounted.
    fn stop(mut self) -> Result<()> {
        self.stop_in_place()
    }
}

impl Drop for Lazysnapd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        // The layer host is not our child: stop it by the pid it wrote.
        if let Some(pid) = self.layer_host_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while nix::sys::signal::kill(pid, None).is_ok()
                && start.elapsed() < Duration::from_secs(10)
                && self.layer_host_pid().is_some()
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.layer_host_pid().is_some() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        unmount_below(self.dir.path());
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The busybox-static image in the registry three ways: as built (gzip), and converted to
/// zstd:chunked and eStargz by `lazysnap convert`.
struct Images {
    /// `DIR:latest`, the OCI layout the fixture script wrote.
    layout: String,
    plain: String,
    zstd: String,
    estargz: String,
    _work: tempfile::TempDir,
}

fn busybox_images(registry: &TestRegistry) -> Result<Images> {
    let work = tempfile::tempdir()?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let layout = String::from_utf8(image::run(
        Command::new(fixtures.join("busybox-image.sh")).arg(work.path().join("layout")),
    )?)?
    .trim()
    .to_owned();
    let plain = format!("{}/busybox:plain", registry.addr);
    image::run(
        Command::new(fixtures.join("push-layout.sh"))
            .arg(&layout)
            .arg(&plain),
    )?;
    let source = format!("oci:{layout}");
    let zstd = format!("{}/busybox:zstd", registry.addr);
    let estargz = format!("{}/busybox:estargz", registry.addr);
    for (format, dst) in [("zstd-chunked", &zstd), ("estargz", &estargz)] {
        image::run(Command::new(LAZYSNAP).args(["convert", "--format", format, &source, dst]))?;
    }
    Ok(Images {
        layout,
        plain,
        zstd,
        estargz,
        _work: work,
    })
}

/// A JSON document of `reference`'s repository, straight from the registry with curl: its
/// manifest (`manifests`, by tag) or a blob (`blobs`, by digest).
fn registry_json(reference: &str, kind: &str, digest: Option<&str>) -> Result<serde_json::Value> {
    let (host, rest) = reference.split_once('/').context("reference has no host")?;
    let (repo, tag) = rest.rsplit_once(':').context("reference has no tag")?;
    let body = image::run(Command::new("curl").args([
        "-fsSL",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        "-H",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        &format!("http://{host}/v2/{repo}/{kind}/{}", digest.unwrap_or(tag)),
    ]))?;
    Ok(serde_json::from_slice(&body)?)
}

/// The layer digests of `reference`'s manifest, straight from the registry.
fn layer_digests(reference: &str) -> Result<Vec<String>> {
    let manifest = registry_json(reference, "manifests", None)?;
    Ok(manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect())
}

/// Runs [`PROBE`] in a container of `reference` on `snapshotter`. `ctr run` under load sometimes
/// loses a short-lived container's output (exit 0, nothing on stdout, with any snapshotter):
/// [`PROBE`] always prints, so an empty result is retried, a wrong one never.
fn probe(ctd: &TestContainerd, snapshotter: &str, reference: &str, id: &str) -> Result<String> {
    for attempt in 0..3 {
        let id = format!("{id}-{}-{attempt}", std::process::id());
        let output = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            &id,
            "/bin/sh",
            "-c",
            PROBE,
        ])?;
        if !output.is_empty() {
            return Ok(output);
        }
    }
    bail!("{reference} on {snapshotter}: three runs printed nothing")
}

/// The top chain ID of `reference` (what its unpacked snapshot is named), from its config.
fn chain_id(reference: &str) -> Result<String> {
    let manifest = registry_json(reference, "manifests", None)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest has no config")?;
    let config = registry_json(reference, "blobs", Some(config_digest))?;
    let mut chain: Option<String> = None;
    for diff_id in config["rootfs"]["diff_ids"]
        .as_array()
        .context("config has no diff_ids")?
    {
        let diff_id = diff_id.as_str().context("diff_id")?;
        chain = Some(match chain {
            None => diff_id.to_owned(),
            Some(parent) => image::digest_of(format!("{parent} {diff_id}").as_bytes()),
        });
    }
    chain.context("image has no layers")
}

/// The tree of `reference` as `snapshotter` unpacked it: a read-only View of its top snapshot
/// through containerd, mounted here with the mount list containerd got.
fn image_tree(
    ctd: &TestContainerd,
    snapshotter: &str,
    reference: &str,
    target: &Path,
) -> Result<TreeMap> {
    std::fs::create_dir_all(target)?;
    let key = format!("view-{}", target.display());
    let parent = chain_id(reference)?;
    let mounts = ctd.ctr(&[
        "snapshots",
        "--snapshotter",
        snapshotter,
        "view",
        "--mounts",
        &key,
        &parent,
    ])?;
    let result = (|| {
        let mounts: Vec<serde_json::Value> =
            serde_json::from_str(&mounts).with_context(|| format!("view mounts {mounts:?}"))?;
        ensure!(mounts.len() == 1, "one mount expected: {mounts:?}");
        // ctr prints Go's mount.Mount: `Type`, `Source`, `Options`.
        let m = &mounts[0];
        let options: Vec<&str> = m["Options"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        image::run(
            Command::new("mount")
                .args(["-t", m["Type"].as_str().context("mount type")?])
                .args(["-o", &options.join(",")])
                .arg(m["Source"].as_str().context("mount source")?)
                .arg(target),
        )?;
        let tree = tree::snapshot(target);
        image::run(Command::new("umount").arg(target))?;
        tree
    })();
    // A view holds no lease: containerd's GC may have collected it already, which is fine.
    let removed = ctd.ctr(&["snapshots", "--snapshotter", snapshotter, "rm", &key]);
    let tree = result?;
    if let Err(e) = removed {
        ensure!(format!("{e}").contains("not found"), "{e:#}");
    }
    Ok(tree)
}

/// The oracle: the plain image through containerd's own overlayfs snapshotter.
fn oracle(ctd: &TestContainerd, images: &Images, work: &Path) -> Result<(String, TreeMap)> {
    ctd.ctr(&["images", "pull", "--plain-http", &images.plain])?;
    let output = probe(ctd, "overlayfs", &images.plain, "oracle")?;
    ensure!(output.starts_with("ok\n"), "oracle run: {output}");
    let tree = image_tree(ctd, "overlayfs", &images.plain, &work.join("oracle"))?;
    ensure!(tree.contains_key("bin/busybox"), "oracle tree: {tree:?}");
    Ok((output, tree))
}

type TreeMap = std::collections::BTreeMap<String, tree::Node>;

#[test]
fn lazy_images_pull_without_layer_blobs_and_run_like_overlayfs() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let work = tempfile::tempdir()?;
    let daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let (want_output, want_tree) = oracle(&ctd, &images, work.path())?;

    for (i, reference) in [&images.zstd, &images.estargz].into_iter().enumerate() {
        ctd.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ])
        .with_context(|| daemon.log())?;
        let content = ctd.ctr(&["content", "ls", "-q"])?;
        for layer in layer_digests(reference)? {
            ensure!(
                !content.contains(&layer),
                "{reference}: layer {layer} was downloaded into containerd's content store:\n{content}\nlazysnapd log:\n{}",
                daemon.log()
            );
        }
        let output = probe(&ctd, SNAPSHOTTER, reference, &format!("lazy{i}"))
            .with_context(|| daemon.log())?;
        ensure!(
            output == want_output,
            "{reference}: the container saw\n{output}\noverlayfs gave\n{want_output}"
        );
        let got_tree = image_tree(
            &ctd,
            SNAPSHOTTER,
            reference,
            &work.path().join(format!("t{i}")),
        )
        .with_context(|| daemon.log())?;
        let differences = tree::differences(&want_tree, &got_tree);
        ensure!(
            differences.is_empty(),
            "{reference}: {} differences from overlayfs:\n{}",
            differences.len(),
            differences.join("\n")
        );
    }
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(lazy >= 2.0, "lazy layers counted: {lazy}\n{}", daemon.log());
    // Background completion decompresses each layer as containerd's applier would, and the
    // result matches the diff_id of its config, in both formats.
    let start = Instant::now();
    while daemon.metric("lazysnap_snapshot_verified_layers_total")? < 2.0 {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "layers not verified after 60 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failed = daemon.metric("lazysnap_snapshot_verify_failures_total")?;
    ensure!(
        failed == 0.0,
        "honest layers failed verification:\n{}",
        daemon.log()
    );
    ensure!(
        !mounts_below(&daemon.root()).is_empty(),
        "the lazy layers are FUSE mounts under lazysnapd's root"
    );

    // containerd's GC removes the snapshots of removed images; lazysnapd unmounts their layers.
    for reference in [&images.zstd, &images.estargz, &images.plain] {
        ctd.ctr(&["images", "rm", "--sync", reference])?;
    }
    let start = Instant::now();
    while !mounts_below(&daemon.root()).is_empty() {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "still mounted after the images were removed: {:?}\n{}",
            mounts_below(&daemon.root()),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = ctd.ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])?;
    ensure!(left.lines().count() <= 1, "snapshots left: {left}");
    drop(ctd);
    daemon.stop()
}

#[test]
fn a_plain_gzip_image_falls_back_and_runs_through_the_same_snapshotter() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let work = tempfile::tempdir()?;
    let daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let (want_output, want_tree) = oracle(&ctd, &images, work.path())?;
    // The oracle pulled the plain image into the content store already: remove it, so this
    // pull must fetch it again and unpack it into lazysnapd's snapshots.
    ctd.ctr(&["images", "rm", "--sync", &images.plain])?;

    ctd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &images.plain,
    ])
    .with_context(|| daemon.log())?;
    let content = ctd.ctr(&["content", "ls", "-q"])?;
    for layer in layer_digests(&images.plain)? {
        ensure!(
            content.contains(&layer),
            "the gzip layer {layer} should have been downloaded by containerd:\n{content}"
        );
    }
    let fallbacks = daemon.metric("lazysnap_snapshot_fallbacks_total{reason=\"not_lazy\"}")?;
    ensure!(
        fallbacks >= 1.0,
        "fallbacks counted: {fallbacks}\n{}",
        daemon.log()
    );
    ensure!(
        daemon.log().contains("not in a lazy format"),
        "the fallback is logged with its reason:\n{}",
        daemon.log()
    );
    let output = probe(&ctd, SNAPSHOTTER, &images.plain, "plain").with_context(|| daemon.log())?;
    ensure!(
        output == want_output,
        "the container saw\n{output}\noverlayfs gave\n{want_output}"
    );
    let got_tree = image_tree(&ctd, SNAPSHOTTER, &images.plain, &work.path().join("t"))?;
    let differences = tree::differences(&want_tree, &got_tree);
    ensure!(
        differences.is_empty(),
        "{} differences from overlayfs:\n{}",
        differences.len(),
        differences.join("\n")
    );
    drop(ctd);
    daemon.stop()
}

#[test]
fn a_running_container_keeps_reading_across_a_restart_and_a_cold_start_refetches_nothing(
) -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let work = tempfile::tempdir()?;
    let mut daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    ctd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &images.zstd,
    ])
    .with_context(|| daemon.log())?;
    let long = format!("long-{}", std::process::id());
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        SNAPSHOTTER,
        &images.zstd,
        &long,
        "/bin/sleep",
        "100000",
    ])?;
    let result = (|| -> Result<()> {
        // containerd runs its own release's shim (its directory comes first on PATH), not the
        // one Debian's containerd 1.6 installed in /usr/bin.
        let own = ctd.release.bin_dir.canonicalize()?;
        let shims = ctd.shim_executables();
        ensure!(
            !shims.is_empty() && shims.iter().all(|s| s.starts_with(&own)),
            "{} runs the shims {shims:?}, not its own from {}",
            ctd.release.banner,
            own.display()
        );
        // The gRPC service restarts; the layer host, and so the container's lower layer, stays.
        daemon.restart()?;
        let start = Instant::now();
        let exec = loop {
            let exec = ctd.ctr(&[
                "task",
                "exec",
                "--exec-id",
                &format!("e{}", start.elapsed().as_millis()),
                &long,
                "/bin/sh",
                "-c",
                PROBE,
            ]);
            match exec {
                Ok(out) if !out.is_empty() => break out,
                Ok(_) if start.elapsed() < Duration::from_secs(15) => {}
                Err(e) if start.elapsed() < Duration::from_secs(15) => {
                    tracing_free_sleep(&e);
                }
                other => break other.with_context(|| daemon.log())?,
            }
        };
        ensure!(
            exec.starts_with("ok\n"),
            "the running container read\n{exec}"
        );
        let before = retry_unavailable(|id| probe(&ctd, SNAPSHOTTER, &images.zstd, id))
            .with_context(|| daemon.log())?;
        ensure!(
            before == exec,
            "a new container saw\n{before}\nthe old one\n{exec}"
        );
        Ok(())
    })();
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", &long]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = ctd.ctr(&["task", "delete", "-f", &long]);
    let _ = ctd.ctr(&["container", "delete", &long]);
    result?;

    // A layer host that dies is replaced, and the layers new containers need are mounted again.
    let host = daemon.layer_host_pid().context("no layer host pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let start = Instant::now();
    while daemon.layer_host_pid() == Some(host)
        && Path::new(&format!("/proc/{host}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{host}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "layer host still alive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its FUSE mount is dead now; containerd's next use of the snapshot brings it back.
    let revived =
        probe(&ctd, SNAPSHOTTER, &images.zstd, "revived").with_context(|| daemon.log())?;
    ensure!(
        revived.starts_with("ok\n"),
        "after the layer host died:\n{revived}"
    );

    // Reading every file puts every chunk in the cache; a cold start must not fetch any again.
    let tree_before = image_tree(&ctd, SNAPSHOTTER, &images.zstd, &work.path().join("a"))?;
    let before = probe(&ctd, SNAPSHOTTER, &images.zstd, "warm")?;
    daemon.restart_cold()?;
    let restored = daemon.metric("lazysnap_snapshot_restored_layers_total")?;
    ensure!(restored >= 1.0, "restored: {restored}\n{}", daemon.log());
    // containerd's gRPC client reconnects with backoff (about a second after a short outage);
    // until then calls fail as unavailable.
    let after = retry_unavailable(|id| probe(&ctd, SNAPSHOTTER, &images.zstd, id))
        .with_context(|| daemon.log())?;
    ensure!(
        after == before,
        "after the restart\n{after}\nbefore\n{before}"
    );
    let tree_after = image_tree(&ctd, SNAPSHOTTER, &images.zstd, &work.path().join("b"))?;
    let differences = tree::differences(&tree_before, &tree_after);
    ensure!(differences.is_empty(), "{}", differences.join("\n"));
    // The reads fetched nothing. (A layer whose verification had not finished before the
    // restart, which starts a second after the last read, is streamed once more to finish it:
    // that is background completion, counted as `background`, not a read's refetch.)
    let mut fetched = 0.0;
    for kind in ["on_demand", "prefetch", "profile"] {
        fetched += daemon.metric(&format!("lazysnap_fetch_bytes_total{{kind=\"{kind}\"}}"))?;
    }
    ensure!(
        fetched == 0.0,
        "{fetched} bytes fetched again for reads after the restart\n{}\n{}",
        daemon.metrics()?,
        daemon.log()
    );
    drop(ctd);
    daemon.stop()
}

/// Waits a little before retrying a call containerd refused while reconnecting.
fn tracing_free_sleep(_error: &anyhow::Error) {
    std::thread::sleep(Duration::from_millis(250));
}

/// Runs `call` (given a fresh id) until containerd stops answering `unavailable`: after lazysnapd
/// restarts, containerd's gRPC client reconnects with backoff (about a second). containerd 1.x
/// reports that as `code = Unavailable`; 2.x passes on the dial error alone (`connection error:
/// ... connect: connection refused`), though the socket is already served again.
fn retry_unavailable(mut call: impl FnMut(&str) -> Result<String>) -> Result<String> {
    let start = Instant::now();
    loop {
        let id = format!("r{}", start.elapsed().as_millis());
        match call(&id) {
            Err(e)
                if (format!("{e}").contains("unavailable")
                    || format!("{e}").contains("Error while dialing"))
                    && start.elapsed() < Duration::from_secs(15) =>
            {
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

#[test]
fn removing_an_image_evicts_its_chunks_past_the_disk_budget() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    // A budget of one byte: only pins keep chunks on disk.
    let daemon = Lazysnapd::start_with("[cache]\ndisk_budget_bytes = 1\n")?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    ctd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &images.zstd,
    ])
    .with_context(|| daemon.log())?;
    probe(&ctd, SNAPSHOTTER, &images.zstd, "budget").with_context(|| daemon.log())?;
    // The background fetch completes the mounted layer and pins it, whatever the budget.
    let start = Instant::now();
    while !daemon.log().contains("layer complete in the cache") {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the layer never completed:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pinned = daemon.cached_chunks();
    ensure!(pinned > 0, "a mounted, complete layer keeps its chunks");

    ctd.ctr(&["images", "rm", "--sync", &images.zstd])?;
    let start = Instant::now();
    while daemon.cached_chunks() > 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "{} of {pinned} chunks still cached after the image was removed:\n{}",
            daemon.cached_chunks(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        mounts_below(&daemon.root()).is_empty(),
        "the layer is unmounted"
    );
    drop(ctd);
    daemon.stop()
}

/// `ctr images pull --snapshotter lazysnap` sends no layer labels, so containerd downloads every
/// layer and unpacks it into lazysnapd's snapshots. containerd 2.x's ctr pulls
/// through the transfer service, which unpacks only for the snapshotters its `unpack_config`
/// lists besides the default ("no unpack platforms defined" otherwise): the shipped version 3
/// snippet lists lazysnap.
#[test]
fn a_pull_without_labels_falls_back_and_the_default_snapshotter_still_unpacks() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start_shipped(&daemon.socket)?;
    ctd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &images.zstd,
    ])
    .with_context(|| daemon.log())?;
    // containerd 1.x's ctr sends no labels at all (not even the chain ID: lazysnapd sees plain
    // snapshots); 2.x's transfer service sends the chain ID (a `no_labels` fallback). Either way
    // nothing is lazy and containerd fetches every layer itself.
    let content = ctd.ctr(&["content", "ls", "-q"])?;
    for layer in layer_digests(&images.zstd)? {
        ensure!(content.contains(&layer), "layer {layer} not downloaded");
    }
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(lazy == 0.0, "lazy layers: {lazy}\n{}", daemon.log());
    let output =
        probe(&ctd, SNAPSHOTTER, &images.zstd, "nolabels").with_context(|| daemon.log())?;
    ensure!(output.starts_with("ok\n"), "{output}");
    ctd.ctr(&["images", "pull", "--plain-http", &images.plain])?;
    let output = probe(&ctd, "overlayfs", &images.plain, "default")?;
    ensure!(output.starts_with("ok\n"), "{output}");
    drop(ctd);
    daemon.stop()
}

/// containerd's CRI ImageService over its socket (what kubelet talks to).
#[test]
fn cri_pulls_lazily_with_its_labels_and_runs_a_pod_from_lazy_images() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let daemon = Lazysnapd::start()?;
    let pause = pause_image(&registry, &images)?;
    // containerd as systemd/ configures it: the snippet shipped for this release (version 2 for
    // 1.x, version 3 for 2.x) names the snapshotter and turns the layer labels on.
    let ctd = TestContainerd::start_cri_shipped(&daemon.socket, &pause)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let image_ref = runtime.block_on(async {
        let mut client = cri_images(&ctd.socket).await?;
        let response = client
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: images.zstd.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CRI PullImage\n{}", daemon.log()))?;
        // kubelet sizes the image file system (image GC, disk pressure) from the directory CRI
        // names here: the root the snippet exports, lazysnapd's. containerd 1.6 reads no
        // `exports` and names a directory under its own root that does not exist.
        let fs = client
            .image_fs_info(k8s_cri::v1::ImageFsInfoRequest {})
            .await?
            .into_inner();
        let mountpoints: Vec<&str> = fs
            .image_filesystems
            .iter()
            .filter_map(|f| Some(f.fs_id.as_ref()?.mountpoint.as_str()))
            .collect();
        if ctd.release.version >= (1, 7) {
            let exported = daemon.socket.parent().context("socket dir")?;
            ensure!(
                mountpoints == [exported.to_string_lossy()],
                "{}: image file systems {mountpoints:?}, not lazysnapd's {}",
                ctd.release.banner,
                exported.display()
            );
        }
        anyhow::Ok(response.into_inner().image_ref)
    })?;
    ensure!(image_ref.starts_with("sha256:"), "image ref {image_ref}");
    let content = ctd.ctr_in("k8s.io", &["content", "ls", "-q"])?;
    for layer in layer_digests(&images.zstd)? {
        ensure!(
            !content.contains(&layer),
            "CRI downloaded layer {layer}:\n{content}\nlazysnapd log:\n{}",
            daemon.log()
        );
    }
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(lazy >= 1.0, "lazy layers: {lazy}\n{}", daemon.log());
    ensure!(
        daemon
            .log()
            .contains("containerd.io/snapshot/cri.manifest-digest"),
        "CRI sent its labels:\n{}",
        daemon.log()
    );

    // A pod whose sandbox and container both start from lazy images.
    let logs = tempfile::tempdir()?;
    let output = runtime
        .block_on(run_pod(&ctd.socket, &images.zstd, logs.path()))
        .with_context(|| daemon.log())?;
    ensure!(
        output.starts_with("ok\n"),
        "the pod's container printed\n{output}"
    );
    ensure!(output.contains("/bin/busybox"), "{output}");
    drop(ctd);
    daemon.stop()
}

/// kubelet's PullImage through lazysnapd's CRI proxy starts the layer host finding the image's
/// lazy layers while containerd resolves it: containerd's Prepare then takes every layer found
/// ahead, the bottom one too (which, found by its own Prepare, would not count: its labels locate
/// its TOC). Fails if the proxy does not start it, or if what it found is not what the Prepare
/// asks for (another key: image name, manifest digest).
#[test]
fn a_pull_through_the_cri_proxy_finds_the_layers_before_containerd_prepares_them() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let pause = pause_image(&registry, &images)?;
    let links = tempfile::tempdir()?;
    let containerd_link = links.path().join("containerd.sock");
    let proxy = links.path().join("cri.sock");
    let daemon = Lazysnapd::start_with(&format!(
        "[cri]\naddress = \"{}\"\ncontainerd_address = \"{}\"\n",
        proxy.display(),
        containerd_link.display()
    ))?;
    let ctd = TestContainerd::start_cri_shipped(&daemon.socket, &pause)?;
    std::os::unix::fs::symlink(&ctd.socket, &containerd_link)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime
        .block_on(cri_pull(&proxy, &images.zstd))
        .with_context(|| format!("{}\ncontainerd:\n{}", daemon.log(), ctd.log()))?;
    let layers = layer_digests(&images.zstd)?.len() as f64;
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    let ahead = daemon.metric("lazysnap_layers_found_ahead_total")?;
    ensure!(
        lazy == layers && ahead == layers,
        "{layers} layers: {lazy} mounted lazily, {ahead} of them found ahead\n{}",
        daemon.log()
    );
    let started = "finding the image's lazy layers ahead of containerd's pull";
    ensure!(
        daemon.log().matches(started).count() == 1,
        "{}",
        daemon.log()
    );
    // Pulled again (`imagePullPolicy: Always`): its layers are mounted and containerd prepares
    // none of them, so none is found ahead again (their TOCs would be read for nothing).
    runtime
        .block_on(cri_pull(&proxy, &images.zstd))
        .context("the second pull")?;
    let mut log = daemon.log();
    for _ in 0..50 {
        if log.contains("all mounted already") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        log = daemon.log();
    }
    ensure!(
        log.contains("all mounted already") && log.matches(started).count() == 1,
        "the pulled-again image was found ahead again:\n{log}"
    );
    // A multi-platform image pinned by the digest of its index, as production pods often are:
    // CRI's labels name the image by that digest (no tag) and the platform manifest's digest,
    // which the layer host resolves through the index as containerd does. Found ahead too.
    let (host, rest) = images.estargz.split_once('/').context("no host")?;
    let (repo, tag) = rest.rsplit_once(':').context("no tag")?;
    let manifest = image::run(Command::new("curl").args([
        "-fsSL",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
    ]))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image::digest_of(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))?;
    let index_path = links.path().join("index.json");
    std::fs::write(&index_path, &index)?;
    let index_digest = image::digest_of(&index);
    image::run(Command::new("curl").args([
        "-fsS",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.index.v1+json",
        "--data-binary",
        &format!("@{}", index_path.display()),
        &format!("http://{host}/v2/{repo}/manifests/{index_digest}"),
    ]))?;
    let pinned = format!("{host}/{repo}@{index_digest}");
    runtime
        .block_on(cri_pull(&proxy, &pinned))
        .with_context(|| daemon.log())?;
    let more = layer_digests(&images.estargz)?.len() as f64;
    let ahead = daemon.metric("lazysnap_layers_found_ahead_total")?;
    let log = daemon.log();
    // (An eStargz layer's labels do not locate its TOC, so its own Prepare would find it ahead
    // with the others anyway: the log tells whether the pull found it first.)
    ensure!(
        ahead == layers + more && log.matches(started).count() == 2,
        "{pinned}: {ahead} layers found ahead in all, not {}; the pull did not start it:\n{log}",
        layers + more
    );
    drop(ctd);
    daemon.stop()
}

/// A hostile image through the same path: its manifest pins another TOC than the one its layer
/// holds. Found ahead of the pull, the layer fails the same check a Prepare makes; the Prepare
/// gets that verdict, falls back (containerd unpacks the layer) and the pull succeeds; the layer
/// host lives on and serves the next image lazily.
#[test]
fn a_layer_found_ahead_of_a_cri_pull_that_fails_its_checks_falls_back() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = busybox_images(&registry)?;
    let pause = pause_image(&registry, &images)?;
    let mut manifest = registry_json(&images.zstd, "manifests", None)?;
    let annotations = manifest["layers"][0]["annotations"]
        .as_object_mut()
        .context("layer annotations")?;
    let key = "io.github.containers.zstd-chunked.manifest-checksum";
    ensure!(annotations.contains_key(key), "{annotations:?}");
    annotations.insert(key.into(), image::digest_of(b"another TOC").into());
    let links = tempfile::tempdir()?;
    let body = links.path().join("tampered.json");
    std::fs::write(&body, serde_json::to_vec(&manifest)?)?;
    let (host, rest) = images.zstd.split_once('/').context("no host")?;
    let (repo, _) = rest.rsplit_once(':').context("no tag")?;
    image::run(Command::new("curl").args([
        "-fsS",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("http://{host}/v2/{repo}/manifests/tampered"),
    ]))?;
    let tampered = format!("{host}/{repo}:tampered");

    let containerd_link = links.path().join("containerd.sock");
    let proxy = links.path().join("cri.sock");
    let daemon = Lazysnapd::start_with(&format!(
        "[cri]\naddress = \"{}\"\ncontainerd_address = \"{}\"\n",
        proxy.display(),
        containerd_link.display()
    ))?;
    let ctd = TestContainerd::start_cri_shipped(&daemon.socket, &pause)?;
    std::os::unix::fs::symlink(&ctd.socket, &containerd_link)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime
        .block_on(cri_pull(&proxy, &tampered))
        .with_context(|| format!("{}\ncontainerd:\n{}", daemon.log(), ctd.log()))?;
    let log = daemon.log();
    let toc = daemon.metric("lazysnap_snapshot_fallbacks_total{reason=\"toc\"}")?;
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(
        log.contains("finding the image's lazy layers ahead of containerd's pull")
            && toc == 1.0
            && lazy == 0.0,
        "{tampered}: {toc} TOC fallbacks, {lazy} lazy layers:\n{log}"
    );
    // The layer host lives on: the next image (other layers) is found ahead and mounted lazily.
    runtime
        .block_on(cri_pull(&proxy, &images.estargz))
        .with_context(|| daemon.log())?;
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(
        lazy == layer_digests(&images.estargz)?.len() as f64,
        "{lazy} lazy layers after the good pull:\n{}",
        daemon.log()
    );
    drop(ctd);
    daemon.stop()
}

/// A pod sandbox image: busybox running `sleep` (pods need a process that stays), converted to
/// zstd:chunked so the sandbox itself starts lazily.
fn pause_image(registry: &TestRegistry, images: &Images) -> Result<String> {
    let (dir, _) = images
        .layout
        .rsplit_once(':')
        .context("layout has no tag")?;
    image::run(Command::new("umoci").args([
        "config",
        "--image",
        &images.layout,
        "--tag",
        "pause",
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "100000",
    ]))?;
    let pause = format!("{}/pause:lazy", registry.addr);
    image::run(Command::new(LAZYSNAP).args(["convert", &format!("oci:{dir}:pause"), &pause]))?;
    Ok(pause)
}

/// A pod on the host network (no CNI here) running one container from a lazy image; returns the
/// container's log. Stops and removes the pod whatever happens.
async fn run_pod(socket: &Path, image: &str, log_dir: &Path) -> Result<String> {
    use containerd_snapshots::tonic::transport::{Endpoint, Uri};
    use k8s_cri::v1 as cri;
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await?;
    let mut runtime = cri::runtime_service_client::RuntimeServiceClient::new(channel);
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "lazy".into(),
            uid: format!("uid-{}", std::process::id()),
            namespace: "test".into(),
            attempt: 0,
        }),
        // Host network shares the host's UTS namespace: no hostname of its own.
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            ..Default::default()
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let result = async {
        let container = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "probe".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.to_owned(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/sh".into(), "-c".into(), PROBE.into()],
                    log_path: "probe.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .context("StartContainer")?;
        let start = Instant::now();
        loop {
            let status = runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .context("ContainerStatus")?
                .into_inner()
                .status
                .context("no status")?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                ensure!(status.exit_code == 0, "container exited {status:?}");
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "container still {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // CRI log lines: `TIMESTAMP STREAM TAG content`.
        let log = std::fs::read_to_string(log_dir.join("probe.log"))?;
        anyhow::Ok(
            log.lines()
                .filter_map(|l| l.splitn(4, ' ').nth(3))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
    }
    .await;
    let _ = runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let _ = runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await;
    result
}

/// The password of the private registry in the CRI proxy test: it must never reach a log.
const PULL_SECRET_PASSWORD: &str = "s3cret-only-kubelet-knows";

#[test]
fn a_private_image_pulls_lazily_with_credentials_that_came_only_through_the_cri_proxy() -> Result<()>
{
    let open = TestRegistry::start()?;
    let images = busybox_images(&open)?;
    let pause = pause_image(&open, &images)?;
    let private = PrivateImage::push(&images)?;
    let (reference, auth) = (private.reference.clone(), private.auth.clone());

    // containerd's socket is known only once it runs, and containerd's config names lazysnapd's:
    // the proxy dials a link made after containerd started (it dials at its first call).
    let links = tempfile::tempdir()?;
    let containerd_link = links.path().join("containerd.sock");
    let no_docker_config = tempfile::tempdir()?;
    let daemon = Lazysnapd::start_with(&format!(
        "[registry]\ndocker_config_dir = \"{}\"\n[cri]\naddress = \"{}\"\ncontainerd_address = \"{}\"\n",
        no_docker_config.path().display(),
        links.path().join("cri.sock").display(),
        containerd_link.display()
    ))?;
    let ctd = TestContainerd::start_cri_shipped(&daemon.socket, &pause)?;
    std::os::unix::fs::symlink(&ctd.socket, &containerd_link)?;
    let proxy = links.path().join("cri.sock");

    let runtime = tokio::runtime::Runtime::new()?;
    runtime
        .block_on(async {
            let mut client = cri_images(&proxy).await?;
            let spec = k8s_cri::v1::ImageSpec {
                image: reference.clone(),
                ..Default::default()
            };
            let before = client
                .image_status(k8s_cri::v1::ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                })
                .await
                .context("CRI ImageStatus through the proxy")?
                .into_inner();
            ensure!(before.image.is_none(), "image present before the pull");
            client
                .pull_image(k8s_cri::v1::PullImageRequest {
                    image: Some(spec.clone()),
                    auth: Some(k8s_cri::v1::AuthConfig {
                        username: "kube".into(),
                        password: PULL_SECRET_PASSWORD.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .context("CRI PullImage through the proxy")?;
            let listed = client
                .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
                .await?
                .into_inner();
            ensure!(
                listed
                    .images
                    .iter()
                    .any(|i| i.repo_tags.contains(&reference)),
                "ListImages through the proxy misses {reference}"
            );
            anyhow::Ok(())
        })
        .with_context(|| format!("{}\ncontainerd:\n{}", daemon.log(), ctd.log()))?;

    // Lazy: containerd downloaded no layer, lazysnapd mounted them with kubelet's credentials.
    private.ensure_lazy(&ctd, &daemon)?;
    ensure!(
        daemon.metric("lazysnap_cri_pulls_total{credentials=\"kept\"}")? == 1.0,
        "{}",
        daemon.metrics()?
    );

    // A pod (its sandbox from the open registry) runs the private image from lazy layers.
    let logs = tempfile::tempdir()?;
    let output = runtime
        .block_on(run_pod(&ctd.socket, &reference, logs.path()))
        .with_context(|| daemon.log())?;
    ensure!(
        output.starts_with("ok\n"),
        "the pod's container printed\n{output}"
    );

    // A pull with a wrong secret fails, and must not take the working one's place: the next
    // lazy mount of the repository (another tag, pulled straight from containerd's CRI with the
    // right credentials, which lazysnapd never sees) still finds the layers.
    let other = private.convert(&images, "estargz", "other")?;
    let lazy_before = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    runtime.block_on(async {
        let wrong = cri_images(&proxy)
            .await?
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: reference.clone(),
                    ..Default::default()
                }),
                auth: Some(k8s_cri::v1::AuthConfig {
                    username: "kube".into(),
                    password: "wrong".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        ensure!(wrong.is_err(), "a pull with a wrong password succeeded");
        cri_images(&ctd.socket)
            .await?
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: other.clone(),
                    ..Default::default()
                }),
                auth: Some(k8s_cri::v1::AuthConfig {
                    auth: auth.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("CRI PullImage of the other tag, straight to containerd")?;
        anyhow::Ok(())
    })?;
    private.ensure_lazy_tag(&ctd, &daemon, "other")?;
    let lazy_after = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(
        lazy_after > lazy_before,
        "the other tag's layers were not mounted lazily ({lazy_before} then {lazy_after}):\n{}",
        daemon.log()
    );
    let log = daemon.log();
    ensure!(
        !log.contains(PULL_SECRET_PASSWORD) && !log.contains(&auth),
        "the password reached lazysnapd's log:\n{log}"
    );
    drop(ctd);
    daemon.stop()
}

/// The busybox image converted into a registry that wants a password (htpasswd), pushed with a
/// docker config of the push's own.
struct PrivateImage {
    registry: TestRegistry,
    reference: String,
    /// docker's `auth` of its user and password.
    auth: String,
    /// The docker config the pushes use.
    push_config: tempfile::TempDir,
}

impl PrivateImage {
    fn push(images: &Images) -> Result<Self> {
        let registry = TestRegistry::start_with_htpasswd("kube", PULL_SECRET_PASSWORD)?;
        let push_config = tempfile::tempdir()?;
        let auth = base64_basic("kube", PULL_SECRET_PASSWORD);
        let config = serde_json::json!({"auths": {registry.addr.clone(): {"auth": auth}}});
        std::fs::write(
            push_config.path().join("config.json"),
            serde_json::to_vec(&config)?,
        )?;
        let reference = format!("{}/team/app:lazy", registry.addr);
        let private = Self {
            registry,
            reference,
            auth,
            push_config,
        };
        private.convert(images, "zstd-chunked", "lazy")?;
        let anonymous = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!(
                "http://{}/v2/team/app/manifests/lazy",
                private.registry.addr
            ))
            .output()?;
        ensure!(
            anonymous.stdout == b"401",
            "the registry must refuse anonymous pulls: {:?}",
            String::from_utf8_lossy(&anonymous.stdout)
        );
        Ok(private)
    }

    /// Converts the busybox image to `format` as `team/app:TAG`; returns its reference.
    fn convert(&self, images: &Images, format: &str, tag: &str) -> Result<String> {
        let reference = format!("{}/team/app:{tag}", self.registry.addr);
        image::run(
            Command::new(LAZYSNAP)
                .env("DOCKER_CONFIG", self.push_config.path())
                .args(["convert", "--format", format])
                .arg(format!("oci:{}", images.layout))
                .arg(&reference),
        )?;
        Ok(reference)
    }

    /// containerd holds no layer blob of the image in its content store, and lazysnapd mounted
    /// lazy layers.
    fn ensure_lazy(&self, ctd: &TestContainerd, daemon: &Lazysnapd) -> Result<()> {
        self.ensure_lazy_tag(ctd, daemon, "lazy")
    }

    /// [`Self::ensure_lazy`] for `team/app:TAG`.
    fn ensure_lazy_tag(&self, ctd: &TestContainerd, daemon: &Lazysnapd, tag: &str) -> Result<()> {
        let manifest = image::run(Command::new("curl").args([
            "-fsSL",
            "-u",
            &format!("kube:{PULL_SECRET_PASSWORD}"),
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{}/v2/team/app/manifests/{tag}", self.registry.addr),
        ]))?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest)?;
        let content = ctd.ctr_in("k8s.io", &["content", "ls", "-q"])?;
        for layer in manifest["layers"].as_array().context("layers")? {
            let digest = layer["digest"].as_str().context("layer digest")?;
            ensure!(
                !content.contains(digest),
                "containerd downloaded layer {digest}:\n{content}\nlazysnapd log:\n{}",
                daemon.log()
            );
        }
        let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
        ensure!(lazy >= 1.0, "lazy layers: {lazy}\n{}", daemon.log());
        Ok(())
    }
}

#[test]
fn a_private_image_pulls_lazily_through_cri_with_credentials_from_a_credential_helper() -> Result<()>
{
    let open = TestRegistry::start()?;
    let images = busybox_images(&open)?;
    let pause = pause_image(&open, &images)?;
    let private = PrivateImage::push(&images)?;
    // lazysnapd's docker config names a helper (credsStore) and holds no credentials; the
    // helper, a script of the test's own, answers for the private registry only.
    let work = tempfile::tempdir()?;
    let helpers = work.path().join("bin");
    std::fs::create_dir_all(&helpers)?;
    let asked = work.path().join("helper.log");
    let helper = helpers.join("docker-credential-lstest");
    let answer = serde_json::json!({
        "ServerURL": private.registry.addr,
        "Username": "kube",
        "Secret": PULL_SECRET_PASSWORD,
    });
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread -r server\necho \"$1 $server\" >> {asked}\n\
             if [ \"$server\" = \"{addr}\" ]; then echo '{answer}'\n\
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
            asked = asked.display(),
            addr = private.registry.addr
        ),
    )?;
    std::fs::set_permissions(
        &helper,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )?;
    let docker_config = work.path().join("docker");
    std::fs::create_dir_all(&docker_config)?;
    std::fs::write(
        docker_config.join("config.json"),
        r#"{"credsStore": "lstest"}"#,
    )?;
    let daemon = Lazysnapd::start_with_path(
        &format!(
            "[registry]\ndocker_config_dir = \"{}\"\n",
            docker_config.display()
        ),
        Some(&helpers),
    )?;
    let ctd = TestContainerd::start_cri_shipped(&daemon.socket, &pause)?;
    // containerd gets the credentials with the pull, straight (no proxy): lazysnapd has only
    // its helper.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime
        .block_on(async {
            cri_images(&ctd.socket)
                .await?
                .pull_image(k8s_cri::v1::PullImageRequest {
                    image: Some(k8s_cri::v1::ImageSpec {
                        image: private.reference.clone(),
                        ..Default::default()
                    }),
                    auth: Some(k8s_cri::v1::AuthConfig {
                        auth: private.auth.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .context("CRI PullImage")?;
            anyhow::Ok(())
        })
        .with_context(|| daemon.log())?;
    private.ensure_lazy(&ctd, &daemon)?;
    let asked = std::fs::read_to_string(&asked).unwrap_or_default();
    ensure!(
        asked.contains(&format!("get {}", private.registry.addr)),
        "the helper was asked: {asked:?}"
    );
    let logs = tempfile::tempdir()?;
    let output = runtime
        .block_on(run_pod(&ctd.socket, &private.reference, logs.path()))
        .with_context(|| daemon.log())?;
    ensure!(
        output.starts_with("ok\n"),
        "the pod's container printed\n{output}"
    );
    ensure!(
        !daemon.log().contains(PULL_SECRET_PASSWORD),
        "the password reached lazysnapd's log"
    );
    drop(ctd);
    daemon.stop()
}

/// docker's `auth`: base64 of `user:password`.
fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[test]
fn a_hosts_toml_mirror_serves_lazy_layers_of_an_unreachable_registry() -> Result<()> {
    let mirror = TestRegistry::start()?;
    let images = busybox_images(&mirror)?;
    // The image is named after a registry nobody answers for; hosts.toml sends both containerd
    // and lazysnapd to the mirror, which has it.
    let dead = format!("127.0.0.1:{}", free_port()?);
    let hosts = tempfile::tempdir()?;
    let file = lazysnap::snapshot::hosts::hosts_file(hosts.path(), &dead);
    std::fs::create_dir_all(file.parent().context("hosts dir")?)?;
    std::fs::write(
        &file,
        format!(
            "server = \"http://{dead}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        ),
    )?;
    let reference = images.zstd.replacen(&mirror.addr, &dead, 1);
    let daemon = Lazysnapd::start_with(&format!(
        "[registry]\nconfig_path = \"{}\"\n",
        hosts.path().display()
    ))?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let hosts_dir = hosts.path().to_string_lossy().into_owned();
    ctd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--hosts-dir",
        &hosts_dir,
        "--snapshotter",
        SNAPSHOTTER,
        &reference,
    ])
    .with_context(|| daemon.log())?;
    let content = ctd.ctr(&["content", "ls", "-q"])?;
    for layer in layer_digests(&images.zstd)? {
        ensure!(
            !content.contains(&layer),
            "layer {layer} was downloaded:\n{content}\n{}",
            daemon.log()
        );
    }
    ensure!(
        daemon.log().contains(&format!("host={}", mirror.addr)),
        "the layer was mounted from the mirror:\n{}",
        daemon.log()
    );
    let output = probe(&ctd, SNAPSHOTTER, &reference, "mirror").with_context(|| daemon.log())?;
    ensure!(output.starts_with("ok\n"), "{output}");
    drop(ctd);
    daemon.stop()
}

#[test]
fn cleanup_detaches_every_mount_left_under_the_root() -> Result<()> {
    let root = tempfile::Builder::new().prefix("lssd-").tempdir()?;
    let _guard = containerd::UnmountOnDrop(root.path().to_owned());
    let fs = root.path().join("snapshots/7/fs");
    std::fs::create_dir_all(&fs)?;
    image::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "lazysnap-test"])
            .arg(&fs),
    )?;
    ensure!(!mounts_below(root.path()).is_empty(), "mounted");
    image::run(
        Command::new(LAZYSNAPD)
            .arg("--root")
            .arg(root.path())
            .arg("--cleanup"),
    )?;
    ensure!(
        mounts_below(root.path()).is_empty(),
        "still mounted: {:?}",
        mounts_below(root.path())
    );
    Ok(())
}

/// The poisoning pair, both zstd:chunked with two layers: the busybox layer (the same blob in
/// both) and a layer whose `/msg` says whose image it is. The attacker's config is forged to
/// claim the victim's `diff_id`s, so both images have the same chain IDs.
struct PoisonImages {
    /// `REG/poison@sha256:…`: the victim, pinned by its manifest digest.
    victim: String,
    /// `REG/poison:forged`.
    attacker: String,
    _work: tempfile::TempDir,
}

/// A JSON blob of an OCI layout.
fn layout_json(dir: &Path, digest: &str) -> Result<serde_json::Value> {
    let path = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
}

fn poison_images(registry: &TestRegistry) -> Result<PoisonImages> {
    use lazysnap::oci::{Digest, Reference};
    use lazysnap::registry::{Client, ClientConfig};

    let work = tempfile::tempdir()?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let busybox = String::from_utf8(image::run(
        Command::new(fixtures.join("busybox-image.sh")).arg(work.path().join("busybox")),
    )?)?;
    let (busybox_dir, _) = busybox.trim().rsplit_once(':').context("layout:tag")?;
    let busybox_dir = Path::new(busybox_dir);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(busybox_dir.join("index.json"))?)?;
    let manifest = layout_json(
        busybox_dir,
        index["manifests"][0]["digest"].as_str().context("index")?,
    )?;
    let base_digest = manifest["layers"][0]["digest"]
        .as_str()
        .context("busybox layer")?;
    let base = image::decompress(&std::fs::read(
        busybox_dir
            .join("blobs/sha256")
            .join(base_digest.trim_start_matches("sha256:")),
    )?)?;
    let layout = image::LayoutBuilder::new(&work.path().join("layout"))?;
    let mut tagged = Vec::new();
    for who in ["victim", "attacker"] {
        let msg = image::python_tar(&format!("add('msg', data=b'{who}\\n')"))?;
        tagged.push((who, layout.image(&[base.clone(), msg], "amd64")?));
    }
    layout.tags(&tagged)?;
    let repo = format!("{}/poison", registry.addr);
    for who in ["victim", "attacker"] {
        let source = format!("oci:{}:{who}", layout.dir.display());
        image::run(Command::new(LAZYSNAP).args([
            "convert",
            "--format",
            "zstd-chunked",
            &source,
            &format!("{repo}:{who}"),
        ]))?;
    }

    let runtime = tokio::runtime::Runtime::new()?;
    let victim_digest = runtime.block_on(async {
        let client = Client::new(ClientConfig::default())?;
        let victim_ref: Reference = format!("{repo}:victim").parse()?;
        let attacker_ref: Reference = format!("{repo}:attacker").parse()?;
        let mut configs = Vec::new();
        let mut manifests = Vec::new();
        for reference in [&victim_ref, &attacker_ref] {
            let fetched = client.get_manifest(reference).await?;
            let manifest: serde_json::Value = serde_json::from_slice(&fetched.bytes)?;
            let config_digest: Digest = manifest["config"]["digest"]
                .as_str()
                .context("config")?
                .parse()?;
            let config = client.get_blob(reference, &config_digest).await?;
            configs.push(serde_json::from_slice::<serde_json::Value>(&config)?);
            manifests.push((Digest::of(&fetched.bytes), manifest));
        }
        let diff_ids = configs[0]["rootfs"]["diff_ids"].clone();
        ensure!(
            configs[1]["rootfs"]["diff_ids"][1] != diff_ids[1],
            "the two /msg layers must differ"
        );
        let mut forged = configs[1].clone();
        forged["rootfs"]["diff_ids"] = diff_ids;
        let config = serde_json::to_vec(&forged)?;
        let config_digest = Digest::of(&config);
        client
            .push_blob_bytes(&attacker_ref, &config_digest, config.clone().into())
            .await?;
        let mut manifest = manifests[1].1.clone();
        manifest["config"]["digest"] = config_digest.to_string().into();
        manifest["config"]["size"] = config.len().into();
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        let forged_ref: Reference = format!("{repo}:forged").parse()?;
        client
            .push_manifest(
                &forged_ref,
                &media_type,
                serde_json::to_vec(&manifest)?.into(),
            )
            .await?;
        anyhow::Ok(manifests[0].0)
    })?;
    Ok(PoisonImages {
        victim: format!("{repo}@{victim_digest}"),
        attacker: format!("{repo}:forged"),
        _work: work,
    })
}

/// `rpull` of `reference` into `namespace` through lazysnapd.
fn rpull_in(ctd: &TestContainerd, namespace: &str, reference: &str) -> Result<String> {
    ctd.ctr_remote_in(
        namespace,
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ],
    )
}

const CAT_MSG: &[&str] = &["/bin/cat", "/msg"];

/// Fails on main: lazysnapd answered the victim's Prepare of the chain ID with the attacker's
/// lazy snapshot (`ALREADY_EXISTS`), and the victim printed "attacker".
#[test]
fn a_forged_diff_id_does_not_lend_its_files_to_the_victim_in_another_namespace() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = poison_images(&registry)?;
    // Nothing is verified without background completion: only the compressed chain keeps the
    // victim's layer from being taken for the attacker's.
    let daemon = Lazysnapd::start_with("background = false\n")?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let attacker_ns = format!("{}-attacker", ctd.namespace);
    rpull_in(&ctd, &attacker_ns, &images.attacker).with_context(|| daemon.log())?;
    let out = ctd.run_in(&attacker_ns, SNAPSHOTTER, &images.attacker, "a", CAT_MSG)?;
    ensure!(out == "attacker\n", "the attacker's own run: {out:?}");
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(
        lazy == 2.0,
        "both attacker layers lazy: {lazy}\n{}",
        daemon.log()
    );

    rpull_in(&ctd, &ctd.namespace, &images.victim).with_context(|| daemon.log())?;
    let out = ctd.run_in(&ctd.namespace, SNAPSHOTTER, &images.victim, "v", CAT_MSG)?;
    ensure!(
        out == "victim\n",
        "the victim {}, pinned by digest, ran {out:?}\n{}",
        images.victim,
        daemon.log()
    );
    let refused = daemon.metric("lazysnap_snapshot_fallbacks_total{reason=\"verify\"}")?;
    ensure!(refused >= 1.0, "refusals counted: {refused}");
    ensure!(
        daemon.log().contains("not the same bytes"),
        "the refusal is logged with both chains:\n{}",
        daemon.log()
    );
    drop(ctd);
    daemon.stop()
}

/// Fails on main: nothing computes a lazy layer's diff_id, the metric never appears.
#[test]
fn a_lazy_layer_whose_diff_id_does_not_match_is_counted_and_never_used_again() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = poison_images(&registry)?;
    let daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let ns = ctd.namespace.clone();
    rpull_in(&ctd, &ns, &images.attacker).with_context(|| daemon.log())?;

    // Background completion streams both layers: the shared busybox layer verifies, the forged
    // one does not.
    let start = Instant::now();
    loop {
        let failed = daemon.metric("lazysnap_snapshot_verify_failures_total")?;
        let verified = daemon.metric("lazysnap_snapshot_verified_layers_total")?;
        if failed >= 1.0 && verified >= 1.0 {
            ensure!(
                failed == 1.0 && verified == 1.0,
                "failed {failed}, verified {verified}"
            );
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no verdicts after 60 s (failed {failed}, verified {verified}):\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        daemon.log().contains("FAILED verification"),
        "the failure is logged:\n{}",
        daemon.log()
    );

    // The refused snapshot is never handed out again, not even to the image that brought it.
    let run = ctd.run_in(&ns, SNAPSHOTTER, &images.attacker, "a", CAT_MSG);
    ensure!(
        run.is_err(),
        "the attacker's image ran on a refused snapshot: {run:?}"
    );
    // The victim, pinned by digest, in the same namespace: containerd's metadata still holds the
    // refused snapshot under the chain ID, so containerd cannot unpack the layer there; whatever
    // happens, the victim never runs the attacker's files.
    if rpull_in(&ctd, &ns, &images.victim).is_ok() {
        let out = ctd.run_in(&ns, SNAPSHOTTER, &images.victim, "v0", CAT_MSG)?;
        ensure!(out == "victim\n", "the victim ran {out:?}");
    }
    // Once the attacker's image is gone, containerd's GC removes the refused snapshot, and the
    // victim pulls and runs its own files.
    ctd.ctr(&["images", "rm", "--sync", &images.attacker])?;
    let _ = ctd.ctr(&["images", "rm", "--sync", &images.victim]);
    rpull_in(&ctd, &ns, &images.victim).with_context(|| daemon.log())?;
    let out = ctd.run_in(&ns, SNAPSHOTTER, &images.victim, "v", CAT_MSG)?;
    ensure!(
        out == "victim\n",
        "the victim ran {out:?}\n{}",
        daemon.log()
    );
    drop(ctd);
    daemon.stop()
}

/// Fails on main: `lazysnap run` took the attacker's lazy snapshot because its chain ID existed
/// (a Stat), and the victim printed "attacker".
#[test]
fn lazysnap_run_never_takes_another_images_lazy_layer_for_its_chain_id() -> Result<()> {
    let registry = TestRegistry::start()?;
    let images = poison_images(&registry)?;
    let daemon = Lazysnapd::start_with("background = false\n")?;
    let root = tempfile::tempdir()?;
    let _unmount = common::UnmountOnDrop(root.path().to_owned());
    let socket = daemon.socket.to_str().context("socket path")?;
    let run = |reference: &str| -> Result<String> {
        let out = Command::new(LAZYSNAP)
            .arg("--root")
            .arg(root.path())
            .args(["run", "--lazysnapd", socket, reference])
            .args(CAT_MSG)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "lazysnap run {reference}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    ensure!(run(&images.attacker)? == "attacker\n");
    let out = run(&images.victim)?;
    ensure!(
        out == "victim\n",
        "the victim ran {out:?}\n{}",
        daemon.log()
    );
    // The next run finds the layer it filled.
    ensure!(run(&images.victim)? == "victim\n");
    ensure!(run(&images.attacker)? == "attacker\n");
    daemon.stop()
}

/// The diff_id check judges third-party layers as containerd's overlayfs snapshotter does when it
/// unpacks them: ctr-remote's eStargz (TOC as a tar entry, footer as an empty gzip member)
/// decompresses to the diff_id its config claims; the zstd:chunked layer of Debian's skopeo 1.9
/// does not (its config keeps the source tar's diff_id, but the chunked writer rewrote the tar), and
/// containerd refuses to unpack it ("wrong diff id calculated on extraction").
#[test]
fn third_party_lazy_layers_are_judged_as_containerd_judges_them_when_unpacking() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let layout = image::fixture(
        "busybox-image.sh",
        &[work.path().join("bb").to_str().context("path")?, "v1"],
    )?;
    let plain = format!("{}/bb/plain:v1", registry.addr);
    image::fixture("push-layout.sh", &[&layout, &plain])?;
    let estargz = image::fixture(
        "estargz-image.sh",
        &[&registry.addr, "bb/plain:v1", "bb/estargz:v1"],
    )?;
    let zstd = image::fixture(
        "zstdchunked-image.sh",
        &[&registry.addr, "bb/plain:v1", "bb/zstd:v1"],
    )?;
    let daemon = Lazysnapd::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;

    // The oracle: containerd's own overlayfs snapshotter, in a namespace of its own.
    let oracle_ns = format!("{}-overlayfs", ctd.namespace);
    ctd.ctr_in(&oracle_ns, &["images", "pull", "--plain-http", &estargz])?;
    let refused = ctd.ctr_in(&oracle_ns, &["images", "pull", "--plain-http", &zstd]);
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("wrong diff id")),
        "containerd unpacked skopeo's zstd:chunked layer: {refused:?}"
    );

    for (i, reference) in [&estargz, &zstd].into_iter().enumerate() {
        let ns = format!("{}-{i}", ctd.namespace);
        rpull_in(&ctd, &ns, reference).with_context(|| daemon.log())?;
    }
    let lazy = daemon.metric("lazysnap_snapshot_lazy_layers_total")?;
    ensure!(lazy == 2.0, "lazy layers: {lazy}\n{}", daemon.log());
    let start = Instant::now();
    loop {
        let verified = daemon.metric("lazysnap_snapshot_verified_layers_total")?;
        let failed = daemon.metric("lazysnap_snapshot_verify_failures_total")?;
        if verified + failed >= 2.0 {
            ensure!(
                verified == 1.0 && failed == 1.0,
                "verified {verified}, failed {failed}:\n{}",
                daemon.log()
            );
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no verdicts after 60 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let zstd_layer = layer_digests(zstd.split_once('@').map_or(zstd.as_str(), |(r, _)| r))?;
    let log = daemon.log();
    let failure = log
        .lines()
        .find(|l| l.contains("FAILED verification and is refused"))
        .context("no failure logged")?;
    ensure!(
        failure.contains(&zstd_layer[0]),
        "the failure is not the zstd:chunked layer {}: {failure}",
        zstd_layer[0]
    );
    drop(ctd);
    daemon.stop()
}

//! Load and scale of the node service: `cargo bench --bench scale [-- --layers N --parallel M]`.
//!
//! With real parts on loopback (docker-registry, Debian's containerd 1.6, the release `lazysnapd`
//! with its separate layer host), images are pulled through containerd's remote-snapshot
//! handshake until N distinct lazy layers are mounted (default 1000: busybox at the bottom of
//! every image, then 19 small layers of its own). At each step the layer host's threads, file
//! descriptors, virtual memory and RSS are read from `/proc`, so growth per layer shows directly.
//! Then M containers (default 20) start at once from different images and each reads every file
//! of its layers; a failed read or a wrong byte is a failed container.
//!
//! Results: a markdown table on stdout and `bench/results/scale.json`.

#[path = "../tests/common/mod.rs"]
mod common;
// Its re-exports of `common`'s guards are for the tests; this bench uses only some.
#[allow(unused_imports)]
#[path = "../tests/common/containerd.rs"]
mod containerd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::image::{self, LayoutBuilder};
use common::registry::TestRegistry;
use containerd::{stop_child, unmount_below, TestContainerd};
use serde_json::json;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");
const SNAPSHOTTER: &str = "lazysnap";
/// Layers of its own above the shared busybox layer, per image.
const OWN_LAYERS: usize = 19;

struct Options {
    layers: usize,
    parallel: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        layers: 1000,
        parallel: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> Result<usize> {
            args.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a}: not a number"))
        };
        match a.as_str() {
            "--layers" => o.layers = value()?,
            "--parallel" => o.parallel = value()?,
            "--bench" => {}
            other => bail!("unknown argument {other} (want --layers N, --parallel M)"),
        }
    }
    Ok(o)
}

/// `lazysnapd` with its own root, socket and default layer host; stopped and cleaned up on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Daemon {
    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("lsscale-").tempdir()?;
        let socket = dir.path().join("lazysnapd.sock");
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"\"\n",
                dir.path().join("root").display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("lazysnapd.log"))?;
        let child = Command::new(LAZYSNAPD)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "lazysnapd not serving"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, dir, socket })
    }

    fn layer_host(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("root/layer-host.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        let _ = Command::new(LAZYSNAPD)
            .arg("--config")
            .arg(self.dir.path().join("lazysnapd.toml"))
            .arg("--cleanup")
            .status();
        unmount_below(self.dir.path());
    }
}

/// What `/proc` says about the layer host.
#[derive(Debug, Clone, serde::Serialize)]
struct Footprint {
    layers: usize,
    threads: u64,
    fds: usize,
    vm_mib: f64,
    rss_mib: f64,
    hwm_mib: f64,
}

fn footprint(pid: u32, layers: usize) -> Result<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?
            .split_whitespace()
            .next()
            .context("empty field")?
            .parse()
            .context("not a number")
    };
    let kib = |name: &str| -> Result<f64> { Ok(field(name)? as f64 / 1024.0) };
    Ok(Footprint {
        layers,
        threads: field("Threads:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        vm_mib: kib("VmSize:")?,
        rss_mib: kib("VmRSS:")?,
        hwm_mib: kib("VmHWM:")?,
    })
}

/// The busybox fixture's layer, as a plain tar.
fn busybox_tar(work: &Path) -> Result<Vec<u8>> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let layout = work.join("busybox");
    image::run(Command::new(fixtures.join("busybox-image.sh")).arg(&layout))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let builder = LayoutBuilder { dir: layout };
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("index")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(builder.blob_path(manifest_digest))?)?;
    let layer = manifest["layers"][0]["digest"].as_str().context("layer")?;
    image::decompress(&std::fs::read(builder.blob_path(layer))?)
}

/// Image `i`: busybox, then [`OWN_LAYERS`] layers holding `/data/<i>-<j>` = `"<i>-<j>\n"`.
fn push_image(registry: &TestRegistry, work: &Path, base: &[u8], i: usize) -> Result<String> {
    let mut tars = vec![base.to_vec()];
    for j in 0..OWN_LAYERS {
        let tree = work.join(format!("tree-{i}-{j}"));
        std::fs::create_dir_all(tree.join("data"))?;
        std::fs::write(tree.join(format!("data/{i}-{j}")), format!("{i}-{j}\n"))?;
        tars.push(image::tar_dir(&tree)?);
        std::fs::remove_dir_all(&tree)?;
    }
    let layout = LayoutBuilder::new(&work.join(format!("src-{i}")))?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/scale/img{i}:v1", registry.addr);
    image::run(Command::new(LAZYSNAP).args([
        "convert",
        &format!("oci:{}:src", layout.dir.display()),
        &reference,
    ]))?;
    std::fs::remove_dir_all(&layout.dir)?;
    Ok(reference)
}

/// Runs a container from image `i` that prints every file under `/data`; checks the bytes.
fn read_everything(ctd: &TestContainerd, reference: &str, i: usize) -> Result<()> {
    let name = format!("scale-{i}-{}", std::process::id());
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        reference,
        &name,
        "/bin/sh",
        "-c",
        "cat /data/* && /bin/busybox true",
    ])?;
    // The shell's glob sorts the names as strings.
    let mut names: Vec<String> = (0..OWN_LAYERS).map(|j| format!("{i}-{j}")).collect();
    names.sort();
    let want: String = names.iter().map(|n| format!("{n}\n")).collect();
    ensure!(out == want, "image {i}: read {out:?}, want {want:?}");
    Ok(())
}

fn main() -> Result<()> {
    let o = options()?;
    let images = o.layers.div_ceil(OWN_LAYERS).max(o.parallel);
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let base = busybox_tar(work.path())?;
    eprintln!("scale: converting and pushing {images} images of 1 + {OWN_LAYERS} layers");
    let started = Instant::now();
    let references: Vec<String> = (0..images)
        .map(|i| push_image(&registry, work.path(), &base, i))
        .collect::<Result<_>>()?;
    eprintln!("scale: pushed in {:.0} s", started.elapsed().as_secs_f64());

    let daemon = Daemon::start()?;
    let ctd = TestContainerd::start(&[(SNAPSHOTTER, &daemon.socket)])?;
    let mut steps = Vec::new();
    let mut next_report = 1;
    let pull_started = Instant::now();
    for (i, reference) in references.iter().enumerate() {
        ctd.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ])?;
        let layers = 1 + (i + 1) * OWN_LAYERS;
        if i + 1 == next_report || i + 1 == images {
            let pid = daemon.layer_host().context("no layer host pid")?;
            let f = footprint(pid, layers)?;
            eprintln!("scale: {f:?}");
            steps.push(f);
            next_report = (next_report * 2).min(images);
        }
    }
    let pull_seconds = pull_started.elapsed().as_secs_f64();

    // Containers at once, each from its own image, each reading all of its layers.
    let started = Instant::now();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = references
            .iter()
            .take(o.parallel)
            .enumerate()
            .map(|(i, r)| {
                let ctd = &ctd;
                s.spawn(move || read_everything(ctd, r, i))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("panicked".into()),
            })
            .collect()
    });
    let parallel_seconds = started.elapsed().as_secs_f64();
    let pid = daemon.layer_host().context("no layer host pid")?;
    let after = footprint(pid, 1 + images * OWN_LAYERS)?;

    let first = steps.first().context("no step")?.clone();
    let last = steps.last().context("no step")?.clone();
    let per_layer = |a: f64, b: f64| (b - a) / (last.layers - first.layers).max(1) as f64;
    println!("| lazy layers | threads | fds | virtual MiB | RSS MiB | peak RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for f in &steps {
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} |",
            f.layers, f.threads, f.fds, f.vm_mib, f.rss_mib, f.hwm_mib
        );
    }
    println!(
        "\nper layer from {} to {} layers: {:.3} threads, {:.3} fds, {:.1} KiB virtual, {:.1} KiB RSS",
        first.layers,
        last.layers,
        per_layer(first.threads as f64, last.threads as f64),
        per_layer(first.fds as f64, last.fds as f64),
        per_layer(first.vm_mib, last.vm_mib) * 1024.0,
        per_layer(first.rss_mib, last.rss_mib) * 1024.0,
    );
    println!(
        "pulling {images} images took {pull_seconds:.1} s; {} containers at once: {} failed, {:.1} s; layer host after: {} threads, {:.1} MiB RSS (peak {:.1})",
        o.parallel,
        failures.len(),
        parallel_seconds,
        after.threads,
        after.rss_mib,
        after.hwm_mib
    );
    for f in &failures {
        eprintln!("scale: failed container: {f}");
    }
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&results)?;
    std::fs::write(
        results.join("scale.json"),
        serde_json::to_vec_pretty(&json!({
            "layers": 1 + images * OWN_LAYERS,
            "images": images,
            "steps": steps,
            "pull_seconds": pull_seconds,
            "parallel": o.parallel,
            "parallel_failures": failures,
            "parallel_seconds": parallel_seconds,
            "after": after,
        }))?,
    )?;
    ensure!(failures.is_empty(), "{} containers failed", failures.len());
    Ok(())
}

//! Lazy mount targets, measured side by side in one run: `cargo bench --bench mount`.
//!
//! Everything runs against a real `docker-registry` on loopback and the release `lazysnap mount`:
//! - mount time of a 100 MB image (the CLI reports it; two small range reads per layer);
//! - bytes fetched to read a 1-byte file from a freshly mounted 100 MB layer (from `/metrics`);
//! - sequential read of a 64 MiB file once its layer is complete, against the same file on the
//!   local disk (page cache dropped before each read);
//! - `find | wc -l` over 100k entries, against a plain overlay of the same layer unpacked;
//! - peak RSS of the mount process serving 10 layers.
//!
//! Results: a markdown table on stdout and `bench/results/mount.json`.

#[path = "../tests/common/image.rs"]
mod image;
#[path = "../tests/common/registry.rs"]
mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A running `lazysnap mount`, stopped (SIGTERM) when dropped.
struct Mount {
    child: Child,
    target: PathBuf,
    log: PathBuf,
    metrics: String,
}

impl Mount {
    fn start(
        root: &Path,
        reference: &str,
        target: &Path,
        background: bool,
        port: u16,
    ) -> Result<(Self, f64)> {
        std::fs::create_dir_all(target)?;
        let log = root.with_extension("log");
        let metrics = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(BIN);
        cmd.arg("--root")
            .arg(root)
            .arg("mount")
            .args(["--metrics-addr", &metrics]);
        if !background {
            cmd.arg("--no-background-fetch");
        }
        let child = cmd
            .arg(reference)
            .arg(target)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut m = Self {
            child,
            target: target.to_owned(),
            log,
            metrics,
        };
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            if let Some(ms) = text.lines().find_map(|l| {
                l.strip_prefix("mounted ")
                    .and_then(|r| r.rsplit(" in ").next())
                    .and_then(|r| r.trim_end_matches(" ms").parse::<f64>().ok())
            }) {
                return Ok((m, ms));
            }
            if let Some(status) = m.child.try_wait()? {
                bail!("mount exited ({status}): {text}");
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("not mounted after 60 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sum of a counter family from `/metrics`.
    fn metric(&self, name: &str) -> Result<f64> {
        let out = image::run(
            Command::new("curl").args(["-sf", &format!("http://{}/metrics", self.metrics)]),
        )?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l.as_bytes().get(name.len()) == Some(&b'{')
                        || l.as_bytes().get(name.len()) == Some(&b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    fn peak_rss_mib(&self) -> Result<f64> {
        self.status_mib("VmHWM")
    }

    /// A `kB` field of `/proc/PID/status` in MiB (`VmHWM`, `RssAnon`, `RssFile`, ...).
    fn status_mib(&self, field: &str) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .with_context(|| field.to_owned())?;
        Ok(kb / 1024.0)
    }

    fn threads(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/task", self.child.id()))?.count())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.target)
            .stderr(Stdio::null())
            .status();
    }
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Reads a file to its end in 128 KiB reads, as `cat` and `cp` do.
fn read_all(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 128 << 10];
    while std::io::Read::read(&mut file, &mut buf)? > 0 {}
    Ok(())
}

fn count_find(dir: &Path) -> Result<usize> {
    let out = image::run(Command::new("find").arg(dir))?;
    Ok(out.iter().filter(|b| **b == b'\n').count())
}

/// Incompressible-ish bytes, so a 100 MB layer stays about 100 MB compressed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("bench/mount: run with `cargo bench --bench mount`");
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut port = 19464;
    let mut next_port = || {
        port += 1;
        port
    };
    // `MOUNT_BENCH_ONLY=rss` measures memory alone (while tuning it).
    let all = std::env::var("MOUNT_BENCH_ONLY").map_or(true, |v| v != "rss");
    let reg = registry::TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let trees = work.path().join("trees");

    let (a, b) = (trees.join("a"), trees.join("b"));
    if all {
        // Image A: one ~100 MB layer: a 1-byte file, a 64 MiB file, and 36 MB of 1 MiB files.
        std::fs::create_dir_all(a.join("data"))?;
        std::fs::write(a.join("one-byte"), b"x")?;
        std::fs::write(a.join("big"), noise(64 << 20, 1))?;
        for i in 0..36 {
            std::fs::write(a.join("data").join(format!("f{i}")), noise(1 << 20, i + 2))?;
        }
        // Image B: 100k entries (1000 dirs of 100 small files).
        for d in 0..1000 {
            let dir = b.join(format!("d{d:04}"));
            std::fs::create_dir_all(&dir)?;
            for f in 0..99 {
                std::fs::write(dir.join(format!("f{f:02}")), b"x")?;
            }
        }
    }
    // Image C: 10 layers of ~5 MB each.
    let mut c_tars = Vec::new();
    for l in 0..10 {
        let dir = trees.join(format!("c{l}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..5 {
            std::fs::write(
                dir.join(format!("l{l}-f{i}")),
                noise(1 << 20, 1000 + l * 10 + i),
            )?;
        }
        c_tars.push(image::tar_dir(&dir)?);
    }
    let layout = image::LayoutBuilder::new(&work.path().join("layout"))?;
    let dc = layout.image(&c_tars, "amd64")?;
    let mut tags = vec![("c", dc)];
    if all {
        tags.push(("a", layout.image(&[image::tar_dir(&a)?], "amd64")?));
        tags.push(("b", layout.image(&[image::tar_dir(&b)?], "amd64")?));
    }
    layout.tags(&tags)?;
    for (tag, _) in &tags {
        image::run(Command::new(BIN).args([
            "convert",
            &format!("oci:{}:{tag}", layout.dir.display()),
            &format!("{}/bench/{tag}:lazy", reg.addr),
        ]))?;
    }
    if all {
        let layer_size: f64 = {
            let out = image::run(Command::new(BIN).args([
                "inspect",
                "--json",
                &format!("{}/bench/a:lazy", reg.addr),
            ]))?;
            let info: serde_json::Value = serde_json::from_slice(&out)?;
            info["layers"][0]["size"].as_f64().context("size")?
        };

        // 1 and 2: mount time, and what reading one byte fetches.
        drop_caches();
        let (m, mount_ms) = Mount::start(
            &work.path().join("root-1"),
            &format!("{}/bench/a:lazy", reg.addr),
            &work.path().join("mnt-1"),
            false,
            next_port(),
        )?;
        let one = std::fs::read(m.target.join("one-byte"))?;
        anyhow::ensure!(one == b"x");
        let fetched = m.metric("lazysnap_fetch_bytes_total")?;
        drop(m);
        rows.push(json!({"metric": "mount time, 100 MB image", "value": mount_ms, "unit": "ms", "target": "< 300 ms"}));
        rows.push(json!({"metric": "bytes fetched reading a 1-byte file / layer size", "value": 100.0 * fetched / layer_size, "unit": "%", "target": "< 1 %"}));

        // 3: sequential read once complete, against the local disk.
        let (m, _) = Mount::start(
            &work.path().join("root-3"),
            &format!("{}/bench/a:lazy", reg.addr),
            &work.path().join("mnt-3"),
            true,
            next_port(),
        )?;
        let start = Instant::now();
        while m.metric("lazysnap_layer_complete")? < 1.0 {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "background fetch unfinished"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The first open after completion is served through FUSE (chunks from the disk cache,
        // each re-verified) and prepares the file for passthrough in the background; opens after
        // that are served by the kernel from the local file.
        drop_caches();
        let through_fuse = timed(|| read_all(&m.target.join("big")))?;
        let start = Instant::now();
        while m.metric("lazysnap_passthrough_files_total")? < 1.0 {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "big never became a passthrough file"
            );
            drop(std::fs::File::open(m.target.join("big"))?);
            std::thread::sleep(Duration::from_millis(100));
        }
        let reads_before = m.metric("lazysnap_fuse_operations_total{op=\"read\"}")?;
        // The local file is written just as freshly as the cache's copy: the VM's disk is cached
        // by its host, so an older file would read slower for reasons of its own.
        let local_big = work.path().join("local-big");
        std::fs::copy(a.join("big"), &local_big)?;
        let mut lazy = f64::MAX;
        let mut local = f64::MAX;
        for _ in 0..5 {
            drop_caches();
            lazy = lazy.min(timed(|| read_all(&m.target.join("big")))?);
            drop_caches();
            local = local.min(timed(|| read_all(&local_big))?);
        }
        eprintln!(
            "64 MiB sequential read: {:.0} MB/s through FUSE, {:.0} MB/s with passthrough, {:.0} MB/s from the local disk",
            64.0 * 1.048_576 / through_fuse,
            64.0 * 1.048_576 / lazy,
            64.0 * 1.048_576 / local
        );
        let fuse_reads = m.metric("lazysnap_fuse_operations_total{op=\"read\"}")? - reads_before;
        drop(m);
        rows.push(json!({"metric": "sequential read of a cached 64 MiB file through FUSE (first open), speed vs local disk", "value": local / through_fuse, "unit": "x", "target": "(before passthrough)"}));
        rows.push(json!({"metric": "sequential read of a cached 64 MiB file, speed vs local disk", "value": local / lazy, "unit": "x", "target": ">= 0.9 x"}));
        rows.push(json!({"metric": "FUSE reads the daemon saw during those reads", "value": fuse_reads, "unit": "", "target": "0 (passthrough)"}));

        // 4: find over 100k entries, against a plain overlay of the same tree.
        let (m, _) = Mount::start(
            &work.path().join("root-4"),
            &format!("{}/bench/b:lazy", reg.addr),
            &work.path().join("mnt-4"),
            false,
            next_port(),
        )?;
        let plain = work.path().join("plain-overlay");
        let empty = work.path().join("empty");
        std::fs::create_dir_all(&plain)?;
        std::fs::create_dir_all(&empty)?;
        image::run(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!("ro,lowerdir={}:{}", b.display(), empty.display()))
                .arg(&plain),
        )?;
        let (mut lazy, mut local) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            drop_caches();
            lazy = lazy.min(timed(|| {
                let n = count_find(&m.target)?;
                anyhow::ensure!(n > 99_000, "{n} entries");
                Ok(())
            })?);
            drop_caches();
            local = local.min(timed(|| count_find(&plain).map(|_| ()))?);
        }
        let _ = Command::new("umount").arg(&plain).status();
        drop(m);
        rows.push(json!({"metric": "find over 100k entries, time vs plain overlay", "value": lazy / local, "unit": "x", "target": "<= 1.5 x"}));
    }
    // 5: memory serving 10 layers, after reading every file: reads only, then with every layer
    // completed in the background at once.
    for background in [false, true] {
        let (m, _) = Mount::start(
            &work.path().join(format!("root-5-{background}")),
            &format!("{}/bench/c:lazy", reg.addr),
            &work.path().join(format!("mnt-5-{background}")),
            background,
            next_port(),
        )?;
        let start = Instant::now();
        while background && m.metric("lazysnap_layer_complete")? < 10.0 {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "background fetch unfinished"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for l in 0..10 {
            for i in 0..5 {
                read_all(&m.target.join(format!("l{l}-f{i}")))?;
            }
        }
        let what = if background {
            "peak RSS serving 10 layers, all completed in the background"
        } else {
            "peak RSS serving 10 layers, every file read"
        };
        rows.push(json!({"metric": what, "value": m.peak_rss_mib()?, "unit": "MiB", "target": "< 64 MiB"}));
        eprintln!(
            "{what}: RSS now {:.1} MiB (anonymous {:.1}, file {:.1}), {} threads",
            m.status_mib("VmRSS")?,
            m.status_mib("RssAnon")?,
            m.status_mib("RssFile")?,
            m.threads()?
        );
    }

    println!("| metric | value | target |\n|---|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} {} | {} |",
            r["metric"].as_str().unwrap_or_default(),
            r["value"].as_f64().unwrap_or(f64::NAN),
            r["unit"].as_str().unwrap_or_default(),
            r["target"].as_str().unwrap_or_default()
        );
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("mount.json"),
        serde_json::to_vec_pretty(&json!({"results": rows}))?,
    )?;
    Ok(())
}

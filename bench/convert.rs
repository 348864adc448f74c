//! Conversion throughput: `cargo bench --bench convert`.
//!
//! Runs the release `lazysnap convert` as a child process on real inputs and reports, per input
//! and format: uncompressed input MB/s, CPU time over wall time (how much of the 2 cores the
//! pipeline uses), and the child's peak RSS. Inputs:
//! - `debian-python3`: a Debian bookworm minbase + python3 image built from Debian packages by
//!   `tests/fixtures/debian-image.sh` (cached);
//! - `synthetic-2g` (unless `LAZYSNAP_BENCH_QUICK=1`): one 2 GiB layer of mixed compressible and
//!   incompressible files, in a docker archive, to check that memory stays bounded.
//!
//! Results go to stdout as a markdown table and to `bench/results/convert.json`.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

struct Measured {
    seconds: f64,
    cpu_seconds: f64,
    max_rss_mib: f64,
}

/// Runs `lazysnap convert` and measures that one child process (not the fixture tools before it).
fn measure(args: &[String]) -> Result<Measured> {
    let log = tempfile::NamedTempFile::new()?;
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen()?)
        .spawn()
        .context("running lazysnap")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 reaps our own child `pid` and writes into the zeroed rusage we own; `child`
    // is never waited on afterwards (dropping a std Child does not wait).
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut usage) != pid {
            bail!("wait4 failed: {}", std::io::Error::last_os_error());
        }
        usage
    };
    drop(child);
    let seconds = start.elapsed().as_secs_f64();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!(
            "lazysnap {args:?} failed: {}",
            std::fs::read_to_string(log.path())?
        );
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        seconds,
        cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
    })
}

/// Total uncompressed size of the layers of an OCI layout's only image.
fn layout_input_bytes(dir: &Path) -> Result<u64> {
    let read = |p: PathBuf| -> Result<Value> { Ok(serde_json::from_slice(&std::fs::read(p)?)?) };
    let blob = |d: &Value| {
        dir.join("blobs/sha256")
            .join(d.as_str().unwrap_or_default().trim_start_matches("sha256:"))
    };
    let index = read(dir.join("index.json"))?;
    let manifest = read(blob(&index["manifests"][0]["digest"]))?;
    let mut total = 0;
    for layer in manifest["layers"].as_array().context("layers")? {
        let file = std::fs::File::open(blob(&layer["digest"]))?;
        let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
        total += std::io::copy(&mut decoder, &mut std::io::sink())?;
    }
    Ok(total)
}

/// Builds (or reuses) the Debian python3 image as an OCI layout.
fn debian_image(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("debian-python3");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("tests/fixtures/debian-image.sh"))
        .args(["--packages", "python3"])
        .arg(&out)
        .arg("bench")
        .status()
        .context("running tests/fixtures/debian-image.sh")?;
    if !status.success() {
        bail!("debian-image.sh failed");
    }
    Ok(out)
}

/// Writes a docker archive with one 2 GiB layer: half text-like (compressible), half random.
fn synthetic_archive(path: &Path) -> Result<u64> {
    const TOTAL: u64 = 2 << 30;
    if path.exists() {
        return Ok(TOTAL);
    }
    let tmp = path.with_extension("partial");
    let layer_path = tmp.with_extension("layer");
    {
        let mut builder = tar::Builder::new(BufWriter::new(std::fs::File::create(&layer_path)?));
        let mut written = 0u64;
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut i = 0;
        while written < TOTAL {
            // Sizes from 1 KiB to 64 MiB, cycling; every other file is text-like.
            let size = (1024u64 << (i % 17)).min(TOTAL - written);
            let mut data = vec![0u8; size as usize];
            if i % 2 == 0 {
                for (j, b) in data.iter_mut().enumerate() {
                    *b = b"lazysnap benchmark line of fairly ordinary text\n"[j % 48];
                }
            } else {
                for b in data.iter_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = state as u8;
                }
            }
            let mut header = tar::Header::new_gnu();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            builder.append_data(
                &mut header,
                format!("data/{:03}/file-{i}", i % 100),
                &data[..],
            )?;
            written += size;
            i += 1;
        }
        builder.into_inner()?.flush()?;
    }
    let mut hasher = sha2_hex(&layer_path)?;
    hasher.insert_str(0, "sha256:");
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [hasher]}});
    let staging = tempfile::tempdir_in(path.parent().context("parent")?)?;
    std::fs::write(
        staging.path().join("config.json"),
        serde_json::to_vec(&config)?,
    )?;
    std::fs::rename(&layer_path, staging.path().join("layer.tar"))?;
    let manifest =
        json!([{"Config": "config.json", "RepoTags": ["bench:big"], "Layers": ["layer.tar"]}]);
    std::fs::write(
        staging.path().join("manifest.json"),
        serde_json::to_vec(&manifest)?,
    )?;
    let status = Command::new("tar")
        .arg("-C")
        .arg(staging.path())
        .arg("-cf")
        .arg(&tmp)
        .arg(".")
        .status()?;
    if !status.success() {
        bail!("tar failed");
    }
    std::fs::rename(&tmp, path)?;
    Ok(TOTAL)
}

fn sha2_hex(path: &Path) -> Result<String> {
    use sha2::Digest as _;
    let mut file = std::fs::File::open(path)?;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    Ok(hex::encode(sha.finalize()))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; under `cargo test --benches` this is a no-op.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("bench/convert: run with `cargo bench --bench convert`");
        return Ok(());
    }
    let quick = std::env::var_os("LAZYSNAP_BENCH_QUICK").is_some();
    let cache = PathBuf::from(
        std::env::var("LAZYSNAP_CACHE").unwrap_or_else(|_| "/var/cache/lazysnap".into()),
    )
    .join("bench");
    std::fs::create_dir_all(&cache)?;
    let mut inputs: Vec<(&str, String, u64)> = Vec::new();
    let debian = debian_image(&cache)?;
    inputs.push((
        "debian-python3",
        format!("oci:{}:bench", debian.display()),
        layout_input_bytes(&debian)?,
    ));
    if !quick {
        let archive = cache.join("synthetic-2g.tar");
        eprintln!("bench: preparing {} (2 GiB, cached)", archive.display());
        let bytes = synthetic_archive(&archive)?;
        inputs.push((
            "synthetic-2g",
            format!("docker-archive:{}", archive.display()),
            bytes,
        ));
    }

    let mut results = Vec::new();
    println!("| input | format | input MB | seconds | MB/s | CPU/wall | peak RSS MiB |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, src, bytes) in &inputs {
        for format in ["zstd-chunked", "estargz"] {
            let out = tempfile::tempdir_in(&cache)?;
            let args: Vec<String> = vec![
                "convert".into(),
                "--format".into(),
                format.into(),
                src.clone(),
                format!("oci:{}:out", out.path().display()),
            ];
            eprintln!("bench: {name} → {format}");
            let m = measure(&args)?;
            let mb = *bytes as f64 / 1e6;
            println!(
                "| {name} | {format} | {mb:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
                m.seconds,
                mb / m.seconds,
                m.cpu_seconds / m.seconds,
                m.max_rss_mib
            );
            results.push(json!({
                "input": name, "format": format, "input_bytes": bytes, "seconds": m.seconds,
                "mb_per_s": mb / m.seconds, "cpu_over_wall": m.cpu_seconds / m.seconds, "max_rss_mib": m.max_rss_mib,
            }));
        }
    }
    let results_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&results_dir)?;
    let report = json!({"machine": {"cores": std::thread::available_parallelism().map_or(0, usize::from)}, "results": results});
    std::fs::write(
        results_dir.join("convert.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(())
}

//! Hostile images, written by hand: zstd:chunked layers whose TOC JSON the test writes itself
//! (whatever a real writer would refuse to produce), manifests whose annotations pin those TOCs,
//! pushed to a real registry; and a `lazysnap mount` process watched for its peak memory.
//!
//! Nothing here goes through the code under test's writer: frames are made with the `zstd` crate,
//! the TOC is `serde_json` values, the footer and annotations follow FORMATS.md.

#![allow(dead_code)]

use super::mount_process::mounted;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::registry::TestRegistry;

pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2A, 0x4D, 0x18];

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// sha256 of `len` zero bytes, streamed.
pub fn sha256_of_zeros(len: u64) -> String {
    let block = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One layer blob with what its manifest descriptor and the config need.
#[derive(Debug, Clone)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub media_type: &'static str,
    pub annotations: Value,
    /// sha256 of what the blob decompresses to (the config's `diff_ids`).
    pub diff_id: String,
}

impl Blob {
    pub fn digest(&self) -> String {
        sha256(&self.bytes)
    }

    /// A plain gzip layer of `tar`.
    pub fn plain(tar: &[u8]) -> Result<Self> {
        Ok(Self {
            bytes: super::image::gzip(tar)?,
            media_type: MEDIA_TYPE_GZIP,
            annotations: json!({}),
            diff_id: sha256(tar),
        })
    }
}

/// A zstd:chunked layer being written by hand: data frames first, TOC entries as JSON values.
#[derive(Debug, Default)]
pub struct LazyLayer {
    blob: Vec<u8>,
    /// What the data frames decompress to, hashed (the layer's diff_id).
    plain: Sha256Wrapper,
    pub entries: Vec<Value>,
}

#[derive(Default)]
struct Sha256Wrapper(Sha256);

impl std::fmt::Debug for Sha256Wrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl LazyLayer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one zstd frame of `data` to the blob; returns its `[start, end)`.
    pub fn frame(&mut self, data: &[u8]) -> (u64, u64) {
        let start = self.blob.len() as u64;
        let compressed = zstd::bulk::compress(data, 3).expect("zstd");
        self.blob.extend_from_slice(&compressed);
        self.plain.0.update(data);
        (start, self.blob.len() as u64)
    }

    /// Appends already compressed bytes (a frame the test crafted); returns its range.
    pub fn raw_frame(&mut self, compressed: &[u8]) -> (u64, u64) {
        let start = self.blob.len() as u64;
        self.blob.extend_from_slice(compressed);
        (start, self.blob.len() as u64)
    }

    /// A directory entry, with xattrs given as (name, raw value).
    pub fn dir(&mut self, name: &str, xattrs: &[(&str, &[u8])]) -> &mut Self {
        let mut e =
            json!({"type": "dir", "name": name, "mode": 0o755, "modtime": "2024-01-02T03:04:05Z"});
        if !xattrs.is_empty() {
            e["xattrs"] = xattr_map(xattrs);
        }
        self.entries.push(e);
        self
    }

    /// A regular file in one real chunk.
    pub fn file(&mut self, name: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> &mut Self {
        let (start, end) = self.frame(data);
        let digest = sha256(data);
        let mut e = json!({
            "type": "reg", "name": name, "mode": 0o644, "size": data.len(),
            "modtime": "2024-01-02T03:04:05Z", "digest": digest,
            "offset": start, "endOffset": end, "chunkSize": data.len(), "chunkDigest": digest,
        });
        if !xattrs.is_empty() {
            e["xattrs"] = xattr_map(xattrs);
        }
        self.entries.push(e);
        self
    }

    /// Any entry, as the test writes it.
    pub fn entry(&mut self, e: Value) -> &mut Self {
        self.entries.push(e);
        self
    }

    /// The blob with the TOC of the entries so far.
    pub fn finish(self) -> Result<Blob> {
        let json = serde_json::to_vec(&json!({"version": 1, "entries": self.entries}))?;
        self.finish_with_toc(&json)
    }

    /// The blob with `json` as its TOC (for TOCs built outside `entries`).
    pub fn finish_with_toc(self, json: &[u8]) -> Result<Blob> {
        let compressed = zstd::bulk::compress(json, 3)?;
        self.finish_with_compressed_toc(&compressed, json.len() as u64)
    }

    /// The blob with `compressed` (a zstd frame of `json_len` bytes of JSON) as its TOC.
    pub fn finish_with_compressed_toc(self, compressed: &[u8], json_len: u64) -> Result<Blob> {
        let Self {
            mut blob, plain, ..
        } = self;
        blob.extend_from_slice(&skippable(compressed.len()));
        let offset = blob.len() as u64;
        blob.extend_from_slice(compressed);
        let mut footer = Vec::with_capacity(64);
        for v in [offset, compressed.len() as u64, json_len, 1, 0, 0, 0] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        footer.extend_from_slice(b"GNUlInUx");
        blob.extend_from_slice(&skippable(footer.len()));
        blob.extend_from_slice(&footer);
        Ok(Blob {
            bytes: blob,
            media_type: MEDIA_TYPE_ZSTD,
            annotations: json!({
                "io.github.containers.zstd-chunked.manifest-checksum": sha256(compressed),
                "io.github.containers.zstd-chunked.manifest-position":
                    format!("{offset}:{}:{json_len}:1", compressed.len()),
            }),
            diff_id: format!("sha256:{}", hex::encode(plain.0.finalize())),
        })
    }
}

fn skippable(len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&SKIPPABLE_MAGIC);
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

fn xattr_map(xattrs: &[(&str, &[u8])]) -> Value {
    Value::Object(
        xattrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String(b64(v))))
            .collect(),
    )
}

/// Pushes an image of `layers` (bottom first) as `repo:v1`; returns its reference.
pub fn push_image(registry: &TestRegistry, repo: &str, layers: &[Blob]) -> Result<String> {
    use lazysnap::oci::Digest;
    use lazysnap::registry::{Client, ClientConfig};
    let config = json!({
        "architecture": lazysnap::oci::Platform::host().architecture,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.digest(), "size": l.bytes.len(),
            "annotations": l.annotations,
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let reference = registry.reference(&format!("{repo}:v1"))?;
    let client = Client::new(ClientConfig {
        plain_http: false,
        docker_config_dir: Some(registry.dir.path().join("no-docker-config")),
        max_retries: 1,
        ..Default::default()
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for l in layers {
            let digest: Digest = l.digest().parse()?;
            client
                .push_blob_bytes(&reference, &digest, Bytes::from(l.bytes.clone()))
                .await?;
        }
        let digest: Digest = sha256(&config).parse()?;
        client
            .push_blob_bytes(&reference, &digest, Bytes::from(config))
            .await?;
        client
            .push_manifest(
                &reference,
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from(manifest),
            )
            .await?;
        anyhow::Ok(())
    })?;
    Ok(format!("{}/{repo}:v1", registry.addr))
}

/// `VmHWM` (peak RSS) and `VmRSS` of a live process, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// How a `lazysnap mount` process ended.
#[derive(Debug)]
pub struct Ended {
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Peak RSS over its whole life, KiB: `ru_maxrss` of the reaped child. Linux carries the
    /// forking process's own peak into it (the pre-exec copy of its memory counts), so this is
    /// an upper bound; the test process keeps itself small for that reason.
    pub peak_kib: u64,
    pub log: String,
}

/// A `lazysnap mount` process. A watchdog kills it if its RSS passes `kill_kib` (the test then
/// fails on the peak instead of taking the machine down); dropped, it is killed and unmounted.
pub struct Mount {
    child: Option<Child>,
    pub pid: u32,
    pub target: PathBuf,
    pub root: PathBuf,
    log: PathBuf,
    stop_watch: Arc<AtomicBool>,
    /// Highest RSS the watchdog saw, KiB.
    pub watched_kib: Arc<AtomicU64>,
    pub killed_for_memory: Arc<AtomicBool>,
}

/// What waiting for a mount gave.
pub enum Started {
    Mounted(Mount),
    /// The process ended before the overlay appeared.
    Refused(Ended),
}

impl Mount {
    /// Starts `lazysnap --root ROOT mount --no-background-fetch REF TARGET` and waits until the
    /// overlay is mounted or the process ends.
    pub fn start(
        bin: &str,
        root: &Path,
        reference: &str,
        target: &Path,
        kill_kib: u64,
    ) -> Result<Started> {
        std::fs::create_dir_all(target)?;
        let log = root.with_extension("log");
        let child = Command::new(bin)
            .arg("--root")
            .arg(root)
            .arg("mount")
            .arg("--no-background-fetch")
            .arg("--read-timeout")
            .arg("20")
            .arg(reference)
            .arg(target)
            .env("LAZYSNAP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let pid = child.id();
        let stop_watch = Arc::new(AtomicBool::new(false));
        let watched_kib = Arc::new(AtomicU64::new(0));
        let killed_for_memory = Arc::new(AtomicBool::new(false));
        {
            let (stop, watched, killed) = (
                stop_watch.clone(),
                watched_kib.clone(),
                killed_for_memory.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some((_, rss)) = memory_kib(pid) else {
                        break;
                    };
                    watched.fetch_max(rss, Ordering::Relaxed);
                    if rss > kill_kib {
                        killed.store(true, Ordering::Relaxed);
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        let mut mount = Self {
            child: Some(child),
            pid,
            target: target.to_owned(),
            root: root.to_owned(),
            log,
            stop_watch,
            watched_kib,
            killed_for_memory,
        };
        let started = Instant::now();
        loop {
            if mounted(target) {
                return Ok(Started::Mounted(mount));
            }
            if exited(pid) {
                return Ok(Started::Refused(mount.reap()?));
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("neither mounted nor ended after 120 s: {}", mount.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak RSS so far (VmHWM), KiB.
    pub fn peak_kib(&self) -> u64 {
        memory_kib(self.pid).map_or(0, |(hwm, _)| hwm)
    }

    pub fn alive(&self) -> bool {
        !exited(self.pid)
    }

    /// The FUSE mount point of layer `i` (under `ROOT/run/mount-*/layer-i`).
    pub fn layer_dir(&self, i: usize) -> Result<PathBuf> {
        let run = self.root.join("run");
        for d in std::fs::read_dir(&run)? {
            let p = d?.path().join(format!("layer-{i}"));
            if mounted(&p) {
                return Ok(p);
            }
        }
        bail!("no mounted layer-{i} under {}", run.display())
    }

    /// SIGTERM; the process must exit 0 having unmounted.
    pub fn stop(mut self) -> Result<Ended> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let ended = self.reap()?;
        ensure!(ended.code == Some(0), "after SIGTERM: {ended:?}");
        ensure!(!mounted(&self.target), "still mounted after exit");
        Ok(ended)
    }

    /// Waits for the process (wait4, for its peak RSS).
    fn reap(&mut self) -> Result<Ended> {
        let Some(child) = self.child.take() else {
            bail!("already reaped");
        };
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of the plain C struct.
        let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
        let started = Instant::now();
        loop {
            // SAFETY: `status` and `usage` are valid for writes; the pid is our unreaped child.
            let rc = unsafe {
                nix::libc::wait4(
                    child.id() as i32,
                    &mut status,
                    nix::libc::WNOHANG,
                    &mut usage,
                )
            };
            if rc == child.id() as i32 {
                break;
            }
            ensure!(rc == 0, "wait4: {}", std::io::Error::last_os_error());
            if started.elapsed() > Duration::from_secs(30) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop_watch.store(true, Ordering::Relaxed);
        std::mem::forget(child);
        let (code, signal) = if nix::libc::WIFEXITED(status) {
            (Some(nix::libc::WEXITSTATUS(status)), None)
        } else if nix::libc::WIFSIGNALED(status) {
            (None, Some(nix::libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        Ok(Ended {
            code,
            signal,
            peak_kib: usage.ru_maxrss as u64,
            log: self.log(),
        })
    }
}

/// Whether `pid` has exited (a zombie counts), without reaping it.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop_watch.store(true, Ordering::Relaxed);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        super::unmount_below(&self.root);
        if mounted(&self.target) {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks), like `du`.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// A TOC of at least `len` bytes of JSON, compressed as it is written (the test process never
/// holds the JSON: a forked child's peak RSS would start from the test's own); returns the
/// compressed frame, the JSON's length and its entry count.
pub fn huge_toc(len: u64) -> Result<(Vec<u8>, u64, u64)> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    let head = br#"{"version":1,"entries":["#;
    enc.write_all(head)?;
    let mut written = head.len() as u64;
    let mut i = 0u64;
    while written < len {
        let comma = if i > 0 { "," } else { "" };
        let entry = format!(r#"{comma}{{"type":"reg","name":"f{i:09}"}}"#);
        enc.write_all(entry.as_bytes())?;
        written += entry.len() as u64;
        i += 1;
    }
    enc.write_all(b"]}")?;
    Ok((enc.finish()?, written + 2, i))
}

/// Writes a zstd frame of `len` zero bytes that declares its size, streaming (no `len` buffer).
pub fn zero_frame(len: u64) -> Result<Vec<u8>> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1)?;
    enc.set_pledged_src_size(Some(len))?;
    enc.include_contentsize(true)?;
    let block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        enc.write_all(&block[..n])?;
        left -= n as u64;
    }
    enc.finish().context("finishing the zero frame")
}

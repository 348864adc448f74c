//! Hostile images against the real `lazysnap mount` binary, a real registry and real FUSE and
//! overlayfs mounts. Each case is built here by hand (TOC JSON, frames, manifest annotations that
//! pin the TOC) and checks the promise of issue 10: the hostile layer fails with a clear error or
//! EIO (or the mount of that image is refused with a clear error), the good layer served by the
//! same process stays readable, the process never aborts, and its peak RSS stays under 128 MiB
//! (the layer host's whole budget in issue 10; measured ~26 MiB in every case).

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::hostile::{self, Blob, LazyLayer, Mount, Started};
use common::registry::TestRegistry;
use common::UnmountOnDrop;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
const MIB: u64 = 1 << 20;
const GOOD: &[u8] = b"served by the good layer\n";
/// The watchdog kills a mount process whose RSS passes this (KiB): far above every stated
/// bound, low enough that a case that would take gigabytes fails fast instead.
const KILL_KIB: u64 = 1536 * 1024;

/// The good bottom layer every hostile image sits on: a file, and two directories with a file
/// each for an upper layer to try to hide (`d`) or redirect to (`r`).
fn good_layer() -> Result<Blob> {
    let mut l = LazyLayer::new();
    l.dir("good", &[])
        .file("good/hello", GOOD, &[])
        .dir("d", &[])
        .file("d/keep", b"lower d\n", &[])
        .dir("r", &[])
        .file("r/keep", b"lower r\n", &[]);
    l.finish()
}

struct Case {
    registry: TestRegistry,
    work: tempfile::TempDir,
    _cleanup: UnmountOnDrop,
}

impl Case {
    fn new() -> Result<Self> {
        let registry = TestRegistry::start()?;
        let work = tempfile::tempdir()?;
        let cleanup = UnmountOnDrop(work.path().to_owned());
        Ok(Self {
            registry,
            work,
            _cleanup: cleanup,
        })
    }

    /// Pushes [good layer, `hostile`...] and starts a mount of it.
    fn mount(&self, name: &str, hostile: Vec<Blob>) -> Result<Started> {
        let mut layers = vec![good_layer()?];
        layers.extend(hostile);
        let reference = hostile::push_image(&self.registry, name, &layers)?;
        Mount::start(
            BIN,
            &self.work.path().join(format!("root-{name}")),
            &reference,
            &self.work.path().join(format!("mnt-{name}")),
            KILL_KIB,
        )
    }
}

/// The good layer still answers, through the overlay, after whatever the hostile one did: its
/// bytes are fetched from the registry now (nothing was read from it before).
fn good_layer_reads(m: &Mount) -> Result<()> {
    let got = std::fs::read(m.target.join("good/hello"))
        .with_context(|| format!("the good layer is unreadable: {}", m.log()))?;
    ensure!(got == GOOD, "the good layer's bytes");
    Ok(())
}

fn check_peak(what: &str, peak_kib: u64, bound_mib: u64, log: &str) -> Result<()> {
    ensure!(
        peak_kib <= bound_mib * 1024,
        "{what}: peak RSS {} MiB is above the bound of {bound_mib} MiB; log:\n{}",
        peak_kib / 1024,
        tail(log)
    );
    eprintln!(
        "{what}: peak RSS {} MiB (bound {bound_mib} MiB)",
        peak_kib / 1024
    );
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A refused mount: a clear error naming the cause, an ordinary exit (no abort, no signal), a
/// bounded peak.
fn check_refused(
    what: &str,
    ended: &common::hostile::Ended,
    cause: &[&str],
    bound_mib: u64,
) -> Result<()> {
    ensure!(
        ended.signal != Some(libc::SIGKILL),
        "{what}: the test's watchdog killed the process: its RSS passed {} MiB",
        KILL_KIB / 1024
    );
    ensure!(
        ended.signal.is_none() && ended.code == Some(1),
        "{what}: the process must fail with an error, not die: {ended:?}\n{}",
        tail(&ended.log)
    );
    ensure!(
        cause.iter().any(|c| ended.log.contains(c)),
        "{what}: the error names the cause (one of {cause:?}):\n{}",
        tail(&ended.log)
    );
    eprintln!(
        "{what}: refused: {}",
        ended
            .log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
    );
    check_peak(what, ended.peak_kib, bound_mib, &ended.log)
}

/// Reads `len` bytes at `offset` of `path` with pread.
fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; `buf` is valid for its length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

/// A zero run of 2^40 bytes: a 1-byte read allocated the run and aborted the process.
#[test]
fn a_terabyte_zero_chunk_serves_zeros_without_allocating_it() -> Result<()> {
    let case = Case::new()?;
    let size = 1u64 << 40;
    let mut l = LazyLayer::new();
    l.entry(json!({
        "type": "reg", "name": "huge", "mode": 0o644, "size": size,
        "offset": 0, "chunkSize": size, "chunkType": "zeros",
        "chunkDigest": hostile::sha256(b"not checked: a zero run has no stored bytes"),
    }));
    let m = match case.mount("zero-tib", vec![l.finish()?])? {
        Started::Mounted(m) => m,
        Started::Refused(ended) => {
            // A limit on zero runs may refuse the TOC instead: then clearly, and cheaply.
            return check_refused("zero run of 2^40", &ended, &["zero", "chunk", "size"], 128);
        }
    };
    let huge = m.target.join("huge");
    ensure!(
        std::fs::metadata(&huge)?.len() == size,
        "the declared size is served"
    );
    ensure!(
        read_at(&huge, size - 1, 1)? == [0],
        "the last byte is a zero"
    );
    ensure!(
        read_at(&huge, 0, 1 << 20)? == vec![0u8; 1 << 20],
        "a megabyte of zeros"
    );
    ensure!(read_at(&huge, size / 2, 4096)? == vec![0u8; 4096]);
    ensure!(m.alive(), "the process survived: {}", m.log());
    good_layer_reads(&m)?;
    check_peak("zero run of 2^40", m.peak_kib(), 128, &m.log())?;
    m.stop()?;
    Ok(())
}

/// A 3 GiB file of zeros in a layer of a few hundred bytes, with its true whole-file digest:
/// opening it assembled a 3 GiB passthrough file in the cache.
#[test]
fn a_zero_filled_file_never_becomes_a_cache_file_of_its_size() -> Result<()> {
    let case = Case::new()?;
    let size = 3u64 << 30;
    let digest = hostile::sha256_of_zeros(size);
    let mut l = LazyLayer::new();
    l.entry(json!({
        "type": "reg", "name": "zeros", "mode": 0o644, "size": size, "digest": digest,
        "offset": 0, "chunkSize": size, "chunkType": "zeros", "chunkDigest": digest,
    }));
    let blob = l.finish()?;
    ensure!(
        blob.bytes.len() < 1024,
        "the layer is tiny: {} bytes",
        blob.bytes.len()
    );
    let m = match case.mount("zero-file", vec![blob])? {
        Started::Mounted(m) => m,
        Started::Refused(ended) => {
            return check_refused("3 GiB of zeros", &ended, &["zero", "chunk", "size"], 128);
        }
    };
    let file = m.target.join("zeros");
    let cache = m.root.join("cache");
    // Opens ask for a passthrough file; give its preparation time, then open again.
    for _ in 0..3 {
        ensure!(read_at(&file, size - 4096, 4096)? == vec![0u8; 4096]);
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let mut all = std::fs::File::open(&file)?;
    let mut block = vec![0u8; 1 << 20];
    all.seek(SeekFrom::Start(size / 3))?;
    all.read_exact(&mut block)?;
    ensure!(block.iter().all(|&b| b == 0));
    drop(all);
    let used = hostile::disk_usage(&cache);
    ensure!(
        used < 64 * MIB,
        "the cache takes {} MiB on disk after opening a file of zeros",
        used / MIB
    );
    good_layer_reads(&m)?;
    check_peak("3 GiB of zeros", m.peak_kib(), 128, &m.log())?;
    m.stop()?;
    Ok(())
}

/// An entry name 200,000 directories deep: building the inode table recursed once per
/// component and overflowed the stack of the serving process.
#[test]
fn a_name_200000_directories_deep_is_refused_without_an_abort() -> Result<()> {
    let case = Case::new()?;
    let name = format!("{}f", "a/".repeat(200_000));
    let mut l = LazyLayer::new();
    l.entry(json!({"type": "reg", "name": name, "mode": 0o644, "size": 0}));
    match case.mount("deep", vec![l.finish()?])? {
        Started::Refused(ended) => check_refused(
            "a name 200,000 deep",
            &ended,
            &["PATH_MAX", "name", "depth"],
            128,
        ),
        Started::Mounted(m) => {
            // Serving it is acceptable only if nothing breaks.
            ensure!(m.alive());
            good_layer_reads(&m)?;
            check_peak("a name 200,000 deep", m.peak_kib(), 128, &m.log())?;
            m.stop()?;
            Ok(())
        }
    }
}

/// 128 MiB of TOC JSON (3.5 million entries) that compresses to well under a megabyte: mounting
/// took 2.3 GB of RSS and 14 s.
#[test]
fn a_128_mib_toc_is_refused_or_mounted_within_bounded_memory() -> Result<()> {
    let case = Case::new()?;
    let (compressed, json_len, entries) = hostile::huge_toc(128 << 20)?;
    let blob = LazyLayer::new().finish_with_compressed_toc(&compressed, json_len)?;
    eprintln!(
        "TOC: {} MiB of JSON, {entries} entries, blob {} KiB",
        json_len >> 20,
        blob.bytes.len() >> 10
    );
    match case.mount("huge-toc", vec![blob])? {
        Started::Refused(ended) => {
            check_refused("128 MiB TOC", &ended, &["TOC", "entries", "limit"], 128)
        }
        Started::Mounted(m) => {
            ensure!(m.alive());
            good_layer_reads(&m)?;
            check_peak("128 MiB TOC", m.peak_kib(), 128, &m.log())?;
            m.stop()?;
            Ok(())
        }
    }
}

/// A chunk whose zstd frame declares and decompresses to 4 GiB, as the TOC says: one 1-byte read
/// took 4.1 GB of RSS.
#[test]
fn a_4_gib_zstd_frame_costs_a_read_not_the_process() -> Result<()> {
    let case = Case::new()?;
    let size = 4u64 << 30;
    let frame = hostile::zero_frame(size)?;
    let mut l = LazyLayer::new();
    let (start, end) = l.raw_frame(&frame);
    l.entry(json!({
        "type": "reg", "name": "bomb", "mode": 0o644, "size": size,
        "offset": start, "endOffset": end, "chunkSize": size,
        // Not the zeros' digest: the bytes are never served, but the memory was spent before.
        "chunkDigest": hostile::sha256(b"bomb"),
    }));
    let m = match case.mount("bomb", vec![l.finish()?])? {
        Started::Mounted(m) => m,
        Started::Refused(ended) => {
            return check_refused("4 GiB frame", &ended, &["chunk", "limit", "large"], 128);
        }
    };
    let err = read_at(&m.target.join("bomb"), 0, 1).expect_err("the bomb's bytes never verify");
    ensure!(
        !m.killed_for_memory
            .load(std::sync::atomic::Ordering::Relaxed),
        "the test's watchdog killed the process: its RSS passed {} MiB",
        KILL_KIB / 1024
    );
    ensure!(err.raw_os_error() == Some(libc::EIO), "EIO, got {err}");
    ensure!(m.alive(), "the process survived: {}", m.log());
    good_layer_reads(&m)?;
    check_peak("4 GiB frame", m.peak_kib(), 128, &m.log())?;
    m.stop()?;
    Ok(())
}

/// `trusted.overlay.opaque` and `trusted.overlay.redirect` on directories of a lazy layer, and
/// `trusted.overlay.opaque` in a plain layer's tar: overlayfs obeyed them, hiding the lower
/// layer's `d` and showing its `r` under another name. `security.capability` is still served.
#[test]
fn overlay_xattrs_from_an_image_never_steer_the_overlay_and_capabilities_are_served() -> Result<()>
{
    let case = Case::new()?;
    // VFS_CAP_REVISION_2, effective, permitted = cap_net_raw (13).
    let mut cap = Vec::new();
    for v in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&v.to_le_bytes());
    }
    let mut lazy = LazyLayer::new();
    lazy.dir("d", &[("trusted.overlay.opaque", b"y")])
        .file("d/upper", b"upper d\n", &[])
        .dir("r2", &[("trusted.overlay.redirect", b"/r")])
        .dir("d3", &[("trusted.overlay.opaque", b"y")])
        .file("ping", b"#!/bin/sh\n", &[("security.capability", &cap)]);
    let plain = Blob::plain(&common::image::python_tar(
        "i = tarfile.TarInfo('d3'); i.type = tarfile.DIRTYPE; i.mode = 0o755\n\
         i.pax_headers = {'SCHILY.xattr.trusted.overlay.opaque': 'y'}\nt.addfile(i)\n\
         i = tarfile.TarInfo('g'); i.type = tarfile.DIRTYPE; i.mode = 0o755\n\
         i.pax_headers = {'SCHILY.xattr.trusted.overlay.opaque': 'y'}\nt.addfile(i)",
    )?)?;
    // Layers: good (d/keep, r/keep), lazy hostile, then a plain one that makes `d` opaque too.
    let plain_d = Blob::plain(&common::image::python_tar(
        "i = tarfile.TarInfo('d'); i.type = tarfile.DIRTYPE; i.mode = 0o755\n\
         i.pax_headers = {'SCHILY.xattr.trusted.overlay.opaque': 'y'}\nt.addfile(i)",
    )?)?;
    let m = match case.mount("xattrs", vec![lazy.finish()?, plain, plain_d])? {
        Started::Mounted(m) => m,
        Started::Refused(ended) => anyhow::bail!("this image must mount: {ended:?}"),
    };
    let t = &m.target;
    ensure!(
        std::fs::read(t.join("d/keep")).ok().as_deref() == Some(&b"lower d\n"[..]),
        "trusted.overlay.opaque from an image hid the lower layer's d/keep: {:?}",
        std::fs::read_dir(t.join("d"))?
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    ensure!(std::fs::read(t.join("d/upper"))? == b"upper d\n");
    ensure!(
        !t.join("r2/keep").exists(),
        "trusted.overlay.redirect from an image showed the lower layer's r under r2"
    );
    ensure!(t.join("r/keep").exists());
    // The FUSE layer itself never offers the attributes (overlayfs reads them there).
    let layer = m.layer_dir(1)?;
    for dir in ["d", "r2", "d3"] {
        for x in ["trusted.overlay.opaque", "trusted.overlay.redirect"] {
            ensure!(
                get_xattr(&layer.join(dir), x).is_none(),
                "{dir}: {x} is served by the FUSE layer"
            );
        }
    }
    // The plain layer's unpacked directory carries none either.
    let unpacked: Vec<_> = std::fs::read_dir(m.root.join("layers"))?
        .flatten()
        .map(|e| e.path().join("fs"))
        .collect();
    ensure!(
        unpacked.len() == 2,
        "two plain layers unpacked: {unpacked:?}"
    );
    for fs in &unpacked {
        for dir in ["d", "d3", "g"] {
            let p = fs.join(dir);
            if p.exists() {
                ensure!(
                    get_xattr(&p, "trusted.overlay.opaque").is_none(),
                    "{}: trusted.overlay.opaque was written by the unpacker",
                    p.display()
                );
            }
        }
    }
    // Capabilities are served as containerd's applier writes them.
    ensure!(
        get_xattr(&t.join("ping"), "security.capability").as_deref() == Some(&cap[..]),
        "security.capability is served through the overlay"
    );
    ensure!(std::fs::metadata(t.join("ping"))?.mode() & 0o777 == 0o644);
    good_layer_reads(&m)?;
    check_peak("overlay xattrs", m.peak_kib(), 128, &m.log())?;
    m.stop()?;
    Ok(())
}

/// A chunk the TOC declares as 1 MiB whose frame inflates to 4 GiB (and declares so in its
/// header): a read must stop at the declared size and fail that read only.
#[test]
fn a_frame_inflating_past_its_declared_size_fails_that_read_only() -> Result<()> {
    let case = Case::new()?;
    let frame = hostile::zero_frame(4 << 30)?;
    let mut l = LazyLayer::new();
    let (start, end) = l.raw_frame(&frame);
    l.entry(json!({
        "type": "reg", "name": "liar", "mode": 0o644, "size": MIB,
        "offset": start, "endOffset": end, "chunkSize": MIB,
        "chunkDigest": hostile::sha256_of_zeros(MIB),
    }));
    let m = match case.mount("liar", vec![l.finish()?])? {
        Started::Mounted(m) => m,
        Started::Refused(ended) => {
            return check_refused("inflating frame", &ended, &["chunk", "frame", "size"], 128);
        }
    };
    let got = read_at(&m.target.join("liar"), 0, MIB as usize);
    ensure!(
        !m.killed_for_memory
            .load(std::sync::atomic::Ordering::Relaxed),
        "the test's watchdog killed the process: its RSS passed {} MiB",
        KILL_KIB / 1024
    );
    ensure!(m.alive(), "the process survived: {}", m.log());
    match got {
        // The first MiB of the frame is the declared chunk, and it verifies: serving it is
        // right, as long as no more was inflated than asked for.
        Ok(data) => ensure!(data == vec![0u8; MIB as usize], "only verified zeros"),
        Err(e) => ensure!(e.raw_os_error() == Some(libc::EIO), "EIO, got {e}"),
    }
    good_layer_reads(&m)?;
    check_peak("inflating frame", m.peak_kib(), 128, &m.log())?;
    m.stop()?;
    Ok(())
}

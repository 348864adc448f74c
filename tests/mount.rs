//! `lazysnap mount` with real parts: a real registry, kernel FUSE and overlayfs, compared with an
//! independent unpack of the same image (`umoci unpack`). Every mount and process a test starts
//! is torn down by a guard, even when the test fails.

mod common;
#[path = "common/delayproxy.rs"]
mod delayproxy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::image::{self, LayoutBuilder};
use common::mount_process::{ensure_mount_equals, MountProcess};
use common::registry::TestRegistry;
use common::scrape;
use common::tree;
use common::{mounts_below, UnmountOnDrop};
use lazysnap::mount::{self, MountConfig};
use lazysnap::oci::Reference;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
const EIO: i32 = 5;

/// The two-layer sample image as an OCI layout tagged `src`: awkward entries, then whiteouts.
fn sample_layout(dir: &Path) -> Result<LayoutBuilder> {
    let trees = tempfile::tempdir()?;
    let (a, b) = (trees.path().join("a"), trees.path().join("b"));
    image::sample_tree(&a, 1)?;
    std::fs::create_dir_all(a.join("many"))?;
    for i in 0..3000 {
        std::fs::write(a.join("many").join(format!("f{i:04}")), format!("{i}\n"))?;
    }
    image::whiteout_tree(&b)?;
    let layout = LayoutBuilder::new(dir)?;
    let desc = layout.image(&[image::tar_dir(&a)?, image::tar_dir(&b)?], "amd64")?;
    layout.tags(&[("src", desc)])?;
    Ok(layout)
}

fn convert(src: &str, dst: &str, format: &str) -> Result<()> {
    image::run(Command::new(BIN).args([
        "convert",
        "--format",
        format,
        "--chunk-size",
        "65536",
        src,
        dst,
    ]))?;
    Ok(())
}

#[test]
fn mounted_images_equal_umoci_unpack_in_both_formats_and_plain_gzip() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let layout = sample_layout(&work.path().join("src"))?;
    let src = format!("oci:{}:src", layout.dir.display());

    // The oracle: umoci's own unpack of the source image.
    let rootfs = image::umoci_unpack(&layout.dir, "src", &work.path().join("bundle"))?;
    let mut want = tree::snapshot(&rootfs)?;
    // umoci 0.4.7 drops an extended attribute whose value is empty; GNU tar's extraction and
    // containerd's applier keep it (`SCHILY.xattr.user.empty=`), and so must every mount.
    want.get_mut("etc/hostname")
        .context("the oracle has etc/hostname")?
        .xattrs
        .entry("user.empty".into())
        .or_default();
    ensure!(
        want.get("usr/bin/up-link").and_then(|n| n.link.as_deref())
            == Some("../../../../etc/hostname"),
        "the oracle keeps a symlink target that climbs above the root"
    );
    ensure!(
        want.contains_key("etc/tty0") && want.contains_key("many/f2999"),
        "the oracle has the sample entries"
    );
    ensure!(
        !want.contains_key("etc/hostname.hard"),
        "the oracle applied the whiteout"
    );

    let plain = format!("{}/sample/plain:v1", registry.addr);
    let push = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/push-layout.sh");
    image::run(
        Command::new(push)
            .arg(format!("{}:src", layout.dir.display()))
            .arg(&plain),
    )?;
    let zstd = format!("{}/sample/zstd:v1", registry.addr);
    convert(&src, &zstd, "zstd-chunked")?;
    let estargz = format!("{}/sample/estargz:v1", registry.addr);
    convert(&src, &estargz, "estargz")?;

    for (i, reference) in [&zstd, &estargz, &plain].into_iter().enumerate() {
        let root = work.path().join(format!("root-{i}"));
        let target = work.path().join(format!("mnt-{i}"));
        ensure_mount_equals(&root, reference, &target, &want)?;
    }
    Ok(())
}

/// The registry's stored blob of `reference`'s first layer, and its TOC read from that file (not
/// through the code under test's fetch path).
fn registry_toc(
    registry: &TestRegistry,
    reference: &str,
) -> Result<(PathBuf, lazysnap::format::Toc)> {
    let out = image::run(Command::new(BIN).args(["inspect", "--json", reference]))?;
    let info: serde_json::Value = serde_json::from_slice(&out)?;
    let layer = &info["layers"][0];
    let digest: lazysnap::oci::Digest = layer["digest"].as_str().context("digest")?.parse()?;
    let path = registry.blob_data_path(&digest);
    let annotations = layer["annotations"]
        .as_object()
        .context("annotations")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let media_type = layer["media_type"].as_str().context("media type")?;
    let (_, toc) =
        lazysnap::format::read_toc(std::fs::File::open(&path)?, media_type, &annotations)?;
    Ok((path, toc))
}

/// Converts the sample image into the registry and returns its reference and the blob path of
/// its first layer in the registry's storage.
fn lazy_sample(
    registry: &TestRegistry,
    work: &Path,
    name: &str,
) -> Result<(String, PathBuf, lazysnap::format::Toc)> {
    lazy_sample_as(registry, work, name, "zstd-chunked")
}

/// [`lazy_sample`] in `format` (`zstd-chunked` or `estargz`).
fn lazy_sample_as(
    registry: &TestRegistry,
    work: &Path,
    name: &str,
    format: &str,
) -> Result<(String, PathBuf, lazysnap::format::Toc)> {
    let layout = sample_layout(&work.join(format!("src-{name}")))?;
    let reference = format!("{}/sample/{name}:v1", registry.addr);
    convert(
        &format!("oci:{}:src", layout.dir.display()),
        &reference,
        format,
    )?;
    let (path, toc) = registry_toc(registry, &reference)?;
    Ok((reference, path, toc))
}

#[test]
fn a_corrupt_chunk_is_never_served_and_other_files_still_read() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, blob, toc) = lazy_sample(&registry, work.path(), "corrupt")?;
    let tool = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/bin/tool")
        .context("tool in TOC")?;
    let chunk = &tool.chunks[1];
    let mut bytes = std::fs::read(&blob)?;
    let at = ((chunk.compressed_start + chunk.compressed_end) / 2) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&blob, &bytes)?;

    let target = work.path().join("mnt");
    let process = MountProcess::start(
        &work.path().join("root"),
        &reference,
        &target,
        &["--no-background-fetch"],
    )?;
    for attempt in 0..2 {
        let err = std::fs::read(target.join("usr/bin/tool"))
            .expect_err("a corrupt chunk must not be served");
        assert_eq!(err.raw_os_error(), Some(EIO), "attempt {attempt}: {err}");
    }
    // The chunks before the corrupt one read correctly (no bad byte is returned with them).
    let mut file = std::fs::File::open(target.join("usr/bin/tool"))?;
    let mut first = vec![0u8; tool.chunks[0].size as usize];
    std::io::Read::read_exact(&mut file, &mut first)?;
    assert_eq!(lazysnap::oci::Digest::of(&first), tool.chunks[0].digest);
    assert_eq!(
        std::fs::read_to_string(target.join("etc/hostname"))?,
        "host1\n"
    );
    let log = process.stop()?;
    assert!(
        log.contains("verification") || log.contains("digest"),
        "the log names the failure: {log}"
    );
    Ok(())
}

#[test]
fn a_registry_that_goes_away_gives_eio_then_reads_recover() -> Result<()> {
    let mut registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "away")?;
    let target = work.path().join("mnt");
    let process = MountProcess::start(
        &work.path().join("root"),
        &reference,
        &target,
        &["--no-background-fetch", "--read-timeout", "5"],
    )?;
    registry.stop()?;
    let start = Instant::now();
    let err = std::fs::read(target.join("usr/bin/tool")).expect_err("nothing to read from");
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "EIO came after {:?}",
        start.elapsed()
    );
    registry.restart()?;
    let data = std::fs::read(target.join("usr/bin/tool"))?;
    assert_eq!(data.len(), 600_000);
    process.stop()?;
    Ok(())
}

#[test]
fn a_truncated_blob_fails_reads_beyond_its_end() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, blob, toc) = lazy_sample(&registry, work.path(), "truncated")?;
    // Keep the footer and TOC where the mount reads them, but cut a file's chunk out: rewrite
    // the blob with the bytes of `usr/bin/tool`'s last chunk removed from the storage file.
    let tool = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/bin/tool")
        .context("tool")?;
    let last = tool.chunks.last().context("chunk")?;
    let bytes = std::fs::read(&blob)?;
    let mut cut = bytes[..last.compressed_start as usize].to_vec();
    cut.extend_from_slice(&bytes[last.compressed_end as usize..]);
    std::fs::write(&blob, &cut)?;
    let target = work.path().join("mnt");
    let mount = MountProcess::start(
        &work.path().join("root"),
        &reference,
        &target,
        &["--no-background-fetch"],
    );
    // The registry now serves a shorter blob than the manifest says: either the mount refuses
    // (the TOC is no longer where the annotation says) or the file read fails; never wrong bytes.
    match mount {
        Err(e) => ensure!(
            format!("{e:#}").contains("TOC") || format!("{e:#}").contains("range"),
            "{e:#}"
        ),
        Ok(process) => {
            let err = std::fs::read(target.join("usr/bin/tool")).expect_err("truncated");
            assert_eq!(err.raw_os_error(), Some(EIO));
            process.stop()?;
        }
    }
    Ok(())
}

/// In-process mount on the test's runtime, so the fetch counters can be read.
async fn mount_in_process(
    reference: &str,
    root: &Path,
    target: &Path,
) -> Result<mount::ImageMount> {
    std::fs::create_dir_all(target)?;
    let mut config = MountConfig::new(root.to_owned());
    config.background_fetch = false;
    let reference: Reference = reference.parse()?;
    Ok(mount::mount_image(&reference, target, &config).await?)
}

async fn read_in_thread(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(std::io::Error::other)?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_of_one_chunk_share_one_request() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "shared")?;
    let target = work.path().join("mnt");
    let mounted = mount_in_process(&reference, &work.path().join("root"), &target).await?;
    let readers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(read_in_thread(target.join("etc/hostname"))))
        .collect();
    for r in readers {
        assert_eq!(r.await??, b"host1\n");
    }
    let requests: u64 = mounted
        .fetchers()
        .map(|f| {
            f.stats()
                .requests
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(requests, 1, "eight readers of one chunk, one range request");
    mounted.unmount()?;
    assert!(mounts_below(work.path()).is_empty());
    Ok(())
}

/// The image config is fetched while the layers' TOCs are read, not before them: no lazy layer
/// needs it. At a proxy adding 50 ms each way, the config request and the first TOC read go out
/// in the same round trip after the manifest (in series they were a round trip apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_config_is_fetched_beside_the_layers_tocs() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "beside")?;
    let one_way = Duration::from_millis(50);
    let proxy = delayproxy::DelayProxy::start(&registry.addr, one_way)?;
    let via = reference.replacen(&registry.addr, &proxy.addr, 1);
    let target = work.path().join("mnt");
    let mounted = mount_in_process(&via, &work.path().join("root"), &target).await?;
    let requests = proxy.requests();
    let log = || format!("{requests:#?}");
    let config = requests
        .iter()
        .find(|r| r.range.is_none() && r.blob().is_some())
        .map(|r| r.at)
        .with_context(log)?;
    let toc = requests
        .iter()
        .find(|r| r.range.is_some())
        .map(|r| r.at)
        .with_context(log)?;
    ensure!(
        toc < config + one_way && config < toc + one_way,
        "the config was asked for at {config:?}, the first TOC at {toc:?}: not side by side\n{}",
        log()
    );
    assert_eq!(
        read_in_thread(target.join("etc/hostname")).await?,
        b"host1\n"
    );
    mounted.unmount()?;
    assert!(mounts_below(work.path()).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_image_sharing_chunks_fetches_none_of_them() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (first, _, _) = lazy_sample(&registry, work.path(), "first")?;
    // A different image whose layer holds the same `usr/bin/tool` among other files.
    let trees = tempfile::tempdir()?;
    image::sample_tree(trees.path(), 1)?;
    std::fs::write(
        trees.path().join("etc/extra"),
        b"only in the second image\n",
    )?;
    let layout = LayoutBuilder::new(&work.path().join("second-src"))?;
    let desc = layout.image(&[image::tar_dir(trees.path())?], "amd64")?;
    layout.tags(&[("src", desc)])?;
    let second = format!("{}/sample/second:v1", registry.addr);
    convert(
        &format!("oci:{}:src", layout.dir.display()),
        &second,
        "zstd-chunked",
    )?;

    let root = work.path().join("root");
    let m1 = mount_in_process(&first, &root, &work.path().join("m1")).await?;
    let tool = read_in_thread(work.path().join("m1/usr/bin/tool")).await?;
    m1.unmount()?;
    let m2 = mount_in_process(&second, &root, &work.path().join("m2")).await?;
    assert_eq!(
        read_in_thread(work.path().join("m2/usr/bin/tool")).await?,
        tool
    );
    let fetched = m2.fetched_bytes();
    assert_eq!(
        fetched, 0,
        "the second image's copy of the file came from the cache"
    );
    assert_eq!(
        read_in_thread(work.path().join("m2/etc/extra")).await?,
        b"only in the second image\n"
    );
    assert!(
        m2.fetched_bytes() > 0,
        "a file only the second image has is fetched"
    );
    m2.unmount()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completed_layer_no_longer_needs_the_registry() -> Result<()> {
    let mut registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "complete")?;
    let target = work.path().join("mnt");
    std::fs::create_dir_all(&target)?;
    let config = MountConfig::new(work.path().join("root"));
    let mut mounted = mount::mount_image(&reference.parse()?, &target, &config).await?;
    assert!(
        mount::wait_background(&mut mounted, Duration::from_secs(60)).await,
        "background fetch finished"
    );
    assert!(mounted.fetchers().all(|f| f.is_complete()));
    registry.stop()?;
    let want = tree::snapshot(&target);
    assert!(
        want.is_ok(),
        "every file reads with the registry gone: {want:?}"
    );
    mounted.unmount()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tiny_disk_budget_evicts_but_keeps_a_complete_layer_while_mounted() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "budget")?;
    let budget = 128 << 10;
    let root = work.path().join("root");
    let oracle = tempfile::tempdir()?;
    image::sample_tree(oracle.path(), 1)?;

    // Without background fetch nothing is complete, so nothing is pinned: reading everything
    // keeps the cache within the budget, and every read is still right.
    let target = work.path().join("m1");
    std::fs::create_dir_all(&target)?;
    let mut config = MountConfig::new(root.clone());
    config.background_fetch = false;
    config.disk_budget = budget;
    let m1 = mount::mount_image(&reference.parse()?, &target, &config).await?;
    for _ in 0..2 {
        for name in ["usr/bin/tool", "usr/bin/tool.hard", "etc/hostname"] {
            assert_eq!(
                read_in_thread(target.join(name)).await?,
                std::fs::read(oracle.path().join(name))?,
                "{name}"
            );
        }
    }
    let usage = m1.cache_usage().context("usage")?;
    assert!(
        usage.disk_bytes <= budget,
        "{usage:?} over a {budget}-byte budget"
    );
    m1.unmount()?;

    // With background fetch the layer completes and is pinned while mounted, over the budget.
    let target = work.path().join("m2");
    std::fs::create_dir_all(&target)?;
    config.background_fetch = true;
    let mut m2 = mount::mount_image(&reference.parse()?, &target, &config).await?;
    assert!(mount::wait_background(&mut m2, Duration::from_secs(60)).await);
    let usage = m2.cache_usage().context("usage")?;
    assert!(
        usage.disk_bytes > budget,
        "a complete, mounted layer is kept whole: {usage:?}"
    );
    m2.unmount()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_estargz_prefetch_set_is_fetched_at_mount_in_one_request() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    // The start-up files, the landmark, then a large file and a late file: tar order is blob
    // order, so the late file lies far beyond anything a prefetch request could take along.
    let files = [
        ("startup/a", image::noise(40_000, 1)),
        ("startup/b", image::noise(90_000, 2)),
        ("filler", image::noise(1 << 20, 3)),
        ("late/c", image::noise(30_000, 4)),
    ];
    let data_dir = work.path().join("data");
    std::fs::create_dir_all(&data_dir)?;
    let mut body = String::new();
    for (i, (name, data)) in files.iter().enumerate() {
        let path = data_dir.join(i.to_string());
        std::fs::write(&path, data)?;
        body.push_str(&format!(
            "add({name:?}, data=open({:?}, 'rb').read())\n",
            path.display().to_string()
        ));
        if i == 1 {
            body.push_str("add('.prefetch.landmark', data=bytes([0xf]))\n");
        }
    }
    let tar = image::python_tar(&body)?;
    let layout = LayoutBuilder::new(&work.path().join("src"))?;
    let desc = layout.image(&[tar], "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/sample/prefetch:v1", registry.addr);
    convert(
        &format!("oci:{}:src", layout.dir.display()),
        &reference,
        "estargz",
    )?;
    // The converter must keep the landmark where the source tar had it.
    let (_, toc) = registry_toc(&registry, &reference)?;
    ensure!(
        toc.prefetch == ["startup/a", "startup/b"],
        "prefetch set from the converted TOC: {:?}",
        toc.prefetch
    );

    let target = work.path().join("mnt");
    let mut mounted = mount_in_process(&reference, &work.path().join("root"), &target).await?;
    ensure!(
        mount::wait_background(&mut mounted, Duration::from_secs(30)).await,
        "prefetch finished"
    );
    let fetcher = mounted.fetchers().next().context("a lazy layer")?;
    let stats = fetcher.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let prefetched = load(&stats.prefetch_bytes);
    ensure!(
        prefetched >= 130_000,
        "the start-up files were fetched at mount: {prefetched} bytes"
    );
    ensure!(
        prefetched < 1 << 20,
        "and not the file after the landmark: {prefetched} bytes"
    );
    assert_eq!(load(&stats.prefetch_requests), 1, "in one request");
    assert_eq!(load(&stats.on_demand_bytes), 0, "nothing read yet");

    for (name, data) in &files[..2] {
        assert_eq!(&read_in_thread(target.join(name)).await?, data, "{name}");
    }
    assert_eq!(
        load(&stats.on_demand_requests),
        0,
        "prefetched files are read from the cache"
    );
    assert_eq!(read_in_thread(target.join("late/c")).await?, files[3].1);
    ensure!(
        load(&stats.on_demand_bytes) > 0 && load(&stats.on_demand_requests) >= 1,
        "a file after the landmark is fetched when read"
    );
    mounted.unmount()?;
    assert!(mounts_below(work.path()).is_empty());
    Ok(())
}

/// The file system type mounted at `path`, if any (the last mount there, the visible one).
fn fstype_at(path: &Path) -> Option<String> {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rev()
        .filter(|l| l.split(' ').nth(4) == Some(&*wanted))
        .filter_map(|l| {
            let (_, after) = l.split_once(" - ")?;
            after.split(' ').next().map(str::to_owned)
        })
        .next()
}

/// Every process descending from `pid` (children found through `/proc/*/stat`).
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces, so parse after the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Mounts the sample image with the real binary, waits for the overlay, sends `signal`, and
/// checks the promise: exit status 0, no mount left under the root or at the mount point, no
/// process left behind. With `hold_open`, a reader keeps a file open across the signal.
fn signal_stops_the_mount_cleanly(signal: nix::sys::signal::Signal, hold_open: bool) -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, _) = lazy_sample(&registry, work.path(), "signal")?;
    let root = work.path().join("root");
    let target = work.path().join("mnt");
    let mut process = MountProcess::start(&root, &reference, &target, &[])?;
    let start = Instant::now();
    while fstype_at(&target).as_deref() != Some("overlay") {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "{} is {:?}, not an overlay",
            target.display(),
            fstype_at(&target)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        mounts_below(&root).iter().any(|m| m.contains("layer-")),
        "layer file systems are mounted under the root: {:?}",
        mounts_below(&root)
    );
    let held = if hold_open {
        let mut f = std::fs::File::open(target.join("usr/bin/tool"))?;
        let mut head = [0u8; 16];
        std::io::Read::read_exact(&mut f, &mut head)?;
        Some(f)
    } else {
        None
    };
    let pid = process.child.id();
    let children = descendants(pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = process.child.try_wait()? {
            break status;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "still running 20 s after {signal}: {}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(
        status.code() == Some(0),
        "{signal}: exit status {status}: {}",
        process.log()
    );
    let left: Vec<String> = mounts_below(&root)
        .into_iter()
        .chain(mounts_below(&target))
        .collect();
    ensure!(left.is_empty(), "{signal}: still mounted: {left:?}");
    let alive: Vec<u32> = children
        .into_iter()
        .filter(|c| Path::new(&format!("/proc/{c}")).exists())
        .collect();
    ensure!(alive.is_empty(), "{signal}: processes left: {alive:?}");
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the mount process is gone"
    );
    drop(held);
    ensure!(
        process.log().contains("unmounted"),
        "{signal}: {}",
        process.log()
    );
    Ok(())
}

#[test]
fn sigterm_unmounts_everything_and_exits_0() -> Result<()> {
    signal_stops_the_mount_cleanly(nix::sys::signal::Signal::SIGTERM, false)
}

#[test]
fn sigint_unmounts_everything_and_exits_0() -> Result<()> {
    signal_stops_the_mount_cleanly(nix::sys::signal::Signal::SIGINT, false)
}

#[test]
fn sigterm_with_a_file_held_open_still_exits_0_and_leaves_no_mount() -> Result<()> {
    signal_stops_the_mount_cleanly(nix::sys::signal::Signal::SIGTERM, true)
}

/// Polls `done` every 50 ms for up to `limit`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        ensure!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn complete_files_are_read_through_passthrough_without_fuse_reads() -> Result<()> {
    passthrough_serves_complete_files("zstd-chunked")
}

#[test]
fn complete_estargz_files_are_read_through_passthrough_too() -> Result<()> {
    passthrough_serves_complete_files("estargz")
}

fn passthrough_serves_complete_files(format: &str) -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (reference, _, toc) = lazy_sample_as(&registry, work.path(), "passthrough", format)?;
    let tool_entry = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/bin/tool")
        .context("tool")?;
    ensure!(tool_entry.chunks.len() > 1, "the tool spans several chunks");
    let oracle = tempfile::tempdir()?;
    image::sample_tree(oracle.path(), 1)?;
    let want_tool = std::fs::read(oracle.path().join("usr/bin/tool"))?;

    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.to_string()
    };
    let target = work.path().join("mnt");
    let process = MountProcess::start(
        &work.path().join("root"),
        &reference,
        &target,
        &["--metrics-addr", &addr],
    )?;
    let reads = || scrape(&addr, "lazysnap_fuse_operations_total{op=\"read\"}");
    let passthrough_opens = || scrape(&addr, "lazysnap_fuse_passthrough_opens_total");
    let tool = target.join("usr/bin/tool");

    // A first open is a plain FUSE open: its reads reach the daemon (the counter works).
    let mut held = std::fs::File::open(&tool)?;
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut held, &mut head)?;
    assert_eq!(head[..], want_tool[..16]);
    ensure!(reads()? >= 1.0, "a plain read is counted");

    // While that handle is open the file must stay a plain FUSE file (the kernel refuses to mix
    // the two kinds on one inode): further opens through the other name of this hard-linked
    // inode succeed and read right, and the file is prepared for later meanwhile.
    wait_until(
        Duration::from_secs(60),
        "tool prepared for passthrough",
        || {
            let mut other = std::fs::File::open(target.join("usr/bin/tool.hard"))?;
            std::io::Read::read_exact(&mut other, &mut head)?;
            assert_eq!(head[..], want_tool[..16]);
            Ok(scrape(&addr, "lazysnap_passthrough_files_total")? >= 1.0)
        },
    )?;
    assert_eq!(
        passthrough_opens()?,
        0.0,
        "no passthrough while a plain handle is open"
    );
    drop(held);

    // Now every handle is closed: a new open is a passthrough open, and two of them share the
    // backing file. Reading the whole file (most of it never cached) costs the daemon no READ.
    let before = reads()?;
    let mut first = std::fs::File::open(&tool)?;
    let mut second = std::fs::File::open(target.join("usr/bin/tool.hard"))?;
    ensure!(
        passthrough_opens()? >= 2.0,
        "opens of a complete file use passthrough: {}",
        process.log()
    );
    for f in [&mut first, &mut second] {
        let mut data = Vec::new();
        std::io::Read::read_to_end(f, &mut data)?;
        ensure!(data == want_tool, "passthrough content equals the source");
    }
    assert_eq!(
        reads()?,
        before,
        "the daemon saw no READ for passthrough reads"
    );
    drop((first, second));

    // Memory-mapped reads (how binaries and libraries are loaded) work on a passthrough file.
    let opens = passthrough_opens()?;
    let script = "import hashlib, mmap, sys\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nprint(hashlib.sha256(m).hexdigest())";
    let out = image::run(Command::new("python3").args(["-c", script]).arg(&tool))?;
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        image::sha256_hex(&want_tool)
    );
    ensure!(
        passthrough_opens()? > opens,
        "the mapped file was opened with passthrough"
    );
    assert_eq!(reads()?, before, "mapped pages came from the backing file");

    // A one-chunk file is served straight from its verified chunk file.
    let hostname = target.join("etc/hostname");
    assert_eq!(std::fs::read(&hostname)?, b"host1\n");
    let opens = passthrough_opens()?;
    wait_until(Duration::from_secs(30), "hostname by passthrough", || {
        drop(std::fs::File::open(&hostname)?);
        Ok(passthrough_opens()? > opens)
    })?;
    assert_eq!(std::fs::read(&hostname)?, b"host1\n");
    process.stop()?;
    Ok(())
}

/// `(threads, distinct lazysnap FUSE superblocks, lazysnap FUSE mounts)` of a mount process:
/// threads from `/proc/PID/status`, superblocks and mounts from the mount table below `root`.
fn fuse_footprint(pid: u32, root: &Path) -> Result<(u64, usize, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .context("no Threads line")?
        .trim()
        .parse()?;
    let root = root.to_string_lossy();
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let fuse: Vec<&str> = table
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&*root)))
        .filter(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, t)| t.starts_with("fuse lazysnap "))
        })
        .filter_map(|l| l.split(' ').nth(2))
        .collect();
    let devices: std::collections::HashSet<&str> = fuse.iter().copied().collect();
    Ok((threads, devices.len(), fuse.len()))
}

/// Threads, buffers and kernel connections must not grow per layer (a node serves thousands):
/// 40 lazy layers are served by the same single FUSE session, and so the same threads, as one.
#[test]
fn many_layers_share_one_fuse_session_and_its_threads() -> Result<()> {
    const LAYERS: usize = 40;
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let mut references = Vec::new();
    for count in [1, LAYERS] {
        let mut tars = Vec::new();
        for i in 0..count {
            let tree = work.path().join(format!("tree-{count}-{i}"));
            std::fs::create_dir_all(&tree)?;
            std::fs::write(
                tree.join(format!("f{i}")),
                format!("layer {i} of {count}\n"),
            )?;
            tars.push(image::tar_dir(&tree)?);
        }
        let layout = LayoutBuilder::new(&work.path().join(format!("src-{count}")))?;
        let desc = layout.image(&tars, "amd64")?;
        layout.tags(&[("src", desc)])?;
        let reference = format!("{}/layers/n{count}:v1", registry.addr);
        convert(
            &format!("oci:{}:src", layout.dir.display()),
            &reference,
            "zstd-chunked",
        )?;
        references.push((count, reference));
    }
    let mut footprints = Vec::new();
    for (count, reference) in &references {
        let root = work.path().join(format!("root-{count}"));
        let target = work.path().join(format!("mnt-{count}"));
        let process = MountProcess::start(&root, reference, &target, &["--no-background-fetch"])?;
        for i in 0..*count {
            let got = std::fs::read_to_string(target.join(format!("f{i}")))?;
            ensure!(got == format!("layer {i} of {count}\n"), "f{i}: {got:?}");
        }
        let footprint = fuse_footprint(process.child.id(), &root)?;
        process.stop()?;
        footprints.push((*count, footprint));
    }
    let [(_, (threads_one, sessions_one, mounts_one)), (_, (threads_many, sessions_many, mounts_many))] =
        footprints[..]
    else {
        bail!("expected two footprints: {footprints:?}");
    };
    ensure!(
        sessions_one == 1 && sessions_many == 1,
        "one FUSE session per process, whatever the layer count: {footprints:?}"
    );
    ensure!(
        mounts_one == 2 && mounts_many == LAYERS + 1,
        "the session and a bind mount per layer: {footprints:?}"
    );
    // Slack for the async runtime's blocking pool, which grows with concurrent work; a thread
    // per layer would add 39 here, three per layer 117.
    ensure!(
        threads_many <= threads_one + 8,
        "threads grew with the layer count: {footprints:?}"
    );
    Ok(())
}

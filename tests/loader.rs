//! The loader prefetch with real parts: a real registry, kernel FUSE and overlayfs, and the host's
//! own `ls` and the libraries it links (the oracle for their bytes). Reading a program's head
//! must fetch its loader and libraries, found in other layers through the image's symlinks,
//! before anything reads them; a library an upper layer whites out must not be fetched; a file
//! with an ELF magic and junk headers must cost nothing. Every mount is torn down by a guard.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::image;
use common::lazy::{load, mount_layers, read};
use common::mounts_below;
use lazysnap::fetch::LayerFetcher;

const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";
/// What the host's `/usr/bin/ls` links (Debian 12): the loader finds each in the image.
const FOUND: [&str; 3] = ["ld-linux-x86-64.so.2", "libc.so.6", "libselinux.so.1"];
/// Chunks of 16 KiB: a program's dynamic section and strings lie in later chunks than its head
/// (as in python3's 6.8 MB with the default 4 MiB chunks), so the parse takes several fetches.
const SMALL_CHUNKS: &[&str] = &["--chunk-size", "16384"];
/// What libselinux links, which the top layer whites out.
const HIDDEN: &str = "libpcre2-8.so.0";

fn host_lib(name: &str) -> std::path::PathBuf {
    Path::new("/lib/x86_64-linux-gnu").join(name)
}

/// Three layer tars, bottom first: the loader and libraries at the bottom (reached through merged-/usr symlinks,
/// as Debian lays them out), a library in the middle, and at the top `ls`, a whiteout of the
/// middle layer's library, and a file with an ELF magic and junk after it.
fn layer_tars() -> Result<Vec<Vec<u8>>> {
    let trees = tempfile::tempdir()?;
    let (bottom, middle, top) = (
        trees.path().join("bottom"),
        trees.path().join("middle"),
        trees.path().join("top"),
    );
    std::fs::create_dir_all(bottom.join(LIB_DIR))?;
    std::fs::create_dir_all(bottom.join("usr/lib64"))?;
    std::os::unix::fs::symlink("usr/lib", bottom.join("lib"))?;
    std::os::unix::fs::symlink("usr/lib64", bottom.join("lib64"))?;
    std::os::unix::fs::symlink(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        bottom.join("usr/lib64/ld-linux-x86-64.so.2"),
    )?;
    for lib in FOUND {
        std::fs::copy(host_lib(lib), bottom.join(LIB_DIR).join(lib))?;
    }
    std::fs::create_dir_all(middle.join(LIB_DIR))?;
    std::fs::copy(host_lib(HIDDEN), middle.join(LIB_DIR).join(HIDDEN))?;
    std::fs::create_dir_all(top.join("usr/bin"))?;
    std::fs::create_dir_all(top.join(LIB_DIR))?;
    std::fs::create_dir_all(top.join("etc"))?;
    std::fs::copy("/usr/bin/ls", top.join("usr/bin/ls"))?;
    std::fs::write(top.join(LIB_DIR).join(format!(".wh.{HIDDEN}")), b"")?;
    let mut junk = b"\x7fELF\x02\x01\x01".to_vec();
    junk.extend(image::noise(8192, 7));
    std::fs::write(top.join("usr/bin/junk"), &junk)?;
    Command::new("chmod")
        .args(["755"])
        .arg(top.join("usr/bin/junk"))
        .status()?;
    std::fs::write(top.join("etc/hostname"), b"loader\n")?;
    Ok(vec![
        image::tar_dir(&bottom)?,
        image::tar_dir(&middle)?,
        image::tar_dir(&top)?,
    ])
}

/// The first `len` bytes of `path`, read in a blocking thread (the FUSE server runs on ours).
async fn head(path: std::path::PathBuf, len: usize) -> Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        std::fs::File::open(&path)?.read_exact(&mut buf)?;
        Ok(buf)
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_a_programs_head_fetches_its_loader_and_libraries_from_the_layers_below(
) -> Result<()> {
    let m = mount_layers("loader", &layer_tars()?, SMALL_CHUNKS, |_| {}).await?;
    let (mounted, target) = (&m.mount, &m.target);
    let layers: Vec<&LayerFetcher> = mounted.fetchers().collect();
    ensure!(layers.len() == 3, "three lazy layers");
    let (bottom, middle, top) = (layers[0], layers[1], layers[2]);
    ensure!(bottom.stats().bytes() == 0, "nothing fetched at mount");

    // The kernel's first read of a program at exec: its head, nothing below it.
    let ls = std::fs::read("/usr/bin/ls")?;
    assert_eq!(head(target.join("usr/bin/ls"), 4096).await?, ls[..4096]);
    // Fetched when the bottom layer's prefetch stops growing; nothing below has read a byte.
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let now = load(bottom, |s| &s.prefetch_bytes);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the loader and libraries were not fetched after the program's head was read: \
             bottom layer {now} bytes prefetched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        load(bottom, |s| &s.on_demand_bytes),
        0,
        "nothing read the bottom layer"
    );
    assert_eq!(
        middle.stats().bytes(),
        0,
        "a library the top layer whites out is not fetched"
    );
    // What the loader reads first of each object, its ELF and program headers, is cached.
    for lib in FOUND {
        let host = std::fs::read(host_lib(lib))?;
        assert_eq!(
            head(target.join(LIB_DIR).join(lib), 4096).await?,
            host[..4096]
        );
    }
    assert_eq!(
        load(bottom, |s| &s.on_demand_requests),
        0,
        "the libraries' headers were read from the cache"
    );
    for lib in FOUND {
        assert_eq!(
            read(target.join(LIB_DIR).join(lib)).await?,
            std::fs::read(host_lib(lib))?,
            "{lib} reads as the host's copy"
        );
    }

    // Junk after an ELF magic: parsed, refused, nothing else fetched; the mount serves on.
    let before = bottom.stats().bytes() + middle.stats().bytes();
    let junk = read(target.join("usr/bin/junk")).await?;
    ensure!(junk.starts_with(b"\x7fELF"), "the junk file reads back");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bottom.stats().bytes() + middle.stats().bytes(), before);
    assert_eq!(read(target.join("etc/hostname")).await?, b"loader\n");
    ensure!(top.stats().bytes() > 0, "the top layer was read");
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok(())
}

/// Off (`[fetch] loader_prefetch = false`), a program's head fetches nothing below it: the
/// control for the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_loader_prefetch_off_a_programs_head_fetches_nothing_else() -> Result<()> {
    let m = mount_layers("loader-off", &layer_tars()?, SMALL_CHUNKS, |c| {
        c.fetch.loader_prefetch = false;
    })
    .await?;
    let (mounted, target) = (&m.mount, &m.target);
    let bottom = mounted.fetchers().next().context("a lazy layer")?;
    head(target.join("usr/bin/ls"), 4096).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        bottom.stats().bytes(),
        0,
        "nothing below the program fetched"
    );
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok(())
}

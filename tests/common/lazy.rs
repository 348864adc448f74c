//! An image of given layer tars, converted to zstd:chunked, pushed to its own test registry and
//! mounted in the test's own process (so its fetchers' counters can be read), background fetch off.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;
use lazysnap::fetch::{FetchStats, LayerFetcher};
use lazysnap::mount::{self, ImageMount, MountConfig};

use super::image::{self, LayoutBuilder};
use super::registry::TestRegistry;
use super::UnmountOnDrop;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A mounted image and what it needs; fields drop in order: the mount, any mount left below the
/// work directory, the directory, the registry.
pub struct LazyMount {
    pub mount: ImageMount,
    pub target: PathBuf,
    _cleanup: UnmountOnDrop,
    pub work: tempfile::TempDir,
    _registry: TestRegistry,
}

/// Pushes the image of `tars` (bottom first) as `sample/NAME:v1`, converted with `convert_args`
/// besides the format, and mounts it with `configure` applied to the mount's config.
pub async fn mount_layers(
    name: &str,
    tars: &[Vec<u8>],
    convert_args: &[&str],
    configure: impl FnOnce(&mut MountConfig),
) -> Result<LazyMount> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let cleanup = UnmountOnDrop(work.path().to_owned());
    let layout = LayoutBuilder::new(&work.path().join("src"))?;
    let desc = layout.image(tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    let reference = format!("{}/sample/{name}:v1", registry.addr);
    image::run(
        Command::new(BIN)
            .args(["convert", "--format", "zstd-chunked"])
            .args(convert_args)
            .arg(format!("oci:{}:src", layout.dir.display()))
            .arg(&reference),
    )?;
    let target = work.path().join("mnt");
    std::fs::create_dir_all(&target)?;
    let mut config = MountConfig::new(work.path().join("root"));
    config.background_fetch = false;
    configure(&mut config);
    let mount = mount::mount_image(&reference.parse()?, &target, &config).await?;
    Ok(LazyMount {
        mount,
        target,
        _cleanup: cleanup,
        work,
        _registry: registry,
    })
}

/// A file's bytes, read in a blocking thread (the FUSE server runs on the test's runtime).
pub async fn read(path: PathBuf) -> Result<Vec<u8>> {
    Ok(tokio::task::spawn_blocking(move || std::fs::read(path)).await??)
}

/// One of a layer's fetch counters, e.g. `load(layer, |s| &s.on_demand_requests)`.
pub fn load(fetcher: &LayerFetcher, what: fn(&FetchStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    what(fetcher.stats()).load(std::sync::atomic::Ordering::Relaxed)
}

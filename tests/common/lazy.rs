//! An image of given layer tars, converted to zstd:chunked, pushed to a test registry and mounted
//! in the test's own process (so its fetchers' counters can be read), background fetch off.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use lazysnap::mount::{self, ImageMount, MountConfig};

use super::image::{self, LayoutBuilder};
use super::registry::TestRegistry;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Pushes the image of `tars` (bottom first) as `sample/NAME:v1`, converted with `convert_args`
/// besides the format, and mounts it at `work/mnt` with `configure` applied to the mount's
/// config; returns the mount and its target.
pub async fn mount_layers(
    registry: &TestRegistry,
    work: &Path,
    (name, tars, convert_args): (&str, &[Vec<u8>], &[&str]),
    configure: impl FnOnce(&mut MountConfig),
) -> Result<(ImageMount, PathBuf)> {
    let layout = LayoutBuilder::new(&work.join("src"))?;
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
    let target = work.join("mnt");
    std::fs::create_dir_all(&target)?;
    let mut config = MountConfig::new(work.join("root"));
    config.background_fetch = false;
    configure(&mut config);
    let mounted = mount::mount_image(&reference.parse()?, &target, &config).await?;
    Ok((mounted, target))
}

/// A file's bytes, read in a blocking thread (the FUSE server runs on the test's runtime).
pub async fn read(path: PathBuf) -> Result<Vec<u8>> {
    Ok(tokio::task::spawn_blocking(move || std::fs::read(path)).await??)
}

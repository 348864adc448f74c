//! The account files with real parts: a real registry, kernel FUSE and overlayfs. A layer that
//! holds `/etc/passwd` or `/etc/group` fetches them when it is mounted, before anything reads
//! them, so the runtime's reads of them (containerd's, runc's, `lazysnap run`'s) ask the registry
//! nothing; a layer without them fetches nothing; off, they are misses (the control). Every
//! mount is torn down by a guard.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use common::image;
use common::lazy::{load, mount_layers, read};
use common::mounts_below;
use lazysnap::fetch::LayerFetcher;

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP_BELOW: &[u8] = b"root:x:0:\n";
const GROUP_ABOVE: &[u8] = b"root:x:0:\napp:x:1000:\n";

/// Three layer tars, bottom first: `etc/passwd` and `etc/group` with 1 MB of noise between
/// them (beyond any read-ahead), a layer of other files, and a top layer replacing `etc/group`.
fn layer_tars() -> Result<Vec<Vec<u8>>> {
    let trees = tempfile::tempdir()?;
    let [bottom, middle, top] = ["bottom", "middle", "top"].map(|d| trees.path().join(d));
    for dir in [&bottom, &top] {
        std::fs::create_dir_all(dir.join("etc"))?;
    }
    std::fs::create_dir_all(middle.join("srv"))?;
    std::fs::write(bottom.join("etc/group"), GROUP_BELOW)?;
    std::fs::write(bottom.join("etc/mid-noise"), image::noise(1_000_000, 1))?;
    std::fs::write(bottom.join("etc/passwd"), PASSWD)?;
    std::fs::write(bottom.join("etc/zz-noise"), image::noise(1_000_000, 2))?;
    std::fs::write(middle.join("srv/data"), image::noise(300_000, 3))?;
    std::fs::write(top.join("etc/group"), GROUP_ABOVE)?;
    [bottom, middle, top]
        .iter()
        .map(|d| image::tar_dir(d))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_layers_account_files_are_fetched_before_anything_reads_them() -> Result<()> {
    let m = mount_layers("accounts", &layer_tars()?, &[], |_| {}).await?;
    let layers: Vec<&LayerFetcher> = m.mount.fetchers().collect();
    ensure!(layers.len() == 3, "three lazy layers");
    let (bottom, middle, top) = (layers[0], layers[1], layers[2]);
    // Nothing has read a byte: wait for the two layers' prefetches to come in.
    let start = Instant::now();
    while load(bottom, |s| &s.prefetch_bytes) == 0 || load(top, |s| &s.prefetch_bytes) == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the account files were not fetched at mount: bottom {} bytes, top {}",
            load(bottom, |s| &s.prefetch_bytes),
            load(top, |s| &s.prefetch_bytes)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // As a runtime reads them: through the merged tree, the top layer's group over the bottom's.
    assert_eq!(read(m.target.join("etc/passwd")).await?, PASSWD);
    assert_eq!(read(m.target.join("etc/group")).await?, GROUP_ABOVE);
    for (name, layer) in [("bottom", bottom), ("top", top)] {
        assert_eq!(
            load(layer, |s| &s.on_demand_requests),
            0,
            "the {name} layer's account files were read from the cache"
        );
    }
    // Two files and the tar headers between: not the megabyte of noise between them.
    let fetched = load(bottom, |s| &s.prefetch_bytes);
    ensure!(
        fetched < 100_000,
        "{fetched} bytes prefetched: more than the account files"
    );
    assert_eq!(
        middle.stats().bytes(),
        0,
        "a layer without account files fetches nothing"
    );
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok(())
}

/// Off (`[fetch] account_files = false`), the same reads are misses: the control for the test
/// above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_account_files_off_their_reads_are_misses() -> Result<()> {
    let m = mount_layers("accounts-off", &layer_tars()?, &[], |c| {
        c.fetch.account_files = false;
    })
    .await?;
    let layers: Vec<&LayerFetcher> = m.mount.fetchers().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        layers.iter().all(|l| l.stats().bytes() == 0),
        "nothing fetched at mount"
    );
    assert_eq!(read(m.target.join("etc/passwd")).await?, PASSWD);
    assert_eq!(read(m.target.join("etc/group")).await?, GROUP_ABOVE);
    ensure!(
        load(layers[0], |s| &s.on_demand_requests) >= 1
            && load(layers[2], |s| &s.on_demand_requests) >= 1,
        "off, reading the account files asks the registry"
    );
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok(())
}

/// Account files over the bound (`fetch::accounts::MAX_BYTES`, 1 MiB; a hostile TOC may state
/// any size) are left to their reads: nothing is fetched at mount, and they still read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn account_files_over_the_bound_are_left_to_their_reads() -> Result<()> {
    let tree = tempfile::tempdir()?;
    std::fs::create_dir_all(tree.path().join("etc"))?;
    let group = image::noise(2_000_000, 4);
    std::fs::write(tree.path().join("etc/group"), &group)?;
    std::fs::write(tree.path().join("etc/passwd"), PASSWD)?;
    let m = mount_layers(
        "accounts-large",
        &[image::tar_dir(tree.path())?],
        &[],
        |_| {},
    )
    .await?;
    let layer = m.mount.fetchers().next().expect("a lazy layer");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(layer.stats().bytes(), 0, "nothing fetched at mount");
    assert_eq!(read(m.target.join("etc/passwd")).await?, PASSWD);
    assert_eq!(read(m.target.join("etc/group")).await?, group);
    ensure!(
        load(layer, |s| &s.on_demand_requests) >= 1,
        "read on demand"
    );
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok(())
}

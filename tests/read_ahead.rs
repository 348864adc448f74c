//! Directory read-ahead with real parts: a real registry, kernel FUSE and overlayfs. Reads that
//! miss two files of one directory fetch the rest of its small files at once, so reading the
//! whole directory after that asks the registry nothing more; a directory read from once, and
//! files too large, are left to their reads; off, every file far from the last miss is a
//! request of its own (the control). Every mount is torn down by a guard.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Result};
use common::image;
use common::lazy::{mount_layers, read};
use common::mounts_below;
use lazysnap::fetch::FetchStats;

/// Files in the module directory: 60 of 20 KB of noise, 1.2 MB in all, far beyond what a
/// miss's read-ahead of neighbours takes along (256 KiB).
const MODULES: usize = 60;

const EXTENSION: &str = "lib/mods/_ext.cpython-311-x86_64-linux-gnu.so";

fn module(i: usize) -> String {
    format!("lib/mods/m{i:02}.pyc")
}

/// One layer's tar: `lib/mods/` (small modules, a shared object and one large file), then `zz/`
/// (two files).
fn layer_tar() -> Result<Vec<u8>> {
    let tree = tempfile::tempdir()?;
    std::fs::create_dir_all(tree.path().join("lib/mods"))?;
    std::fs::create_dir_all(tree.path().join("zz"))?;
    for i in 0..MODULES {
        std::fs::write(tree.path().join(module(i)), image::noise(20_000, i as u64))?;
    }
    std::fs::write(
        tree.path().join("lib/mods/zlarge.bin"),
        image::noise(600_000, 99),
    )?;
    // A shared object: the loader prefetch's business, never read ahead with its directory.
    std::fs::write(tree.path().join(EXTENSION), image::noise(50_000, 98))?;
    std::fs::write(tree.path().join("zz/a"), image::noise(30_000, 100))?;
    std::fs::write(tree.path().join("zz/b"), image::noise(30_000, 101))?;
    image::tar_dir(tree.path())
}

fn load(stats: &FetchStats, what: fn(&FetchStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    what(stats).load(Ordering::Relaxed)
}

/// Mounts the image (`directory_read_ahead` as given), reads `lib/mods/m02` and `m45`, then
/// every module, then the shared object; returns the layer's on-demand requests after the two
/// reads, after all modules and after the shared object, and its bytes fetched before that.
async fn read_modules(read_ahead: bool) -> Result<(u64, u64, u64, u64)> {
    let m = mount_layers("modules", &[layer_tar()?], &[], |c| {
        c.fetch.directory_read_ahead = read_ahead;
    })
    .await?;
    let (mounted, target) = (&m.mount, &m.target);
    let stats = mounted.fetchers().next().expect("a lazy layer").stats();

    // One file of another directory: a single miss there reads nothing ahead of it.
    assert_eq!(read(target.join("zz/a")).await?, image::noise(30_000, 100));
    for i in [2, 45] {
        assert_eq!(
            read(target.join(module(i))).await?,
            image::noise(20_000, i as u64)
        );
    }
    // The read-ahead's request is answered while the reads above return: let it finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_two = load(stats, |s| &s.on_demand_requests);
    for i in 0..MODULES {
        assert_eq!(
            read(target.join(module(i))).await?,
            image::noise(20_000, i as u64),
            "{}",
            module(i)
        );
    }
    let after_all = load(stats, |s| &s.on_demand_requests);
    let bytes = stats.bytes();
    assert_eq!(
        read(target.join(EXTENSION)).await?,
        image::noise(50_000, 98)
    );
    let after_extension = load(stats, |s| &s.on_demand_requests);
    m.mount.unmount()?;
    ensure!(mounts_below(m.work.path()).is_empty(), "no mount left");
    Ok((after_two, after_all, after_extension, bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_missed_files_of_a_directory_fetch_its_other_small_files() -> Result<()> {
    let (after_two, after_all, after_extension, bytes) = read_modules(true).await?;
    assert_eq!(after_two, 3, "zz/a, m02 and m45 each missed once");
    assert_eq!(
        after_all, after_two,
        "every other module came with the directory's read-ahead"
    );
    // The modules (1.2 MB of noise), zz/a and what rode along with it; not the large file.
    ensure!(
        bytes < 1_200_000 + 400_000,
        "{bytes} bytes fetched: more than the small files and the read-ahead of three misses"
    );
    assert_eq!(
        after_extension,
        after_all + 1,
        "the shared object did not ride along with its directory"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_directory_read_ahead_far_modules_are_requests_of_their_own() -> Result<()> {
    let (after_two, after_all, _, _) = read_modules(false).await?;
    assert_eq!(after_two, 3);
    ensure!(
        after_all > after_two + 2,
        "off, reading every module needs more requests ({after_all} after {after_two})"
    );
    Ok(())
}

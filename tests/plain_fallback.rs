//! A layer the lazy format cannot hold stays plain: `lazysnap convert` keeps its stored blob (same
//! digest, so the manifest still verifies it), converts the other layers, and says which layer and
//! why; the mounted image is then the same tree as `umoci unpack` of the source, byte names
//! included, and a container that `lazysnap run` starts sees the same bytes. Here the layer holds
//! file names and symlink targets that are not UTF-8 (Latin-1), which a JSON TOC cannot carry.
//! Every mount, container and process is torn down by a guard.

mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::image::{self, fixture, LayoutBuilder};
use common::mount_process::ensure_mount_equals;
use common::registry::TestRegistry;
use common::run_root::Root;
use common::tree;
use common::UnmountOnDrop;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A source layout tagged `src`: an ordinary layer, then one with Latin-1 names. Returns the
/// layout and the source manifest's layer digests.
fn latin1_layout(dir: &Path) -> Result<(LayoutBuilder, Vec<String>)> {
    let trees = tempfile::tempdir()?;
    let (a, b) = (trees.path().join("a"), trees.path().join("b"));
    image::sample_tree(&a, 3)?;
    image::latin1_tree(&b)?;
    let layout = LayoutBuilder::new(dir)?;
    let desc = layout.image(&[image::tar_dir(&a)?, image::tar_dir(&b)?], "amd64")?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(
        layout.blob_path(desc["digest"].as_str().context("digest")?),
    )?)?;
    let digests = manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .map(|l| l["digest"].as_str().unwrap_or_default().to_owned())
        .collect();
    layout.tags(&[("src", desc)])?;
    Ok((layout, digests))
}

#[test]
fn a_layer_with_names_a_toc_cannot_hold_stays_plain_and_mounts_as_umoci_unpacks_it() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = UnmountOnDrop(work.path().to_owned());
    let (layout, source_digests) = latin1_layout(&work.path().join("src"))?;

    // The oracle: umoci's own unpack of the source image.
    let rootfs = image::umoci_unpack(&layout.dir, "src", &work.path().join("bundle"))?;
    let mut want = tree::snapshot(&rootfs)?;
    // umoci 0.4.7 drops an extended attribute whose value is empty (see tests/mount.rs).
    for name in ["etc/hostname", "etc/hostname.hard"] {
        want.get_mut(name)
            .with_context(|| format!("the oracle has {name}"))?
            .xattrs
            .entry("user.empty".into())
            .or_default();
    }
    ensure!(
        want.contains_key(r"caf\xe9.txt")
            && want.contains_key(r"d\xff/inner\xe9")
            && want.get(r"d\xff/up").and_then(|n| n.link.as_deref()) == Some(r"../../\xfe/\xe9"),
        "the oracle keeps the byte names: {:?}",
        want.keys().collect::<Vec<_>>()
    );

    // `--startup-elf` decompresses and indexes every layer before converting any: the layer is
    // found unrepresentable on that path.
    for (format, extra) in [
        ("zstd-chunked", None),
        ("estargz", None),
        ("zstd-chunked", Some("--startup-elf")),
    ] {
        let name = format!("{format}{}", extra.unwrap_or_default());
        let reference = format!("{}/latin1/{}:v1", registry.addr, name.replace("--", "-"));
        let out = Command::new(BIN)
            .args(["convert", "--format", format, "--chunk-size", "65536"])
            .args(extra)
            .arg(format!("oci:{}:src", layout.dir.display()))
            .arg(&reference)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "{format}: convert failed: {stderr}");
        // It says which layer stayed plain, and why.
        let said = format!("layer 2/2 {}: kept plain", source_digests[1]);
        ensure!(
            stderr.contains(&said) && stderr.contains("not valid UTF-8"),
            "{format}: convert should say {said:?} and why: {stderr}"
        );
        ensure!(
            stderr.matches("kept plain").count() == 1,
            "{format}: only the Latin-1 layer is kept plain: {stderr}"
        );

        let info: Value = serde_json::from_slice(&image::run(
            Command::new(BIN).args(["inspect", "--json", &reference]),
        )?)?;
        let layers = info["layers"].as_array().context("layers")?;
        ensure!(layers.len() == 2, "{format}: {info}");
        let want_format = if format == "estargz" {
            "estargz"
        } else {
            "zstd:chunked"
        };
        ensure!(
            layers[0]["format"] == want_format && layers[0]["toc_verified"] == true,
            "{format}: the ordinary layer is lazy: {}",
            layers[0]
        );
        ensure!(
            layers[1]["digest"] == source_digests[1].as_str() && layers[1]["format"].is_null(),
            "{format}: the Latin-1 layer is the source's blob, plain: {}",
            layers[1]
        );
        ensure!(
            layers[1]["media_type"] == "application/vnd.oci.image.layer.v1.tar+gzip",
            "{format}: {}",
            layers[1]
        );
        // Its diff_id is the source's (the config names the tar the kept blob decodes to).
        let tar = image::decompress(&std::fs::read(layout.blob_path(&source_digests[1]))?)?;
        ensure!(
            layers[1]["diff_id"] == image::digest_of(&tar).as_str(),
            "{format}: diff_id {}",
            layers[1]["diff_id"]
        );

        let root = work.path().join(format!("root-{name}"));
        let target = work.path().join(format!("mnt-{name}"));
        ensure_mount_equals(&root, &reference, &target, &want)?;
    }
    Ok(())
}

/// A shell command that prints, as bytes, the sorted names below `dir`, two files' contents and
/// two symlink targets of [`image::latin1_tree`]: run by the container's busybox and by the host
/// on `umoci unpack`'s tree, the outputs must be equal.
fn byte_listing(dir: &str) -> String {
    format!("cd {dir} && find . | LC_ALL=C sort && cat caf*.txt d*/inner* && readlink link* && readlink d*/up")
}

/// The uncompressed tar of the only layer of the OCI layout image `layout` (`DIR:TAG`).
fn only_layer(layout: &str) -> Result<Vec<u8>> {
    let (dir, tag) = layout.rsplit_once(':').context("layout:tag")?;
    let blob = |digest: &str| -> Result<Vec<u8>> {
        let hex = digest.trim_start_matches("sha256:");
        Ok(std::fs::read(
            Path::new(dir).join("blobs/sha256").join(hex),
        )?)
    };
    let index: Value = serde_json::from_slice(&std::fs::read(Path::new(dir).join("index.json"))?)?;
    let manifest = index["manifests"]
        .as_array()
        .context("manifests")?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .context("the tag")?;
    let manifest: Value =
        serde_json::from_slice(&blob(manifest["digest"].as_str().context("digest")?)?)?;
    let layers = manifest["layers"].as_array().context("layers")?;
    ensure!(layers.len() == 1, "one layer: {manifest}");
    image::decompress(&blob(layers[0]["digest"].as_str().context("digest")?)?)
}

#[test]
fn lazysnap_run_sees_the_byte_names_of_a_layer_kept_plain() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let busybox = fixture(
        "busybox-image.sh",
        &[work.path().join("bb").to_str().context("path")?, "v1"],
    )?;
    let extra = work.path().join("extra");
    image::latin1_tree(&extra.join("latin1"))?;
    let layout = LayoutBuilder::new(&work.path().join("src"))?;
    let desc = layout.image(&[only_layer(&busybox)?, image::tar_dir(&extra)?], "amd64")?;
    layout.tags(&[("src", desc)])?;

    // The oracle: the host's tools on umoci's unpack of the source.
    let rootfs =
        image::umoci_unpack(&layout.dir, "src", &work.path().join("bundle"))?.join("latin1");
    let want = image::run(
        Command::new("sh").args(["-c", &byte_listing(rootfs.to_str().context("path")?)]),
    )?;
    ensure!(
        want.windows(4).any(|w| w == b"caf\xe9") && want.ends_with(b"../../\xfe/\xe9\n"),
        "the oracle prints the byte names: {}",
        want.escape_ascii()
    );

    let reference = format!("{}/latin1/run:v1", registry.addr);
    let out = Command::new(BIN)
        .args([
            "convert",
            &format!("oci:{}:src", layout.dir.display()),
            &reference,
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.contains("layer 2/2") && stderr.contains("kept plain"),
        "convert: {stderr}"
    );

    let root = Root::new()?;
    let out = root.run(&[&reference, "--", "sh", "-c", &byte_listing("/latin1")])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.stdout == want,
        "the container printed\n{}\nwant\n{}",
        out.stdout.escape_ascii(),
        want.escape_ascii()
    );
    root.assert_clean()?;
    Ok(())
}

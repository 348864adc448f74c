//! The build path end to end: `lazysnap convert` from an OCI layout, a docker archive or a real
//! registry, into a layout or a real `docker-registry`, checked with independent tools.

mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use common::image::{self, LayoutBuilder};
use common::registry::TestRegistry;
use lazysnap::convert::{self, ConvertOptions, ImageLocation};
use lazysnap::format::LayerFormat;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Runs `lazysnap ARGS`; returns (success, stdout, stderr).
fn lazysnap(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run lazysnap");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A two-layer source layout (a sample tree, then whiteouts and an opaque dir) tagged `src`.
fn source_layout(dir: &Path) -> Result<(LayoutBuilder, Vec<Vec<u8>>)> {
    let trees = tempfile::tempdir()?;
    let (a, b) = (trees.path().join("a"), trees.path().join("b"));
    image::sample_tree(&a, 1)?;
    image::whiteout_tree(&b)?;
    let tars = vec![image::tar_dir(&a)?, image::tar_dir(&b)?];
    let layout = LayoutBuilder::new(dir)?;
    let desc = layout.image(&tars, "amd64")?;
    layout.tags(&[("src", desc)])?;
    Ok((layout, tars))
}

fn read_json(path: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(
        &std::fs::read(path).with_context(|| path.display().to_string())?,
    )?)
}

fn check_layout_conversion(
    format: &str,
    media_type: &str,
    toc_annotation: &str,
    extra_entry: Option<&str>,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, tars) = source_layout(&tmp.path().join("src"))?;
    let dst = tmp.path().join("dst");
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        "--format",
        format,
        "--chunk-size",
        "65536",
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:lazy", dst.display()),
    ]);
    assert!(ok, "convert failed: {stderr}");
    let digest = stdout.lines().last().context("no output")?.to_owned();

    // index.json names the manifest the command printed.
    let index = read_json(&dst.join("index.json"))?;
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], digest.as_str());
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "lazy"
    );
    let blob = |d: &Value| -> Result<Vec<u8>> {
        let hex = d
            .as_str()
            .context("digest")?
            .trim_start_matches("sha256:")
            .to_owned();
        let bytes = std::fs::read(dst.join("blobs/sha256").join(&hex))?;
        assert_eq!(image::sha256_hex(&bytes), hex, "blob named by its digest");
        Ok(bytes)
    };
    let manifest: Value = serde_json::from_slice(&blob(&entry["digest"])?)?;
    let config: Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])?)?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 2);
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(layer["mediaType"], media_type);
        assert!(
            layer["annotations"][toc_annotation].is_string(),
            "layer {i} lacks {toc_annotation}: {layer}"
        );
        // An independent decompressor reads it as a plain layer with the same entries.
        let tar = image::decompress(&blob(&layer["digest"])?)?;
        let mut want = image::tar_listing(&tars[i])?;
        let mut got = image::tar_listing(&tar)?;
        if let Some(extra) = extra_entry {
            let before = got.len();
            got.retain(|l| !l.ends_with(extra));
            assert_eq!(before, got.len() + 1, "exactly one {extra} entry");
        }
        want.sort();
        got.sort();
        assert_eq!(got, want, "layer {i} lists the source's entries");
        // diff_ids are what sha256sum says the uncompressed tar is.
        let sum = image::pipe(&mut Command::new("sha256sum"), &tar)?;
        let sum = String::from_utf8(sum)?;
        assert_eq!(
            config["rootfs"]["diff_ids"][i],
            format!("sha256:{}", &sum[..64])
        );
    }
    // Every other config field is kept.
    assert_eq!(config["config"]["Env"][1], "LAZYSNAP_TEST=1");
    assert_eq!(config["config"]["WorkingDir"], "/srv");
    assert_eq!(config["history"].as_array().map(Vec::len), Some(2));
    assert_eq!(config["created"], "2024-01-02T03:04:05Z");
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.title"],
        "lazysnap test"
    );

    // Reproducible: a second conversion gives the same manifest digest.
    let (ok, again, stderr) = lazysnap(&[
        "convert",
        "--format",
        format,
        "--chunk-size",
        "65536",
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:again", dst.display()),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(again.lines().last(), Some(digest.as_str()));

    // And inspect verifies each TOC by range reads from the layout.
    let (ok, json, stderr) =
        lazysnap(&["inspect", "--json", &format!("oci:{}:lazy", dst.display())]);
    assert!(ok, "{stderr}");
    let info: Value = serde_json::from_str(&json)?;
    for layer in info["layers"].as_array().context("layers")? {
        assert_eq!(layer["toc_verified"], true, "{layer}");
        assert!(layer["entries"].as_u64().unwrap_or(0) >= 3, "{layer}");
    }
    Ok(())
}

#[test]
fn layout_to_zstd_chunked_layout_keeps_entries_diff_ids_and_config() -> Result<()> {
    check_layout_conversion(
        "zstd-chunked",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "io.github.containers.zstd-chunked.manifest-checksum",
        None,
    )
}

#[test]
fn layout_to_estargz_layout_keeps_entries_diff_ids_and_config() -> Result<()> {
    check_layout_conversion(
        "estargz",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "containerd.io/snapshot/stargz/toc.digest",
        Some("stargz.index.json"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_push_is_reproducible_and_a_second_push_uploads_nothing() -> Result<()> {
    let registry = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let (src, _) = source_layout(&tmp.path().join("src"))?;
    let source: ImageLocation = format!("oci:{}:src", src.dir.display()).parse()?;
    let dest: ImageLocation = format!("{}/lazy/app:v1", registry.addr).parse()?;
    let options = ConvertOptions::new(LayerFormat::ZstdChunked);

    let first = convert::convert(&source, &dest, &options).await?;
    assert!(
        first.layers.iter().all(|l| l.outcome == "uploaded"),
        "{:?}",
        first.layers
    );
    let second = convert::convert(&source, &dest, &options).await?;
    assert_eq!(second.manifest_digest, first.manifest_digest);
    assert!(
        second.layers.iter().all(|l| l.outcome == "existed"),
        "{:?}",
        second.layers
    );

    // The registry serves what was pushed, and inspect verifies each TOC with range requests.
    let (ok, json, stderr) = lazysnap(&[
        "inspect",
        "--json",
        &format!("{}/lazy/app:v1", registry.addr),
    ]);
    assert!(ok, "{stderr}");
    let info: Value = serde_json::from_str(&json)?;
    assert_eq!(info["manifest_digest"], first.manifest_digest.to_string());
    assert!(
        info["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .all(|l| l["toc_verified"] == true),
        "{info}"
    );

    // Registry to registry (same registry, another repository) converts the lazy image again
    // as a pass-through: every layer is already zstd:chunked.
    let (ok, stdout, stderr) = lazysnap(&[
        "convert",
        &format!("{}/lazy/app:v1", registry.addr),
        &format!("{}/copy/app:v1", registry.addr),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some(first.manifest_digest.to_string().as_str())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_platform_source_resolves_to_the_requested_platform() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let trees = tempfile::tempdir()?;
    let layout = LayoutBuilder::new(&tmp.path().join("src"))?;
    let mut manifests = Vec::new();
    for (arch, seed) in [("amd64", 1), ("arm64", 2)] {
        let root = trees.path().join(arch);
        image::sample_tree(&root, seed)?;
        manifests.push(layout.image(&[image::tar_dir(&root)?], arch)?);
    }
    let index = layout.index(&manifests)?;
    layout.tags(&[("multi", index)])?;
    let dst = tmp.path().join("dst");
    for arch in ["amd64", "arm64"] {
        let (ok, _, stderr) = lazysnap(&[
            "convert",
            "--platform",
            &format!("linux/{arch}"),
            &format!("oci:{}:multi", layout.dir.display()),
            &format!("oci:{}:{arch}", dst.display()),
        ]);
        assert!(ok, "{stderr}");
        let (ok, json, stderr) = lazysnap(&[
            "inspect",
            "--json",
            &format!("oci:{}:{arch}", dst.display()),
        ]);
        assert!(ok, "{stderr}");
        let info: Value = serde_json::from_str(&json)?;
        assert_eq!(info["platform"], format!("linux/{arch}"));
    }
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        "--platform",
        "linux/s390x",
        &format!("oci:{}:multi", layout.dir.display()),
        &format!("oci:{}:x", dst.display()),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("linux/arm64"),
        "the error lists what the index offers: {stderr}"
    );
    Ok(())
}

#[test]
fn a_docker_archive_converts() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("tree");
    image::sample_tree(&root, 3)?;
    let tar = image::tar_dir(&root)?;
    let archive = tmp.path().join("image.tar");
    image::docker_archive(&archive, std::slice::from_ref(&tar), None)?;
    let dst = tmp.path().join("dst");
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        &format!("docker-archive:{}", archive.display()),
        &format!("oci:{}:t", dst.display()),
    ]);
    assert!(ok, "{stderr}");
    let (ok, json, stderr) = lazysnap(&["inspect", "--json", &format!("oci:{}:t", dst.display())]);
    assert!(ok, "{stderr}");
    let info: Value = serde_json::from_str(&json)?;
    assert_eq!(info["layers"][0]["format"], "zstd:chunked");
    assert_eq!(info["layers"][0]["toc_verified"], true);

    // A docker archive whose layer is not the tar its config names is refused: here the tar
    // differs only in its end-of-archive padding, which a tar reader alone would never notice.
    let mut other = tar.clone();
    let last = other.len() - 1;
    other[last] ^= 1;
    let bad = tmp.path().join("bad.tar");
    image::docker_archive(&bad, &[other], Some(vec![image::digest_of(&tar)]))?;
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        &format!("docker-archive:{}", bad.display()),
        &format!("oci:{}:bad", dst.display()),
    ]);
    assert!(
        !ok,
        "a layer that does not match its diff_id must be refused"
    );
    assert!(stderr.contains("diff_id"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_source_blob_fails_and_no_manifest_is_pushed() -> Result<()> {
    let registry = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let (src, _) = source_layout(&tmp.path().join("src"))?;
    let manifest = read_json(
        &src.blob_path(
            read_json(&src.dir.join("index.json"))?["manifests"][0]["digest"]
                .as_str()
                .context("digest")?,
        ),
    )?;
    let layer = manifest["layers"][1]["digest"]
        .as_str()
        .context("layer")?
        .to_owned();
    let path = src.blob_path(&layer);
    let mut bytes = std::fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes)?;

    let dest = format!("{}/lazy/corrupt:v1", registry.addr);
    let (ok, stdout, stderr) =
        lazysnap(&["convert", &format!("oci:{}:src", src.dir.display()), &dest]);
    assert!(!ok, "conversion of a corrupt blob must fail: {stdout}");
    assert!(
        stderr.contains(&layer[..19]) || stderr.contains("digest"),
        "the error names the blob: {stderr}"
    );
    // Nothing names a half-written image.
    let (ok, _, stderr) = lazysnap(&["inspect", &dest]);
    assert!(!ok);
    assert!(
        stderr.contains("MANIFEST_UNKNOWN") || stderr.contains("unknown"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn hostile_entries_are_rejected_naming_the_entry() -> Result<()> {
    let cases = [
        (
            "add('etc/ok', b'fine')\nadd('../escape', b'x')",
            "../escape",
        ),
        ("add('/etc/absolute', b'x')", "/etc/absolute"),
        (
            "add('etc/ok', b'fine')\nadd('etc/hl', kind=tarfile.LNKTYPE, link='../../outside')",
            "etc/hl",
        ),
    ];
    for (i, (body, entry)) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir()?;
        let layout = LayoutBuilder::new(&tmp.path().join("src"))?;
        let desc = layout.image(&[image::python_tar(body)?], "amd64")?;
        layout.tags(&[("src", desc)])?;
        let dst = tmp.path().join("dst");
        let (ok, _, stderr) = lazysnap(&[
            "convert",
            &format!("oci:{}:src", layout.dir.display()),
            &format!("oci:{}:t", dst.display()),
        ]);
        assert!(!ok, "case {i} must fail");
        assert!(
            stderr.contains(entry),
            "case {i}: the error names {entry:?}: {stderr}"
        );
        // Nothing was tagged.
        let tagged = std::fs::read(dst.join("index.json"))
            .map(|b| String::from_utf8_lossy(&b).contains("\"t\""))
            .unwrap_or(false);
        assert!(!tagged, "case {i}: a failed conversion tags nothing");
    }
    Ok(())
}

#[test]
fn a_truncated_source_layer_is_an_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("tree");
    image::sample_tree(&root, 4)?;
    let tar = image::tar_dir(&root)?;
    let truncated = tar[..tar.len() / 2].to_vec();
    let archive = tmp.path().join("image.tar");
    image::docker_archive(&archive, &[truncated], None)?;
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        &format!("docker-archive:{}", archive.display()),
        &format!("oci:{}:t", tmp.path().join("dst").display()),
    ]);
    assert!(!ok);
    assert!(
        stderr.to_lowercase().contains("truncat") || stderr.contains("end of"),
        "{stderr}"
    );
    Ok(())
}

/// Unmounts a test mount when dropped, so a failing test leaves nothing mounted.
struct MountGuard(std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_tags_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, _) = source_layout(&tmp.path().join("src"))?;
    let small = tmp.path().join("small");
    std::fs::create_dir(&small)?;
    image::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=32k", "lazysnap-test"])
            .arg(&small),
    )?;
    let _guard = MountGuard(small.clone());
    let (ok, _, stderr) = lazysnap(&[
        "convert",
        &format!("oci:{}:src", src.dir.display()),
        &format!("oci:{}:t", small.join("dst").display()),
    ]);
    assert!(!ok, "a conversion that cannot fit must fail");
    assert!(stderr.contains("disk is full"), "{stderr}");
    let index = std::fs::read_to_string(small.join("dst/index.json")).unwrap_or_default();
    assert!(!index.contains("\"t\""), "nothing is tagged: {index}");
    Ok(())
}

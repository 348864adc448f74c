//! Layers written by other tools load here: an eStargz image converted by `ctr-remote` (Debian's
//! stargz-snapshotter, driving a real containerd) and a zstd:chunked image pushed by Debian's
//! skopeo. Every file is read back the way the lazy mount will read it (a footer range, the TOC,
//! then one range per chunk, each verified) and compared with the plain layer unpacked by GNU tar.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use common::image::{self, fixture};
use common::registry::TestRegistry;
use lazysnap::format::{self, EntryKind, LayerFormat};
use lazysnap::oci::{self, ImageDocument, Reference};
use lazysnap::registry::{Client, ClientConfig};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// The layer descriptors and config of `reference`'s manifest.
async fn layers(
    client: &Client,
    reference: &Reference,
) -> Result<Vec<(String, oci::Digest, u64, BTreeMap<String, String>)>> {
    let fetched = client.get_manifest(reference).await?;
    let ImageDocument::Manifest(_) =
        oci::parse_document(fetched.media_type.as_deref(), &fetched.bytes)?
    else {
        bail!("{reference} is not a manifest");
    };
    let manifest: Value = serde_json::from_slice(&fetched.bytes)?;
    let mut out = Vec::new();
    for l in manifest["layers"].as_array().context("layers")? {
        let annotations = l["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            l["mediaType"].as_str().unwrap_or_default().to_owned(),
            l["digest"].as_str().context("digest")?.parse()?,
            l["size"].as_u64().context("size")?,
            annotations,
        ));
    }
    Ok(out)
}

/// Reads every entry of each lazy layer of `reference` by range requests and compares it with
/// the plain image's layers unpacked into `oracle` (one directory per layer).
async fn check_against_oracle(
    client: &Client,
    reference: &Reference,
    expect: LayerFormat,
    oracle: &[std::path::PathBuf],
) -> Result<()> {
    let lazy_layers = layers(client, reference).await?;
    ensure!(
        lazy_layers.len() == oracle.len(),
        "{reference}: {} layers, oracle has {}",
        lazy_layers.len(),
        oracle.len()
    );
    for ((media_type, digest, size, annotations), root) in lazy_layers.iter().zip(oracle) {
        let lazy = format::detect(media_type, annotations)
            .with_context(|| format!("layer {digest} is not detected as lazy: {annotations:?}"))?;
        ensure!(
            lazy.format == expect,
            "layer {digest}: detected {:?}",
            lazy.format
        );
        let position = match lazy.toc_position {
            Some(p) => p,
            None => {
                let tail_len = format::tail_len(lazy.format).min(*size);
                let tail = client
                    .get_blob_range(reference, digest, size - tail_len..*size)
                    .await?;
                format::parse_tail(lazy.format, &tail, *size)?
            }
        };
        let raw = client
            .get_blob_range(
                reference,
                digest,
                position.offset..position.offset + position.compressed_len,
            )
            .await?;
        let toc = format::parse_toc(&lazy, position, &raw)?;
        let mut files = 0;
        for entry in &toc.entries {
            if entry.name == "stargz.index.json" || entry.name.ends_with(".prefetch.landmark") {
                continue;
            }
            let path = root.join(&entry.name);
            let meta = std::fs::symlink_metadata(&path).with_context(|| {
                format!("{}: in the TOC, not in the unpacked layer", entry.name)
            })?;
            match entry.kind {
                EntryKind::Reg => {
                    let mut content = Vec::with_capacity(entry.size as usize);
                    for chunk in &entry.chunks {
                        let compressed = client
                            .get_blob_range(
                                reference,
                                digest,
                                chunk.compressed_start..chunk.compressed_end,
                            )
                            .await?;
                        content.extend(format::decode_chunk(lazy.format, chunk, &compressed)?);
                    }
                    let want = std::fs::read(&path)?;
                    ensure!(
                        content == want,
                        "{}: content differs from the unpacked layer",
                        entry.name
                    );
                    ensure!(
                        meta.permissions().mode() & 0o7777 == entry.mode & 0o7777,
                        "{}: mode {:o} vs {:o}",
                        entry.name,
                        entry.mode,
                        meta.permissions().mode()
                    );
                    files += 1;
                }
                EntryKind::Symlink => {
                    ensure!(
                        std::fs::read_link(&path)?.to_string_lossy() == entry.link_name,
                        "{}: symlink target",
                        entry.name
                    );
                }
                EntryKind::Dir => ensure!(meta.is_dir(), "{}: not a dir", entry.name),
                _ => {}
            }
        }
        ensure!(files > 0, "layer {digest}: no regular file was read");
        eprintln!(
            "{reference} layer {}: {} TOC entries, {files} files read by range and verified",
            digest.short(),
            toc.entries.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_estargz_and_zstd_chunked_images_read_by_range_match_the_plain_layers(
) -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let layout = fixture(
        "busybox-image.sh",
        &[work.path().join("bb").to_str().context("path")?, "v1"],
    )?;
    let plain = format!("{}/bb/plain:v1", registry.addr);
    fixture("push-layout.sh", &[&layout, &plain])?;
    let estargz = fixture(
        "estargz-image.sh",
        &[&registry.addr, "bb/plain:v1", "bb/estargz:v1"],
    )?;
    let zstd = fixture(
        "zstdchunked-image.sh",
        &[&registry.addr, "bb/plain:v1", "bb/zstd:v1"],
    )?;

    // The oracle: the plain image's layers, unpacked by GNU tar.
    let client = Client::new(ClientConfig::default())?;
    let plain_ref: Reference = plain.parse()?;
    let mut oracle = Vec::new();
    for (i, (_, digest, _, _)) in layers(&client, &plain_ref).await?.iter().enumerate() {
        let root = work.path().join(format!("oracle-{i}"));
        std::fs::create_dir_all(&root)?;
        let tar = image::decompress(&client.get_blob(&plain_ref, digest).await?)?;
        image::pipe(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .args(["--numeric-owner", "-xf", "-"]),
            &tar,
        )?;
        oracle.push(root);
    }

    for (reference, format, name) in [
        (&estargz, LayerFormat::Estargz, "estargz"),
        (&zstd, LayerFormat::ZstdChunked, "zstd:chunked"),
    ] {
        let reference: Reference = reference.parse()?;
        check_against_oracle(&client, &reference, format, &oracle)
            .await
            .with_context(|| format!("{name} image {reference}"))?;
        // inspect agrees, and verifies every TOC.
        let out = Command::new(BIN)
            .args(["inspect", "--json", &reference.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "inspect {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: Value = serde_json::from_slice(&out.stdout)?;
        for layer in info["layers"].as_array().context("layers")? {
            ensure!(
                layer["format"] == name && layer["toc_verified"] == true,
                "{layer}"
            );
        }
    }

    // Third-party lazy images convert too: eStargz into zstd:chunked, and zstd:chunked into
    // zstd:chunked as a pass-through that keeps skopeo's layer as it is.
    for (src, dst) in [(&estargz, "bb/from-estargz:v1"), (&zstd, "bb/from-zstd:v1")] {
        let dst = format!("{}/{dst}", registry.addr);
        let out = Command::new(BIN).args(["convert", src, &dst]).output()?;
        ensure!(
            out.status.success(),
            "convert {src}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(BIN)
            .args(["inspect", "--json", &dst])
            .output()?;
        ensure!(
            out.status.success(),
            "inspect {dst}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let zstd_ref: Reference = zstd.parse()?;
    let passthrough: Reference = format!("{}/bb/from-zstd:v1", registry.addr).parse()?;
    let digests = |l: Vec<(String, oci::Digest, u64, BTreeMap<String, String>)>| {
        l.into_iter().map(|l| l.1).collect::<Vec<_>>()
    };
    assert_eq!(
        digests(layers(&client, &passthrough).await?),
        digests(layers(&client, &zstd_ref).await?)
    );
    Ok(())
}

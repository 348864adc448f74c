//! Start-up profiles in a real registry (Debian's docker-registry 2.8 on 127.0.0.1, which has no
//! referrers API, so the referrers tag schema is what stores them), and behind a proxy that adds
//! the referrers API to it (tests/common/referrers.rs); recording on a real image with real FUSE,
//! overlayfs and runc; `lazysnap profile show`.

mod common;
#[path = "common/delayproxy.rs"]
mod delayproxy;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::referrers::ReferrersProxy;
use common::registry::TestRegistry;
use delayproxy::DelayProxy;
use lazysnap::oci::{Digest, Reference, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};
use lazysnap::profile::store::{self, StoreError};
use lazysnap::profile::{Access, LayerProfile, Profile, MAX_BYTES, MEDIA_TYPE};
use lazysnap::registry::{Client, ClientConfig};
use serde_json::{json, Value};

fn client(registry: &TestRegistry) -> Client {
    Client::new(ClientConfig {
        docker_config_dir: Some(registry.dir.path().join("no-docker-config")),
        ..Default::default()
    })
    .expect("client")
}

const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// Pushes a one-layer image (`seed` makes it distinct) as `reference`; returns its manifest digest.
async fn push_image(client: &Client, reference: &Reference, seed: u8) -> Result<Digest> {
    let layer = vec![seed; 1000];
    let layer_digest = Digest::of(&layer);
    client
        .push_blob_bytes(reference, &layer_digest, Bytes::from(layer.clone()))
        .await?;
    client
        .push_blob_bytes(reference, &Digest::of(CONFIG), Bytes::from_static(CONFIG))
        .await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of(CONFIG).to_string(), "size": CONFIG.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest.to_string(), "size": layer.len()}],
    });
    Ok(client
        .push_manifest(
            reference,
            MEDIA_TYPE_OCI_MANIFEST,
            Bytes::from(serde_json::to_vec(&manifest)?),
        )
        .await?)
}

/// A profile of `image` with `n` accesses in one layer.
fn profile_of(image: Digest, n: usize) -> Profile {
    Profile {
        version: 1,
        image,
        command: vec!["/bin/sh".into(), "-c".into(), format!("echo {n}")],
        layers: vec![LayerProfile {
            digest: Digest::of(b"layer"),
            diff_id: None,
            accesses: (0..n)
                .map(|i| Access {
                    name: format!("usr/lib/file{i}"),
                    offset: 0,
                    chunk: Digest::of(format!("chunk {i}").as_bytes()),
                    at_ms: i as u64,
                })
                .collect(),
        }],
    }
}

/// `reference`'s repository at `tag`.
fn at_tag(reference: &Reference, tag: &str) -> Reference {
    Reference {
        tag: Some(tag.to_owned()),
        digest: None,
        ..reference.clone()
    }
}

/// The referrers tag index of `subject`, as the registry holds it (None: no tag).
async fn tag_index(client: &Client, reference: &Reference, subject: &Digest) -> Option<Value> {
    let tag = at_tag(reference, &format!("sha256-{}", subject.hex()));
    let fetched = client.get_manifest(&tag).await.ok()?;
    assert_eq!(fetched.media_type.as_deref(), Some(MEDIA_TYPE_OCI_INDEX));
    Some(serde_json::from_slice(&fetched.bytes).expect("index JSON"))
}

/// Pushes, by hand, an artifact manifest with `subject` whose one layer is `blob` (of
/// `layer_type`); returns its descriptor for a referrers index.
async fn push_artifact_by_hand(
    client: &Client,
    reference: &Reference,
    subject: &Digest,
    artifact_type: &str,
    layer_type: &str,
    blob: Vec<u8>,
) -> Result<Value> {
    let blob_digest = Digest::of(&blob);
    let blob_len = blob.len();
    client
        .push_blob_bytes(reference, &blob_digest, Bytes::from(blob))
        .await?;
    client
        .push_blob_bytes(reference, &Digest::of(b"{}"), Bytes::from_static(b"{}"))
        .await?;
    let subject_manifest = client
        .get_manifest(&reference.with_digest(*subject))
        .await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::of(b"{}").to_string(), "size": 2},
        "layers": [{"mediaType": layer_type, "digest": blob_digest.to_string(), "size": blob_len}],
        "subject": {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": subject.to_string(), "size": subject_manifest.bytes.len()},
        "annotations": {"org.opencontainers.image.created": "2030-01-01T00:00:00Z"},
    });
    let bytes = serde_json::to_vec(&manifest)?;
    let digest = Digest::of(&bytes);
    let by_digest = Reference {
        tag: None,
        ..reference.with_digest(digest)
    };
    client
        .push_manifest(
            &by_digest,
            MEDIA_TYPE_OCI_MANIFEST,
            Bytes::from(bytes.clone()),
        )
        .await?;
    Ok(json!({
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "digest": digest.to_string(),
        "size": bytes.len(),
        "artifactType": artifact_type,
        "annotations": {"org.opencontainers.image.created": "2030-01-01T00:00:00Z"},
    }))
}

/// Writes the referrers tag index of `subject` by hand.
async fn write_tag_index(
    client: &Client,
    reference: &Reference,
    subject: &Digest,
    manifests: Vec<Value>,
) -> Result<()> {
    let index =
        json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": manifests});
    client
        .push_manifest(
            &at_tag(reference, &format!("sha256-{}", subject.hex())),
            MEDIA_TYPE_OCI_INDEX,
            Bytes::from(serde_json::to_vec(&index)?),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_profile_round_trips_through_the_referrers_tag() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let image = push_image(&client, &reference, 1).await?;
    assert!(store::find(&client, &reference, &image).await?.is_none());

    let profile = profile_of(image, 3);
    let artifact = store::push(&client, &reference, &profile).await?;

    // docker-registry 2.8 has no referrers API: the tag holds an index naming the artifact.
    let index = tag_index(&client, &reference, &image)
        .await
        .context("no referrers tag")?;
    let entries = index["manifests"].as_array().context("manifests")?;
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["digest"], artifact.to_string());
    assert_eq!(entries[0]["artifactType"], MEDIA_TYPE);
    // The artifact manifest has the referrers layout and the image as subject.
    let manifest = client
        .get_manifest(&reference.with_digest(artifact))
        .await?;
    let m: Value = serde_json::from_slice(&manifest.bytes)?;
    assert_eq!(m["artifactType"], MEDIA_TYPE);
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(m["subject"]["digest"], image.to_string());
    assert_eq!(m["layers"].as_array().map(Vec::len), Some(1));
    // The image is untouched: same digest by tag.
    let by_tag = client.get_manifest(&reference).await?;
    assert_eq!(by_tag.digest, image);

    let found = store::find(&client, &reference, &image).await?;
    assert_eq!(found.as_ref(), Some(&profile));
    // Another image of the same repository has none.
    let other = push_image(&client, &registry.reference("app:v2")?, 2).await?;
    assert!(store::find(&client, &reference, &other).await?.is_none());
    Ok(())
}

/// The requests a proxy saw, as "METHOD PATH" without the query.
fn seen(proxy: &DelayProxy) -> Vec<String> {
    let mut lines: Vec<String> = proxy
        .requests()
        .into_iter()
        .map(|r| r.line.split('?').next().unwrap_or_default().to_owned())
        .collect();
    lines.sort();
    lines
}

/// Fails on main of 2026-12-02: finding a profile took three round trips (index, artifact
/// manifest, document) on the path to a container's first read.
#[tokio::test]
async fn a_profile_is_found_in_one_round_trip_from_the_tag_and_two_from_the_api() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);

    // Referrers tag (docker-registry 2.8): the entry embeds the manifest, which embeds the document.
    let proxy = DelayProxy::start(&registry.addr, std::time::Duration::ZERO)?;
    let reference: Reference = format!("{}/app:v1", proxy.addr).parse()?;
    let image = push_image(&client, &reference, 1).await?;
    let profile = profile_of(image, 40);
    store::push(&client, &reference, &profile).await?;
    proxy.clear();
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(profile)
    );
    let tag = format!("GET /v2/app/manifests/sha256-{}", image.hex());
    let api = format!("GET /v2/app/referrers/{image}");
    assert_eq!(seen(&proxy), vec![tag.clone(), api.clone()]);

    // The referrers API: its index has no `data`, the artifact manifest still embeds the document.
    let api_proxy = ReferrersProxy::start(&registry.addr)?;
    let proxy = DelayProxy::start(&api_proxy.addr, std::time::Duration::ZERO)?;
    let reference: Reference = format!("{}/app:v2", proxy.addr).parse()?;
    let image = push_image(&client, &reference, 2).await?;
    let profile = profile_of(image, 40);
    let artifact = store::push(&client, &reference, &profile).await?;
    proxy.clear();
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(profile)
    );
    let mut want = vec![
        format!("GET /v2/app/manifests/sha256-{}", image.hex()),
        format!("GET /v2/app/manifests/{artifact}"),
        format!("GET /v2/app/referrers/{image}"),
    ];
    want.sort();
    assert_eq!(seen(&proxy), want);

    // A document too large to embed is fetched as a blob, and still found.
    let reference = registry.reference("app:v3")?;
    let image = push_image(&client, &reference, 3).await?;
    let large = profile_of(image, 2000);
    assert!(large.encode()?.len() as u64 > store::MAX_EMBEDDED);
    store::push(&client, &reference, &large).await?;
    assert_eq!(store::find(&client, &reference, &image).await?, Some(large));
    Ok(())
}

/// Embedded bytes are only a shortcut: bytes that are not what their descriptor names are passed
/// over and the content is fetched by digest, so a rewritten index cannot slip in another profile.
#[tokio::test]
async fn embedded_bytes_that_do_not_match_their_digest_are_passed_over() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let image = push_image(&client, &reference, 1).await?;
    let genuine = profile_of(image, 3);
    let artifact = store::push(&client, &reference, &genuine).await?;
    let entry = tag_index(&client, &reference, &image)
        .await
        .context("tag")?["manifests"][0]
        .clone();
    assert!(
        entry["data"].is_string(),
        "the tag's entry embeds nothing: {entry}"
    );

    // The entry names the genuine artifact but embeds another manifest: one whose document is an
    // impostor profile of the same image.
    let impostor = profile_of(image, 7).encode()?;
    let genuine_manifest = client
        .get_manifest(&reference.with_digest(artifact))
        .await?;
    let mut forged: Value = serde_json::from_slice(&genuine_manifest.bytes)?;
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    forged["layers"][0]["data"] = json!(b64(&impostor));
    let forged_bytes = serde_json::to_vec(&forged)?;
    let mut lying = entry.clone();
    lying["data"] = json!(b64(&forged_bytes));
    write_tag_index(&client, &reference, &image, vec![lying]).await?;
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(genuine.clone())
    );

    // The forged manifest pushed under its own digest: its document's `data` is not the document
    // its descriptor names, so the blob is read.
    let forged_digest = Digest::of(&forged_bytes);
    client
        .push_manifest(
            &Reference {
                tag: None,
                ..reference.with_digest(forged_digest)
            },
            MEDIA_TYPE_OCI_MANIFEST,
            Bytes::from(forged_bytes.clone()),
        )
        .await?;
    let mut honest_entry = entry.clone();
    honest_entry["digest"] = json!(forged_digest.to_string());
    honest_entry["size"] = json!(forged_bytes.len());
    honest_entry["data"] = json!(b64(&forged_bytes));
    write_tag_index(&client, &reference, &image, vec![honest_entry]).await?;
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(genuine)
    );
    Ok(())
}

#[tokio::test]
async fn a_second_push_replaces_the_first_and_other_artifacts_are_kept() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let image = push_image(&client, &reference, 1).await?;
    // Another tool's artifact (a signature) is listed first.
    let signature = push_artifact_by_hand(
        &client,
        &reference,
        &image,
        "application/vnd.example.signature.v1",
        "application/vnd.example.signature.v1+json",
        b"{\"sig\":1}".to_vec(),
    )
    .await?;
    write_tag_index(&client, &reference, &image, vec![signature.clone()]).await?;

    let first = store::push(&client, &reference, &profile_of(image, 2)).await?;
    let second_profile = profile_of(image, 5);
    let second = store::push(&client, &reference, &second_profile).await?;
    assert_ne!(first, second);

    let index = tag_index(&client, &reference, &image)
        .await
        .context("tag")?;
    let entries = index["manifests"].as_array().context("manifests")?;
    let digests: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["digest"].as_str())
        .collect();
    assert_eq!(
        digests,
        vec![
            signature["digest"].as_str().context("digest")?,
            second.to_string().as_str()
        ],
        "{index}"
    );
    assert_eq!(entries[0], signature, "another artifact's entry changed");
    let found = store::find(&client, &reference, &image).await?;
    assert_eq!(found, Some(second_profile));
    Ok(())
}

#[tokio::test]
async fn the_referrers_api_is_used_where_the_registry_has_it() -> Result<()> {
    let registry = TestRegistry::start()?;
    let proxy = ReferrersProxy::start(&registry.addr)?;
    let client = client(&registry);
    let direct = registry.reference("app:v1")?;
    let reference: Reference = format!("{}/app:v1", proxy.addr).parse()?;
    let image = push_image(&client, &reference, 1).await?;
    assert!(store::find(&client, &reference, &image).await?.is_none());
    assert_eq!(proxy.referrers_gets(), 1);

    let profile = profile_of(image, 4);
    let artifact = store::push(&client, &reference, &profile).await?;
    // The registry said OCI-Subject: the client wrote no tag, the API lists the artifact.
    assert!(
        tag_index(&client, &direct, &image).await.is_none(),
        "a referrers tag was written although the registry indexes subjects itself"
    );
    let listed = proxy.referrers("app", &image.to_string());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["digest"], artifact.to_string());
    // Another tool's artifact in the API's answer is passed over.
    let signature = push_artifact_by_hand(
        &client,
        &reference,
        &image,
        "application/vnd.example.signature.v1",
        "application/vnd.example.signature.v1+json",
        b"{}".to_vec(),
    )
    .await?;
    assert_eq!(proxy.referrers("app", &image.to_string()).len(), 2);
    assert_eq!(
        signature["artifactType"],
        "application/vnd.example.signature.v1"
    );

    let found = store::find(&client, &reference, &image).await?;
    assert_eq!(found, Some(profile.clone()));
    // Only the API knows it: the same registry without the proxy finds none.
    assert!(store::find(&client, &direct, &image).await?.is_none());

    // A newer profile wins over the older one the API still lists.
    let newer = profile_of(image, 6);
    store::push(&client, &reference, &newer).await?;
    assert_eq!(proxy.referrers("app", &image.to_string()).len(), 3);
    assert_eq!(store::find(&client, &reference, &image).await?, Some(newer));
    Ok(())
}

#[tokio::test]
async fn oversized_and_foreign_profiles_are_refused_with_a_clear_error() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let image = push_image(&client, &reference, 1).await?;
    let other = push_image(&client, &registry.reference("app:v2")?, 2).await?;

    // Recorded from another image, listed under this one.
    let foreign_doc = profile_of(other, 1).encode()?;
    let foreign = push_artifact_by_hand(
        &client,
        &reference,
        &image,
        MEDIA_TYPE,
        MEDIA_TYPE,
        foreign_doc,
    )
    .await?;
    write_tag_index(&client, &reference, &image, vec![foreign]).await?;
    let err = store::find(&client, &reference, &image)
        .await
        .expect_err("a foreign profile was accepted");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Foreign { .. }), "{text}");
    assert!(
        text.contains(&other.to_string()) && text.contains(&image.to_string()),
        "{text}"
    );

    // A document one byte over the bound: refused from its descriptor, before it is read.
    let mut big = profile_of(image, 1).encode()?;
    big.resize(MAX_BYTES as usize + 1, b' ');
    let oversized =
        push_artifact_by_hand(&client, &reference, &image, MEDIA_TYPE, MEDIA_TYPE, big).await?;
    write_tag_index(&client, &reference, &image, vec![oversized]).await?;
    let err = store::find(&client, &reference, &image)
        .await
        .expect_err("an oversized profile was accepted");
    let text = err.to_string();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{text}");
    assert!(text.contains("more than the 4194304 allowed"), "{text}");

    // Not a profile document at all.
    let junk = push_artifact_by_hand(
        &client,
        &reference,
        &image,
        MEDIA_TYPE,
        MEDIA_TYPE,
        b"{\"version\":1}".to_vec(),
    )
    .await?;
    write_tag_index(&client, &reference, &image, vec![junk]).await?;
    let err = store::find(&client, &reference, &image)
        .await
        .expect_err("a broken profile was accepted");
    assert!(matches!(err, StoreError::Document { .. }), "{err}");

    // A profile of another image is refused at push time too: its subject is not in this repo.
    let elsewhere = Digest::of(b"no such manifest");
    assert!(store::push(&client, &reference, &profile_of(elsewhere, 1))
        .await
        .is_err());
    Ok(())
}

/// Deletes a manifest from the registry by digest (the registry's own API, with curl).
fn delete_manifest(registry: &TestRegistry, repository: &str, digest: &str) -> Result<()> {
    let url = format!("{}/v2/{repository}/manifests/{digest}", registry.url());
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
            &url,
        ])
        .output()?;
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(code == "202", "DELETE {url}: HTTP {code}");
    Ok(())
}

#[tokio::test]
async fn a_listed_profile_that_is_gone_is_passed_over() -> Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let image = push_image(&client, &reference, 1).await?;
    let older_profile = profile_of(image, 2);
    let older = store::push(&client, &reference, &older_profile).await?;
    // An entry as other tools write it: the manifest is fetched, so its absence shows.
    let mut older_entry = tag_index(&client, &reference, &image)
        .await
        .context("tag")?["manifests"][0]
        .clone();
    older_entry.as_object_mut().context("entry")?.remove("data");
    let newer_profile = profile_of(image, 7);
    let newer = push_artifact_by_hand(
        &client,
        &reference,
        &image,
        MEDIA_TYPE,
        MEDIA_TYPE,
        newer_profile.encode()?,
    )
    .await?;
    write_tag_index(
        &client,
        &reference,
        &image,
        vec![older_entry, newer.clone()],
    )
    .await?;
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(newer_profile)
    );
    // The newer one is deleted, its entry stays: the older one is found.
    delete_manifest(
        &registry,
        "app",
        newer["digest"].as_str().context("digest")?,
    )?;
    assert_eq!(
        store::find(&client, &reference, &image).await?,
        Some(older_profile)
    );
    // Both gone: none, not an error.
    delete_manifest(&registry, "app", &older.to_string())?;
    assert_eq!(store::find(&client, &reference, &image).await?, None);
    // An entry that embeds its manifest and document (as `push` writes it) still vouches for
    // them, by digest, when the artifact is gone and the tag's index still lists it.
    let second = push_image(&client, &registry.reference("app:v2")?, 2).await?;
    let embedded_profile = profile_of(second, 4);
    let artifact = store::push(&client, &reference, &embedded_profile).await?;
    delete_manifest(&registry, "app", &artifact.to_string())?;
    assert_eq!(
        store::find(&client, &reference, &second).await?,
        Some(embedded_profile)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recording on a real image: busybox-static (from Debian) plus a layer of our own files,
// converted to zstd:chunked with small chunks, run with real FUSE, overlayfs and runc.

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
/// Chunk size of the converted test image: files of several chunks.
const CHUNK: usize = 64 << 10;

/// A state root for `lazysnap profile record`; whatever a failed test left mounted or running
/// under it is removed on drop.
struct Root(tempfile::TempDir);

impl Root {
    fn new() -> Result<Self> {
        Ok(Self(tempfile::tempdir()?))
    }

    fn lazysnap(&self, args: &[&str]) -> Result<std::process::Output> {
        let out = std::process::Command::new(BIN)
            .arg("--root")
            .arg(self.0.path())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?;
        eprintln!(
            "lazysnap {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Nothing left under the root: no mount, no fresh recording root.
    fn assert_clean(&self) -> Result<()> {
        let left = common::mounts_below(self.0.path());
        anyhow::ensure!(left.is_empty(), "mounts left behind: {left:?}");
        let dirs: Vec<_> = std::fs::read_dir(self.0.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("profile-record-"))
            .collect();
        anyhow::ensure!(dirs.is_empty(), "recording roots left behind: {dirs:?}");
        Ok(())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0.path()) {
            for e in entries.flatten() {
                let containers = e.path().join("containers");
                for c in std::fs::read_dir(containers)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let _ = std::process::Command::new("runc")
                        .args(["--root", "/run/lazysnap/runc", "delete", "--force"])
                        .arg(c.file_name())
                        .output();
                }
            }
        }
        common::unmount_below(self.0.path());
    }
}

/// The files of the test's own layer.
struct Files {
    /// `srv/data/read`: 4.5 chunks, read by the test's command.
    read: Vec<u8>,
}

/// Pushes busybox + a layer with `srv/data/read` and `srv/data/unread`, converted to
/// zstd:chunked; returns the reference and our files.
fn sample_image(registry: &TestRegistry, work: &std::path::Path) -> Result<(String, Files)> {
    use common::image::{self, fixture, LayoutBuilder};
    let bb = fixture(
        "busybox-image.sh",
        &[work.join("bb").to_str().context("path")?, "v1"],
    )?;
    let bb_dir = std::path::Path::new(bb.rsplit_once(':').context("layout:tag")?.0);
    let index: Value = serde_json::from_slice(&std::fs::read(bb_dir.join("index.json"))?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|d| {
                d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some("v1")
            })
        })
        .and_then(|d| d["digest"].as_str())
        .context("busybox manifest")?;
    let blob = |digest: &str| {
        std::fs::read(
            bb_dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
    };
    let manifest: Value = serde_json::from_slice(&blob(manifest_digest)?)?;
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .context("busybox layer")?;
    let bb_tar = image::decompress(&blob(layer_digest)?)?;

    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("srv/data"))?;
    let files = Files {
        read: image::noise(CHUNK * 4 + CHUNK / 2, 11),
    };
    std::fs::write(tree.join("srv/data/read"), &files.read)?;
    std::fs::write(tree.join("srv/data/unread"), image::noise(CHUNK * 2, 12))?;
    let ours = image::tar_dir(&tree)?;

    let layout = LayoutBuilder::new(&work.join("img"))?;
    let desc = layout.image(&[bb_tar, ours], "amd64")?;
    layout.tags(&[("v1", desc)])?;
    let reference = format!("{}/sample/app:v1", registry.addr);
    image::run(std::process::Command::new(BIN).args([
        "convert",
        "--chunk-size",
        &CHUNK.to_string(),
        &format!("oci:{}:v1", layout.dir.display()),
        &reference,
    ]))?;
    Ok((reference, files))
}

fn sha256(bytes: &[u8]) -> Digest {
    Digest::of(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn recording_a_real_start_up_lists_the_chunks_the_command_read() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (reference, files) = sample_image(&registry, work.path())?;
    let root = Root::new()?;
    let out = work.path().join("profile.json");
    let result = root.lazysnap(&[
        "profile",
        "record",
        "--push",
        "--out",
        out.to_str().context("path")?,
        &reference,
        "--",
        "head",
        "-c",
        "100000",
        "/srv/data/read",
    ])?;
    anyhow::ensure!(result.status.success(), "record failed");
    root.assert_clean()?;
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("the container exited (0)"), "{stderr}");
    // The container's own output went to stdout, then the artifact digest.
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.len() > 100_000, "the command's output is missing");

    let profile = lazysnap::profile::show::read_file(&out)?;
    let client = client(&registry);
    let r: Reference = reference.parse()?;
    let image = client.get_manifest(&r).await?;
    assert_eq!(profile.image, image.digest);
    assert_eq!(
        profile.command,
        vec!["head", "-c", "100000", "/srv/data/read"]
    );
    let manifest: Value = serde_json::from_slice(&image.bytes)?;
    let ours: Digest = manifest["layers"][1]["digest"]
        .as_str()
        .context("layer 1")?
        .parse()?;
    let busybox: Digest = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer 0")?
        .parse()?;
    assert_eq!(
        profile.layers.iter().map(|l| l.digest).collect::<Vec<_>>(),
        vec![busybox, ours],
        "layers bottom first, both read (busybox ran `head`)"
    );
    assert!(profile.layers.iter().all(|l| l.diff_id.is_some()));

    // Our layer: the chunks `head -c 100000` needs are the file's first two, in that order
    // (each checked against the file's bytes here, not against lazysnap's TOC); the unread file
    // is absent. Reads ahead may add later chunks of the same file, never before these.
    let layer = profile.layer(&ours).context("our layer")?;
    let read: Vec<(&str, u64)> = layer
        .accesses
        .iter()
        .map(|a| (a.name.as_str(), a.offset))
        .collect();
    assert!(
        read.starts_with(&[("srv/data/read", 0), ("srv/data/read", CHUNK as u64)]),
        "{read:?}"
    );
    assert!(read.iter().all(|(n, _)| *n == "srv/data/read"), "{read:?}");
    for a in &layer.accesses {
        let start = a.offset as usize;
        let end = (start + CHUNK).min(files.read.len());
        assert_eq!(a.chunk, sha256(&files.read[start..end]), "{a:?}");
    }
    assert!(layer.accesses.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    // The busybox layer: the binary the command ran.
    let bb = profile.layer(&busybox).context("busybox layer")?;
    assert!(
        bb.accesses.iter().any(|a| a.name == "bin/busybox"),
        "{:?}",
        bb.accesses
    );
    // Every access is a chunk of its layer's TOC.
    let tocs = lazysnap::profile::show::layer_tocs(&client, &r, &image.digest, &profile).await;
    for l in &profile.layers {
        let toc = tocs.get(&l.digest).context("toc")?;
        for a in &l.accesses {
            let entry = toc
                .entries
                .iter()
                .find(|e| e.name == a.name)
                .context("entry")?;
            assert!(
                entry
                    .chunks
                    .iter()
                    .any(|c| c.digest == a.chunk && c.file_offset == a.offset),
                "{a:?} is not a chunk of its entry"
            );
        }
    }

    // --push stored it: found through the registry, and shown.
    let found = store::find(&client, &r, &image.digest).await?;
    assert_eq!(found.as_ref(), Some(&profile));
    let shown = root.lazysnap(&["profile", "show", &reference])?;
    assert!(shown.status.success());
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("    srv/data/read"), "{text}");
    assert!(text.contains("    bin/busybox"), "{text}");
    assert!(
        text.contains(&format!("layer 2/2 {}", ours.short())),
        "{text}"
    );
    assert!(text.contains("compressed)"), "sizes from the TOC: {text}");
    let from_file = root.lazysnap(&["profile", "show", out.to_str().context("path")?])?;
    assert!(String::from_utf8_lossy(&from_file.stdout).contains("    srv/data/read"));
    let json = root.lazysnap(&["profile", "show", "--json", &reference])?;
    let parsed: Profile = serde_json::from_slice(&json.stdout)?;
    assert_eq!(parsed, profile);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn recording_stops_a_quiet_container_and_show_says_when_there_is_none() -> Result<()> {
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let (reference, _) = sample_image(&registry, work.path())?;
    let root = Root::new()?;

    let shown = root.lazysnap(&["profile", "show", &reference])?;
    assert_eq!(shown.status.code(), Some(1));
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("has no start-up profile"), "{text}");

    let out = work.path().join("profile.json");
    let started = std::time::Instant::now();
    let result = root.lazysnap(&[
        "profile",
        "record",
        "--quiet-ms",
        "700",
        "--out",
        out.to_str().context("path")?,
        &reference,
        "--",
        "sh",
        "-c",
        "cat /srv/data/read >/dev/null; sleep 300",
    ])?;
    anyhow::ensure!(result.status.success(), "record failed");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("nothing new was read for 700 ms"),
        "{stderr}"
    );
    root.assert_clean()?;
    let profile = lazysnap::profile::show::read_file(&out)?;
    let names: std::collections::HashSet<&str> = profile
        .layers
        .iter()
        .flat_map(|l| l.accesses.iter().map(|a| a.name.as_str()))
        .collect();
    assert!(names.contains("srv/data/read"), "{names:?}");
    assert!(!names.contains("srv/data/unread"), "{names:?}");

    // The time limit ends a container that keeps reading nothing (and never goes quiet enough).
    let started = std::time::Instant::now();
    let result = root.lazysnap(&[
        "profile",
        "record",
        "--quiet-ms",
        "600000",
        "--time-limit",
        "3",
        "--out",
        out.to_str().context("path")?,
        &reference,
        "--",
        "sleep",
        "300",
    ])?;
    anyhow::ensure!(result.status.success(), "record failed");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("the time limit of 3 s passed"), "{stderr}");
    root.assert_clean()?;
    Ok(())
}

/// Waits until `done`, at most `limit`.
fn wait_until(
    limit: std::time::Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = std::time::Instant::now();
    while !done()? {
        anyhow::ensure!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// The whole workflow of issue 11's first two points: a profile recorded by one node and pushed
/// is found by the next node's mount, which fetches the profiled chunks before anything reads
/// them; the same reads then need no request of their own.
#[test]
fn a_recorded_and_pushed_profile_is_prefetched_by_the_next_mount() -> Result<()> {
    use common::mount_process::MountProcess;
    let registry = TestRegistry::start()?;
    let work = tempfile::tempdir()?;
    let _cleanup = common::UnmountOnDrop(work.path().to_owned());
    let (reference, files) = sample_image(&registry, work.path())?;
    let root = Root::new()?;
    let out = work.path().join("profile.json");
    let recorded = root.lazysnap(&[
        "profile",
        "record",
        "--push",
        "--out",
        out.to_str().context("path")?,
        &reference,
        "--",
        "cat",
        "/srv/data/read",
    ])?;
    anyhow::ensure!(recorded.status.success(), "record failed");
    let profile = lazysnap::profile::show::read_file(&out)?;

    // Another node: a fresh root, the profile looked up in the registry (the default).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let target = work.path().join("mnt");
    let process = MountProcess::start(
        &work.path().join("node"),
        &reference,
        &target,
        &["--no-background-fetch", "--metrics-addr", &addr],
    )?;
    let metric = |name: &str| common::scrape(&addr, name);
    // Fetched by the profile, or held already: the layer's account files (`/etc/passwd` and
    // `/etc/group`, which the recording read) are fetched when it is found.
    let fetched = r#"lazysnap_profile_chunks_total{result="fetched"}"#;
    let held = r#"lazysnap_profile_chunks_total{result="held"}"#;
    wait_until(
        std::time::Duration::from_secs(30),
        "the profile prefetched",
        || Ok(metric(fetched)? + metric(held)? >= profile.accesses() as f64),
    )?;
    anyhow::ensure!(metric(r#"lazysnap_profile_lookups_total{result="found"}"#)? == 1.0);
    anyhow::ensure!(metric(r#"lazysnap_profile_chunks_total{result="unknown"}"#)? == 0.0);
    let on_demand = r#"lazysnap_fetch_requests_total{kind="on_demand"}"#;
    anyhow::ensure!(metric(on_demand)? == 0.0, "something read before the test");
    let got = std::fs::read(target.join("srv/data/read"))?;
    anyhow::ensure!(got == files.read, "wrong bytes through the mount");
    anyhow::ensure!(
        metric(on_demand)? == 0.0,
        "a profiled read went to the registry: {}",
        process.log()
    );
    process.stop()?;
    Ok(())
}

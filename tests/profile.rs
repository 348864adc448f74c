//! Start-up profiles in a real registry (Debian's docker-registry 2.8 on 127.0.0.1, which has no
//! referrers API, so the referrers tag schema is what stores them), and behind a proxy that adds
//! the referrers API to it (tests/common/referrers.rs); recording on a real image with real FUSE,
//! overlayfs and runc; `lazysnap profile show`.

mod common;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::referrers::ReferrersProxy;
use common::registry::TestRegistry;
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

//! Profiles in the registry: an OCI artifact next to the image, found through the image.
//!
//! The artifact is an OCI image manifest with `artifactType` [`MEDIA_TYPE`], the empty config
//! (`application/vnd.oci.empty.v1+json`, the 2-byte `{}`), one layer (the profile document) and
//! a `subject` naming the image manifest. The image itself is never touched: its digest and its
//! signatures stay as they are, and a profile can be added or replaced at any time.
//!
//! Registries with the OCI 1.1 referrers API index the artifact themselves (they answer the
//! manifest PUT with `OCI-Subject`); for the others (Debian's docker-registry 2.8) [`push`] keeps
//! the referrers tag `sha256-<hex>` up to date, an image index of the subject's referrers. [`find`]
//! asks both at once, so finding none costs one round trip, and reads the newest lazysnap profile
//! with every size bounded and every byte checked against its digest.
//!
//! A profile is found at mount, on the path to a container's first read, so it is carried inline
//! too (OCI 1.1 descriptors' `data`, base64 of the very bytes the descriptor names): the artifact
//! manifest embeds the document, and the referrers tag's entry embeds the artifact manifest. With
//! the tag, one request finds the profile; with the API, two (the registry builds that index
//! without `data`); three before. Embedded bytes are used only when they match the descriptor's
//! digest and size, else the blob is fetched as other readers of the artifact do; the blob is
//! always pushed.
//!
//! Owns: the artifact layout and the referrers bookkeeping. Does not own: the document
//! (`profile`), the HTTP (`registry`), or what a mount does with a profile.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;

use super::{Profile, ProfileError, MAX_BYTES, MEDIA_TYPE};
use crate::oci::{Digest, Reference, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST};
use crate::registry::{self, referrers_tag, FetchedManifest, RegistryError};

/// Media type of the empty config descriptor of an artifact.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config blob.
pub const EMPTY_BLOB: &[u8] = b"{}";
/// The annotation that dates an artifact; the newest profile of an image wins.
pub const CREATED: &str = "org.opencontainers.image.created";
/// The largest artifact manifest read: ours are under 1 KiB, plus the document they embed.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;
/// The largest document embedded in its artifact manifest: base64 of it stays within
/// [`MAX_MANIFEST_BYTES`], which earlier lazysnap releases read too. Holds ~250 accesses
/// (python-import's profile is ~190); a larger document is only in its blob.
pub const MAX_EMBEDDED: u64 = 46 << 10;
/// The most listed profiles [`find`] reads when the newer ones are gone from the registry.
const MAX_TRIED: usize = 4;

/// Why a profile could not be found, read or stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The profile to push does not pass its own bounds.
    #[error("the profile cannot be pushed: {0}")]
    Encode(#[source] ProfileError),
    /// The stored document is not a valid profile.
    #[error("{reference}: profile {artifact}: {source}")]
    Document {
        reference: String,
        artifact: Digest,
        #[source]
        source: ProfileError,
    },
    /// A size the registry states is past its bound; nothing of it was read.
    #[error("{reference}: profile {artifact}: its {what} is {size} bytes, more than the {limit} allowed; refusing it")]
    TooLarge {
        reference: String,
        artifact: Digest,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    /// A profile recorded from another image: its chunks would be the wrong ones.
    #[error("{reference}: profile {artifact} was recorded from image {recorded}, not {expected}; refusing it (a profile only applies to the image it was recorded from: record one for this image)")]
    Foreign {
        reference: String,
        artifact: Digest,
        recorded: Digest,
        expected: Digest,
    },
    /// An index or artifact manifest that is not what the referrers schema says it is.
    #[error("{reference}: {what}: {detail}")]
    Malformed {
        reference: String,
        what: String,
        detail: String,
    },
    /// The profile blob could not be read whole (a broken connection, or bytes that do not match
    /// its digest or size).
    #[error("{reference}: profile {artifact}: reading its document: {source}")]
    Read {
        reference: String,
        artifact: Digest,
        #[source]
        source: std::io::Error,
    },
}

/// The newest lazysnap profile of the image manifest `manifest` in `reference`'s repository, or
/// `None` if it has none. The referrers API and the referrers tag are asked at once; an answer
/// from either is enough (a registry without the API answers 404 to it). A profile that is too
/// large, not a valid document or recorded from another image is refused with an error.
#[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, manifest = %manifest))]
pub async fn find(
    client: &registry::Client,
    reference: &Reference,
    manifest: &Digest,
) -> Result<Option<Profile>, StoreError> {
    let tag = tag_reference(reference, manifest);
    let (api, tagged) = tokio::join!(
        client.get_referrers(reference, manifest, MEDIA_TYPE),
        optional_manifest(client, &tag)
    );
    let mut candidates = Vec::new();
    let mut answered = false;
    let mut failure = None;
    match api {
        Ok(Some(bytes)) => {
            answered = true;
            let found = profiles_in_index(&bytes).map_err(|detail| StoreError::Malformed {
                reference: reference.to_string(),
                what: format!("the referrers of {manifest}"),
                detail,
            })?;
            candidates.extend(found);
        }
        Ok(None) => answered = true,
        Err(e) => failure = Some(e),
    }
    match tagged {
        Ok(Some(index)) => {
            answered = true;
            check_index_type(&tag, &index)?;
            let found =
                profiles_in_index(&index.bytes).map_err(|detail| StoreError::Malformed {
                    reference: tag.to_string(),
                    what: "referrers tag index".to_owned(),
                    detail,
                })?;
            candidates.extend(found);
        }
        Ok(None) => answered = true,
        Err(e) => {
            if failure.is_none() {
                failure = Some(e);
            }
        }
    }
    match failure {
        Some(e) if !answered => return Err(e.into()),
        Some(e) => tracing::debug!(error = %e, "one referrers lookup failed; the other answered"),
        None => {}
    }
    // A listed profile whose manifest or document is gone (deleted, collected) is stale: the
    // next older one is tried, a few at most. (An entry that embeds its manifest and document is
    // read from the listing alone: deleting a profile means removing it from the tag's index,
    // as the referrers tag schema asks of whoever deletes a referrer.)
    for referrer in newest_first(candidates).iter().take(MAX_TRIED) {
        match read_profile(client, reference, manifest, referrer).await {
            Err(StoreError::Registry(RegistryError::NotFound { .. })) => {
                tracing::warn!(artifact = %referrer.digest, "a listed profile is gone from the registry; trying an older one");
            }
            found => return found.map(Some),
        }
    }
    tracing::debug!("no profile");
    Ok(None)
}

/// Pushes `profile` as an artifact whose subject is the image manifest `profile.image` in
/// `reference`'s repository (which must hold it), and returns the artifact manifest's digest.
/// Blobs go first, then the manifest by digest; if the registry does not index the subject itself,
/// the referrers tag is updated: other artifacts are kept, an older lazysnap profile is replaced.
#[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, image = %profile.image))]
pub async fn push(
    client: &registry::Client,
    reference: &Reference,
    profile: &Profile,
) -> Result<Digest, StoreError> {
    let document = Bytes::from(profile.encode().map_err(StoreError::Encode)?);
    let document_digest = Digest::of(&document);
    let image = client
        .get_manifest(&by_digest(reference, profile.image))
        .await?;
    let subject_type = image
        .media_type
        .clone()
        .or_else(|| embedded_media_type(&image.bytes))
        .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_owned());
    let (empty, empty_digest) = (Bytes::from_static(EMPTY_BLOB), Digest::of(EMPTY_BLOB));
    let (config, layer) = tokio::join!(
        client.push_blob_bytes(reference, &empty_digest, empty),
        client.push_blob_bytes(reference, &document_digest, document.clone())
    );
    config?;
    layer?;
    let created = rfc3339(SystemTime::now());
    let manifest = artifact_manifest(&subject_type, &image, &document_digest, &document, &created);
    let manifest_bytes = Bytes::from(manifest);
    let pushed = client
        .push_referrer(reference, MEDIA_TYPE_OCI_MANIFEST, manifest_bytes.clone())
        .await?;
    if pushed.subject_indexed {
        tracing::debug!(artifact = %pushed.digest, "the registry indexed the subject");
    } else {
        let descriptor = referrer_descriptor(&pushed.digest, &manifest_bytes, &created);
        update_tag_index(client, reference, &profile.image, descriptor).await?;
    }
    tracing::info!(artifact = %pushed.digest, image = %profile.image, accesses = profile.accesses(), "profile pushed");
    Ok(pushed.digest)
}

/// A lazysnap profile named in a referrers index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Referrer {
    digest: Digest,
    size: u64,
    /// The `created` annotation (RFC 3339, UTC), empty if absent.
    created: String,
    /// The artifact manifest itself, when the entry embeds it (`data`) and it verified.
    manifest: Option<Vec<u8>>,
}

/// `reference`'s repository, by digest only.
fn by_digest(reference: &Reference, digest: Digest) -> Reference {
    Reference {
        tag: None,
        digest: Some(digest),
        ..reference.clone()
    }
}

/// `reference`'s repository at the referrers tag of `subject`.
fn tag_reference(reference: &Reference, subject: &Digest) -> Reference {
    Reference {
        tag: Some(referrers_tag(subject)),
        digest: None,
        ..reference.clone()
    }
}

/// The manifest or index `reference` names, `None` if the registry has none (404).
async fn optional_manifest(
    client: &registry::Client,
    reference: &Reference,
) -> Result<Option<FetchedManifest>, RegistryError> {
    match client.get_manifest(reference).await {
        Ok(m) => Ok(Some(m)),
        Err(RegistryError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The top-level `mediaType` of a JSON document, if it has one.
fn embedded_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Typed>(bytes).ok()?.media_type
}

/// The referrers tag must hold an image index; anything else is not ours to read or overwrite.
fn check_index_type(tag: &Reference, index: &FetchedManifest) -> Result<(), StoreError> {
    let media_type = index
        .media_type
        .clone()
        .or_else(|| embedded_media_type(&index.bytes));
    if media_type.as_deref() == Some(MEDIA_TYPE_OCI_INDEX) {
        return Ok(());
    }
    Err(StoreError::Malformed {
        reference: tag.to_string(),
        what: "referrers tag".to_owned(),
        detail: format!(
            "holds {}, not an OCI image index; leaving it alone",
            media_type
                .as_deref()
                .unwrap_or("a document without a media type")
        ),
    })
}

/// The lazysnap profiles an index of referrers names (entries of other artifact types, and ours
/// that do not parse, are passed over).
fn profiles_in_index(bytes: &[u8]) -> Result<Vec<Referrer>, String> {
    let index: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Some(manifests) = index.get("manifests") else {
        return Ok(Vec::new());
    };
    let manifests = manifests.as_array().ok_or("`manifests` is not an array")?;
    let mut found = Vec::new();
    for entry in manifests {
        if entry.get("artifactType").and_then(Value::as_str) != Some(MEDIA_TYPE) {
            continue;
        }
        let parsed = (|| {
            if entry.get("mediaType").and_then(Value::as_str) != Some(MEDIA_TYPE_OCI_MANIFEST) {
                return None;
            }
            let digest: Digest = entry.get("digest")?.as_str()?.parse().ok()?;
            let size = entry.get("size")?.as_u64()?;
            let created = entry
                .get("annotations")
                .and_then(|a| a.get(CREATED))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let data = entry.get("data").and_then(Value::as_str);
            let manifest = embedded(data, &digest, size, MAX_MANIFEST_BYTES);
            Some(Referrer {
                digest,
                size,
                created,
                manifest,
            })
        })();
        match parsed {
            Some(r) => found.push(r),
            None => tracing::debug!(%entry, "passing over an unreadable profile descriptor"),
        }
    }
    Ok(found)
}

/// The profiles, each once, the most recently created first; of equal dates, the one listed
/// last goes first.
fn newest_first(mut candidates: Vec<Referrer>) -> Vec<Referrer> {
    candidates.reverse();
    // Stable: equal dates keep the reversed listing order.
    candidates.sort_by(|a, b| b.created.cmp(&a.created));
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|r| seen.insert(r.digest));
    candidates
}

/// Reads and checks the profile `referrer` names: manifest and document bounded before they are
/// read, each verified against its digest, the document decoded and bounded, its image checked.
async fn read_profile(
    client: &registry::Client,
    reference: &Reference,
    manifest: &Digest,
    referrer: &Referrer,
) -> Result<Profile, StoreError> {
    let artifact = referrer.digest;
    let too_large = |what, size, limit| StoreError::TooLarge {
        reference: reference.to_string(),
        artifact,
        what,
        size,
        limit,
    };
    let malformed = |detail: String| StoreError::Malformed {
        reference: reference.to_string(),
        what: format!("profile {artifact}"),
        detail,
    };
    if referrer.size > MAX_MANIFEST_BYTES {
        return Err(too_large("manifest", referrer.size, MAX_MANIFEST_BYTES));
    }
    let fetched;
    let manifest_bytes: &[u8] = match &referrer.manifest {
        Some(embedded) => embedded,
        None => {
            fetched = client.get_manifest(&by_digest(reference, artifact)).await?;
            &fetched.bytes
        }
    };
    if manifest_bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_large(
            "manifest",
            manifest_bytes.len() as u64,
            MAX_MANIFEST_BYTES,
        ));
    }
    let parsed: ArtifactManifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| malformed(format!("its manifest is not an OCI image manifest: {e}")))?;
    if parsed.artifact_type.as_deref() != Some(MEDIA_TYPE) {
        return Err(malformed(format!(
            "its manifest has artifactType {:?}, not {MEDIA_TYPE:?}",
            parsed.artifact_type.as_deref().unwrap_or("")
        )));
    }
    match &parsed.subject {
        Some(subject) if subject.digest == *manifest => {}
        Some(subject) => {
            return Err(StoreError::Foreign {
                reference: reference.to_string(),
                artifact,
                recorded: subject.digest,
                expected: *manifest,
            })
        }
        None => return Err(malformed("its manifest has no subject".to_owned())),
    }
    let layer = match parsed.layers.as_slice() {
        [layer] if layer.media_type == MEDIA_TYPE => layer,
        _ => {
            return Err(malformed(format!(
                "its manifest must have exactly one layer of type {MEDIA_TYPE}"
            )))
        }
    };
    if layer.size > MAX_BYTES {
        return Err(too_large("document", layer.size, MAX_BYTES));
    }
    let document = match embedded(layer.data.as_deref(), &layer.digest, layer.size, MAX_BYTES) {
        Some(document) => document,
        None => {
            let reader = client
                .blob_reader_sized(reference, &layer.digest, layer.size)
                .await?;
            let mut document = Vec::with_capacity(layer.size as usize);
            reader
                .take(MAX_BYTES + 1)
                .read_to_end(&mut document)
                .await
                .map_err(|source| StoreError::Read {
                    reference: reference.to_string(),
                    artifact,
                    source,
                })?;
            document
        }
    };
    let profile = Profile::decode(&document).map_err(|source| StoreError::Document {
        reference: reference.to_string(),
        artifact,
        source,
    })?;
    if profile.image != *manifest {
        return Err(StoreError::Foreign {
            reference: reference.to_string(),
            artifact,
            recorded: profile.image,
            expected: *manifest,
        });
    }
    tracing::debug!(%artifact, accesses = profile.accesses(), "profile found");
    Ok(profile)
}

/// The fields of an artifact manifest that [`read_profile`] checks.
#[derive(Deserialize)]
struct ArtifactManifest {
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    subject: Option<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: Digest,
    size: u64,
    /// The content itself, base64 (OCI 1.1), when embedded.
    data: Option<String>,
}

/// The bytes a descriptor embeds (`data`), if it embeds any, they are at most `limit` long
/// (checked on the base64 text before decoding it) and they are exactly `size` bytes of digest
/// `digest`. Anything else is passed over (and the content fetched by digest instead): a
/// descriptor's digest is what vouches for it, never its `data`.
fn embedded(data: Option<&str>, digest: &Digest, size: u64, limit: u64) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let data = data?;
    if size > limit || data.len() as u64 > limit.div_ceil(3) * 4 {
        tracing::debug!(%digest, "embedded data past its bound; fetching by digest");
        return None;
    }
    match base64::engine::general_purpose::STANDARD.decode(data) {
        Ok(bytes) if bytes.len() as u64 == size && Digest::of(&bytes) == *digest => Some(bytes),
        _ => {
            tracing::warn!(%digest, "embedded data does not match its descriptor; ignoring it and fetching by digest");
            None
        }
    }
}

/// `bytes` as a descriptor's `data` (base64), when they are at most `limit` long.
fn embed(bytes: &[u8], limit: u64) -> Option<String> {
    use base64::Engine as _;
    (bytes.len() as u64 <= limit).then(|| base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The artifact manifest: empty config, the document as its one layer (embedded when it is at
/// most [`MAX_EMBEDDED`] bytes), the image as subject.
fn artifact_manifest(
    subject_type: &str,
    image: &FetchedManifest,
    document_digest: &Digest,
    document: &[u8],
    created: &str,
) -> Vec<u8> {
    let mut layer = json!({
        "mediaType": MEDIA_TYPE,
        "digest": document_digest.to_string(),
        "size": document.len(),
    });
    if let Some(data) = embed(document, MAX_EMBEDDED) {
        layer["data"] = json!(data);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": Digest::of(EMPTY_BLOB).to_string(),
            "size": EMPTY_BLOB.len(),
            "data": "e30=",
        },
        "layers": [layer],
        "subject": {
            "mediaType": subject_type,
            "digest": image.digest.to_string(),
            "size": image.bytes.len(),
        },
        "annotations": { CREATED: created },
    });
    // A `Value` always serializes.
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// The descriptor of a pushed profile in a referrers index: the manifest's `artifactType` and
/// annotations copied, as the referrers schema asks, and the manifest itself embedded.
fn referrer_descriptor(digest: &Digest, manifest: &[u8], created: &str) -> Value {
    let mut descriptor = json!({
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "digest": digest.to_string(),
        "size": manifest.len(),
        "artifactType": MEDIA_TYPE,
        "annotations": { CREATED: created },
    });
    if let Some(data) = embed(manifest, MAX_MANIFEST_BYTES) {
        descriptor["data"] = json!(data);
    }
    descriptor
}

/// Read-modify-write of the referrers tag of `subject`: a missing tag starts an empty index.
/// Two pushers at once can lose one's entry (the registry offers no conditional PUT); the loser's
/// artifact stays in the repository and the next push of a profile lists it again.
async fn update_tag_index(
    client: &registry::Client,
    reference: &Reference,
    subject: &Digest,
    descriptor: Value,
) -> Result<(), StoreError> {
    let tag = tag_reference(reference, subject);
    let existing = optional_manifest(client, &tag).await?;
    if let Some(index) = &existing {
        check_index_type(&tag, index)?;
    }
    let bytes =
        updated_index(existing.as_ref().map(|m| &m.bytes[..]), descriptor).map_err(|detail| {
            StoreError::Malformed {
                reference: tag.to_string(),
                what: "referrers tag index".to_owned(),
                detail,
            }
        })?;
    client
        .push_manifest(&tag, MEDIA_TYPE_OCI_INDEX, Bytes::from(bytes))
        .await?;
    tracing::debug!(tag = %tag, "referrers tag updated");
    Ok(())
}

/// The index with `descriptor` added: entries of other artifacts are kept as they are, earlier
/// lazysnap profiles (and the same manifest, should it be listed) are dropped.
fn updated_index(existing: Option<&[u8]>, descriptor: Value) -> Result<Vec<u8>, String> {
    let mut index: Map<String, Value> = match existing {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?,
        None => Map::new(),
    };
    index.insert("schemaVersion".to_owned(), json!(2));
    index.insert("mediaType".to_owned(), json!(MEDIA_TYPE_OCI_INDEX));
    let mut manifests = match index.remove("manifests") {
        Some(Value::Array(entries)) => entries,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err("`manifests` is not an array".to_owned()),
    };
    let digest = descriptor.get("digest").cloned();
    manifests.retain(|entry| {
        entry.get("artifactType").and_then(Value::as_str) != Some(MEDIA_TYPE)
            && entry.get("digest") != digest.as_ref()
    });
    manifests.push(descriptor);
    index.insert("manifests".to_owned(), Value::Array(manifests));
    serde_json::to_vec(&index).map_err(|e| e.to_string())
}

/// `time` as RFC 3339 in UTC with milliseconds (`2026-12-03T01:02:03.456Z`): fixed width, so
/// later times sort later as strings.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Year, month and day of the `days`th day after 1970-01-01 (proleptic Gregorian calendar),
/// counted in 400-year eras that begin on 1 March, so the leap day ends each year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

//! Referrers (OCI distribution 1.1): the artifacts whose `subject` is a given manifest.
//!
//! Two ways to learn them, and this client speaks both: the referrers API
//! (`GET /v2/<name>/referrers/<digest>`, an image index the registry keeps), and, for registries
//! without it (Debian's docker-registry 2.8), the referrers tag schema: a tag `<alg>-<hex>` holding
//! an image index that pushing clients keep up to date themselves. A registry that has the API
//! says so when a manifest with a `subject` is pushed, by answering with an `OCI-Subject` header.
//! Owns the HTTP of both; what the indexes hold is the caller's business.

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use super::client::{read_limited, Target};
use super::pull::MANIFEST_LIMIT;
use super::{Client, RegistryError};
use crate::oci::{Digest, Reference, MEDIA_TYPE_OCI_INDEX};

/// The header a registry with the referrers API answers a manifest PUT with when it processed the
/// manifest's `subject`.
pub const OCI_SUBJECT: &str = "oci-subject";

/// The tag of the referrers tag schema for `subject`: `sha256-<hex>`.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// What a manifest PUT with a `subject` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushedReferrer {
    /// The pushed manifest's digest.
    pub digest: Digest,
    /// True if the registry answered with `OCI-Subject` (it indexes referrers itself); false if
    /// the client must maintain the referrers tag.
    pub subject_indexed: bool,
}

impl Client {
    /// `GET /v2/<name>/referrers/<subject>?artifactType=<artifact_type>`: the index of referrers
    /// (at most 4 MiB, like any manifest), or `None` if the registry has no referrers API (404).
    /// The registry may ignore the filter (it then omits `OCI-Filters-Applied`): callers filter
    /// again.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, subject = %subject))]
    pub async fn get_referrers(
        &self,
        reference: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let mut req = self.request(reference, Method::GET, &format!("referrers/{subject}"))?;
        req.url
            .query_pairs_mut()
            .append_pair("artifactType", artifact_type);
        req.headers
            .insert(ACCEPT, HeaderValue::from_static(MEDIA_TYPE_OCI_INDEX));
        let response = self.execute(&req).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                tracing::debug!("no referrers API (404)");
                return Ok(None);
            }
            _ => {
                let what = format!("listing referrers of {subject}");
                return Err(self
                    .error_for(response, reference, Target::Manifest, &what)
                    .await);
            }
        }
        let too_large = || RegistryError::Protocol {
            reference: reference.to_string(),
            detail: format!(
                "the referrers of {subject} are larger than {MANIFEST_LIMIT} bytes; refusing them"
            ),
        };
        if response
            .content_length()
            .is_some_and(|len| len > MANIFEST_LIMIT as u64)
        {
            return Err(too_large());
        }
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
        let bytes = read_limited(response, MANIFEST_LIMIT + 1)
            .await
            .map_err(|source| RegistryError::Transport {
                reference: reference.to_string(),
                context: format!("reading the referrers of {subject}"),
                error: source,
            })?;
        if bytes.len() > MANIFEST_LIMIT {
            return Err(too_large());
        }
        if media_type
            .as_deref()
            .is_some_and(|m| m != MEDIA_TYPE_OCI_INDEX)
        {
            // A registry without the API may answer 200 with something else (a web page).
            tracing::debug!(
                ?media_type,
                "referrers answer is not an image index; no API"
            );
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// PUTs a manifest that has a `subject` by its digest (no tag) and reports whether the
    /// registry indexed the subject itself (`OCI-Subject`).
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, len = bytes.len()))]
    pub async fn push_referrer(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PushedReferrer, RegistryError> {
        let by_digest = Reference {
            tag: None,
            digest: Some(Digest::of(&bytes)),
            ..reference.clone()
        };
        let (digest, headers) = self.put_manifest(&by_digest, media_type, bytes).await?;
        let subject_indexed = headers.contains_key(OCI_SUBJECT);
        tracing::debug!(%digest, subject_indexed, "referrer pushed");
        Ok(PushedReferrer {
            digest,
            subject_indexed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_schema_names_the_subject() {
        let d = Digest::of(b"m");
        let tag = referrers_tag(&d);
        assert_eq!(tag, format!("sha256-{}", d.hex()));
        // A valid tag: at most 128 characters of [A-Za-z0-9_.-].
        assert!(tag.len() <= 128);
        assert!(tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
    }
}

//! Reading: manifests (verified), whole blobs (verified), blob streams (verified at EOF), single
//! `Range` reads and HEAD.

use bytes::Bytes;
use futures_util::TryStreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode};

use super::client::{pull_scope, read_limited, Body, Request, Target};
use super::verify::VerifyingReader;
use super::{BlobReader, Client, FetchedManifest, RegistryError};
use crate::oci::{
    Digest, Reference, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

/// Manifests and indexes larger than this are refused (containerd's limit; the distribution spec
/// lets registries refuse manifests over 4 MiB, so none larger is portable).
pub(crate) const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
/// Blobs read whole ([`Client::get_blob`]: image configs) larger than this are refused. Layers are
/// streamed ([`Client::blob_reader`]) or read by range, never read whole.
pub const WHOLE_BLOB_LIMIT: u64 = 16 * 1024 * 1024;

/// The header registries name a manifest's or blob's digest in.
pub(crate) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// The `Docker-Content-Digest` of a response, if present and readable.
pub(crate) fn content_digest(headers: &HeaderMap) -> Option<Result<Digest, String>> {
    let value = headers.get(DOCKER_CONTENT_DIGEST)?;
    let text = value.to_str().unwrap_or_default();
    Some(text.trim().parse::<Digest>().map_err(|e| e.to_string()))
}

impl Client {
    pub(crate) fn request<'a>(
        &self,
        reference: &'a Reference,
        method: Method,
        rest: &str,
    ) -> Result<Request<'a>, RegistryError> {
        Ok(Request {
            method,
            url: self.url(reference, rest)?,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scopes: vec![pull_scope(&reference.repository)],
            reference,
        })
    }

    /// GET the manifest or index `reference` names (by digest if pinned, else by tag).
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference))]
    pub async fn get_manifest(
        &self,
        reference: &Reference,
    ) -> Result<FetchedManifest, RegistryError> {
        let mut req = self.request(
            reference,
            Method::GET,
            &format!("manifests/{}", reference.tag_or_digest()),
        )?;
        let accept = [
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_DOCKER_LIST,
        ]
        .join(", ");
        req.headers.insert(
            ACCEPT,
            HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("*/*")),
        );
        let response = self.execute(&req).await?;
        if response.status() != StatusCode::OK {
            return Err(self
                .error_for(response, reference, Target::Manifest, "")
                .await);
        }
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|v| !v.is_empty());
        let announced = content_digest(response.headers());
        if response
            .content_length()
            .is_some_and(|len| len > MANIFEST_LIMIT as u64)
        {
            return Err(RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("manifest larger than {MANIFEST_LIMIT} bytes; refusing it"),
            });
        }
        let bytes = read_limited(response, MANIFEST_LIMIT + 1)
            .await
            .map_err(|source| RegistryError::Transport {
                reference: reference.to_string(),
                context: "reading manifest".to_owned(),
                error: source,
            })?;
        if bytes.len() > MANIFEST_LIMIT {
            return Err(RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("manifest larger than {MANIFEST_LIMIT} bytes; refusing it"),
            });
        }
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest".to_owned(),
                    expected,
                    got: digest,
                });
            }
        }
        match announced {
            Some(Ok(announced)) if announced != digest => {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest (Docker-Content-Digest)".to_owned(),
                    expected: announced,
                    got: digest,
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "ignoring unreadable Docker-Content-Digest")
            }
            _ => {}
        }
        tracing::debug!(%digest, media_type = ?media_type, len = bytes.len(), "manifest fetched");
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Starts a blob GET (following redirects to storage) and checks for 200.
    pub(crate) async fn blob_response(
        &self,
        reference: &Reference,
        digest: &Digest,
        extra: HeaderMap,
    ) -> Result<Response, RegistryError> {
        let mut req = self.request(reference, Method::GET, &format!("blobs/{digest}"))?;
        req.headers.extend(extra);
        self.execute(&req).await
    }

    /// GET a whole blob of `reference`'s repository (an image config: at most
    /// `WHOLE_BLOB_LIMIT` bytes), checked against `digest`.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest))]
    pub async fn get_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let response = self
            .blob_response(reference, digest, HeaderMap::new())
            .await?;
        if response.status() != StatusCode::OK {
            return Err(self
                .error_for(response, reference, Target::Blob, &format!("blob {digest}"))
                .await);
        }
        let too_large = || RegistryError::Protocol {
            reference: reference.to_string(),
            detail: format!(
                "blob {digest} is larger than {WHOLE_BLOB_LIMIT} bytes, the most read whole \
                 (an image config that large is refused)"
            ),
        };
        if response
            .content_length()
            .is_some_and(|len| len > WHOLE_BLOB_LIMIT)
        {
            return Err(too_large());
        }
        let limit = WHOLE_BLOB_LIMIT as usize;
        let bytes =
            read_limited(response, limit + 1)
                .await
                .map_err(|source| RegistryError::Transport {
                    reference: reference.to_string(),
                    context: format!("reading blob {digest}"),
                    error: source,
                })?;
        if bytes.len() > limit {
            return Err(too_large());
        }
        let got = Digest::of(&bytes);
        if got != *digest {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                what: format!("blob {digest} ({} bytes)", bytes.len()),
                expected: *digest,
                got,
            });
        }
        Ok(bytes)
    }

    /// Streams a blob; the reader fails at EOF if the content did not hash to `digest`. Prefer
    /// [`Client::blob_reader_sized`] when the descriptor's size is known: this one reads until the
    /// registry stops sending.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest))]
    pub async fn blob_reader(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<BlobReader, RegistryError> {
        self.blob_stream(reference, digest, None).await
    }

    /// Streams a blob of the descriptor's `size`: a response that announces another length fails
    /// before its body is read, one that sends more fails as soon as it passes `size` bytes, and
    /// the reader fails at EOF if the content did not hash to `digest`.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest, size))]
    pub async fn blob_reader_sized(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<BlobReader, RegistryError> {
        self.blob_stream(reference, digest, Some(size)).await
    }

    async fn blob_stream(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobReader, RegistryError> {
        let response = self
            .blob_response(reference, digest, HeaderMap::new())
            .await?;
        if response.status() != StatusCode::OK {
            return Err(self
                .error_for(response, reference, Target::Blob, &format!("blob {digest}"))
                .await);
        }
        if let (Some(size), Some(len)) = (size, response.content_length()) {
            if len != size {
                return Err(RegistryError::Protocol {
                    reference: reference.to_string(),
                    detail: format!(
                        "blob {digest}: the registry announces {len} bytes, the descriptor says {size}"
                    ),
                });
            }
        }
        let stream = Box::pin(response.bytes_stream().map_err(std::io::Error::other));
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::pin(
            VerifyingReader::new(reader, *digest, reference.to_string()).with_size(size),
        ))
    }

    /// HEAD a blob: its size if the registry has it.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest))]
    pub async fn blob_size(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let req = self.request(reference, Method::HEAD, &format!("blobs/{digest}"))?;
        self.head_blob(req, digest).await
    }

    /// HEAD with the given request (its scopes decide the token): `None` on 404.
    pub(crate) async fn head_blob(
        &self,
        req: Request<'_>,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let reference = req.reference;
        let response = self.execute(&req).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => {
                return Err(self
                    .error_for(response, reference, Target::Blob, &format!("blob {digest}"))
                    .await)
            }
        }
        // HEAD answers have no body, so the length is in the header, not in the body's size.
        let len = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("HEAD of blob {digest} answered without a Content-Length"),
            })?;
        Ok(Some(len))
    }
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;

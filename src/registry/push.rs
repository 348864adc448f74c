//! Writing: blob upload (HEAD, cross-repository mount, POST + monolithic PUT), manifest PUT.

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};

use super::client::{pull_scope, push_scope, Body, Request, Target};
use super::pull::content_digest;
use super::{Client, PushedBlob, RegistryError};
use crate::oci::{Digest, Reference};

impl Client {
    /// Pushes the blob stored at `path` unless the registry has it: HEAD, then a cross-repository
    /// mount from `mount_from` (same registry) if given, then an upload. The file is streamed,
    /// never read whole into memory.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest, path = %path.display()))]
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
        mount_from: Option<&Reference>,
    ) -> Result<PushedBlob, RegistryError> {
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|source| RegistryError::Io {
                reference: reference.to_string(),
                context: format!("blob {digest}: reading {}", path.display()),
                source,
            })?
            .len();
        self.push_blob_body(
            reference,
            digest,
            Body::File {
                path: path.to_owned(),
                len,
            },
            mount_from,
        )
        .await
    }

    /// Pushes a small blob held in memory (an image config, say) unless the registry has it.
    /// `bytes` must hash to `digest`.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, digest = %digest, len = bytes.len()))]
    pub async fn push_blob_bytes(
        &self,
        reference: &Reference,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<PushedBlob, RegistryError> {
        let got = Digest::of(&bytes);
        if got != *digest {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                what: "blob to push".to_owned(),
                expected: *digest,
                got,
            });
        }
        self.push_blob_body(reference, digest, Body::Bytes(bytes), None)
            .await
    }

    async fn push_blob_body(
        &self,
        reference: &Reference,
        digest: &Digest,
        body: Body,
        mount_from: Option<&Reference>,
    ) -> Result<PushedBlob, RegistryError> {
        let push_scopes = vec![push_scope(&reference.repository)];
        let head = Request {
            method: Method::HEAD,
            url: self.url(reference, &format!("blobs/{digest}"))?,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scopes: push_scopes.clone(),
            reference,
        };
        if self.head_blob(head, digest).await?.is_some() {
            tracing::debug!("blob exists");
            return Ok(PushedBlob::Existed);
        }

        let mut session = None;
        if let Some(from) = mount_from {
            if from.registry != reference.registry {
                tracing::debug!(from = %from, "not mounting across registries; uploading");
            } else if from.repository != reference.repository {
                let mut url = self.url(reference, "blobs/uploads/")?;
                url.query_pairs_mut()
                    .append_pair("mount", &digest.to_string())
                    .append_pair("from", &from.repository);
                let req = Request {
                    method: Method::POST,
                    url,
                    headers: HeaderMap::new(),
                    body: Body::Bytes(Bytes::new()),
                    scopes: vec![
                        push_scope(&reference.repository),
                        pull_scope(&from.repository),
                    ],
                    reference,
                };
                let response = self.execute(&req).await?;
                match response.status() {
                    StatusCode::CREATED => {
                        tracing::debug!(from = %from.repository, "blob mounted");
                        return Ok(PushedBlob::Mounted);
                    }
                    StatusCode::ACCEPTED => {
                        tracing::debug!(from = %from.repository, "mount refused; uploading in the session offered");
                        session = Some(upload_location(&response, reference)?);
                    }
                    _ => {
                        let what = format!("mounting blob {digest} from {}", from.repository);
                        return Err(self
                            .error_for(response, reference, Target::Upload, &what)
                            .await);
                    }
                }
            }
        }
        // A session can be lost (e.g. a registry restarted behind a retried 5xx): start one
        // more and upload again.
        let mut restarted = false;
        let response = loop {
            let mut location = match session.take() {
                Some(location) => location,
                None => self.start_upload(reference, digest, &push_scopes).await?,
            };
            location
                .query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let req = Request {
                method: Method::PUT,
                url: location,
                headers,
                body: body.clone(),
                scopes: push_scopes.clone(),
                reference,
            };
            let response = self.execute(&req).await?;
            if response.status() == StatusCode::NOT_FOUND && !restarted {
                tracing::debug!("upload session unknown to the registry; starting a new one");
                restarted = true;
                continue;
            }
            if !response.status().is_success() {
                return Err(self
                    .error_for(
                        response,
                        reference,
                        Target::Upload,
                        &format!("uploading blob {digest}"),
                    )
                    .await);
            }
            break response;
        };
        if let Some(Ok(announced)) = content_digest(response.headers()) {
            if announced != *digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "uploaded blob (Docker-Content-Digest)".to_owned(),
                    expected: *digest,
                    got: announced,
                });
            }
        }
        tracing::debug!("blob uploaded");
        Ok(PushedBlob::Uploaded)
    }

    /// POSTs for a new upload session and returns its location.
    async fn start_upload(
        &self,
        reference: &Reference,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<Url, RegistryError> {
        let req = Request {
            method: Method::POST,
            url: self.url(reference, "blobs/uploads/")?,
            headers: HeaderMap::new(),
            body: Body::Bytes(Bytes::new()),
            scopes: scopes.to_vec(),
            reference,
        };
        let response = self.execute(&req).await?;
        if response.status() != StatusCode::ACCEPTED {
            let what = format!("starting upload of blob {digest}");
            return Err(self
                .error_for(response, reference, Target::Upload, &what)
                .await);
        }
        upload_location(&response, reference)
    }

    /// PUTs a manifest under `reference`'s tag (or its digest) and returns its digest.
    #[tracing::instrument(level = "debug", skip_all, fields(reference = %reference, media_type, len = bytes.len()))]
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        Ok(self.put_manifest(reference, media_type, bytes).await?.0)
    }

    /// PUTs a manifest as [`Client::push_manifest`] does and returns its digest and the response's
    /// headers (a manifest with a `subject` needs to know whether the registry sent `OCI-Subject`).
    pub(crate) async fn put_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(Digest, HeaderMap), RegistryError> {
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest to push".to_owned(),
                    expected,
                    got: digest,
                });
            }
        }
        let target = match (&reference.tag, &reference.digest) {
            (Some(tag), _) => tag.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => "latest".to_owned(),
        };
        let mut headers = HeaderMap::new();
        let content_type =
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("media type {media_type:?} cannot be sent as a header"),
            })?;
        headers.insert(CONTENT_TYPE, content_type);
        let req = Request {
            method: Method::PUT,
            url: self.url(reference, &format!("manifests/{target}"))?,
            headers,
            body: Body::Bytes(bytes),
            scopes: vec![push_scope(&reference.repository)],
            reference,
        };
        let response = self.execute(&req).await?;
        if !response.status().is_success() {
            return Err(self
                .error_for(response, reference, Target::Manifest, "pushing manifest")
                .await);
        }
        match content_digest(response.headers()) {
            Some(Ok(announced)) if announced != digest => {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "pushed manifest (Docker-Content-Digest)".to_owned(),
                    expected: digest,
                    got: announced,
                })
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "ignoring unreadable Docker-Content-Digest")
            }
            _ => {}
        }
        tracing::debug!(%digest, "manifest pushed");
        Ok((digest, response.headers().clone()))
    }
}

/// The upload session URL from a 202's `Location`, relative or absolute, resolved against the URL
/// the response came from (any query it carries, such as `_state`, is kept).
fn upload_location(response: &Response, reference: &Reference) -> Result<Url, RegistryError> {
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| RegistryError::Protocol {
            reference: reference.to_string(),
            detail: "upload session started without a Location header".to_owned(),
        })?;
    resolve_location(response.url(), location).map_err(|e| RegistryError::Protocol {
        reference: reference.to_string(),
        detail: format!("upload Location {location:?} is not a URL: {e}"),
    })
}

fn resolve_location(base: &Url, location: &str) -> Result<Url, url_error::ParseError> {
    base.join(location)
}

/// `reqwest` re-exports `Url` but not its error type under a stable path.
mod url_error {
    pub type ParseError = <reqwest::Url as std::str::FromStr>::Err;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_relative_absolute_and_keep_queries() {
        let base = Url::parse("http://127.0.0.1:5000/v2/app/blobs/uploads/").unwrap();
        let d = Digest::of(b"x");
        let cases = [
            (
                "/v2/app/blobs/uploads/u1",
                "http://127.0.0.1:5000/v2/app/blobs/uploads/u1?digest=",
            ),
            (
                "u2?_state=abc",
                "http://127.0.0.1:5000/v2/app/blobs/uploads/u2?_state=abc&digest=",
            ),
            (
                "http://other:9/up/u3?x=1&y=2",
                "http://other:9/up/u3?x=1&y=2&digest=",
            ),
        ];
        for (location, expected) in cases {
            let mut url = resolve_location(&base, location).unwrap();
            url.query_pairs_mut().append_pair("digest", &d.to_string());
            assert_eq!(
                url.as_str(),
                format!("{expected}sha256%3A{}", d.hex()),
                "{location}"
            );
        }
    }
}

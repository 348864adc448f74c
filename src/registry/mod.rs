//! The OCI distribution API: resolve, manifest and blob GET (whole or by `Range`), HEAD, push
//! (blob upload, cross-repository mount, manifest PUT), authentication and retries.
//!
//! One pooled HTTP client per [`Client`]; every blob read whole is checked against its digest.

use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::oci::{Digest, Reference};

/// Errors name the reference and, where the registry sent one, its error code.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{reference}: {message}")]
    Other { reference: String, message: String },
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Speak plain HTTP to every registry (loopback registries always get plain HTTP).
    pub plain_http: bool,
    /// Directory holding docker's `config.json` (default: `$DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
    /// Retries after a 429, a 5xx or a connection error (with exponential backoff).
    pub max_retries: u32,
}

/// A fetched manifest or index, verified against the digest when it was asked for by digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub media_type: Option<String>,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// What a blob push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushedBlob {
    /// The registry already had it (HEAD); nothing uploaded.
    Existed,
    /// Mounted from another repository of the same registry; nothing uploaded.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// A blob read as a stream: `AsyncRead` that fails at EOF if the bytes did not match the digest.
pub type BlobReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// A registry client (cheap to clone; clones share the connection pool and token cache).
#[derive(Debug, Clone)]
pub struct Client {}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, RegistryError> {
        let _ = config;
        todo!("registry helper")
    }

    /// GET the manifest or index `reference` names (by digest if pinned, else by tag).
    pub async fn get_manifest(&self, reference: &Reference) -> Result<FetchedManifest, RegistryError> {
        let _ = reference;
        todo!("registry helper")
    }

    /// GET a whole blob of `reference`'s repository, checked against `digest`.
    pub async fn get_blob(&self, reference: &Reference, digest: &Digest) -> Result<Bytes, RegistryError> {
        let _ = (reference, digest);
        todo!("registry helper")
    }

    /// Streams a blob; the reader fails at EOF if the content did not hash to `digest`.
    pub async fn blob_reader(&self, reference: &Reference, digest: &Digest) -> Result<BlobReader, RegistryError> {
        let _ = (reference, digest);
        todo!("registry helper")
    }

    /// GET `range` of a blob with one `Range` request.
    pub async fn get_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let _ = (reference, digest, range);
        todo!("registry helper")
    }

    /// HEAD a blob: its size if the registry has it.
    pub async fn blob_size(&self, reference: &Reference, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let _ = (reference, digest);
        todo!("registry helper")
    }

    /// Pushes the blob stored at `path` unless the registry has it: HEAD, then a cross-repository
    /// mount from `mount_from` (same registry) if given, then an upload.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
        mount_from: Option<&Reference>,
    ) -> Result<PushedBlob, RegistryError> {
        let _ = (reference, digest, path, mount_from);
        todo!("registry helper")
    }

    /// PUTs a manifest under `reference`'s tag (or its digest) and returns its digest.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let _ = (reference, media_type, bytes);
        todo!("registry helper")
    }
}

impl Client {
    /// Pushes a small blob held in memory (a config) unless the registry has it.
    pub async fn push_blob_bytes(&self, reference: &Reference, digest: &Digest, bytes: Bytes) -> Result<PushedBlob, RegistryError> {
        let _ = (reference, digest, bytes);
        todo!("registry helper")
    }
}

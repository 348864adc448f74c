//! OCI names and documents: digests, image references, manifests, indexes, platforms and the
//! image config. Pure data: nothing here does I/O.

pub mod digest;

use std::fmt;
use std::str::FromStr;

pub use digest::{Digest, DigestError, Hasher, HashingReader, HashingWriter};
pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Errors in names and documents.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// `HOST[:PORT]/REPO[:TAG][@DIGEST]`, normalised as docker does (`debian` is
/// `docker.io/library/debian:latest`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `127.0.0.1:5000`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// The same repository, pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        let _ = digest;
        todo!("registry helper")
    }

    /// True for a registry on loopback (`localhost`, `127.0.0.0/8`, `[::1]`), spoken to over plain
    /// HTTP without a flag.
    pub fn is_loopback(&self) -> bool {
        todo!("registry helper")
    }

    /// What to ask the registry for: the digest if pinned, else the tag (`latest` if neither).
    pub fn tag_or_digest(&self) -> String {
        todo!("registry helper")
    }
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        todo!("registry helper")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("registry helper")
    }
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI (GOARCH) names: `linux/amd64`, `linux/arm64`, ...
    pub fn host() -> Self {
        todo!("registry helper")
    }
}

impl FromStr for Platform {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        todo!("registry helper")
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let _ = f;
        todo!("registry helper")
    }
}

/// A manifest or an index, told apart by media type (and by content when the media type is absent).
#[derive(Debug, Clone)]
pub enum ImageDocument {
    Manifest(ImageManifest),
    Index(ImageIndex),
}

/// Parses a manifest or index (OCI or Docker schema 2) fetched with `media_type`.
pub fn parse_document(media_type: Option<&str>, bytes: &[u8]) -> Result<ImageDocument, OciError> {
    let _ = (media_type, bytes);
    todo!("registry helper")
}

/// Chooses the manifest for `platform` from an index; the error lists the platforms it offers.
pub fn select_platform(index: &ImageIndex, platform: &Platform) -> Result<Descriptor, OciError> {
    let _ = (index, platform);
    todo!("registry helper")
}

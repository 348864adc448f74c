//! OCI names and documents: digests, image references, manifests, indexes, platforms and the
//! image config. Pure data: nothing here does I/O.
//!
//! - [`Reference`]: `HOST[:PORT]/REPO[:TAG][@DIGEST]`, normalised as docker does.
//! - [`Platform`]: `os/arch[/variant]` in GOOS/GOARCH names.
//! - [`parse_document`], [`select_platform`]: manifests and indexes (OCI and Docker schema 2).

pub mod digest;
mod document;
mod platform;
mod reference;

pub use digest::{Digest, DigestError, Hasher, HashingReader, HashingWriter};
pub use document::{parse_document, select_platform, ImageDocument};
pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
pub use platform::Platform;
pub use reference::Reference;

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Errors in names and documents.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A string that is not an image reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    /// A string that is not `os/arch[/variant]`.
    #[error(
        "invalid platform {platform:?}: {reason} (expected os/arch[/variant], e.g. linux/amd64)"
    )]
    Platform { platform: String, reason: String },
    /// A manifest or index that cannot be read.
    #[error("{what}: {reason}")]
    Document { what: String, reason: String },
    /// A media type this project does not read (e.g. Docker schema 1).
    #[error("unsupported manifest media type {media_type:?}: {hint}")]
    UnsupportedMediaType { media_type: String, hint: String },
    /// An index without a manifest for the wanted platform.
    #[error("no manifest for {wanted} in index; it offers {offered}")]
    NoPlatform { wanted: String, offered: String },
}

/// The string entries of a JSON object (annotations, labels); anything else gives an empty map.
pub fn string_map(value: Option<&serde_json::Value>) -> std::collections::BTreeMap<String, String> {
    value
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

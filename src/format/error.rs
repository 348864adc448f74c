//! The one error type of the `format` module.

use crate::oci::Digest;

/// Everything that can go wrong reading or writing a lazy layer. Messages name the entry or chunk
/// and the cause.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A tar entry (or TOC entry) that is hostile, malformed or unsupported.
    #[error("entry {name:?}: {reason}")]
    Entry { name: String, reason: String },

    /// A valid tar entry that a lazy layer's TOC cannot hold (a name or link target that is not
    /// UTF-8, which JSON cannot carry; a time outside the years RFC 3339 can write). Unlike
    /// [`FormatError::Entry`] the layer is fine as a plain layer: `convert` keeps it plain.
    #[error("entry {name:?}: {reason} (a lazy layer's TOC cannot hold it)")]
    Unrepresentable { name: String, reason: String },

    /// The tar stream ended inside a header or a payload.
    #[error("tar stream truncated: {detail} (entry {name:?}); the layer is incomplete")]
    Truncated { name: String, detail: String },

    /// A tar header block whose checksum does not match its bytes.
    #[error(
        "entry {name:?}: bad tar header checksum at byte offset {offset} (stored {stored}, computed {computed}); the layer is corrupt"
    )]
    Checksum {
        name: String,
        offset: u64,
        stored: String,
        computed: u64,
    },

    /// A chunk whose decompressed bytes do not match the digest in the TOC.
    #[error("{chunk}: digest mismatch (expected {expected}, got {actual})")]
    ChunkDigest {
        chunk: String,
        expected: Digest,
        actual: Digest,
    },

    /// A chunk that could not be decompressed or was too short.
    #[error("{chunk}: {reason}")]
    Chunk { chunk: String, reason: String },

    /// The TOC bytes do not match the digest pinned in the manifest annotation.
    #[error(
        "TOC digest mismatch (expected {expected}, got {actual}): the blob does not match its manifest annotation"
    )]
    TocDigest { expected: Digest, actual: Digest },

    /// A footer that is not one of the known layouts.
    #[error("footer: {0}")]
    Footer(String),

    /// A TOC that cannot be decoded.
    #[error("TOC: {0}")]
    Toc(String),

    /// The descriptor carries no annotations of a lazy format.
    #[error("layer of media type {media_type:?} is not a lazy layer (no zstd:chunked or eStargz annotations)")]
    NotLazy { media_type: String },

    /// Invalid [`super::WriteOptions`].
    #[error("invalid write options: {0}")]
    Options(String),

    /// A compression worker failed.
    #[error("compression failed: {0}")]
    Compress(String),
}

impl FormatError {
    /// Whether the error says only that the layer cannot be written in a lazy format, and the
    /// same layer kept plain is valid (as opposed to hostile, corrupt or truncated input).
    pub fn is_unrepresentable(&self) -> bool {
        matches!(self, Self::Unrepresentable { .. })
    }

    pub(crate) fn entry(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Entry {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

//! Start-up profiles: which chunks of each layer a container read while it started, in the order
//! it first read them.
//!
//! A profile is recorded once (`lazysnap profile record`), stored in the registry as an OCI
//! artifact whose `subject` is the image manifest (so the image's digest and signatures never
//! change), and used at mount as a hint: the profiled chunks are fetched ahead of the container's
//! own reads. It is only a hint. Every chunk is still verified against the layer's TOC, entries the
//! TOC does not hold are ignored, and its size is bounded before it is read, so a broken or hostile
//! profile costs at most its own bytes.
//!
//! Owns: the profile document (JSON, [`MEDIA_TYPE`]) and its bounds. Does not own: recording
//! (the `fetch` access log), storage in the registry, or prefetching.

pub mod lookup;
pub mod record;
pub mod show;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::oci::Digest;

/// Media type of the profile blob, and `artifactType` of the manifest that carries it.
pub const MEDIA_TYPE: &str = "application/vnd.lazysnap.profile.v1+json";

/// The most bytes a profile document may have; larger ones are refused before they are read.
/// 4 MiB holds ~30 000 accesses, far more than any start-up reads (python-import: ~600 chunks).
pub const MAX_BYTES: u64 = 4 << 20;
/// The most layers a profile may name (an image has at most a few hundred).
pub const MAX_LAYERS: usize = 1024;
/// The most accesses a profile may list, over all layers.
pub const MAX_ACCESSES: usize = 65_536;
/// The longest entry name kept (PATH_MAX); longer names are refused with the document.
pub const MAX_NAME: usize = 4096;

/// Why a profile document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("the profile is {0} bytes, more than the {MAX_BYTES} allowed")]
    TooLarge(u64),
    #[error("the profile is not valid JSON of version 1: {0}")]
    Syntax(String),
    #[error("unsupported profile version {0} (this lazysnap reads version 1)")]
    Version(u32),
    #[error("the profile names {0} layers, more than the {MAX_LAYERS} allowed")]
    TooManyLayers(usize),
    #[error("the profile lists {0} accesses, more than the {MAX_ACCESSES} allowed")]
    TooManyAccesses(usize),
    #[error("the profile names an entry of {0} bytes, more than the {MAX_NAME} allowed")]
    NameTooLong(usize),
}

/// What one image's start-up read, layer by layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Always 1.
    pub version: u32,
    /// The image manifest the profile was recorded from (the artifact's `subject`).
    pub image: Digest,
    /// The command that ran while recording, for people reading `profile show`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The image's layers that start-up read from, bottom first; layers it never read are left out.
    pub layers: Vec<LayerProfile>,
}

/// The chunks start-up read from one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    /// The layer's blob digest (as in the manifest).
    pub digest: Digest,
    /// The layer's uncompressed digest (its `diff_id`), which a conversion of the same source
    /// keeps for plain layers and which lets `convert --profile` match layers of another encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    /// Each chunk once, in the order of its first read.
    pub accesses: Vec<Access>,
}

/// The first read of one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// The entry (file path in the layer, as in the TOC) the chunk belongs to.
    pub name: String,
    /// Where the chunk starts in the file's content.
    pub offset: u64,
    /// The chunk's uncompressed sha256, as in the TOC: what prefetch looks the chunk up by.
    pub chunk: Digest,
    /// Milliseconds from the start of recording to this first read.
    #[serde(default)]
    pub at_ms: u64,
}

impl Profile {
    /// Decodes and bounds a profile document. `bytes` must already be bounded by [`MAX_BYTES`]
    /// (read it with that limit); this checks again, then checks every count and name.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProfileError> {
        let len = bytes.len() as u64;
        if len > MAX_BYTES {
            return Err(ProfileError::TooLarge(len));
        }
        let profile: Profile =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Syntax(e.to_string()))?;
        profile.check()?;
        Ok(profile)
    }

    /// The document: deterministic (same profile, same bytes), so pushing it twice uploads once.
    pub fn encode(&self) -> Result<Vec<u8>, ProfileError> {
        self.check()?;
        let bytes = serde_json::to_vec(self).map_err(|e| ProfileError::Syntax(e.to_string()))?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(ProfileError::TooLarge(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// The accesses recorded for the layer whose blob is `blob`, if start-up read it.
    pub fn layer(&self, blob: &Digest) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| &l.digest == blob)
    }

    /// All accesses, over every layer.
    pub fn accesses(&self) -> usize {
        self.layers.iter().map(|l| l.accesses.len()).sum()
    }

    fn check(&self) -> Result<(), ProfileError> {
        if self.version != 1 {
            return Err(ProfileError::Version(self.version));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(ProfileError::TooManyLayers(self.layers.len()));
        }
        let accesses = self.accesses();
        if accesses > MAX_ACCESSES {
            return Err(ProfileError::TooManyAccesses(accesses));
        }
        let longest = self
            .layers
            .iter()
            .flat_map(|l| l.accesses.iter().map(|a| a.name.len()))
            .chain(self.command.iter().map(String::len))
            .max()
            .unwrap_or(0);
        if longest > MAX_NAME {
            return Err(ProfileError::NameTooLong(longest));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        Profile {
            version: 1,
            image: Digest::of(b"manifest"),
            command: vec!["python3".into(), "-c".into(), "print(1)".into()],
            layers: vec![LayerProfile {
                digest: Digest::of(b"layer"),
                diff_id: Some(Digest::of(b"tar")),
                accesses: vec![Access {
                    name: "usr/bin/python3.11".into(),
                    offset: 4 << 20,
                    chunk: Digest::of(b"chunk"),
                    at_ms: 12,
                }],
            }],
        }
    }

    #[test]
    fn round_trips_byte_for_byte() {
        let p = sample();
        let bytes = p.encode().unwrap();
        assert_eq!(Profile::decode(&bytes).unwrap(), p);
        assert_eq!(p.encode().unwrap(), bytes);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let mut p = sample();
        p.version = 2;
        let bytes = serde_json::to_vec(&p).unwrap();
        assert!(matches!(
            Profile::decode(&bytes),
            Err(ProfileError::Version(2))
        ));
        let odd = br#"{"version":1,"image":"sha256:00","layers":[]}"#;
        assert!(matches!(Profile::decode(odd), Err(ProfileError::Syntax(_))));
        let extra = String::from_utf8(sample().encode().unwrap())
            .unwrap()
            .replacen("{", r#"{"evil":1,"#, 1);
        assert!(Profile::decode(extra.as_bytes()).is_err());
    }

    #[test]
    fn bounds_every_count_before_use() {
        let big = vec![b' '; MAX_BYTES as usize + 1];
        assert!(matches!(
            Profile::decode(&big),
            Err(ProfileError::TooLarge(_))
        ));
        let mut p = sample();
        let a = p.layers[0].accesses[0].clone();
        p.layers[0].accesses = vec![a; MAX_ACCESSES + 1];
        assert!(matches!(
            p.encode(),
            Err(ProfileError::TooManyAccesses(_)) | Err(ProfileError::TooLarge(_))
        ));
        let mut p = sample();
        p.layers[0].accesses[0].name = "x".repeat(MAX_NAME + 1);
        assert!(matches!(p.encode(), Err(ProfileError::NameTooLong(_))));
    }
}

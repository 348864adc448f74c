//! Finding an image's start-up profile at mount: in the registry (the image's referrers), in a
//! file, or not at all.
//!
//! A profile is a hint, so finding one never fails a mount: whatever goes wrong (the registry,
//! a document that is not JSON, too large, or recorded from another image) is logged once, counted
//! in `lazysnap_profile_ignored_total`, and the mount goes on without it. Registry lookups are
//! `profile::lookup`'s, shared with lazysnapd: one per image a minute.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::FutureExt;

use crate::metrics::METRICS;
use crate::oci::{Digest, Reference};
use crate::profile::lookup::{Lookup, Lookups};
use crate::profile::{self, Profile, ProfileError};
use crate::registry::Client;

/// Where a mount gets the image's start-up profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProfileSource {
    /// Look it up among the image's referrers in its registry (the default).
    #[default]
    Registry,
    /// Read it from this JSON file (`lazysnap profile record --out`).
    File(PathBuf),
    /// Use none.
    Off,
}

impl std::str::FromStr for ProfileSource {
    type Err = std::convert::Infallible;

    /// `none` (or `off`) turns profiles off, `registry` is the default lookup, anything else is
    /// a file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" | "off" => Self::Off,
            "registry" => Self::Registry,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// A lookup's result, shared by every mount of the image that asks while (or after) it runs.
pub type SharedProfile = Lookup;

/// How long a registry lookup may take before the mount goes on without a profile: each layer's
/// own fetching (TOC prefetch set, background completion) waits for the answer, and a profile
/// that arrives later than this is of little use to a start-up anyway.
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Registry lookups, in flight or done, kept a minute per image ([`Lookups`]); clones share them.
#[derive(Debug, Clone)]
pub struct ProfileLookups {
    registry: Lookups,
}

impl Default for ProfileLookups {
    fn default() -> Self {
        Self {
            registry: Lookups::new(LOOKUP_TIMEOUT),
        }
    }
}

/// Why a profile was not used: the `reason` label of `lazysnap_profile_ignored_total`.
fn reason(e: &ProfileError) -> &'static str {
    match e {
        ProfileError::TooLarge(_) => "too_large",
        _ => "invalid",
    }
}

/// Counts and logs a profile that is not used.
fn ignored(what: &str, reason: &'static str, detail: &dyn std::fmt::Display) {
    METRICS.profile_ignored.with_label_values(&[reason]).inc();
    tracing::warn!(
        reason,
        "start-up profile {what} ignored, mounting without it: {detail}"
    );
}

impl ProfileLookups {
    /// The profile of the image `manifest` (of `reference`) from `source`, as a future that is
    /// already running: await it once the layers' TOCs are known. A registry lookup is made
    /// once per image a minute ([`Lookups`]); a file is read now.
    pub fn lookup(
        &self,
        source: &ProfileSource,
        client: &Client,
        reference: &Reference,
        manifest: &Digest,
    ) -> SharedProfile {
        match source {
            ProfileSource::Off => futures_util::future::ready(None).boxed().shared(),
            ProfileSource::File(path) => {
                futures_util::future::ready(from_file(path, manifest).map(Arc::new))
                    .boxed()
                    .shared()
            }
            ProfileSource::Registry => self.registry.lookup(client, reference, *manifest),
        }
    }
}

/// Reads the profile in `path`, bounded by [`profile::MAX_BYTES`] before it is read; `None`
/// (logged and counted) when it cannot be used for the image `manifest`.
pub fn from_file(path: &Path, manifest: &Digest) -> Option<Profile> {
    let what = format!("{}", path.display());
    let read = || -> std::io::Result<Vec<u8>> {
        let file = std::fs::File::open(path)?;
        let mut bytes = Vec::new();
        file.take(profile::MAX_BYTES + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = match read() {
        Ok(b) => b,
        Err(e) => {
            METRICS.profile_lookups.with_label_values(&["error"]).inc();
            ignored(&what, "unreadable", &e);
            return None;
        }
    };
    checked(&what, Profile::decode(&bytes), manifest)
}

/// The decoded profile if it was recorded from `manifest`; counted either way.
fn checked(
    what: &str,
    decoded: Result<Profile, ProfileError>,
    manifest: &Digest,
) -> Option<Profile> {
    match decoded {
        Ok(p) if p.image == *manifest => {
            METRICS.profile_lookups.with_label_values(&["found"]).inc();
            tracing::info!(
                layers = p.layers.len(),
                accesses = p.accesses(),
                "start-up profile {what} found"
            );
            Some(p)
        }
        Ok(p) => {
            METRICS.profile_lookups.with_label_values(&["error"]).inc();
            let detail = format!("it was recorded from image {}, not {manifest}", p.image);
            ignored(what, "foreign", &detail);
            None
        }
        Err(e) => {
            METRICS.profile_lookups.with_label_values(&["error"]).inc();
            ignored(what, reason(&e), &e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Access, LayerProfile};

    fn sample(image: Digest) -> Profile {
        Profile {
            version: 1,
            image,
            command: vec![],
            layers: vec![LayerProfile {
                digest: Digest::of(b"layer"),
                diff_id: None,
                accesses: vec![Access {
                    name: "bin/sh".into(),
                    offset: 0,
                    chunk: Digest::of(b"chunk"),
                    at_ms: 0,
                }],
            }],
        }
    }

    #[test]
    fn a_file_profile_is_used_only_when_it_is_sound_and_for_this_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = Digest::of(b"image");
        let good = dir.path().join("good.json");
        std::fs::write(&good, sample(image).encode().unwrap()).unwrap();
        assert_eq!(from_file(&good, &image), Some(sample(image)));

        let foreign = Digest::of(b"another image");
        let count = |r: &str| METRICS.profile_ignored.with_label_values(&[r]).get();
        let before = count("foreign");
        assert_eq!(
            from_file(&good, &foreign),
            None,
            "recorded from another image"
        );
        assert_eq!(count("foreign"), before + 1);

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"version\":1,").unwrap();
        let before = count("invalid");
        assert_eq!(from_file(&bad, &image), None);
        assert_eq!(count("invalid"), before + 1);

        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; profile::MAX_BYTES as usize + 10]).unwrap();
        let before = count("too_large");
        assert_eq!(from_file(&big, &image), None);
        assert_eq!(count("too_large"), before + 1);

        let before = count("unreadable");
        assert_eq!(from_file(&dir.path().join("missing"), &image), None);
        assert_eq!(count("unreadable"), before + 1);
    }

    #[test]
    fn sources_parse_from_the_flag() {
        assert_eq!("none".parse::<ProfileSource>().unwrap(), ProfileSource::Off);
        assert_eq!(
            "registry".parse::<ProfileSource>().unwrap(),
            ProfileSource::Registry
        );
        assert_eq!(
            "/tmp/p.json".parse::<ProfileSource>().unwrap(),
            ProfileSource::File("/tmp/p.json".into())
        );
    }
}

//! Finding an image's start-up profile at mount: in the registry (the image's referrers), in a
//! file, or not at all.
//!
//! A profile is a hint, so finding one never fails a mount: whatever goes wrong (the registry,
//! a document that is not JSON, too large, or recorded from another image) is logged once, counted
//! in `lazysnap_profile_ignored_total`, and the mount goes on without it. Lookups in the registry
//! are remembered per manifest digest for the life of the process ([`ProfileLookups`]): the
//! second mount of an image asks nothing.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::metrics::METRICS;
use crate::oci::{Digest, Reference};
use crate::profile::store::StoreError;
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
pub type SharedProfile = Shared<BoxFuture<'static, Option<Arc<Profile>>>>;

/// The most manifests whose lookup result a process remembers; older ones are asked again.
const REMEMBERED: usize = 256;

/// Registry lookups by manifest digest, in flight or done; clones share them.
#[derive(Clone, Default)]
pub struct ProfileLookups {
    inner: Arc<Mutex<Remembered>>,
}

#[derive(Default)]
struct Remembered {
    by_manifest: HashMap<Digest, SharedProfile>,
    order: VecDeque<Digest>,
}

impl std::fmt::Debug for ProfileLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map_or(0, |r| r.by_manifest.len());
        f.debug_struct("ProfileLookups")
            .field("remembered", &n)
            .finish()
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
    /// once per manifest digest in the process; a file is read now.
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
            ProfileSource::Registry => {
                let mut remembered = self
                    .inner
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(found) = remembered.by_manifest.get(manifest) {
                    return found.clone();
                }
                let task =
                    tokio::spawn(from_registry(client.clone(), reference.clone(), *manifest));
                let shared = async move { task.await.ok().flatten().map(Arc::new) }
                    .boxed()
                    .shared();
                remembered.by_manifest.insert(*manifest, shared.clone());
                remembered.order.push_back(*manifest);
                while remembered.order.len() > REMEMBERED {
                    if let Some(old) = remembered.order.pop_front() {
                        remembered.by_manifest.remove(&old);
                    }
                }
                shared
            }
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

/// Why a profile in the registry was not used: the `reason` label of
/// `lazysnap_profile_ignored_total`.
fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Registry(_) | StoreError::Read { .. } => "unreachable",
        StoreError::TooLarge { .. } => "too_large",
        StoreError::Foreign { .. } => "foreign",
        StoreError::Document { source, .. } => reason(source),
        StoreError::Encode(_) | StoreError::Malformed { .. } => "invalid",
    }
}

/// Looks the image's profile up among its referrers in the registry (both the referrers API and
/// the `sha256-<hex>` tag, at once: finding none costs one round trip).
async fn from_registry(client: Client, reference: Reference, manifest: Digest) -> Option<Profile> {
    let what = format!("of {reference}@{manifest} in the registry");
    match profile::store::find(&client, &reference, &manifest).await {
        Ok(None) => {
            METRICS.profile_lookups.with_label_values(&["none"]).inc();
            tracing::debug!(image = %manifest, "no start-up profile in the registry");
            None
        }
        Ok(Some(p)) => checked(&what, Ok(p), &manifest),
        Err(e) => {
            METRICS.profile_lookups.with_label_values(&["error"]).inc();
            ignored(&what, store_reason(&e), &e);
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

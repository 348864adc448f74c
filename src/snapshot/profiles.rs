//! Start-up profiles for lazysnapd's layers: the image's profile (an OCI artifact whose subject
//! is the image manifest, see `profile::store`) is looked up once per manifest, as soon as the
//! manifest is known and in parallel with the layers' TOC reads, and shared by all of the
//! image's layers; each layer's part is fetched ahead of the container's reads when the layer is
//! mounted (`remote`).
//!
//! A profile is a hint: a lookup that fails, or finds a profile that is too large, broken or
//! recorded from another image, is logged, counted (`lazysnap_profile_lookups_total`,
//! `lazysnap_profile_ignored_total`) and ignored; the layer mounts as it would without one.
//! Every chunk a profile names is still looked up in the layer's TOC and verified when fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;

use crate::metrics::METRICS;
use crate::oci::{Digest, Reference};
use crate::profile::store::{self, StoreError};
use crate::profile::Profile;
use crate::registry::Client;

/// A lookup being made (or made): the profile, or none (none found, or ignored).
pub(super) type Lookup = Shared<BoxFuture<'static, Option<Arc<Profile>>>>;

/// Lookups kept at once, and how long: one pull's layers share one (a profile may be replaced at
/// any time, so not much longer).
const MAX_KEPT: usize = 64;
const KEEP: Duration = Duration::from_secs(60);

/// Lookups by (registry, repository, manifest digest), with when each was started.
type Kept = HashMap<(String, String, Digest), (Instant, Lookup)>;

/// Profile lookups by (registry, repository, manifest digest).
pub(super) struct Profiles {
    /// Bounds one lookup (the read timeout, as for a TOC).
    timeout: Duration,
    kept: Mutex<Kept>,
}

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiles")
            .field("kept", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Profiles {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            kept: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The profile lookup of image `manifest` in `reference`'s repository at the host `client`
    /// talks to: started now (in a task of its own, so it runs while the caller reads TOCs) unless
    /// one for the same manifest was started a moment ago. Must run inside a tokio runtime.
    pub(super) fn lookup(
        &self,
        client: &Client,
        reference: &Reference,
        manifest: Digest,
    ) -> Lookup {
        let key = (
            reference.registry.clone(),
            reference.repository.clone(),
            manifest,
        );
        let now = Instant::now();
        let mut kept = self.lock();
        kept.retain(|_, (at, _)| now.duration_since(*at) < KEEP);
        if let Some((_, lookup)) = kept.get(&key) {
            return lookup.clone();
        }
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        let (client, reference, timeout) = (client.clone(), reference.clone(), self.timeout);
        let task = tokio::spawn(find_logged(client, reference, manifest, timeout));
        let lookup = async move { task.await.ok().flatten() }.boxed().shared();
        kept.insert(key, (now, lookup.clone()));
        lookup
    }
}

/// The bounded label a lookup failure is counted under.
fn ignored_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Registry(_) => "unreachable",
        StoreError::Encode(_) | StoreError::Document { .. } | StoreError::Malformed { .. } => {
            "invalid"
        }
        StoreError::TooLarge { .. } => "too_large",
        StoreError::Foreign { .. } => "foreign",
        StoreError::Read { .. } => "unreadable",
    }
}

async fn find_logged(
    client: Client,
    reference: Reference,
    manifest: Digest,
    timeout: Duration,
) -> Option<Arc<Profile>> {
    let found = tokio::time::timeout(timeout, store::find(&client, &reference, &manifest)).await;
    let lookups = |result: &str| METRICS.profile_lookups.with_label_values(&[result]).inc();
    match found {
        Ok(Ok(Some(profile))) => {
            lookups("found");
            tracing::info!(
                image = %reference,
                %manifest,
                layers = profile.layers.len(),
                accesses = profile.accesses(),
                "start-up profile found"
            );
            Some(Arc::new(profile))
        }
        Ok(Ok(None)) => {
            lookups("none");
            tracing::debug!(image = %reference, %manifest, "no start-up profile");
            None
        }
        Ok(Err(e)) => {
            lookups("error");
            let reason = ignored_reason(&e);
            METRICS.profile_ignored.with_label_values(&[reason]).inc();
            tracing::warn!(image = %reference, %manifest, reason, "start-up profile ignored, mounting without it: {e}");
            None
        }
        Err(_) => {
            lookups("error");
            METRICS
                .profile_ignored
                .with_label_values(&["unreachable"])
                .inc();
            tracing::warn!(image = %reference, %manifest, "no answer to the start-up profile lookup within {timeout:?}; mounting without one");
            None
        }
    }
}

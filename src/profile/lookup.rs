//! Looking an image's start-up profile up in its registry, once per image: the lookup starts as
//! soon as the manifest is known, runs in a task of its own (in parallel with the layers' TOC
//! reads), and every layer of the image, in `lazysnap run`/`mount` or in lazysnapd, shares it.
//!
//! A profile is a hint: a lookup that fails, times out, or finds a profile that is too large,
//! broken or recorded from another image, is logged, counted (`lazysnap_profile_lookups_total`,
//! `lazysnap_profile_ignored_total`) and ignored; the layer mounts as it would without one.
//! Every chunk a profile names is still looked up in the layer's TOC and verified when fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;

use super::store::{self, StoreError};
use super::{Profile, ProfileError};
use crate::metrics::METRICS;
use crate::oci::{Digest, Reference};
use crate::registry::Client;

/// A lookup being made (or made): the profile, or none (none found, or ignored).
pub type Lookup = Shared<BoxFuture<'static, Option<Arc<Profile>>>>;

/// Lookups kept at once, and how long: one pull's layers share one (a profile may be replaced at
/// any time, so not much longer).
const MAX_KEPT: usize = 256;
const KEEP: Duration = Duration::from_secs(60);

/// Lookups by (registry, repository, manifest digest), with when each was started.
type Kept = HashMap<(String, String, Digest), (Instant, Lookup)>;

/// Profile lookups by (registry, repository, manifest digest); clones share them. A profile
/// found in one repository says nothing of another's, so the key names both.
#[derive(Clone)]
pub struct Lookups {
    /// Bounds one lookup: a profile that arrives later is of little use to a start-up, and each
    /// layer's own prefetch and background fetch wait for the answer.
    timeout: Duration,
    kept: Arc<Mutex<Kept>>,
}

impl std::fmt::Debug for Lookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookups")
            .field("kept", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Lookups {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            kept: Arc::new(Mutex::new(HashMap::new())),
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
    pub fn lookup(&self, client: &Client, reference: &Reference, manifest: Digest) -> Lookup {
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

/// The bounded label a lookup failure is counted under (`lazysnap_profile_ignored_total`).
fn ignored_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Registry(_) => "unreachable",
        StoreError::Read { .. } => "unreadable",
        StoreError::TooLarge { .. }
        | StoreError::Document {
            source: ProfileError::TooLarge(_),
            ..
        } => "too_large",
        StoreError::Foreign { .. } => "foreign",
        StoreError::Encode(_) | StoreError::Document { .. } | StoreError::Malformed { .. } => {
            "invalid"
        }
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

//! Pull secrets: credentials that reached us with an image pull (kubelet's image pull secrets,
//! through the CRI image service proxy), kept per repository for a bounded time.
//!
//! containerd's CRI plugin uses a pod's pull secret for its own requests and never passes it
//! to a proxy snapshotter, so the lazy layers of a private image would fall back. The proxy
//! hands each PullImage's credentials here before containerd starts the pull, and the
//! registry client answers that repository's 401s with them.
//!
//! Kept in memory only (never on disk, never logged: [`Credentials`] redacts its `Debug`), for
//! each `(registry, repository)` pair the last pull named, until `ttl` after that pull: the
//! background fetch of a layer completes within it, and a pull of the same image renews it.
//! The number of repositories kept is bounded; the one whose secret expires first goes first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::auth::Credentials;

/// Repositories whose secrets are kept at most (a node pulls from far fewer).
const MAX_REPOSITORIES: usize = 4096;
/// Longest time a secret may be kept, whatever the caller asks.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The pull secrets of one process, shared by every client made with the same
/// [`super::ClientConfig`] (cheap to clone: clones share the store).
#[derive(Debug, Clone, Default)]
pub struct PullSecrets {
    inner: Arc<Mutex<HashMap<(String, String), Kept>>>,
}

#[derive(Debug)]
struct Kept {
    credentials: Credentials,
    until: Instant,
}

/// One pull's credentials for one repository, as the CRI proxy hands them on (also between
/// lazysnapd's processes, over the layer host's root-only socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullSecret {
    /// As [`crate::oci::Reference`] normalises it (`docker.io`, `host:port`).
    pub registry: String,
    pub repository: String,
    pub credentials: Credentials,
    /// Kept this long (at most [`MAX_TTL`]).
    pub ttl_secs: u64,
}

impl PullSecrets {
    /// Keeps `secret` for pulls from its repository, replacing what an earlier pull gave.
    pub fn remember(&self, secret: PullSecret) {
        let now = Instant::now();
        let ttl = Duration::from_secs(secret.ttl_secs).min(MAX_TTL);
        let mut kept = self.lock();
        kept.retain(|_, k| k.until > now);
        let key = (secret.registry, secret.repository);
        if kept.len() >= MAX_REPOSITORIES && !kept.contains_key(&key) {
            if let Some(first) = kept
                .iter()
                .min_by_key(|(_, k)| k.until)
                .map(|(key, _)| key.clone())
            {
                kept.remove(&first);
            }
        }
        kept.insert(
            key,
            Kept {
                credentials: secret.credentials,
                until: now + ttl,
            },
        );
    }

    /// The credentials a pull gave for `registry`/`repository`, while they are fresh.
    pub fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        self.fresh(registry, repository).map(|(c, _)| c)
    }

    /// The whole secret kept for `registry`/`repository`, with the time it has left, while it is
    /// fresh (to hand it on again).
    pub fn secret(&self, registry: &str, repository: &str) -> Option<PullSecret> {
        let (credentials, left) = self.fresh(registry, repository)?;
        Some(PullSecret {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            credentials,
            ttl_secs: left.as_secs().max(1),
        })
    }

    /// The credentials kept for `registry`/`repository` and the time they have left, if any.
    fn fresh(&self, registry: &str, repository: &str) -> Option<(Credentials, Duration)> {
        let kept = self.lock();
        let k = kept.get(&(registry.to_owned(), repository.to_owned()))?;
        let left = k.until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then(|| (k.credentials.clone(), left))
    }

    /// How many repositories have a secret now (expired ones included until the next
    /// `remember`); for tests and metrics.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Kept>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str) -> Credentials {
        Credentials {
            username: user.into(),
            password: "secret".into(),
        }
    }

    fn secret(registry: &str, repository: &str, user: &str, ttl: Duration) -> PullSecret {
        PullSecret {
            registry: registry.into(),
            repository: repository.into(),
            credentials: creds(user),
            ttl_secs: ttl.as_secs(),
        }
    }

    #[test]
    fn a_secret_is_per_repository_and_the_last_pull_wins() {
        let s = PullSecrets::default();
        s.remember(secret(
            "r.example",
            "team/app",
            "a",
            Duration::from_secs(60),
        ));
        assert_eq!(s.get("r.example", "team/app"), Some(creds("a")));
        assert_eq!(s.get("r.example", "team/other"), None);
        assert_eq!(s.get("other.example", "team/app"), None);
        s.remember(secret(
            "r.example",
            "team/app",
            "b",
            Duration::from_secs(60),
        ));
        assert_eq!(s.get("r.example", "team/app"), Some(creds("b")));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_kept_secret_is_handed_on_with_the_time_it_has_left() {
        let s = PullSecrets::default();
        s.remember(secret("r.example", "app", "a", Duration::from_secs(60)));
        let again = s.secret("r.example", "app").unwrap();
        assert_eq!(again.credentials, creds("a"));
        assert!(
            again.ttl_secs <= 60 && again.ttl_secs >= 58,
            "{}",
            again.ttl_secs
        );
        assert_eq!(s.secret("r.example", "other"), None);
    }

    #[test]
    fn an_expired_secret_is_not_used() {
        let s = PullSecrets::default();
        s.remember(secret("r.example", "app", "a", Duration::ZERO));
        assert_eq!(s.get("r.example", "app"), None);
    }

    #[test]
    fn the_store_is_bounded_and_drops_the_secret_that_expires_first() {
        let s = PullSecrets::default();
        s.remember(secret("r.example", "short", "a", Duration::from_secs(1)));
        for i in 0..MAX_REPOSITORIES {
            s.remember(secret("r.example", &format!("repo{i}"), "b", MAX_TTL));
        }
        assert_eq!(s.len(), MAX_REPOSITORIES);
        assert_eq!(s.get("r.example", "short"), None);
        assert!(s.get("r.example", "repo0").is_some());
        assert!(s
            .get("r.example", &format!("repo{}", MAX_REPOSITORIES - 1))
            .is_some());
    }

    #[test]
    fn a_secret_never_shows_in_debug_output() {
        let s = PullSecrets::default();
        s.remember(secret("r.example", "app", "a", Duration::from_secs(60)));
        assert!(!format!("{s:?}").contains("secret"));
    }
}

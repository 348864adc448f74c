//! The OCI distribution API: resolve, manifest and blob GET (whole or by `Range`), HEAD, push
//! (blob upload, cross-repository mount, manifest PUT), authentication and retries.
//!
//! One pooled HTTP client per [`Client`]; every blob read whole is checked against its digest.
//! Loopback registries are spoken to over plain HTTP, others over HTTPS (unless
//! [`ClientConfig::plain_http`]). Owns no cache and no layer format: callers get bytes.
//!
//! - `client`: the HTTP core (authentication on 401, retries with backoff, error mapping);
//! - `auth`: docker `config.json`, `WWW-Authenticate` challenges, the token cache;
//! - `helper`: docker credential helpers (`docker-credential-NAME get`);
//! - `pull`: manifests, blobs, ranges, HEAD; `push`: uploads, mounts, manifest PUT;
//! - `referrers`: the artifacts whose `subject` is a manifest (referrers API and tag schema);
//! - `secrets`: credentials handed over with a pull (kubelet's pull secrets), per repository;
//! - `verify`: the digest-checking blob stream.

mod auth;
mod client;
mod error;
mod helper;
mod pull;
mod push;
mod range;
mod referrers;
mod secrets;
mod verify;

use std::path::PathBuf;

use bytes::Bytes;

pub use auth::Credentials;
pub use client::Client;
pub use error::RegistryError;
pub use range::RangeBody;
pub use referrers::{referrers_tag, PushedReferrer, OCI_SUBJECT};
pub use secrets::{PullSecret, PullSecrets, MAX_TTL as MAX_PULL_SECRET_TTL};

use crate::oci::Digest;

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Speak plain HTTP to every registry (loopback registries always get plain HTTP).
    pub plain_http: bool,
    /// Directory holding docker's `config.json` (default: `$DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
    /// Retries after a 429, a 5xx or a connection error (with exponential backoff).
    pub max_retries: u32,
    /// Credentials that pulls handed over (the CRI proxy's), shared by clients of this config.
    pub pull_secrets: PullSecrets,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            plain_http: false,
            docker_config_dir: None,
            max_retries: 3,
            pull_secrets: PullSecrets::default(),
        }
    }
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

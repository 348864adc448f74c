//! The HTTP core: one pooled `reqwest::Client`, URLs, authentication on 401, retries with
//! backoff, and mapping error responses to [`RegistryError`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode, Url};

use super::auth::{parse_challenges, AuthState, Credentials, DockerConfig, TokenResponse};
use super::error::describe_body;
use super::{ClientConfig, RegistryError};
use crate::oci::Reference;

/// First backoff delay; doubled per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest backoff delay.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);
/// Error bodies are read up to this size.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Token responses are read up to this size.
const TOKEN_BODY_LIMIT: usize = 1024 * 1024;
/// How long a credential helper's answer is used before the helper is asked again.
const HELPER_TTL: Duration = Duration::from_secs(300);
/// How long after a failed credential helper it is tried again.
const HELPER_RETRY: Duration = Duration::from_secs(30);

/// How long a [`Client::preconnect`] request may take: past this the connection would come
/// too late to save anything.
const PRECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry client (cheap to clone; clones share the connection pool and token cache).
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub http: reqwest::Client,
    pub config: ClientConfig,
    pub docker_config: DockerConfig,
    pub auth: AuthState,
}

/// A request body that can be sent again on a retry.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    Empty,
    Bytes(Bytes),
    /// A file streamed from disk, re-opened per attempt.
    File {
        path: PathBuf,
        len: u64,
    },
}

/// One logical request: retried and re-authenticated as a unit.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Body,
    /// Token scopes the request needs (`repository:<repo>:pull`, ...).
    pub scopes: Vec<String>,
    /// Named in errors.
    pub reference: &'a Reference,
}

/// What a request was about, for the messages of errors mapped from its response.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Manifest,
    Blob,
    Upload,
}

/// `repository:<repo>:pull`.
pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// `repository:<repo>:pull,push`.
pub(crate) fn push_scope(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, RegistryError> {
        let docker_config = DockerConfig::load(config.docker_config_dir.as_deref())?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("lazysnap/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(90))
            // reqwest drops `Authorization` when a redirect leaves the host (blob storage).
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| RegistryError::Config {
                detail: format!("building the HTTP client: {e}"),
            })?;
        tracing::debug!(
            docker_config = ?docker_config.path,
            plain_http = config.plain_http,
            max_retries = config.max_retries,
            "registry client ready"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config,
                docker_config,
                auth: AuthState::default(),
            }),
        })
    }

    /// Opens up to `connections` connections to `reference`'s registry now, in the background,
    /// so that the requests a mount is about to make side by side (TOCs, the profile lookup, its
    /// prefetch) find them open instead of each paying a TCP (and TLS) handshake first, a round
    /// trip or two on the path to a container's first read. Each is an unauthenticated `GET /v2/`
    /// (the API version check: a 401 is as good an answer), its body read up to 4 KiB so that
    /// the connection goes back to the pool, its result ignored. Must run inside a tokio runtime.
    pub fn preconnect(&self, reference: &Reference, connections: usize) {
        let Ok(url) = self.url(reference, "").and_then(|u| {
            u.join("/v2/").map_err(|e| RegistryError::Protocol {
                reference: reference.to_string(),
                detail: e.to_string(),
            })
        }) else {
            return;
        };
        for _ in 0..connections {
            let (http, url) = (self.inner.http.clone(), url.clone());
            tokio::spawn(async move {
                let sent = http.get(url).timeout(PRECONNECT_TIMEOUT).send().await;
                if let Ok(response) = sent {
                    let _ = read_limited(response, 4096).await;
                }
            });
        }
    }

    /// `http(s)://<host>/v2/<repo>/<rest>` for `reference`'s registry.
    pub(crate) fn url(&self, reference: &Reference, rest: &str) -> Result<Url, RegistryError> {
        let scheme = if reference.is_loopback() || self.inner.config.plain_http {
            "http"
        } else {
            "https"
        };
        let host = match reference.registry.as_str() {
            "docker.io" => "registry-1.docker.io",
            other => other,
        };
        let text = format!("{scheme}://{host}/v2/{}/{rest}", reference.repository);
        Url::parse(&text).map_err(|e| RegistryError::Protocol {
            reference: reference.to_string(),
            detail: format!("cannot build URL {text:?}: {e}"),
        })
    }

    /// Sends `req`: with the authorization known for its registry and scopes, answering one 401
    /// challenge, retrying 429, 5xx and connection errors. Returns any final response; callers
    /// map unwanted statuses with [`Client::error_for`].
    pub(crate) async fn execute(&self, req: &Request<'_>) -> Result<Response, RegistryError> {
        let registry = req.reference.registry.as_str();
        let mut challenged = false;
        loop {
            // Credentials go only to the registry itself, never to a host a Location points at.
            let same_host = self.url(req.reference, "").is_ok_and(|base| {
                base.host_str() == req.url.host_str()
                    && base.port_or_known_default() == req.url.port_or_known_default()
            });
            let authorization = if same_host {
                self.inner
                    .auth
                    .header_for(registry, &req.scopes, || self.credentials(req.reference))
            } else {
                None
            };
            let response = self.send_retrying(req, authorization.as_deref()).await?;
            if response.status() != StatusCode::UNAUTHORIZED || challenged || !same_host {
                return Ok(response);
            }
            challenged = true;
            let challenges: Vec<_> = response
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            tracing::debug!(registry, ?challenges, "401: authenticating");
            if !self
                .authenticate(req, &challenges, authorization.as_deref())
                .await?
            {
                return Ok(response);
            }
        }
    }

    /// Answers a challenge to a request that carried `sent`: true if there is something new to
    /// send.
    async fn authenticate(
        &self,
        req: &Request<'_>,
        challenges: &[super::auth::Challenge],
        sent: Option<&str>,
    ) -> Result<bool, RegistryError> {
        let registry = req.reference.registry.as_str();
        let credentials = match self.credentials(req.reference) {
            Some(known) => Some(known),
            None => {
                self.run_credential_helper(registry).await;
                self.credentials(req.reference)
            }
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = bearer.params.get("realm") else {
                return Err(RegistryError::Protocol {
                    reference: req.reference.to_string(),
                    detail: "Bearer challenge without a realm".to_owned(),
                });
            };
            let mut scopes = req.scopes.clone();
            if let Some(scope) = bearer.params.get("scope") {
                for s in scope.split(' ').filter(|s| !s.is_empty()) {
                    if !scopes.iter().any(|have| have == s) {
                        scopes.push(s.to_owned());
                    }
                }
            }
            let (token, expires_in) = self
                .fetch_token(req.reference, realm, bearer.params.get("service"), &scopes)
                .await?;
            // Cached under the request's own scopes, so the next such request finds it.
            self.inner
                .auth
                .store_token(registry, &req.scopes, token, expires_in);
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(credentials) = credentials else {
                return Ok(false);
            };
            self.inner.auth.mark_basic(registry);
            // Not "did we just learn it wants basic": requests racing on a new registry each get
            // their 401, and all but the first would give up. Send again unless these very
            // credentials were the ones refused.
            return Ok(sent != Some(credentials.basic_header().as_str()));
        }
        Ok(false)
    }

    /// The credentials for `reference`: what the pull of that repository gave (a pull secret),
    /// else `config.json`'s own, else what its credential helper answered last.
    fn credentials(&self, reference: &Reference) -> Option<Credentials> {
        let inner = &self.inner;
        inner
            .config
            .pull_secrets
            .get(&reference.registry, &reference.repository)
            .or_else(|| {
                inner
                    .auth
                    .credentials(&reference.registry, &inner.docker_config)
            })
    }

    /// Asks `registry`'s credential helper, if `config.json` names one and its last answer is
    /// stale. A helper that fails is logged (never its output) and the request goes without.
    async fn run_credential_helper(&self, registry: &str) {
        let inner = &self.inner;
        let Some(helper) = inner.auth.helper_due(registry, &inner.docker_config) else {
            return;
        };
        match super::helper::get(&helper, registry).await {
            Ok(credentials) => {
                tracing::debug!(
                    registry,
                    helper,
                    found = credentials.is_some(),
                    "credential helper answered"
                );
                inner.auth.store_helped(registry, credentials, HELPER_TTL);
            }
            Err(e) => {
                tracing::warn!(
                    registry,
                    helper,
                    "credential helper failed, going without credentials: {e}"
                );
                inner.auth.store_helped(registry, None, HELPER_RETRY);
            }
        }
    }

    /// GETs a bearer token from `realm` (with basic credentials when docker config has them).
    async fn fetch_token(
        &self,
        reference: &Reference,
        realm: &str,
        service: Option<&String>,
        scopes: &[String],
    ) -> Result<(String, Option<u64>), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| RegistryError::Protocol {
            reference: reference.to_string(),
            detail: format!("token realm {realm:?} is not a URL: {e}"),
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
        }
        let credentials = self.credentials(reference);
        if let Some(c) = &credentials {
            url.query_pairs_mut().append_pair("account", &c.username);
        }
        let req = Request {
            method: Method::GET,
            url,
            headers: HeaderMap::new(),
            body: Body::Empty,
            scopes: Vec::new(),
            reference,
        };
        tracing::debug!(realm, ?scopes, "fetching bearer token");
        let basic = credentials.map(|c| c.basic_header());
        let response = self.send_retrying(&req, basic.as_deref()).await?;
        let status = response.status();
        if !status.is_success() {
            let body = read_limited(response, ERROR_BODY_LIMIT)
                .await
                .unwrap_or_default();
            let (code, detail) = describe_body(status, &body);
            let detail = format!("token endpoint {realm} refused: {detail}");
            return Err(
                if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    RegistryError::Unauthorized {
                        reference: reference.to_string(),
                        status: status.as_u16(),
                        code,
                        detail,
                        hint: self.credentials_hint(&reference.registry),
                    }
                } else {
                    RegistryError::Http {
                        reference: reference.to_string(),
                        status: status.as_u16(),
                        code,
                        detail,
                    }
                },
            );
        }
        let body = read_limited(response, TOKEN_BODY_LIMIT)
            .await
            .map_err(|source| RegistryError::Transport {
                reference: reference.to_string(),
                context: format!("reading token from {realm}"),
                error: source,
            })?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("token endpoint {realm} sent invalid JSON: {e}"),
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Protocol {
                reference: reference.to_string(),
                detail: format!("token endpoint {realm} sent neither `token` nor `access_token`"),
            })?;
        Ok((token, parsed.expires_in))
    }

    /// One request, retried with exponential backoff on 429, 5xx and connection errors.
    async fn send_retrying(
        &self,
        req: &Request<'_>,
        authorization: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let max_retries = self.inner.config.max_retries;
        let mut attempt: u32 = 0;
        loop {
            let mut builder = self
                .inner
                .http
                .request(req.method.clone(), req.url.clone())
                .headers(req.headers.clone());
            if let Some(value) = authorization {
                builder = builder.header(AUTHORIZATION, value);
            }
            builder = match &req.body {
                Body::Empty => builder,
                Body::Bytes(bytes) => builder.body(bytes.clone()),
                Body::File { path, len } => {
                    let file =
                        tokio::fs::File::open(path)
                            .await
                            .map_err(|source| RegistryError::Io {
                                reference: req.reference.to_string(),
                                context: format!("opening {}", path.display()),
                                source,
                            })?;
                    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
                    builder
                        .header(CONTENT_LENGTH, *len)
                        .body(reqwest::Body::wrap_stream(stream))
                }
            };
            tracing::debug!(method = %req.method, url = %req.url, attempt, "registry request");
            let delay = match builder.send().await {
                Ok(response) => {
                    let status = response.status();
                    tracing::debug!(method = %req.method, url = %req.url, status = status.as_u16(), "registry response");
                    let retryable =
                        status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !retryable || attempt >= max_retries {
                        return Ok(response);
                    }
                    let delay = retry_after(response.headers()).unwrap_or_else(|| backoff(attempt));
                    tracing::debug!(
                        status = status.as_u16(),
                        ?delay,
                        attempt,
                        "retrying after error status"
                    );
                    delay
                }
                Err(error) => {
                    let retryable = error.is_connect() || error.is_timeout() || error.is_request();
                    if !retryable || attempt >= max_retries {
                        let context = if attempt > 0 {
                            format!("{} {} (after {attempt} retries)", req.method, req.url)
                        } else {
                            format!("{} {}", req.method, req.url)
                        };
                        return Err(RegistryError::Transport {
                            reference: req.reference.to_string(),
                            context,
                            error,
                        });
                    }
                    let delay = backoff(attempt);
                    tracing::debug!(%error, ?delay, attempt, "retrying after connection error");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// What to tell a user whose request was refused.
    pub(crate) fn credentials_hint(&self, registry: &str) -> String {
        let config = &self.inner.docker_config;
        let file = config.path.as_ref().map_or_else(
            || "docker config.json".to_owned(),
            |p| p.display().to_string(),
        );
        if config.credentials(registry).is_some() {
            format!("the registry refused the credentials for {registry} from {file}; check them (docker login {registry})")
        } else if let Some(helper) = config.helper_for(registry) {
            format!("credentials for {registry} come from docker-credential-{helper} (named in {file}), and it had none the registry accepted; check them (docker login {registry})")
        } else {
            format!(
                "no credentials for {registry} in {file}; log in first (docker login {registry})"
            )
        }
    }

    /// Maps an unwanted response to an error naming `reference` (and `digest` if given).
    pub(crate) async fn error_for(
        &self,
        response: Response,
        reference: &Reference,
        target: Target,
        what: &str,
    ) -> RegistryError {
        let status = response.status();
        // HEAD answers have no body; reading one is harmless.
        let body = read_limited(response, ERROR_BODY_LIMIT)
            .await
            .unwrap_or_default();
        let (code, mut detail) = describe_body(status, &body);
        if body.is_empty() {
            let default = match (status, target) {
                (StatusCode::NOT_FOUND, Target::Manifest) => Some("manifest unknown"),
                (StatusCode::NOT_FOUND, Target::Blob) => Some("blob unknown"),
                (StatusCode::NOT_FOUND, Target::Upload) => Some("blob upload unknown"),
                _ => None,
            };
            if let Some(default) = default {
                detail = format!("{default} (HTTP 404)");
            }
        }
        if !what.is_empty() {
            detail = format!("{what}: {detail}");
        }
        let reference_text = reference.to_string();
        match status {
            StatusCode::NOT_FOUND => {
                let hint = match target {
                    Target::Manifest if reference.digest.is_some() => {
                        "check the digest exists in this repository"
                    }
                    Target::Manifest => "check the tag exists",
                    Target::Blob => "check the blob was pushed to this repository",
                    Target::Upload => "the upload session expired or is unknown; push again",
                };
                RegistryError::NotFound {
                    reference: reference_text,
                    code,
                    detail,
                    hint: hint.to_owned(),
                }
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
                reference: reference_text,
                status: status.as_u16(),
                code,
                detail,
                hint: self.credentials_hint(&reference.registry),
            },
            _ => RegistryError::Http {
                reference: reference_text,
                status: status.as_u16(),
                code,
                detail,
            },
        }
    }
}

/// `200 ms × 2^attempt`, capped.
fn backoff(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_CAP)
}

/// `Retry-After: <seconds>` (the HTTP-date form is ignored), capped.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value: &HeaderValue = headers.get(RETRY_AFTER)?;
    let seconds: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds).min(RETRY_AFTER_CAP))
}

/// Reads a body of at most `limit` bytes (more is cut off).
pub(crate) async fn read_limited(
    mut response: Response,
    limit: usize,
) -> Result<Bytes, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(3), Duration::from_millis(1600));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn retry_after_seconds_are_honoured_and_capped() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("99999"));
        assert_eq!(retry_after(&h), Some(RETRY_AFTER_CAP));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn loopback_gets_plain_http_and_others_https() {
        let client = Client::new(ClientConfig {
            docker_config_dir: Some("/nonexistent".into()),
            ..Default::default()
        })
        .unwrap();
        let lo: Reference = "127.0.0.1:5000/app:v1".parse().unwrap();
        assert_eq!(
            client.url(&lo, "manifests/v1").unwrap().as_str(),
            "http://127.0.0.1:5000/v2/app/manifests/v1"
        );
        let hub: Reference = "debian".parse().unwrap();
        assert_eq!(
            client.url(&hub, "manifests/latest").unwrap().as_str(),
            "https://registry-1.docker.io/v2/library/debian/manifests/latest"
        );
        let plain = Client::new(ClientConfig {
            plain_http: true,
            docker_config_dir: Some("/nonexistent".into()),
            ..Default::default()
        })
        .unwrap();
        let r: Reference = "reg.example.com/a/b".parse().unwrap();
        assert!(plain
            .url(&r, "")
            .unwrap()
            .as_str()
            .starts_with("http://reg.example.com/v2/a/b/"));
    }
}

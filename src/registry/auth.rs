//! Authentication: credentials from docker's `config.json` (its `auths`, or the credential helper
//! it names: `helper`), `WWW-Authenticate` challenges, and the bearer token cache (per registry
//! and scope, with expiry).
//!
//! Flow: requests go out anonymously (or with what an earlier challenge taught us); a 401 is
//! answered once, with basic credentials (`Basic`) or a token fetched from the realm (`Bearer`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;

/// A user name and password (or identity token) for one registry. Its `Debug` never shows the
/// password; serialized only between lazysnapd's own processes, over a root-only socket.
#[derive(Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// What docker's `config.json` says about registries.
#[derive(Debug, Default)]
pub(crate) struct DockerConfig {
    /// Where it was read from (for messages).
    pub path: Option<PathBuf>,
    /// Credentials by normalised registry host.
    auths: HashMap<String, Credentials>,
    /// The credential helper for every registry without its own (`credsStore`).
    creds_store: Option<String>,
    /// Per-registry credential helpers (`credHelpers`), before `credsStore`.
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// `https://host/v1/`, `http://host`, `host` → `host`; Docker Hub's aliases → `docker.io`.
pub(crate) fn normalise_host(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

impl DockerConfig {
    /// Reads `config.json` from `dir`, else `$DOCKER_CONFIG`, else `~/.docker`. A missing file means
    /// no credentials; a file that is not valid is an error naming it.
    pub fn load(dir: Option<&Path>) -> Result<Self, RegistryError> {
        let dir = match dir {
            Some(dir) => Some(dir.to_owned()),
            None => std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker"))
                }),
        };
        let Some(dir) = dir else {
            return Ok(Self::default());
        };
        let path = dir.join("config.json");
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(RegistryError::Config {
                    detail: format!("reading {}: {e}", path.display()),
                })
            }
        };
        Self::parse(&text, Some(path))
    }

    pub fn parse(text: &[u8], path: Option<PathBuf>) -> Result<Self, RegistryError> {
        let shown = path
            .as_ref()
            .map_or_else(|| "docker config".to_owned(), |p| p.display().to_string());
        let file: ConfigFile = serde_json::from_slice(text).map_err(|e| RegistryError::Config {
            detail: format!("{shown}: not a valid docker config.json: {e}"),
        })?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let bad = |why: &str| RegistryError::Config {
                detail: format!("{shown}: auths.{key:?}: {why}"),
            };
            let credentials = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad("`auth` is not base64"))?;
                let decoded = String::from_utf8(decoded).map_err(|_| bad("`auth` is not UTF-8"))?;
                let (username, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` is not base64 of user:password"))?;
                Credentials {
                    username: username.to_owned(),
                    password: password.to_owned(),
                }
            } else if let (Some(username), Some(password)) =
                (entry.username.clone(), entry.password)
            {
                Credentials { username, password }
            } else if let Some(token) = entry.identitytoken {
                // An identity token is sent as the password of the `<token>` user.
                Credentials {
                    username: entry.username.unwrap_or_else(|| "<token>".to_owned()),
                    password: token,
                }
            } else {
                continue; // an empty entry: credentials live in a helper
            };
            auths.insert(normalise_host(&key), credentials);
        }
        let cred_helpers = file
            .cred_helpers
            .into_iter()
            .map(|(k, v)| (normalise_host(&k), v))
            .collect();
        Ok(Self {
            path,
            auths,
            creds_store: file.creds_store.filter(|s| !s.is_empty()),
            cred_helpers,
        })
    }

    /// The credentials for `registry`, if the file holds them.
    pub fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.auths.get(&normalise_host(registry))
    }

    /// The credential helper docker would run for `registry`, if any.
    pub fn helper_for(&self, registry: &str) -> Option<&str> {
        self.cred_helpers
            .get(&normalise_host(registry))
            .or(self.creds_store.as_ref())
            .map(String::as_str)
    }
}

/// One `WWW-Authenticate` challenge: a scheme (lower case) and its parameters (keys lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses a `WWW-Authenticate` header value, which may hold several challenges:
/// `Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"`, `Basic realm="x"`.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let bytes = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/:".contains(&b);
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && (bytes[*i] == b' ' || bytes[*i] == b'\t') {
            *i += 1;
        }
    };
    let read_token = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && is_token(bytes[*i]) {
            *i += 1;
        }
        &header[start..*i]
    };
    while i < bytes.len() {
        skip_ws(&mut i);
        if i < bytes.len() && bytes[i] == b',' {
            i += 1;
            continue;
        }
        let token = read_token(&mut i);
        if token.is_empty() {
            // Not a token character: skip it (whole, so `i` stays on a character boundary).
            i += header[i..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        skip_ws(&mut i);
        if i < bytes.len() && bytes[i] == b'=' {
            // A parameter of the current challenge.
            i += 1;
            skip_ws(&mut i);
            let value = if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                let mut value = String::new();
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters.
                    let ch_len = header[i..].chars().next().map_or(1, char::len_utf8);
                    value.push_str(&header[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1; // closing quote
                value
            } else {
                // token68 values may end in `=` padding.
                let mut value = read_token(&mut i).to_owned();
                while i < bytes.len() && bytes[i] == b'=' {
                    value.push('=');
                    i += 1;
                }
                value
            };
            if let Some(challenge) = out.last_mut() {
                challenge.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

/// A token endpoint's answer (docker token auth spec: `token` or `access_token`).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

/// Token lifetime when the endpoint names none (the spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;
/// Tokens are dropped this long before they expire, so none expires in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

struct CachedToken {
    token: String,
    expires: Instant,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// What the client learned about each registry's authentication.
#[derive(Debug, Default)]
pub(crate) struct AuthState {
    /// Bearer tokens by (registry, scope key).
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    /// Registries that asked for basic credentials (sent up front from then on).
    basic: Mutex<HashSet<String>>,
    /// What credential helpers answered, by registry, until when.
    helped: Mutex<HashMap<String, Helped>>,
}

/// A credential helper's answer for one registry, kept a while so that a burst of requests runs
/// the helper once, yet a rotated secret is picked up.
#[derive(Debug)]
struct Helped {
    credentials: Option<Credentials>,
    until: Instant,
}

/// One string for a set of scopes, as a cache key.
pub(crate) fn scope_key(scopes: &[String]) -> String {
    let mut sorted: Vec<&str> = scopes.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.join(" ")
}

impl AuthState {
    /// The `Authorization` value to send to `registry` for `scopes`, if we know one; `credentials`
    /// gives the basic credentials for a registry that asked for them.
    pub fn header_for(
        &self,
        registry: &str,
        scopes: &[String],
        credentials: impl FnOnce() -> Option<Credentials>,
    ) -> Option<String> {
        let key = (registry.to_owned(), scope_key(scopes));
        if let Ok(mut tokens) = self.tokens.lock() {
            match tokens.get(&key) {
                Some(cached) if cached.expires > Instant::now() => {
                    return Some(format!("Bearer {}", cached.token))
                }
                Some(_) => {
                    tokens.remove(&key);
                }
                None => {}
            }
        }
        let basic = self
            .basic
            .lock()
            .map(|b| b.contains(registry))
            .unwrap_or(false);
        if basic {
            return credentials().map(|c| c.basic_header());
        }
        None
    }

    /// The credentials for `registry`: `config.json`'s own, else what its credential helper
    /// answered last (while that answer is fresh).
    pub fn credentials(&self, registry: &str, config: &DockerConfig) -> Option<Credentials> {
        if let Some(c) = config.credentials(registry) {
            return Some(c.clone());
        }
        let helped = self.helped.lock().ok()?;
        helped
            .get(registry)
            .filter(|h| h.until > Instant::now())
            .and_then(|h| h.credentials.clone())
    }

    /// The credential helper to run for `registry` now: one is configured, `config.json` has no
    /// credentials of its own, and there is no fresh answer.
    pub fn helper_due(&self, registry: &str, config: &DockerConfig) -> Option<String> {
        if config.credentials(registry).is_some() {
            return None;
        }
        let helper = config.helper_for(registry)?;
        let fresh = self
            .helped
            .lock()
            .map(|h| h.get(registry).is_some_and(|h| h.until > Instant::now()))
            .unwrap_or(false);
        (!fresh).then(|| helper.to_owned())
    }

    /// Keeps a credential helper's answer for `registry` for `ttl`.
    pub fn store_helped(&self, registry: &str, credentials: Option<Credentials>, ttl: Duration) {
        if let Ok(mut helped) = self.helped.lock() {
            helped.insert(
                registry.to_owned(),
                Helped {
                    credentials,
                    until: Instant::now() + ttl,
                },
            );
        }
    }

    pub fn store_token(
        &self,
        registry: &str,
        scopes: &[String],
        token: String,
        expires_in: Option<u64>,
    ) {
        let lifetime = Duration::from_secs(expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME).max(1));
        let expires = Instant::now()
            + lifetime
                .saturating_sub(EXPIRY_MARGIN)
                .max(Duration::from_secs(1));
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(
                (registry.to_owned(), scope_key(scopes)),
                CachedToken { token, expires },
            );
        }
    }

    /// Remembers that `registry` wants basic credentials, sent up front from then on.
    pub fn mark_basic(&self, registry: &str) {
        if let Ok(mut basic) = self.basic.lock() {
            basic.insert(registry.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.example.com/token");
        assert_eq!(c[0].params["service"], "registry.example.com");
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");

        let c = parse_challenges(
            r#"Basic realm="my \"registry\"", Bearer realm=http://x/t , error=insufficient_scope"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], r#"my "registry""#);
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["realm"], "http://x/t");
        assert_eq!(c[1].params["error"], "insufficient_scope");
    }

    #[test]
    fn challenge_parser_survives_garbage() {
        for junk in [
            "",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            ",,,",
            "Bearer ==",
            "é=\"ü\"",
            "Basic realm=\"\\",
        ] {
            let _ = parse_challenges(junk);
        }
        assert_eq!(parse_challenges("Basic")[0].scheme, "basic");
    }

    proptest::proptest! {
        #[test]
        fn challenge_parser_never_panics(s in "\\PC{0,60}") {
            let _ = parse_challenges(&s);
        }
    }

    #[test]
    fn reads_docker_config_auths_in_all_key_forms() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let text = format!(
            r#"{{"auths":{{
                "127.0.0.1:5000":{{"auth":"{}"}},
                "https://reg.example.com":{{"username":"bob","password":"pw"}},
                "https://index.docker.io/v1/":{{"auth":"{}"}},
                "helper.example.com":{{}}
              }},
              "credHelpers":{{"gcr.io":"gcloud"}}}}"#,
            b64("alice:s3:cret"),
            b64("hub:hubpw")
        );
        let config = DockerConfig::parse(text.as_bytes(), None).unwrap();
        let alice = config.credentials("127.0.0.1:5000").unwrap();
        assert_eq!(
            (alice.username.as_str(), alice.password.as_str()),
            ("alice", "s3:cret")
        );
        assert_eq!(
            config.credentials("reg.example.com").unwrap().username,
            "bob"
        );
        assert_eq!(config.credentials("docker.io").unwrap().password, "hubpw");
        assert!(config.credentials("helper.example.com").is_none());
        assert_eq!(config.helper_for("gcr.io"), Some("gcloud"));
        assert_eq!(config.helper_for("127.0.0.1:5000"), None);
        assert!(!format!("{alice:?}").contains("s3:cret"));
    }

    #[test]
    fn bad_docker_config_names_the_problem() {
        let err = DockerConfig::parse(br#"{"auths":{"h":{"auth":"!!"}}}"#, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        let err = DockerConfig::parse(b"{", Some("/x/config.json".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/x/config.json"), "{err}");
    }

    #[test]
    fn tokens_are_cached_per_scope_and_expire() {
        let state = AuthState::default();
        let config = DockerConfig::default();
        let pull = vec!["repository:a:pull".to_owned()];
        let push = vec!["repository:a:pull,push".to_owned()];
        state.store_token("r", &pull, "t1".into(), Some(300));
        assert_eq!(
            state
                .header_for("r", &pull, || config.credentials("r").cloned())
                .as_deref(),
            Some("Bearer t1")
        );
        assert_eq!(
            state.header_for("r", &push, || config.credentials("r").cloned()),
            None
        );
        assert_eq!(
            state.header_for("other", &pull, || config.credentials("r").cloned()),
            None
        );
        // A token shorter-lived than the margin is still kept for a moment, then dropped.
        state.store_token("r", &push, "t2".into(), Some(1));
        assert_eq!(
            state
                .header_for("r", &push, || config.credentials("r").cloned())
                .as_deref(),
            Some("Bearer t2")
        );
    }
}

//! Registry errors: each names the reference (and digest) and carries the registry's own error code
//! and message from its JSON body (`{"errors":[{"code":"MANIFEST_UNKNOWN","message":…}]}`).

use std::error::Error as _;
use std::fmt::Write as _;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::oci::Digest;

/// Errors name the reference and, where the registry sent one, its error code.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// 404: the manifest, blob or upload does not exist.
    #[error("{reference}: {detail} — {hint}")]
    NotFound {
        reference: String,
        code: Option<String>,
        detail: String,
        hint: String,
    },
    /// 401 or 403 after trying the credentials this client has (if any).
    #[error("{reference}: {detail} — {hint}")]
    Unauthorized {
        reference: String,
        status: u16,
        code: Option<String>,
        detail: String,
        hint: String,
    },
    /// Content that does not hash to the digest it was asked for by (or that the registry named).
    #[error("{reference}: {what} digest mismatch (expected {expected}, got {got})")]
    DigestMismatch {
        reference: String,
        what: String,
        expected: Digest,
        got: Digest,
    },
    /// A range read the registry could not or did not serve as asked.
    #[error("{reference}: blob {digest} bytes {start}..{end}: {detail}")]
    Range {
        reference: String,
        digest: Digest,
        start: u64,
        end: u64,
        detail: String,
    },
    /// Any other unexpected HTTP status.
    #[error("{reference}: {detail}")]
    Http {
        reference: String,
        status: u16,
        code: Option<String>,
        detail: String,
    },
    /// The registry could not be reached, or the connection broke. The message holds the
    /// causes (reqwest's Display hides them), so `error` is not also a `source`: printing the
    /// chain would name every cause twice.
    #[error("{reference}: {context}: {}", chain(.error))]
    Transport {
        reference: String,
        context: String,
        error: reqwest::Error,
    },
    /// A local file could not be read.
    #[error("{reference}: {context}: {source}")]
    Io {
        reference: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The registry answered in a way the distribution API does not allow.
    #[error("{reference}: {detail}")]
    Protocol { reference: String, detail: String },
    /// The client itself could not be set up (TLS, docker `config.json`).
    #[error("registry client: {detail}")]
    Config { detail: String },
}

impl RegistryError {
    /// The registry's error code (`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, `DENIED`, ...), if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::NotFound { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Http { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status behind this error, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::NotFound { .. } => Some(404),
            Self::Unauthorized { status, .. } | Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `error: cause: cause` for errors whose Display hides their sources (reqwest's do).
/// reqwest's own message repeats the URL, which the context before it names already.
fn chain(error: &reqwest::Error) -> String {
    let mut out = error.to_string();
    if let Some(url) = error.url() {
        out = out.replace(&format!(" for url ({url})"), "");
    }
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = cause.source();
    }
    out
}

#[derive(Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    code: String,
    #[serde(default)]
    message: String,
}

/// What an error response said: the first error code and a readable summary of all of them,
/// e.g. `manifest unknown (MANIFEST_UNKNOWN)`; for a body that is not the registry's JSON, the
/// status and the start of the body.
pub(crate) fn describe_body(status: StatusCode, body: &[u8]) -> (Option<String>, String) {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        if !parsed.errors.is_empty() {
            let code = parsed.errors.first().map(|e| e.code.clone());
            let detail = parsed
                .errors
                .iter()
                .map(|e| {
                    let message = if e.message.is_empty() {
                        e.code.to_lowercase().replace('_', " ")
                    } else {
                        e.message.clone()
                    };
                    format!("{message} ({})", e.code)
                })
                .collect::<Vec<_>>()
                .join("; ");
            return (code, detail);
        }
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(200).collect();
    let reason = status.canonical_reason().unwrap_or("unexpected status");
    if text.is_empty() {
        (None, format!("HTTP {} {reason}", status.as_u16()))
    } else {
        (None, format!("HTTP {} {reason}: {text}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_error_bodies_give_code_and_message() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v1"}}]}"#;
        let (code, detail) = describe_body(StatusCode::NOT_FOUND, body);
        assert_eq!(code.as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(detail, "manifest unknown (MANIFEST_UNKNOWN)");
        let err = RegistryError::NotFound {
            reference: "127.0.0.1:5000/app:v1".into(),
            code,
            detail,
            hint: "check the tag exists".into(),
        };
        assert_eq!(
            err.to_string(),
            "127.0.0.1:5000/app:v1: manifest unknown (MANIFEST_UNKNOWN) — check the tag exists"
        );
        assert_eq!(err.code(), Some("MANIFEST_UNKNOWN"));
    }

    #[test]
    fn other_bodies_give_status_and_text() {
        let (code, detail) = describe_body(StatusCode::BAD_GATEWAY, b"<html>upstream down</html>");
        assert_eq!(code, None);
        assert_eq!(detail, "HTTP 502 Bad Gateway: <html>upstream down</html>");
        let (_, detail) = describe_body(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(detail, "HTTP 503 Service Unavailable");
        let (code, detail) = describe_body(
            StatusCode::UNAUTHORIZED,
            br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
        );
        assert_eq!(
            (code.as_deref(), detail.as_str()),
            (Some("UNAUTHORIZED"), "unauthorized (UNAUTHORIZED)")
        );
    }
}

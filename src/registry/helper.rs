//! Docker credential helpers: `docker-credential-NAME get`, run as docker runs them, for the
//! registries whose credentials `config.json` keeps in a helper (`credsStore`, `credHelpers`).
//!
//! The helper is a program of the node's own configuration, but what it prints is bounded and
//! checked like any input: at most [`MAX_OUTPUT`] bytes, within [`TIMEOUT`], JSON with the fields
//! docker defines. Secrets are never logged.

use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Credentials;

/// How long a helper may take (a keychain prompt would wait for ever: a node has nobody to ask).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);
/// The most a helper may print: a token is a few kB.
const MAX_OUTPUT: u64 = 64 << 10;

/// What `get` prints.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// The server name a helper is asked for: docker asks for Docker Hub under its v1 URL.
fn server_url(registry: &str) -> &str {
    if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    }
}

/// Runs `docker-credential-{helper} get` for `registry`: `Ok(None)` when the helper has no
/// credentials for it, an error (for a log line) when the helper cannot be run or answers badly.
pub(crate) async fn get(helper: &str, registry: &str) -> Result<Option<Credentials>, String> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "credential helper name {helper:?} is not a plain name"
        ));
    }
    run(&format!("docker-credential-{helper}"), registry).await
}

/// Runs `program get` (found on PATH unless a path) and reads its answer for `registry`.
async fn run(program: &str, registry: &str) -> Result<Option<Credentials>, String> {
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?.take(MAX_OUTPUT + 1);
    let mut stderr = child.stderr.take().ok_or("no stderr")?.take(MAX_OUTPUT);
    let talk = async {
        // A helper that exits without reading its input is not an error here; its answer is.
        let _ = stdin.write_all(server_url(registry).as_bytes()).await;
        drop(stdin);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        stdout
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("reading {program}'s answer: {e}"))?;
        if out.len() as u64 > MAX_OUTPUT {
            // Dropping the child kills it (`kill_on_drop`): it may be blocked writing more.
            return Err(format!("{program} printed more than {MAX_OUTPUT} bytes"));
        }
        let _ = stderr.read_to_end(&mut err).await;
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for {program}: {e}"))?;
        Ok::<_, String>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(TIMEOUT, talk)
        .await
        .map_err(|_| format!("{program} did not answer within {TIMEOUT:?}"))??;
    if !status.success() {
        // The protocol's answer for "nothing stored for this server".
        let said = String::from_utf8_lossy(if out.is_empty() { &err } else { &out });
        if said.contains("credentials not found") {
            return Ok(None);
        }
        let said: String = said.trim().chars().take(200).collect();
        return Err(format!("{program} get failed ({status}): {said}"));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out)
        .map_err(|e| format!("{program} answered with something other than credentials: {e}"))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes a helper script and runs it as `get` would. The executable is written by `cp`, not
    /// by this process: a test on another thread that forks while this process holds it open for
    /// writing would keep the fd in its child until that child execs, and exec of the script
    /// then fails with ETXTBSY ("Text file busy").
    async fn with_helper(script: &str, registry: &str) -> Result<Option<Credentials>, String> {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("script");
        let path = dir.path().join("docker-credential-test");
        std::fs::write(&source, format!("#!/bin/sh\n{script}\n")).unwrap();
        let copied = std::process::Command::new("cp")
            .arg(&source)
            .arg(&path)
            .status()
            .unwrap();
        assert!(copied.success());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        run(path.to_str().unwrap(), registry).await
    }

    #[tokio::test]
    async fn reads_what_the_helper_answers_for_the_server_it_was_asked() {
        let script = r#"read server; [ "$1" = get ] || exit 3
case "$server" in
  reg.example:5000) echo '{"ServerURL":"reg.example:5000","Username":"alice","Secret":"s3cret"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"tok"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#;
        let c = with_helper(script, "reg.example:5000")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        let c = with_helper(script, "docker.io").await.unwrap().unwrap();
        assert_eq!(c.username, "<token>");
        assert_eq!(with_helper(script, "other").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_broken_helper_is_an_error_not_a_hang_or_a_crash() {
        let err = with_helper("echo not json", "r").await.unwrap_err();
        assert!(err.contains("something other than credentials"), "{err}");
        let err = with_helper("echo boom >&2; exit 2", "r").await.unwrap_err();
        assert!(err.contains("boom"), "{err}");
        let err = with_helper("head -c 200000 /dev/zero", "r")
            .await
            .unwrap_err();
        assert!(err.contains("more than"), "{err}");
        assert!(get("../../bin/sh", "r")
            .await
            .unwrap_err()
            .contains("plain name"));
        assert!(get("missing-helper-xyz", "r")
            .await
            .unwrap_err()
            .contains("running"));
    }
}

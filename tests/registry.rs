//! The registry client against a real `docker-registry` (distribution 2.8) on 127.0.0.1: push,
//! pull, ranges, HEAD, mounts, errors, corruption, basic auth, retries, and bearer tokens (through
//! a small in-test proxy that plays token server).

mod common;
#[path = "common/delayproxy.rs"]
mod delayproxy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use bytes::Bytes;
use common::registry::TestRegistry;
use lazysnap::oci::{
    parse_document, Digest, ImageDocument, Reference, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_MANIFEST,
};
use lazysnap::registry::{Client, ClientConfig, PushedBlob, RegistryError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Deterministic, not very compressible test bytes.
fn test_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A client that reads no docker config (unless `docker_config_dir` is given).
fn client_with(dir: &Path, docker_config_dir: Option<PathBuf>, max_retries: u32) -> Client {
    let config = ClientConfig {
        plain_http: false,
        docker_config_dir: Some(docker_config_dir.unwrap_or_else(|| dir.join("no-docker-config"))),
        max_retries,
        ..Default::default()
    };
    Client::new(config).expect("client")
}

fn client(registry: &TestRegistry) -> Client {
    client_with(registry.dir.path(), None, 3)
}

/// A layer blob in a file, its digest and its bytes.
fn layer_file(dir: &Path, len: usize, seed: u8) -> (PathBuf, Digest, Vec<u8>) {
    let data = test_bytes(len, seed);
    let path = dir.join(format!("layer-{seed}.bin"));
    std::fs::write(&path, &data).expect("write layer");
    (path, Digest::of(&data), data)
}

/// An OCI manifest naming `config` and `layer`.
fn manifest_for(config: &[u8], layer: &[u8]) -> Bytes {
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_OCI_CONFIG, "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": Digest::of(layer).to_string(), "size": layer.len()}],
    });
    Bytes::from(serde_json::to_vec(&doc).expect("json"))
}

const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// Pushes a one-layer image as `repo:tag`; returns (layer digest, layer bytes, manifest digest).
async fn push_image(
    client: &Client,
    registry: &TestRegistry,
    repo_tag: &str,
    seed: u8,
) -> anyhow::Result<(Digest, Vec<u8>, Digest)> {
    let reference = registry.reference(repo_tag)?;
    let (path, digest, data) = layer_file(registry.dir.path(), 300_000, seed);
    client.push_blob(&reference, &digest, &path, None).await?;
    client
        .push_blob_bytes(&reference, &Digest::of(CONFIG), Bytes::from_static(CONFIG))
        .await?;
    let manifest = manifest_for(CONFIG, &data);
    let manifest_digest = client
        .push_manifest(&reference, MEDIA_TYPE_OCI_MANIFEST, manifest)
        .await?;
    Ok((digest, data, manifest_digest))
}

#[tokio::test]
async fn pushed_image_reads_back_by_tag_and_digest() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let (path, digest, data) = layer_file(registry.dir.path(), 1_500_000, 1);

    assert_eq!(
        client.push_blob(&reference, &digest, &path, None).await?,
        PushedBlob::Uploaded
    );
    let config_digest = Digest::of(CONFIG);
    assert_eq!(
        client
            .push_blob_bytes(&reference, &config_digest, Bytes::from_static(CONFIG))
            .await?,
        PushedBlob::Uploaded
    );
    let manifest = manifest_for(CONFIG, &data);
    let pushed = client
        .push_manifest(&reference, MEDIA_TYPE_OCI_MANIFEST, manifest.clone())
        .await?;
    assert_eq!(pushed, Digest::of(&manifest));

    let by_tag = client.get_manifest(&reference).await?;
    assert_eq!(by_tag.bytes, manifest);
    assert_eq!(by_tag.digest, pushed);
    assert_eq!(by_tag.media_type.as_deref(), Some(MEDIA_TYPE_OCI_MANIFEST));
    let ImageDocument::Manifest(parsed) =
        parse_document(by_tag.media_type.as_deref(), &by_tag.bytes)?
    else {
        anyhow::bail!("not a manifest");
    };
    assert_eq!(parsed.layers()[0].digest().to_string(), digest.to_string());

    let by_digest = client.get_manifest(&reference.with_digest(pushed)).await?;
    assert_eq!(by_digest.bytes, manifest);
    let pinned_only: Reference = format!("{}/app@{pushed}", registry.addr).parse()?;
    assert_eq!(client.get_manifest(&pinned_only).await?.digest, pushed);

    assert_eq!(
        client.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );
    assert_eq!(
        client.get_blob(&reference, &config_digest).await?.as_ref(),
        CONFIG
    );
    let mut streamed = Vec::new();
    client
        .blob_reader(&reference, &digest)
        .await?
        .read_to_end(&mut streamed)
        .await?;
    assert_eq!(streamed, data);

    assert_eq!(
        client.blob_size(&reference, &digest).await?,
        Some(data.len() as u64)
    );
    assert_eq!(
        client.blob_size(&reference, &Digest::of(b"absent")).await?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn range_reads_return_exactly_the_bytes_asked_for() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let (digest, data, _) = push_image(&client, &registry, "app:v1", 2).await?;
    let reference = registry.reference("app:v1")?;
    let len = data.len() as u64;
    for range in [0..1, 0..len, 100..5000, len - 10..len, 123_456..123_457] {
        let got = client
            .get_blob_range(&reference, &digest, range.clone())
            .await?;
        assert_eq!(
            got.as_ref(),
            &data[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    for bad in [
        len..len + 10,
        len + 100..len + 200,
        len - 5..len + 5,
        10..10,
    ] {
        let err = client
            .get_blob_range(&reference, &digest, bad.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Range { .. }), "{bad:?}: {err}");
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
    }
    let err = client
        .get_blob_range(&reference, &Digest::of(b"nope"), 0..10)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert_eq!(err.code(), Some("BLOB_UNKNOWN"), "{err}");
    Ok(())
}

/// Connections opened ahead go back to the pool: the requests that follow side by side pay no
/// handshake of their own (counted at a proxy that sees every connection).
#[tokio::test(flavor = "multi_thread")]
async fn connections_opened_ahead_serve_the_requests_that_follow() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (digest, data, _) = push_image(&client(&registry), &registry, "app:v1", 2).await?;
    let proxy = delayproxy::DelayProxy::start(&registry.addr, Duration::from_millis(10))?;
    let reference: Reference = format!("{}/app:v1", proxy.addr).parse()?;
    let client = client(&registry);
    client.preconnect(&reference, 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.requests().len() < 3 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{:?}",
            proxy.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.requests().iter().all(|r| r.line == "GET /v2/"));
    // The answers are on their way back (one way); then the connections are idle in the pool.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.connections(), 3);
    let reads =
        (0..3u64).map(|i| client.get_blob_range(&reference, &digest, i * 100..i * 100 + 50));
    for (i, got) in futures_util::future::try_join_all(reads)
        .await?
        .iter()
        .enumerate()
    {
        assert_eq!(got.as_ref(), &data[i * 100..i * 100 + 50]);
    }
    assert_eq!(proxy.connections(), 3, "{:?}", proxy.requests());
    Ok(())
}

#[tokio::test]
async fn second_push_of_a_blob_finds_it_existing() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let reference = registry.reference("app:v1")?;
    let (path, digest, _) = layer_file(registry.dir.path(), 10_000, 3);
    assert_eq!(
        client.push_blob(&reference, &digest, &path, None).await?,
        PushedBlob::Uploaded
    );
    assert_eq!(
        client.push_blob(&reference, &digest, &path, None).await?,
        PushedBlob::Existed
    );
    let config = Bytes::from_static(CONFIG);
    assert_eq!(
        client
            .push_blob_bytes(&reference, &Digest::of(CONFIG), config.clone())
            .await?,
        PushedBlob::Uploaded
    );
    assert_eq!(
        client
            .push_blob_bytes(&reference, &Digest::of(CONFIG), config)
            .await?,
        PushedBlob::Existed
    );
    // Bytes that do not match the digest are refused before anything is sent.
    let err = client
        .push_blob_bytes(&reference, &Digest::of(b"other"), Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn cross_repository_mount_uploads_nothing() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let source = registry.reference("base/image:v1")?;
    let target = registry.reference("derived/image:v1")?;
    let (path, digest, data) = layer_file(registry.dir.path(), 50_000, 4);
    client.push_blob(&source, &digest, &path, None).await?;
    assert_eq!(
        client
            .push_blob(&target, &digest, &path, Some(&source))
            .await?,
        PushedBlob::Mounted
    );
    assert_eq!(client.get_blob(&target, &digest).await?.as_ref(), &data[..]);

    // A mount from a repository without the blob falls back to the upload session it opened.
    let (path2, digest2, data2) = layer_file(registry.dir.path(), 20_000, 5);
    let empty = registry.reference("empty/repo:v1")?;
    assert_eq!(
        client
            .push_blob(&target, &digest2, &path2, Some(&empty))
            .await?,
        PushedBlob::Uploaded
    );
    assert_eq!(
        client.get_blob(&target, &digest2).await?.as_ref(),
        &data2[..]
    );
    Ok(())
}

#[tokio::test]
async fn unknown_tag_names_reference_and_manifest_unknown() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    push_image(&client, &registry, "app:v1", 6).await?;
    let missing = registry.reference("app:nope")?;
    let err = client.get_manifest(&missing).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{text}");
    assert!(text.contains("MANIFEST_UNKNOWN"), "{text}");
    assert!(
        text.contains(&format!("{}/app:nope", registry.addr)),
        "{text}"
    );
    assert!(text.contains("check the tag exists"), "{text}");

    let err = client
        .get_blob(&missing, &Digest::of(b"absent"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("BLOB_UNKNOWN"), "{err}");
    Ok(())
}

#[tokio::test]
async fn blob_corrupted_in_storage_fails_the_digest_check() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let (digest, data, _) = push_image(&client, &registry, "app:v1", 7).await?;
    let reference = registry.reference("app:v1")?;
    let stored = registry.blob_data_path(&digest);
    assert_eq!(std::fs::read(&stored).context("stored blob")?, data);
    // Same length, one byte flipped.
    let mut corrupt = data.clone();
    corrupt[1000] ^= 0xff;
    std::fs::write(&stored, &corrupt)?;

    let err = client.get_blob(&reference, &digest).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::DigestMismatch { expected, .. } if expected == digest),
        "{err}"
    );
    assert!(err.to_string().contains("digest mismatch"), "{err}");

    let mut reader = client.blob_reader(&reference, &digest).await?;
    let mut out = Vec::new();
    let err = reader.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<RegistryError>());
    assert!(
        matches!(inner, Some(RegistryError::DigestMismatch { .. })),
        "{err}"
    );
    Ok(())
}

fn docker_config(dir: &Path, key: &str, user: &str, pass: &str) -> anyhow::Result<PathBuf> {
    let config_dir = dir.join(format!("docker-{user}-{pass}"));
    std::fs::create_dir_all(&config_dir)?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let json = serde_json::json!({"auths": {key: {"auth": auth}}});
    std::fs::write(config_dir.join("config.json"), serde_json::to_vec(&json)?)?;
    Ok(config_dir)
}

#[tokio::test]
async fn basic_auth_uses_docker_config_and_fails_clearly_without() -> anyhow::Result<()> {
    let registry = TestRegistry::start_with_htpasswd("alice", "s3cret")?;
    let dir = registry.dir.path();
    let good = docker_config(dir, &registry.addr, "alice", "s3cret")?;
    let authed = client_with(dir, Some(good.clone()), 3);
    let (digest, data, manifest_digest) =
        push_image(&authed, &registry, "private/app:v1", 8).await?;
    let reference = registry.reference("private/app:v1")?;
    assert_eq!(
        authed.get_manifest(&reference).await?.digest,
        manifest_digest
    );
    assert_eq!(
        authed.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );

    // A fresh client's first requests race: each gets its own 401, and each must answer it
    // (not only the one that first learned the registry wants basic credentials).
    let racing = client_with(dir, Some(good), 0);
    let all =
        futures_util::future::join_all((0..16).map(|_| racing.get_manifest(&reference))).await;
    for got in all {
        assert_eq!(got?.digest, manifest_digest);
    }

    // `https://host` key form works too.
    let url_key = docker_config(
        dir,
        &format!("https://{}", registry.addr),
        "alice",
        "s3cret",
    )?;
    let url_keyed = client_with(dir, Some(url_key), 3);
    assert_eq!(
        url_keyed.get_manifest(&reference).await?.digest,
        manifest_digest
    );

    let anonymous = client_with(dir, None, 3);
    let err = anonymous.get_manifest(&reference).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RegistryError::Unauthorized { status: 401, .. }),
        "{text}"
    );
    assert!(text.contains("no credentials for"), "{text}");
    assert!(text.contains("UNAUTHORIZED"), "{text}");

    let wrong = docker_config(dir, &registry.addr, "alice", "wrong")?;
    let err = client_with(dir, Some(wrong), 3)
        .get_manifest(&reference)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("refused the credentials"), "{err}");
    Ok(())
}

/// `lazysnap inspect REF` with docker's config in `config_dir` and `helpers` first on PATH.
fn inspect_with(
    config_dir: &Path,
    helpers: &Path,
    reference: &str,
) -> anyhow::Result<std::process::Output> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![helpers.to_owned()];
    paths.extend(std::env::split_paths(&path));
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["inspect", reference])
        .env("DOCKER_CONFIG", config_dir)
        .env("PATH", std::env::join_paths(paths)?)
        .output()?)
}

#[tokio::test]
async fn credential_helpers_named_by_docker_config_are_run() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let registry = TestRegistry::start_with_htpasswd("alice", "s3cret")?;
    let dir = registry.dir.path();
    let good = docker_config(dir, &registry.addr, "alice", "s3cret")?;
    // A real image (config with diff_ids), pushed with the config file's own credentials.
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree)?;
    std::fs::write(tree.join("hello"), "hello\n")?;
    let layout = common::image::LayoutBuilder::new(&dir.join("layout"))?;
    let desc = layout.image(&[common::image::tar_dir(&tree)?], "amd64")?;
    layout.tags(&[("v1", desc)])?;
    let reference = format!("{}/private/app:v1", registry.addr);
    let pushed = std::process::Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args([
            "convert",
            &format!("oci:{}:v1", layout.dir.display()),
            &reference,
        ])
        .env("DOCKER_CONFIG", &good)
        .output()?;
    anyhow::ensure!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let manifest_digest = String::from_utf8(pushed.stdout)?.trim().to_owned();

    // A helper of the test's own: it logs which server it was asked about and answers only for
    // this registry, as `docker-credential-*` helpers do.
    let helpers = dir.join("helpers");
    std::fs::create_dir_all(&helpers)?;
    let log = dir.join("helper.log");
    let script = format!(
        "#!/bin/sh\nread -r server\necho \"$1 $server\" >> {log}\n\
         if [ \"$server\" = \"{addr}\" ]; then\n\
         echo '{{\"ServerURL\":\"{addr}\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}'\n\
         else echo 'credentials not found in native keychain'; exit 1; fi\n",
        log = log.display(),
        addr = registry.addr
    );
    for name in ["lazytest", "othertest"] {
        let path = helpers.join(format!("docker-credential-{name}"));
        std::fs::write(&path, &script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let config = |json: serde_json::Value, name: &str| -> anyhow::Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("config.json"), serde_json::to_vec(&json)?)?;
        Ok(d)
    };

    // credsStore: every registry's helper.
    let store = config(serde_json::json!({"credsStore": "lazytest"}), "store")?;
    let out = inspect_with(&store, &helpers, &reference)?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "inspect through credsStore: {text}");
    anyhow::ensure!(text.contains(&manifest_digest), "{text}");
    let asked = std::fs::read_to_string(&log)?;
    anyhow::ensure!(
        asked.lines().any(|l| l == format!("get {}", registry.addr)),
        "{asked}"
    );

    // credHelpers wins over credsStore for its registry; a helper without credentials for the
    // registry leaves the request anonymous, refused with a message naming the helper.
    let helpers_for = config(
        serde_json::json!({"credsStore": "missing", "credHelpers": {&registry.addr: "othertest"}}),
        "helpers",
    )?;
    let out = inspect_with(&helpers_for, &helpers, &reference)?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let none = config(
        serde_json::json!({"credHelpers": {"elsewhere.example": "lazytest"}, "credsStore": "lazytest"}),
        "none",
    )?;
    let other = format!("{}/private/app:v1", registry.addr).replace("127.0.0.1", "localhost");
    let out = inspect_with(&none, &helpers, &other)?;
    let err = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(!out.status.success(), "no credentials for localhost: {err}");
    anyhow::ensure!(err.contains("docker-credential-lazytest"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// An in-test HTTP/1.1 proxy on 127.0.0.1 in front of the registry: it can fail the first requests
// (503 or a dropped connection) and can demand bearer tokens it hands out itself. One request per
// connection; it stops itself after a bounded number of connections or when dropped.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Answer 503 with a registry-style error body.
    Unavailable,
    /// Close the connection without answering.
    Drop,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Requests still to fail, and how.
    fail_next: AtomicUsize,
    fault: Mutex<Option<Fault>>,
    /// Faults actually injected.
    faults: AtomicUsize,
    /// Requests forwarded to the registry.
    forwarded: AtomicUsize,
    /// Bearer mode: the token handed out; `None` means no auth.
    token: Option<String>,
    /// Bearer mode: the basic `Authorization` the token endpoint wants.
    token_basic: Option<String>,
    /// Bearer mode: query strings of token requests.
    token_requests: Mutex<Vec<String>>,
    /// Requests that arrived with an `Authorization` header.
    authorized: AtomicUsize,
    /// Answer blob GETs with a 307 to this `host:port` (storage elsewhere).
    redirect_blobs_to: Option<String>,
    /// Change a byte of every manifest served (same length): `"schemaVersion":2` → `3`.
    tamper_manifests: bool,
    /// Upload PUTs still to answer with 404 BLOB_UPLOAD_UNKNOWN (a lost session).
    lose_uploads: AtomicUsize,
}

struct Proxy {
    addr: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections one proxy serves at most.
const PROXY_CONNECTION_LIMIT: usize = 500;

impl Proxy {
    async fn start(upstream: &str, state: ProxyState) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(state);
        let upstream = upstream.to_owned();
        let (task_state, proxy_addr) = (state.clone(), addr.clone());
        let task = tokio::spawn(async move {
            for _ in 0..PROXY_CONNECTION_LIMIT {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (state, upstream, addr) =
                    (task_state.clone(), upstream.clone(), proxy_addr.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        serve(socket, &upstream, &addr, &state),
                    )
                    .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    fn reference(&self, repo_tag: &str) -> anyhow::Result<Reference> {
        Ok(format!("{}/{repo_tag}", self.addr).parse()?)
    }

    fn fail_next(&self, count: usize, fault: Fault) {
        *self.state.fault.lock().expect("lock") = Some(fault);
        self.state.fail_next.store(count, Ordering::SeqCst);
    }
}

/// Reads one request: head (lines) and body (by Content-Length).
async fn read_request(socket: &mut TcpStream) -> anyhow::Result<(Vec<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "request head too large");
        let n = socket.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let lines: Vec<String> = head.split("\r\n").map(str::to_owned).collect();
    let content_length = header(&lines, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    anyhow::ensure!(
        header(&lines, "transfer-encoding").is_none(),
        "chunked requests are not supported by this proxy"
    );
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < content_length {
        let n = socket.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((lines, body))
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn respond(
    socket: &mut TcpStream,
    status: &str,
    extra: &str,
    body: &str,
) -> anyhow::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    socket.write_all(text.as_bytes()).await?;
    socket.shutdown().await?;
    Ok(())
}

async fn serve(
    mut socket: TcpStream,
    upstream: &str,
    addr: &str,
    state: &ProxyState,
) -> anyhow::Result<()> {
    let (lines, body) = read_request(&mut socket).await?;
    let request_line = lines.first().cloned().unwrap_or_default();
    let target = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let method = request_line
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    if header(&lines, "authorization").is_some() {
        state.authorized.fetch_add(1, Ordering::SeqCst);
    }

    let fault = *state.fault.lock().expect("lock");
    let failing = state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if let (true, Some(fault)) = (failing, fault) {
        state.faults.fetch_add(1, Ordering::SeqCst);
        return match fault {
            Fault::Unavailable => {
                let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"service unavailable"}]}"#;
                respond(&mut socket, "503 Service Unavailable", "", body).await
            }
            Fault::Drop => Ok(()), // dropping the socket closes it unanswered
        };
    }

    if let Some(token) = &state.token {
        if let Some(query) = target.strip_prefix("/token?") {
            state
                .token_requests
                .lock()
                .expect("lock")
                .push(query.to_owned());
            if state
                .token_basic
                .as_deref()
                .is_some_and(|want| header(&lines, "authorization") != Some(want))
            {
                let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
                return respond(&mut socket, "401 Unauthorized", "", body).await;
            }
            let body = format!(r#"{{"access_token":"{token}","expires_in":300}}"#);
            return respond(&mut socket, "200 OK", "", &body).await;
        }
        if header(&lines, "authorization") != Some(&format!("Bearer {token}")) {
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"lazysnap-test\",scope=\"registry:catalog:*\"\r\n"
            );
            let body =
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            return respond(&mut socket, "401 Unauthorized", &challenge, body).await;
        }
    }

    if method == "PUT"
        && target.contains("/blobs/uploads/")
        && state
            .lose_uploads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        let body = r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"blob upload unknown to registry"}]}"#;
        return respond(&mut socket, "404 Not Found", "", body).await;
    }
    if let Some(to) = &state.redirect_blobs_to {
        if method == "GET" && target.contains("/blobs/sha256:") {
            let location = format!("Location: http://{to}{target}\r\n");
            return respond(&mut socket, "307 Temporary Redirect", &location, "").await;
        }
    }

    // Forward, one request per upstream connection, and relay the answer until upstream closes.
    let mut head = String::new();
    head.push_str(&request_line);
    head.push_str("\r\n");
    for line in lines.iter().skip(1) {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(head.as_bytes()).await?;
    up.write_all(&body).await?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).await?;
    if state.tamper_manifests && target.contains("/manifests/") {
        let needle = br#""schemaVersion":2"#;
        if let Some(pos) = answer.windows(needle.len()).position(|w| w == needle) {
            answer[pos + needle.len() - 1] = b'3';
        }
    }
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    socket.write_all(&answer).await?;
    socket.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn transient_503s_are_retried_until_the_budget_runs_out() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (digest, data, manifest_digest) =
        push_image(&client(&registry), &registry, "app:v1", 9).await?;
    let proxy = Proxy::start(&registry.addr, ProxyState::default()).await?;
    let reference = proxy.reference("app:v1")?;

    let patient = client_with(registry.dir.path(), None, 3);
    proxy.fail_next(2, Fault::Unavailable);
    assert_eq!(
        patient.get_manifest(&reference).await?.digest,
        manifest_digest
    );
    assert_eq!(proxy.state.faults.load(Ordering::SeqCst), 2);
    proxy.fail_next(3, Fault::Unavailable);
    assert_eq!(
        patient.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );
    assert_eq!(proxy.state.faults.load(Ordering::SeqCst), 5);

    // A push through the flaky proxy: the file body is re-opened for the retried PUT.
    let (path, new_digest, new_data) = layer_file(registry.dir.path(), 40_000, 10);
    proxy.fail_next(2, Fault::Unavailable);
    assert_eq!(
        patient
            .push_blob(&reference, &new_digest, &path, None)
            .await?,
        PushedBlob::Uploaded
    );
    assert_eq!(
        client(&registry)
            .get_blob(&registry.reference("app:v1")?, &new_digest)
            .await?
            .as_ref(),
        &new_data[..]
    );

    let impatient = client_with(registry.dir.path(), None, 0);
    proxy.fail_next(1, Fault::Unavailable);
    let err = impatient.get_manifest(&reference).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Http { status: 503, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("UNAVAILABLE"), "{err}");
    // One retry is not enough for four failures.
    let one_retry = client_with(registry.dir.path(), None, 1);
    proxy.fail_next(4, Fault::Unavailable);
    let err = one_retry.get_manifest(&reference).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    Ok(())
}

#[tokio::test]
async fn dropped_connections_are_retried() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (_, _, manifest_digest) = push_image(&client(&registry), &registry, "app:v1", 11).await?;
    let proxy = Proxy::start(&registry.addr, ProxyState::default()).await?;
    let reference = proxy.reference("app:v1")?;

    proxy.fail_next(2, Fault::Drop);
    let patient = client_with(registry.dir.path(), None, 3);
    assert_eq!(
        patient.get_manifest(&reference).await?.digest,
        manifest_digest
    );
    assert_eq!(proxy.state.faults.load(Ordering::SeqCst), 2);

    proxy.fail_next(1, Fault::Drop);
    let err = client_with(registry.dir.path(), None, 0)
        .get_manifest(&reference)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn bearer_tokens_are_fetched_with_credentials_and_cached() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (digest, data, manifest_digest) =
        push_image(&client(&registry), &registry, "app:v1", 12).await?;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
    let state = ProxyState {
        token: Some("tok-123".into()),
        token_basic: Some(basic),
        ..Default::default()
    };
    let proxy = Proxy::start(&registry.addr, state).await?;
    let reference = proxy.reference("app:v1")?;
    let dir = registry.dir.path();

    let config = docker_config(dir, &proxy.addr, "bob", "hunter2")?;
    let authed = client_with(dir, Some(config), 3);
    assert_eq!(
        authed.get_manifest(&reference).await?.digest,
        manifest_digest
    );
    assert_eq!(
        authed.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );
    {
        let requests = proxy.state.token_requests.lock().expect("lock");
        assert_eq!(requests.len(), 1, "one token for one scope: {requests:?}");
        assert!(
            requests[0].contains("service=lazysnap-test"),
            "{requests:?}"
        );
        assert!(
            requests[0].contains("scope=repository%3Aapp%3Apull"),
            "{requests:?}"
        );
        assert!(requests[0].contains("account=bob"), "{requests:?}");
    }
    // Pushing needs a new scope: one more token, with pull,push.
    let (path, new_digest, _) = layer_file(dir, 30_000, 13);
    assert_eq!(
        authed
            .push_blob(&reference, &new_digest, &path, None)
            .await?,
        PushedBlob::Uploaded
    );
    {
        let requests = proxy.state.token_requests.lock().expect("lock");
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert!(
            requests[1].contains("scope=repository%3Aapp%3Apull%2Cpush"),
            "{requests:?}"
        );
    }

    // Without credentials the token endpoint refuses, and the error says why.
    let err = client_with(dir, None, 3)
        .get_manifest(&reference)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("token endpoint") && text.contains("no credentials for"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn tampered_manifests_fail_the_digest_checks() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (_, _, manifest_digest) = push_image(&client(&registry), &registry, "app:v1", 14).await?;
    let state = ProxyState {
        tamper_manifests: true,
        ..Default::default()
    };
    let proxy = Proxy::start(&registry.addr, state).await?;
    let client = client_with(registry.dir.path(), None, 0);

    // By digest: the body no longer hashes to the pinned digest.
    let pinned = proxy.reference("app:v1")?.with_digest(manifest_digest);
    let err = client.get_manifest(&pinned).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::DigestMismatch { expected, .. } if expected == manifest_digest),
        "{err}"
    );
    // By tag: the body no longer matches the registry's Docker-Content-Digest.
    let err = client
        .get_manifest(&proxy.reference("app:v1")?)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::DigestMismatch { expected, .. } if expected == manifest_digest),
        "{err}"
    );
    assert!(err.to_string().contains("Docker-Content-Digest"), "{err}");
    Ok(())
}

#[tokio::test]
async fn blob_redirects_are_followed_without_forwarding_credentials() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let (digest, data, _) = push_image(&client(&registry), &registry, "app:v1", 15).await?;
    // "Storage": a plain forwarder reached under another host name (localhost, not 127.0.0.1).
    let storage = Proxy::start(&registry.addr, ProxyState::default()).await?;
    let storage_port = storage
        .addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let state = ProxyState {
        token: Some("tok-redirect".into()),
        redirect_blobs_to: Some(format!("localhost:{storage_port}")),
        ..Default::default()
    };
    let front = Proxy::start(&registry.addr, state).await?;
    let reference = front.reference("app:v1")?;
    let client = client_with(registry.dir.path(), None, 3);

    assert_eq!(
        client.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );
    let got = client
        .get_blob_range(&reference, &digest, 1000..3000)
        .await?;
    assert_eq!(got.as_ref(), &data[1000..3000]);
    let mut streamed = Vec::new();
    client
        .blob_reader(&reference, &digest)
        .await?
        .read_to_end(&mut streamed)
        .await?;
    assert_eq!(streamed, data);
    assert!(
        front.state.authorized.load(Ordering::SeqCst) >= 3,
        "the registry got the token"
    );
    assert_eq!(
        storage.state.forwarded.load(Ordering::SeqCst),
        3,
        "storage served the blob reads"
    );
    assert_eq!(
        storage.state.authorized.load(Ordering::SeqCst),
        0,
        "credentials leaked to storage"
    );
    Ok(())
}

#[tokio::test]
async fn lost_upload_session_is_restarted_once() -> anyhow::Result<()> {
    let registry = TestRegistry::start()?;
    let proxy = Proxy::start(&registry.addr, ProxyState::default()).await?;
    let reference = proxy.reference("app:v1")?;
    let client = client_with(registry.dir.path(), None, 0);
    let (path, digest, data) = layer_file(registry.dir.path(), 25_000, 16);

    proxy.state.lose_uploads.store(1, Ordering::SeqCst);
    assert_eq!(
        client.push_blob(&reference, &digest, &path, None).await?,
        PushedBlob::Uploaded
    );
    assert_eq!(
        client.get_blob(&reference, &digest).await?.as_ref(),
        &data[..]
    );

    // Twice in a row is an error that says what happened.
    let (path, digest, _) = layer_file(registry.dir.path(), 25_000, 17);
    proxy.state.lose_uploads.store(2, Ordering::SeqCst);
    let err = client
        .push_blob(&reference, &digest, &path, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("BLOB_UPLOAD_UNKNOWN"), "{err}");
    assert!(err.to_string().contains("push again"), "{err}");
    Ok(())
}

#[tokio::test]
async fn indexes_and_docker_media_types_come_back_as_pushed() -> anyhow::Result<()> {
    use lazysnap::oci::{
        select_platform, Platform, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
    };

    let registry = TestRegistry::start()?;
    let client = client(&registry);
    let (layer_digest, layer, oci_manifest_digest) =
        push_image(&client, &registry, "multi:oci", 18).await?;
    let oci_manifest = client
        .get_manifest(&registry.reference("multi:oci")?)
        .await?;

    // The same image as a Docker schema 2 manifest.
    let docker_manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": Digest::of(CONFIG).to_string(), "size": CONFIG.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer_digest.to_string(), "size": layer.len()}],
    }))?;
    let docker_ref = registry.reference("multi:docker")?;
    let docker_digest = client
        .push_manifest(
            &docker_ref,
            MEDIA_TYPE_DOCKER_MANIFEST,
            docker_manifest.clone().into(),
        )
        .await?;
    let fetched = client.get_manifest(&docker_ref).await?;
    assert_eq!(
        fetched.media_type.as_deref(),
        Some(MEDIA_TYPE_DOCKER_MANIFEST)
    );
    assert_eq!(
        (fetched.digest, fetched.bytes.as_ref()),
        (docker_digest, &docker_manifest[..])
    );
    assert!(matches!(
        parse_document(fetched.media_type.as_deref(), &fetched.bytes)?,
        ImageDocument::Manifest(_)
    ));

    for (tag, index_type, child_type, child_digest, child_len) in [
        (
            "index",
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_OCI_MANIFEST,
            oci_manifest_digest,
            oci_manifest.bytes.len(),
        ),
        (
            "list",
            MEDIA_TYPE_DOCKER_LIST,
            MEDIA_TYPE_DOCKER_MANIFEST,
            docker_digest,
            docker_manifest.len(),
        ),
    ] {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {"mediaType": child_type, "digest": child_digest.to_string(), "size": child_len, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": child_type, "digest": child_digest.to_string(), "size": child_len, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        }))?;
        let reference = registry.reference(&format!("multi:{tag}"))?;
        client
            .push_manifest(&reference, index_type, index.clone().into())
            .await?;
        let fetched = client.get_manifest(&reference).await?;
        assert_eq!(fetched.media_type.as_deref(), Some(index_type), "{tag}");
        assert_eq!(fetched.bytes.as_ref(), &index[..], "{tag}");
        let ImageDocument::Index(parsed) =
            parse_document(fetched.media_type.as_deref(), &fetched.bytes)?
        else {
            anyhow::bail!("{tag}: not an index");
        };
        let chosen = select_platform(&parsed, &"linux/arm64".parse::<Platform>()?)?;
        let chosen_digest: Digest = chosen.digest().to_string().parse()?;
        assert_eq!(chosen_digest, child_digest, "{tag}");
        let child = client
            .get_manifest(&reference.with_digest(chosen_digest))
            .await?;
        assert_eq!(child.media_type.as_deref(), Some(child_type), "{tag}");
        let err = select_platform(&parsed, &"linux/s390x".parse::<Platform>()?).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no manifest for linux/s390x in index; it offers linux/amd64, linux/arm64/v8"
        );
    }
    Ok(())
}

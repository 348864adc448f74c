//! A real Debian `docker-registry` (distribution 2.8) on 127.0.0.1, with filesystem storage in its
//! own temp dir; killed and reaped in `Drop`, so a failing test leaves no process behind.
//!
//! ```ignore
//! let registry = TestRegistry::start()?;
//! let reference = registry.reference("app:v1")?; // 127.0.0.1:PORT/app:v1
//! ```

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lazysnap::oci::{Digest, Reference};

/// The binary of Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long the registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running registry. `addr` is `127.0.0.1:PORT`; storage lives under `dir`.
#[derive(Debug)]
pub struct TestRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Config, storage (`storage/`), log (`registry.log`) and htpasswd file.
    pub dir: tempfile::TempDir,
    child: Child,
}

impl TestRegistry {
    /// Starts an open registry (no authentication).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// Starts a registry that wants HTTP basic authentication (htpasswd, bcrypt) for `user`/`pass`.
    /// Works over plain HTTP with distribution 2.8.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> anyhow::Result<Self> {
        let hash = bcrypt_hash(pass)?;
        Self::start_with(Some(format!("{user}:{hash}\n")))
    }

    fn start_with(htpasswd: Option<String>) -> anyhow::Result<Self> {
        // A free port can be taken between probing and binding: try a few.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(htpasswd.as_deref()) {
                Ok(registry) => return Ok(registry),
                Err(e) if format!("{e:#}").contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    fn try_start(htpasswd: Option<&str>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} not found: install the Debian package docker-registry"
        );
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-registry-")
            .tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let auth = match htpasswd {
            Some(line) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, line)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: \"{}\"\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: \"{addr}\"\n  secret: lazysnap-test-secret\n\
             {auth}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {REGISTRY_BIN}"))?;
        // From here on, Drop kills the child whatever happens.
        let mut registry = Self { addr, dir, child };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "docker-registry exited ({status}) before answering; its log:\n{}",
                    self.log()
                );
            }
            if probe(&self.addr) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "docker-registry on {} did not answer GET /v2/ within {READY_TIMEOUT:?}; its log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry (as if it died); [`Self::restart`] brings it back on the same port.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Starts the registry again with the same config, port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("registry.log"))?;
        self.child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {REGISTRY_BIN}"))?;
        self.wait_ready()
    }

    /// The registry's log so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT/<repo_tag>` parsed, e.g. `registry.reference("app:v1")`.
    pub fn reference(&self, repo_tag: &str) -> anyhow::Result<Reference> {
        Ok(format!("{}/{repo_tag}", self.addr).parse()?)
    }

    /// Where the registry stores the bytes of blob `digest` (to corrupt them in tests).
    pub fn blob_data_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(&hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// True once `GET /v2/` answers 200 or 401.
fn probe(addr: &str) -> bool {
    let Ok(sock) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&sock, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..got]);
    head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 401")
}

/// A bcrypt hash of `pass` for htpasswd: `htpasswd -nbB` (apache2-utils) if installed, else the
/// system `crypt(3)` (libxcrypt does bcrypt) through perl, which every Debian has.
pub fn bcrypt_hash(pass: &str) -> anyhow::Result<String> {
    if let Ok(out) = Command::new("htpasswd").args(["-nbB", "u", pass]).output() {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(hash) = text.trim().strip_prefix("u:") {
                return Ok(hash.to_owned());
            }
        }
    }
    // Cost 5 keeps tests fast; the fixed salt is fine for a throwaway registry.
    let out = Command::new("perl")
        .args([
            "-e",
            "print crypt($ARGV[0], $ARGV[1])",
            pass,
            "$2b$05$lazysnaptestsaltlazysu",
        ])
        .output()
        .context("running perl to make a bcrypt hash (no htpasswd either)")?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        out.status.success() && hash.starts_with("$2b$") && hash.len() == 60,
        "could not make a bcrypt hash (htpasswd missing, perl crypt gave {hash:?}); install apache2-utils"
    );
    Ok(hash)
}

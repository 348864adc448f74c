//! A `lazysnapd` child with its own root, socket, config and metrics port, stopped in `Drop`
//! together with the layer host it started, and every mount below its directory detached.
//!
//! A small starter for test files that only need a running daemon (`tests/snapshotter.rs` keeps
//! its own, with restarts); include it with `#[path = "common/lazysnapd.rs"] mod lazysnapd;`
//! beside `#[path = "common/containerd.rs"] mod containerd;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{stop_child, unmount_below};

pub const LAZYSNAPD: &str = env!("CARGO_BIN_EXE_lazysnapd");

/// A running `lazysnapd`.
#[derive(Debug)]
pub struct Lazysnapd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics_addr: String,
}

impl Lazysnapd {
    /// Starts with `extra` appended to its config file (top-level keys are not allowed there:
    /// `[fetch]` is open, so start with keys of that table or a new table).
    pub fn start(fetch_extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("lscp-").tempdir()?;
        let socket = dir.path().join("lazysnapd.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\naddress = \"{}\"\nmetrics_address = \"{metrics_addr}\"\n\
                 [fetch]\nread_timeout_secs = 20\n{fetch_extra}",
                dir.path().join("root").display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("lazysnapd.log"))?;
        let child = Command::new(LAZYSNAPD)
            .arg("--config")
            .arg(&config)
            .env("LAZYSNAP_LOG", "info,lazysnap=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning lazysnapd")?;
        let mut daemon = Self {
            child,
            dir,
            socket,
            metrics_addr,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("lazysnapd exited ({status}): {}", daemon.log());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "lazysnapd not serving after 30 s: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The service's log, then the layer host's.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lazysnapd.log")).unwrap_or_default()
            + "\n--- layer host ---\n"
            + &std::fs::read_to_string(self.root().join("layer-host.log")).unwrap_or_default()
    }

    /// The metrics page (the service's, with the layer host's appended).
    pub fn metrics(&self) -> Result<String> {
        let mut stream = TcpStream::connect(&self.metrics_addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The sum of every series of metric `name` (a family, or one series with its labels).
    pub fn metric(&self, name: &str) -> Result<f64> {
        Ok(self
            .metrics()?
            .lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// The layer host's pid, if its pid file names a live layer host of this root.
    fn layer_host_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.root().join("layer-host.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let root = self.root().to_string_lossy().into_owned();
        (String::from_utf8_lossy(&cmdline).contains("--layer-host")
            && String::from_utf8_lossy(&environ).contains(&root))
        .then_some(pid)
    }
}

impl Drop for Lazysnapd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        // The layer host is not our child: stop it by the pid it wrote.
        if let Some(pid) = self.layer_host_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while self.layer_host_pid().is_some() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.layer_host_pid().is_some() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        unmount_below(self.dir.path());
    }
}

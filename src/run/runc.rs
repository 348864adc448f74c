//! Driving `runc`: create, start, delete, and waiting for the container's process.
//!
//! `create` then `start` (rather than `runc run`) tells us the moment the process is exec'd:
//! `start` returns once the container's init has been released to exec. Because this process is
//! a child subreaper, the container's init becomes our child when `runc create` exits, so we
//! wait for it ourselves and get its real exit status, and signals go straight to it.
//!
//! runc 1.1 (not crun): crun fails on these machines' hybrid cgroups.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Why runc did not do what was asked. `message` is runc's own last error line.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runc {action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
    #[error("cannot run {binary}: {error}")]
    Spawn {
        binary: String,
        error: std::io::Error,
    },
    #[error("waiting for the container's process: {0}")]
    Wait(nix::errno::Errno),
}

/// A runc binary and the state directory its containers live in.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    /// runc's `--root`: kept apart from other users of runc, on a tmpfs (`/run`).
    pub state: PathBuf,
}

impl Default for Runc {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("runc"),
            state: PathBuf::from("/run/lazysnap/runc"),
        }
    }
}

impl Runc {
    fn command(&self, log: Option<&Path>) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.state);
        if let Some(log) = log {
            c.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        c
    }

    /// Creates container `id` from `bundle`. The container's standard streams are ours; runc's
    /// own errors also go to `bundle/runc.log`, from which the error message is taken.
    pub fn create(&self, id: &str, bundle: &Path, pid_file: &Path) -> Result<(), RuncError> {
        let log = bundle.join("runc.log");
        let status = self
            .command(Some(&log))
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .status()
            .map_err(|e| self.spawn_error(e))?;
        if status.success() {
            return Ok(());
        }
        let message = last_error(&log).unwrap_or_else(|| status.to_string());
        Err(RuncError::Failed {
            action: "create",
            message: message
                .strip_prefix("runc create failed: ")
                .unwrap_or(&message)
                .to_owned(),
        })
    }

    /// Releases the created container's process to exec its command.
    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        self.quiet("start", &[id])
    }

    /// Deletes container `id`, killing it first if it still runs. Idempotent: an unknown
    /// container is not an error.
    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        match self.quiet("delete", &["--force", id]) {
            Err(RuncError::Failed { message, .. }) if message.contains("does not exist") => Ok(()),
            other => other,
        }
    }

    fn quiet(&self, action: &'static str, args: &[&str]) -> Result<(), RuncError> {
        let out = self
            .command(None)
            .arg(action)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(RuncError::Failed {
            action,
            message: stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message")
                .trim()
                .to_owned(),
        })
    }

    fn spawn_error(&self, error: std::io::Error) -> RuncError {
        RuncError::Spawn {
            binary: self.binary.display().to_string(),
            error,
        }
    }
}

/// The last `"level":"error"` message in a runc JSON log.
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
}

/// Makes this process a child subreaper, so orphaned descendants (the container's init once
/// `runc create` exits) become our children.
pub fn become_subreaper() -> Result<(), nix::errno::Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Blocks until process `pid` (a child of ours) exits; returns its exit code, or 128 + the
/// signal that killed it, as shells report it.
pub fn wait_exit(pid: i32) -> Result<i32, RuncError> {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RuncError::Wait(e)),
        }
    }
}

/// What process `pid` runs (`/proc/PID/exe`), if it can be read.
pub fn executable(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Waits (up to 5 s) until process `pid` no longer runs `before`: it has exec'd its command,
/// or exited.
pub async fn wait_exec(pid: i32, before: Option<PathBuf>) {
    let Some(before) = before else { return };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while executable(pid).as_ref() == Some(&before) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Sends `signal` to process `pid`; a process that is already gone is not an error.
pub fn forward(pid: i32, signal: Signal) {
    if let Err(e) = nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        tracing::debug!("forwarding {signal} to {pid}: {e}");
    }
}

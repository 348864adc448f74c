//! A real `lazysnap mount` child process for the tests: started against a registry, waited for
//! until its overlay is mounted, and on drop stopped (SIGTERM, then SIGKILL) with every mount
//! below its mount point and its root detached, so a failing test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};

use super::unmount_below;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the process has to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `path` is a mount point (in this process's mount table).
pub fn mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*wanted))
}

/// A `lazysnap --root ROOT mount [EXTRA] REFERENCE TARGET` child; its stderr goes to `ROOT.log`.
#[derive(Debug)]
pub struct MountProcess {
    pub child: Child,
    pub root: PathBuf,
    pub target: PathBuf,
    pub log: PathBuf,
}

impl MountProcess {
    /// Starts the mount and waits until `target` is mounted.
    pub fn start(root: &Path, reference: &str, target: &Path, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(target)?;
        let log = root.with_extension("log");
        let child = Command::new(BIN)
            .arg("--root")
            .arg(root)
            .arg("mount")
            .args(extra)
            .arg(reference)
            .arg(target)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut process = Self {
            child,
            root: root.to_owned(),
            target: target.to_owned(),
            log,
        };
        let start = Instant::now();
        while !mounted(target) {
            if let Some(status) = process.child.try_wait()? {
                bail!("lazysnap mount exited ({status}): {}", process.log());
            }
            ensure!(
                start.elapsed() < MOUNT_TIMEOUT,
                "not mounted after {MOUNT_TIMEOUT:?}: {}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// SIGTERM, then the process must exit 0 having unmounted the target; returns its log.
    pub fn stop(mut self) -> Result<String> {
        self.terminate()?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(
                start.elapsed() < STOP_TIMEOUT,
                "still running {STOP_TIMEOUT:?} after SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(status.success(), "exit status {status}: {}", self.log());
        ensure!(
            !mounted(&self.target),
            "{} still mounted after exit",
            self.target.display()
        );
        Ok(self.log())
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < STOP_TIMEOUT / 2 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        unmount_below(&self.target);
        unmount_below(&self.root);
    }
}

/// Mounts `reference` at `target` (own `root`), requires the merged tree to equal `want` (an
/// independent unpack), then a clean stop: nothing left mounted below `root`, `unmounted` logged.
pub fn ensure_mount_equals(
    root: &Path,
    reference: &str,
    target: &Path,
    want: &std::collections::BTreeMap<String, super::tree::Node>,
) -> Result<()> {
    let process = MountProcess::start(root, reference, target, &[])?;
    let got = super::tree::snapshot(target)?;
    let differences = super::tree::differences(want, &got);
    ensure!(
        differences.is_empty(),
        "{reference}: {} differences:\n{}",
        differences.len(),
        differences.join("\n")
    );
    let log = process.stop()?;
    let left = super::mounts_below(root);
    ensure!(left.is_empty(), "{reference}: left mounted: {left:?}");
    ensure!(log.contains("unmounted"), "{log}");
    Ok(())
}

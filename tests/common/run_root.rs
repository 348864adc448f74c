//! A state root for `lazysnap run --no-lazysnapd` in tests, removed with whatever a failed test
//! left mounted or running under it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Result};

use super::{mounts_below, unmount_below};

const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A state root for `lazysnap run`; whatever a failed test left mounted or running under it is
/// removed on drop.
pub struct Root {
    dir: tempfile::TempDir,
    pub runc_state: PathBuf,
}

impl Root {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            dir,
            runc_state: PathBuf::from("/run/lazysnap/runc"),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root")
            .arg(self.path())
            .args(["run", "--no-lazysnapd"])
            .args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs `lazysnap run ARGS` to the end.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self.command(args).output()?;
        eprintln!(
            "lazysnap run {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Nothing left: no mount under the root, no container directory.
    pub fn assert_clean(&self) -> Result<()> {
        let left = mounts_below(self.path());
        ensure!(left.is_empty(), "mounts left behind: {left:?}");
        let containers = self.path().join("containers");
        if containers.exists() {
            let names: Vec<_> = std::fs::read_dir(&containers)?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            ensure!(names.is_empty(), "container dirs left behind: {names:?}");
        }
        Ok(())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.path().join("containers")) {
            for e in entries.flatten() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&self.runc_state)
                    .args(["delete", "--force"])
                    .arg(e.file_name())
                    .output();
            }
        }
        unmount_below(self.path());
    }
}

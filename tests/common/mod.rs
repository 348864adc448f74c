//! Helpers shared by the integration tests: real parts started on loopback with their own temp
//! dirs, torn down in `Drop`.
#![allow(dead_code)]

pub mod faultproxy;
pub mod hostile;
pub mod image;
pub mod mount_process;
pub mod registry;
pub mod tree;

/// Mount points at or below `dir` (from this process's mountinfo), deepest first.
pub fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    points
}

/// Detaches every mount at or below `dir`.
pub fn unmount_below(dir: &std::path::Path) {
    for m in mounts_below(dir) {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Detaches every mount at or below its directory when dropped, so a failing test leaves none.
#[derive(Debug)]
pub struct UnmountOnDrop(pub std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

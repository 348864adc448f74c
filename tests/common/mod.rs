//! Helpers shared by the integration tests: real parts started on loopback with their own temp
//! dirs, torn down in `Drop`.
#![allow(dead_code)]

pub mod image;
pub mod registry;
pub mod tree;

/// Mount points at or below `dir` (from this process's mountinfo).
pub fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

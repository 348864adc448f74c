//! Helpers shared by the integration tests: real parts started on loopback with their own temp
//! dirs, torn down in `Drop`.
#![allow(dead_code)]

pub mod faultproxy;
pub mod hostile;
pub mod image;
pub mod lazy;
pub mod mount_process;
pub mod referrers;
pub mod registry;
pub mod run_root;
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

/// The sum of the series of metric `name` (a family, or one series with its labels) scraped from
/// a mount process's `/metrics` endpoint.
pub fn scrape(addr: &str, name: &str) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

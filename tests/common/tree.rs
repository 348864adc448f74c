//! Comparing two directory trees entry by entry: the check that a mounted image is the same tree
//! as an independent unpack of it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};

/// What is compared of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub link: Option<String>,
    pub rdev: Option<(u64, u64)>,
    /// `user.*` xattrs (the rest are the mount's own business, e.g. overlay's).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub mtime: Option<(i64, i64)>,
    /// For a file with several names: the first of its names in walk order.
    pub hard_link_of: Option<String>,
}

/// A name as a key: itself when it is UTF-8, else every byte outside printable ASCII escaped
/// (`caf\xe9.txt`), so two byte names never compare equal by a lossy conversion.
pub fn name_key(name: &std::ffi::OsStr) -> String {
    let bytes = name.as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

/// Every entry below `root` (not `root` itself), by relative path (see [`name_key`]).
pub fn snapshot(root: &Path) -> Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut first_name: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for path in names {
            let rel = name_key(path.strip_prefix(root)?.as_os_str());
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("lstat {}", path.display()))?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            let hard_link_of = if ft.is_file() && meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                match first_name.get(&key) {
                    Some(first) => Some(first.clone()),
                    None => {
                        first_name.insert(key, rel.clone());
                        None
                    }
                }
            } else {
                None
            };
            let node = Node {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: ft.is_file().then_some(meta.len()),
                sha256: if ft.is_file() {
                    let data = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Some(super::image::sha256_hex(&data))
                } else {
                    None
                },
                link: ft
                    .is_symlink()
                    .then(|| std::fs::read_link(&path).map(|l| name_key(l.as_os_str())))
                    .transpose()?,
                rdev: (ft.is_char_device() || ft.is_block_device())
                    .then(|| (major(meta.rdev()), minor(meta.rdev()))),
                xattrs: user_xattrs(&path)?,
                mtime: (!ft.is_dir()).then(|| (meta.mtime(), meta.mtime_nsec())),
                hard_link_of,
            };
            if ft.is_dir() {
                stack.push(path);
            }
            out.insert(rel, node);
        }
    }
    Ok(out)
}

/// The differences between two snapshots, one line each (empty when equal).
pub fn differences(want: &BTreeMap<String, Node>, got: &BTreeMap<String, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, w) in want {
        match got.get(name) {
            None => out.push(format!("missing: {name} ({})", w.kind)),
            Some(g) if g != w => out.push(format!("differs: {name}\n  want {w:?}\n  got  {g:?}")),
            Some(_) => {}
        }
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        out.push(format!("unexpected: {name}"));
    }
    out
}

fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// `user.*` extended attributes of `path` (not following a symlink).
fn user_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `c` is a NUL-terminated path and `names` a buffer of the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(BTreeMap::new()),
            _ => Err(e).with_context(|| format!("listxattr {}", path.display())),
        };
    }
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let cname = CString::new(name)?;
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both strings are NUL-terminated and `value` is a buffer of the length passed.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("getxattr {}", path.display()));
        }
        value.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(out)
}

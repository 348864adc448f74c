//! Unpacking a plain (non-lazy) layer into a directory that overlayfs can use as a lower layer:
//! OCI whiteouts become overlay whiteouts and opaque directories, and no entry can write outside
//! the directory.
//!
//! Names were already checked by the tar parser (no absolute names, no `..`, no links out of the
//! root). What remains is the classic attack of a symlink created earlier in the same layer
//! (`a -> /etc`, then `a/passwd`): every parent is opened component by component with
//! `O_NOFOLLOW | O_DIRECTORY` from a descriptor of the target directory, and every entry is created
//! relative to its parent's descriptor, so no path is ever resolved through a symlink.
//!
//! Names and link targets are bytes from the tar to the system call (`OsStr`, never `str`): a
//! layer may name a file `caf\xe9.txt` (Latin-1), which no lazy TOC can hold, so such a layer
//! stays plain and this is the path that must create it exactly. A symlink target is data and is
//! stored as its bytes are.
//!
//! Extended attributes in the `trusted.` namespace are never written from a tar. overlayfs keeps
//! its own state there (`trusted.overlay.opaque`, `…redirect`, `…metacopy`, `…origin`) and reads it
//! from every lower layer: a layer that could write it would hide or redirect directories of the
//! layers below. containerd's applier (1.6) writes every `SCHILY.xattr.*` record it finds,
//! `trusted.overlay.*` included; this unpacker takes the safe path instead, and the only overlay
//! attribute it writes is the opaque mark of an OCI `.wh..wh..opq` entry. Other namespaces
//! (`security.capability`, `user.*`) are written as containerd writes them.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::format::tar::{padding, EntryMeta, TarItem, TarParser};
use crate::format::{EntryKind, FormatError};

/// Errors name the entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("entry {name:?}: {message}")]
    Entry { name: String, message: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

/// What was unpacked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unpacked {
    pub entries: u64,
    pub bytes: u64,
}

const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The namespace no layer may write (overlayfs's own state lives there).
const TRUSTED_PREFIX: &str = "trusted.";
/// The kernel's `PATH_MAX`: a longer name cannot be created by any unpacker that opens paths
/// (containerd's fails with ENAMETOOLONG), so a layer holding one is refused.
const MAX_NAME_BYTES: usize = 4096;

/// The extended attributes of `meta` that may be written; counts the ones dropped.
fn writable_xattrs<'a>(
    meta: &'a EntryMeta,
    dropped: &'a mut u64,
) -> impl Iterator<Item = (&'a String, &'a Vec<u8>)> + 'a {
    meta.xattrs.iter().filter(move |(k, _)| {
        let trusted = k.starts_with(TRUSTED_PREFIX);
        if trusted {
            *dropped += 1;
            tracing::debug!(entry = %meta.shown_name(), xattr = %k, "not writing a trusted.* attribute from a layer");
        }
        !trusted
    })
}

/// Unpacks the uncompressed tar stream `tar` into the empty directory `dir`.
pub fn unpack_layer<R: Read>(tar: R, dir: &Path) -> Result<Unpacked, UnpackError> {
    let root = nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Io {
        context: format!("opening {}", dir.display()),
        error: e.into(),
    })?;
    let mut parser = TarParser::new(tar);
    let mut stats = Unpacked::default();
    // Directories get their modes, owners and times last: writing children changes them.
    let mut dirs: Vec<EntryMeta> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut dropped = 0u64;
    while let Some(item) = parser.next_item()? {
        let TarItem::Entry(entry) = item else {
            continue;
        };
        let meta = entry.meta;
        let name = meta.name.clone();
        let shown = meta.shown_name();
        let fail = |message: String| UnpackError::Entry {
            name: shown.clone(),
            message,
        };
        stats.entries += 1;
        let mut payload_left = entry.size;
        let too_long = [&name, &meta.link_name]
            .into_iter()
            .find(|n| n.len() > MAX_NAME_BYTES);
        if let Some(long) = too_long {
            return Err(fail(format!(
                "a name of {} bytes is longer than PATH_MAX ({MAX_NAME_BYTES})",
                long.len()
            )));
        }
        if name.is_empty() {
            dirs.push(meta);
        } else {
            let (parent_path, base) = split_last(&name);
            let parent = open_dir(&root, parent_path, true).map_err(&fail)?;
            if base.as_bytes() == OPAQUE_MARKER {
                set_xattr(&parent, None, "trusted.overlay.opaque", b"y")
                    .map_err(|e| fail(format!("marking the directory opaque: {e}")))?;
            } else if let Some(hidden) = base.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
                let hidden = OsStr::from_bytes(hidden);
                remove(&parent, hidden).map_err(|e| {
                    fail(format!(
                        "replacing {}: {e}",
                        hidden.as_bytes().escape_ascii()
                    ))
                })?;
                mknodat(&parent, hidden, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| fail(format!("creating the whiteout: {e}")))?;
            } else {
                match meta.kind {
                    EntryKind::Dir => {
                        if !is_dir(&parent, base) {
                            remove(&parent, base).map_err(|e| fail(format!("replacing: {e}")))?;
                            mkdirat(&parent, base, Mode::from_bits_truncate(0o700))
                                .map_err(|e| fail(format!("mkdir: {e}")))?;
                        }
                        dirs.push(meta);
                    }
                    EntryKind::Reg => {
                        remove(&parent, base).map_err(|e| fail(format!("replacing: {e}")))?;
                        let flags = OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC;
                        let fd = openat(&parent, base, flags, Mode::from_bits_truncate(0o600))
                            .map_err(|e| fail(format!("create: {e}")))?;
                        let mut file = std::fs::File::from(fd);
                        while payload_left > 0 {
                            let n = payload_left.min(buf.len() as u64) as usize;
                            parser.read_payload(&mut buf[..n])?;
                            std::io::Write::write_all(&mut file, &buf[..n])
                                .map_err(|e| fail(format!("write: {e}")))?;
                            payload_left -= n as u64;
                            stats.bytes += n as u64;
                        }
                        chown_at(&parent, base, &meta).map_err(|e| fail(format!("chown: {e}")))?;
                        // After chown, which clears setuid and setgid.
                        fchmod(&file, Mode::from_bits_truncate(meta.mode & 0o7777))
                            .map_err(|e| fail(format!("chmod: {e}")))?;
                        for (k, v) in writable_xattrs(&meta, &mut dropped) {
                            set_xattr(&file, None, k, v)
                                .map_err(|e| fail(format!("xattr {k}: {e}")))?;
                        }
                        set_times(&parent, base, &meta).map_err(|e| fail(format!("times: {e}")))?;
                    }
                    EntryKind::Symlink => {
                        remove(&parent, base).map_err(|e| fail(format!("replacing: {e}")))?;
                        symlinkat(OsStr::from_bytes(&meta.link_name), &parent, base)
                            .map_err(|e| fail(format!("symlink: {e}")))?;
                        chown_at(&parent, base, &meta).map_err(|e| fail(format!("chown: {e}")))?;
                        set_times(&parent, base, &meta).map_err(|e| fail(format!("times: {e}")))?;
                    }
                    EntryKind::Hardlink => {
                        let (target_parent, target_base) = split_last(&meta.link_name);
                        let from = open_dir(&root, target_parent, false)
                            .map_err(|m| fail(format!("hard link target: {m}")))?;
                        remove(&parent, base).map_err(|e| fail(format!("replacing: {e}")))?;
                        linkat(&from, target_base, &parent, base, AtFlags::empty()).map_err(
                            |e| {
                                let target = crate::format::tar::shown(&meta.link_name);
                                fail(format!("hard link to {target:?}: {e}"))
                            },
                        )?;
                    }
                    EntryKind::Char | EntryKind::Block | EntryKind::Fifo => {
                        remove(&parent, base).map_err(|e| fail(format!("replacing: {e}")))?;
                        let (kind, dev) = match meta.kind {
                            EntryKind::Char => (
                                SFlag::S_IFCHR,
                                nix::sys::stat::makedev(
                                    meta.dev_major.into(),
                                    meta.dev_minor.into(),
                                ),
                            ),
                            EntryKind::Block => (
                                SFlag::S_IFBLK,
                                nix::sys::stat::makedev(
                                    meta.dev_major.into(),
                                    meta.dev_minor.into(),
                                ),
                            ),
                            _ => (SFlag::S_IFIFO, 0),
                        };
                        mknodat(&parent, base, kind, Mode::empty(), dev)
                            .map_err(|e| fail(format!("mknod: {e}")))?;
                        chown_at(&parent, base, &meta).map_err(|e| fail(format!("chown: {e}")))?;
                        fchmodat(
                            &parent,
                            base,
                            Mode::from_bits_truncate(meta.mode & 0o7777),
                            FchmodatFlags::FollowSymlink,
                        )
                        .map_err(|e| fail(format!("chmod: {e}")))?;
                        for (k, v) in writable_xattrs(&meta, &mut dropped) {
                            set_xattr(&parent, Some(base), k, v)
                                .map_err(|e| fail(format!("xattr {k}: {e}")))?;
                        }
                        set_times(&parent, base, &meta).map_err(|e| fail(format!("times: {e}")))?;
                    }
                }
            }
        }
        if payload_left > 0 {
            parser.skip_payload(payload_left)?;
        }
        parser.skip_payload(padding(entry.size) as u64)?;
    }
    // Deepest first, so setting a parent's time is not undone by its children.
    dirs.sort_by_key(|m| {
        let slashes = m.name.iter().filter(|&&b| b == b'/').count();
        std::cmp::Reverse(slashes + usize::from(!m.name.is_empty()))
    });
    for meta in dirs {
        let fail = |message: String| UnpackError::Entry {
            name: meta.shown_name(),
            message,
        };
        let fd = open_dir(&root, &meta.name, false).map_err(&fail)?;
        nix::unistd::fchown(
            &fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| fail(format!("chown: {e}")))?;
        fchmod(&fd, Mode::from_bits_truncate(meta.mode & 0o7777))
            .map_err(|e| fail(format!("chmod: {e}")))?;
        for (k, v) in writable_xattrs(&meta, &mut dropped) {
            set_xattr(&fd, None, k, v).map_err(|e| fail(format!("xattr {k}: {e}")))?;
        }
        let (atime, mtime) = times(&meta);
        nix::sys::stat::futimens(&fd, &atime, &mtime).map_err(|e| fail(format!("times: {e}")))?;
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "the layer carries trusted.* extended attributes; they were not written (overlayfs would obey them)"
        );
    }
    Ok(stats)
}

/// `a/b/c` → (`a/b`, `c`); a name without `/` has the root (empty) as its parent.
fn split_last(name: &[u8]) -> (&[u8], &OsStr) {
    match name.iter().rposition(|&b| b == b'/') {
        Some(i) => (&name[..i], OsStr::from_bytes(&name[i + 1..])),
        None => (&[], OsStr::from_bytes(name)),
    }
}

/// Opens directory `path` below `root` one component at a time, never following a symlink;
/// with `create`, missing directories are made (mode 0755, as an unpacker would).
fn open_dir(root: &OwnedFd, path: &[u8], create: bool) -> Result<OwnedFd, String> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut fd = root.try_clone().map_err(|e| e.to_string())?;
    let mut walked = Vec::new();
    for component in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        if !walked.is_empty() {
            walked.push(b'/');
        }
        walked.extend_from_slice(component);
        let walked = crate::format::tar::shown(&walked);
        let component = OsStr::from_bytes(component);
        let next = match openat(&fd, component, flags, Mode::empty()) {
            Ok(next) => next,
            Err(Errno::ENOENT) if create => {
                mkdirat(&fd, component, Mode::from_bits_truncate(0o755))
                    .map_err(|e| format!("creating parent {walked:?}: {e}"))?;
                openat(&fd, component, flags, Mode::empty())
                    .map_err(|e| format!("opening parent {walked:?}: {e}"))?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(format!(
                    "parent {walked:?} is not a directory (a symlink?); refusing to follow it"
                ))
            }
            Err(e) => return Err(format!("opening parent {walked:?}: {e}")),
        };
        fd = next;
    }
    Ok(fd)
}

/// Sets an entry's owner without following it (a symlink's own owner, not its target's).
fn chown_at(parent: &OwnedFd, name: &OsStr, meta: &EntryMeta) -> Result<(), Errno> {
    fchownat(
        parent,
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

fn is_dir(parent: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
    })
}

/// Removes `name` if present (an empty directory too), so a later entry replaces an earlier one.
fn remove(parent: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => unlinkat(parent, name, UnlinkatFlags::RemoveDir),
        Err(e) => Err(e),
    }
}

fn times(meta: &EntryMeta) -> (TimeSpec, TimeSpec) {
    let t = TimeSpec::new(meta.mtime, i64::from(meta.mtime_nsec));
    (t, t)
}

fn set_times(parent: &OwnedFd, name: &OsStr, meta: &EntryMeta) -> Result<(), Errno> {
    let (atime, mtime) = times(meta);
    utimensat(
        parent,
        name,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
}

/// Sets an xattr on `fd` itself, or on `name` inside directory `fd` without following it.
fn set_xattr(fd: &impl AsFd, name: Option<&OsStr>, key: &str, value: &[u8]) -> std::io::Result<()> {
    let key = CString::new(key)?;
    let raw = fd.as_fd().as_raw_fd();
    let rc = match name {
        // SAFETY: `raw` is an open descriptor we borrow for the call; `key` is NUL-terminated and
        // `value` is a valid buffer of the length passed.
        None => unsafe {
            nix::libc::fsetxattr(raw, key.as_ptr(), value.as_ptr().cast(), value.len(), 0)
        },
        Some(name) => {
            let mut path = format!("/proc/self/fd/{raw}/").into_bytes();
            path.extend_from_slice(name.as_bytes());
            let path = CString::new(path)?;
            // SAFETY: as above; `lsetxattr` does not follow a final symlink, and `/proc/self/fd/N`
            // names the directory `raw` refers to, so no other path is resolved.
            unsafe {
                nix::libc::lsetxattr(
                    path.as_ptr(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of one directory `d` and one file `d/f`, each carrying `xattrs` as PAX records.
    fn tar_with_xattrs(xattrs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        for (name, kind, data) in [
            ("d/", ::tar::EntryType::Directory, &b""[..]),
            ("d/f", ::tar::EntryType::Regular, &b"x"[..]),
        ] {
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
            let mut h = ::tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            h.set_path(name).unwrap();
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let name = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated; `buf` is valid for its length.
        let n = unsafe {
            nix::libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    #[test]
    fn trusted_xattrs_from_a_tar_are_never_written_and_user_ones_are() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: writing trusted.* xattrs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_with_xattrs(&[
            ("trusted.overlay.opaque", b"y"),
            ("trusted.overlay.redirect", b"/elsewhere"),
            ("user.kept", b"v"),
        ]);
        unpack_layer(&tar[..], dir.path()).unwrap();
        for p in [dir.path().join("d"), dir.path().join("d/f")] {
            assert_eq!(get_xattr(&p, "trusted.overlay.opaque"), None, "{p:?}");
            assert_eq!(get_xattr(&p, "trusted.overlay.redirect"), None, "{p:?}");
            assert_eq!(
                get_xattr(&p, "user.kept").as_deref(),
                Some(&b"v"[..]),
                "{p:?}"
            );
        }
    }

    #[test]
    fn an_oci_opaque_marker_still_makes_the_directory_opaque() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: writing trusted.* xattrs needs root");
            return;
        }
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(::tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_path("d/.wh..wh..opq").unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&tar[..], dir.path()).unwrap();
        assert_eq!(
            get_xattr(&dir.path().join("d"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
    }

    #[test]
    fn a_name_longer_than_path_max_is_refused() {
        let mut b = ::tar::Builder::new(Vec::new());
        let long = format!("{}f", "a/".repeat(3000));
        b.append_pax_extensions([("path", long.as_bytes())])
            .unwrap();
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(::tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_path("placeholder").unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The tar parser's name limit may refuse it first (its limit can be raised; this one
        // cannot).
        let err = unpack_layer(&tar[..], dir.path()).unwrap_err().to_string();
        assert!(err.contains("PATH_MAX") || err.contains("limit"), "{err}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}

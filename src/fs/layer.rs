//! The FUSE file system of one layer: attributes, names and links from the TOC's inode table,
//! file content from a [`ChunkSource`]. The layer is immutable, so the kernel may cache entries,
//! attributes and pages for as long as it likes.
//!
//! Every request handler runs under [`LayerFs::guard`]: a panic, whatever input caused it, fails
//! that one request with EIO and leaves the event loop (and every other layer of the process)
//! serving. Extended attributes in the `trusted.` namespace never pass from a TOC to the kernel:
//! overlayfs keeps its own state there (`trusted.overlay.opaque`, `…redirect`, `…metacopy`), and
//! an image must not steer how the layers below it are seen; the one such attribute served is the
//! opaque mark this module derives from an OCI `.wh..wh..opq` entry.

use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use futures_util::FutureExt;

use super::inode::{InodeTable, Node, NodeKind, ROOT};
use super::passthrough::{Passthrough, FH_FUSE};
use super::ChunkSource;
use crate::format::{Chunk, Toc, TocEntry};
use crate::metrics::FuseOp;

/// Entries and attributes never change while mounted.
const TTL: Duration = Duration::from_secs(24 * 3600);
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The namespace no TOC may set (overlayfs's own state lives there).
const TRUSTED_PREFIX: &str = "trusted.";
/// The kernel's `XATTR_NAME_MAX` and `XATTR_SIZE_MAX`: an attribute beyond them could not have
/// been written by an unpacker, and the kernel could not return it.
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;

pub(super) struct LayerFs {
    pub(super) table: InodeTable,
    pub(super) toc: Arc<Toc>,
    pub(super) source: Arc<dyn ChunkSource>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) read_timeout: Duration,
    /// Names the layer in logs.
    pub(super) label: String,
    pub(super) passthrough: Passthrough,
    /// Added to the table's inode numbers in every reply: the layer's range in its session.
    pub(super) base: u64,
}

impl LayerFs {
    fn entry_of(&self, node: &Node) -> Option<&TocEntry> {
        node.entry.and_then(|i| self.toc.entries.get(i as usize))
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let entry = self.entry_of(node);
        let (kind, size, rdev) = match node.kind {
            NodeKind::Dir => (FileType::Directory, 4096, 0),
            NodeKind::Reg => (FileType::RegularFile, entry.map_or(0, |e| e.size), 0),
            NodeKind::Symlink => (
                FileType::Symlink,
                entry.map_or(0, |e| e.link_name.len() as u64),
                0,
            ),
            NodeKind::Char => (
                FileType::CharDevice,
                0,
                entry.map_or(0, |e| makedev(e.dev_major, e.dev_minor)),
            ),
            NodeKind::Block => (
                FileType::BlockDevice,
                0,
                entry.map_or(0, |e| makedev(e.dev_major, e.dev_minor)),
            ),
            NodeKind::Fifo => (FileType::NamedPipe, 0, 0),
            NodeKind::Whiteout => (FileType::CharDevice, 0, 0),
        };
        let mtime = entry.map_or(UNIX_EPOCH, |e| system_time(e.mtime, e.mtime_nsec));
        let default_perm = if node.kind == NodeKind::Dir {
            0o755
        } else {
            0o644
        };
        FileAttr {
            ino: INodeNo(self.base | ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: entry.map_or(default_perm, |e| (e.mode & 0o7777) as u16),
            nlink: node.nlink,
            uid: entry.map_or(0, |e| e.uid),
            gid: entry.map_or(0, |e| e.gid),
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Answers the session's lookup of this layer's directory: the layer's root.
    pub(super) fn lookup_root(&self, reply: ReplyEntry) {
        self.guard("lookup", || match self.table.get(ROOT) {
            Some(node) => reply.entry(&TTL, &self.attr(ROOT, node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn xattrs(&self, node: &Node) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .entry_of(node)
            .filter(|_| node.kind != NodeKind::Whiteout)
            .map(|e| {
                e.xattrs
                    .iter()
                    .filter(|(k, v)| servable_xattr(k, v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if node.opaque {
            out.push((OPAQUE_XATTR.to_owned(), b"y".to_vec()));
        }
        out
    }
}

/// Whether a TOC's extended attribute may reach the kernel: never one in `trusted.`, never one
/// the kernel could not hold. `security.*` (file capabilities, SELinux labels) and `user.*` are
/// served as containerd's applier writes them; that is safe only because image content is
/// reachable by root alone (see docs/formats.md).
pub(super) fn servable_xattr(name: &str, value: &[u8]) -> bool {
    !name.starts_with(TRUSTED_PREFIX)
        && !name.is_empty()
        && name.len() <= XATTR_NAME_MAX
        && value.len() <= XATTR_SIZE_MAX
}

/// An entry's time; a time the clock cannot represent is clamped, never a panic.
fn system_time(secs: i64, nsec: u32) -> std::time::SystemTime {
    let nsec = nsec.min(999_999_999);
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(nsec.into())))
    };
    time.unwrap_or(UNIX_EPOCH)
}

/// Fills `out` with the part of `[offset, end)` that `chunk` covers: zeros for a zero run
/// (never more than the read asked for, however large the run), else the slice of `data`.
/// `false` if `data` is shorter than the TOC says.
fn copy_piece(
    out: &mut Vec<u8>,
    chunk: &Chunk,
    data: Option<&Bytes>,
    offset: u64,
    end: u64,
) -> bool {
    let from = offset.max(chunk.file_offset) - chunk.file_offset;
    let to = end.min(chunk.file_offset.saturating_add(chunk.size)) - chunk.file_offset;
    if to <= from {
        return true;
    }
    match data {
        None => {
            out.resize(out.len() + (to - from) as usize, 0);
            true
        }
        Some(data) => match data.get(from as usize..to as usize) {
            Some(piece) => {
                out.extend_from_slice(piece);
                true
            }
            None => false,
        },
    }
}

/// Linux `makedev` for the 32-bit `rdev` FUSE carries.
fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// The chunks of `chunks` (in file order) that overlap `[start, end)`.
fn covering(chunks: &[Chunk], start: u64, end: u64) -> &[Chunk] {
    let first = chunks.partition_point(|c| c.file_offset + c.size <= start);
    let last = chunks.partition_point(|c| c.file_offset < end);
    &chunks[first..last.max(first)]
}

impl LayerFs {
    /// Runs one request's handler, which owns the request's reply. If the handler panics, the
    /// reply is dropped while unwinding, and fuser answers a dropped reply with EIO: the kernel
    /// gets an error for that request, and this event loop goes on to the next one. The layer's
    /// state stays usable: the table is immutable, and the passthrough counts only ever err
    /// towards a plain open (their lock ignores poisoning).
    fn guard(&self, op: &'static str, handler: impl FnOnce()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(handler)) {
            tracing::error!(
                layer = %self.label,
                op,
                "request handler panicked ({}); answered EIO",
                panic_message(&*panic)
            );
        }
    }
}

/// The text of a panic payload, for the log.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Reads `[offset, end)` of a file from its chunks: zero runs are written, never allocated
/// whole; other chunks come from `source`, all at once, within `timeout`.
async fn read_range(
    source: Arc<dyn ChunkSource>,
    chunks: Vec<Chunk>,
    offset: u64,
    end: u64,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let fetches = chunks.iter().map(|c| {
        let source = source.clone();
        let c = c.clone();
        async move {
            if c.zeros {
                Ok(None)
            } else {
                source.read_chunk(&c).await.map(Some)
            }
        }
    });
    let parts =
        match tokio::time::timeout(timeout, futures_util::future::try_join_all(fetches)).await {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
            Err(_) => return Err(format!("read not served within {timeout:?}")),
        };
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (c, data) in chunks.iter().zip(&parts) {
        if !copy_piece(&mut out, c, data.as_ref(), offset, end) {
            return Err("chunk shorter than the TOC says".into());
        }
    }
    Ok(out)
}

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", || {
            let _op = FuseOp::start("lookup");
            let found = name.to_str().and_then(|n| self.table.lookup(parent.0, n));
            match found.and_then(|ino| Some((ino, self.table.get(ino)?))) {
                Some((ino, node)) => reply.entry(&TTL, &self.attr(ino, node), Generation(0)),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guard("getattr", || {
            let _op = FuseOp::start("getattr");
            match self.table.get(ino.0) {
                Some(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.guard("readlink", || {
            let _op = FuseOp::start("readlink");
            match self
                .table
                .get(ino.0)
                .filter(|n| n.kind == NodeKind::Symlink)
                .and_then(|n| self.entry_of(n))
            {
                Some(e) => reply.data(e.link_name.as_bytes()),
                None => reply.error(Errno::EINVAL),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guard("open", || {
            let _op = FuseOp::start("open");
            match self.table.get(ino.0) {
                Some(n) if n.kind == NodeKind::Dir => reply.error(Errno::EISDIR),
                Some(n) if n.kind == NodeKind::Reg => match self.entry_of(n) {
                    Some(entry) => self.passthrough.open(ino.0, entry, &*self.source, reply),
                    None => reply.opened(FH_FUSE, FopenFlags::FOPEN_KEEP_CACHE),
                },
                Some(_) => reply.opened(FH_FUSE, FopenFlags::FOPEN_KEEP_CACHE),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", || {
            let _op = FuseOp::start("release");
            self.passthrough.release(ino.0, fh);
            reply.ok();
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", || {
            let op = FuseOp::start("read");
            let Some(entry) = self
                .table
                .get(ino.0)
                .filter(|n| n.kind == NodeKind::Reg)
                .and_then(|n| self.entry_of(n))
            else {
                reply.error(Errno::EIO);
                return;
            };
            let end = offset.saturating_add(u64::from(size)).min(entry.size);
            if offset >= end {
                reply.data(&[]);
                return;
            }
            let chunks: Vec<Chunk> = covering(&entry.chunks, offset, end).to_vec();
            let source = self.source.clone();
            let timeout = self.read_timeout;
            let name = entry.name.clone();
            let label = self.label.clone();
            // Answered from a task: the FUSE thread goes straight back to the next request. The
            // reply stays outside the work, so even a panic in it is answered (EIO), not dropped
            // with the task.
            self.runtime.spawn(async move {
                let _op = op;
                let work = read_range(source, chunks, offset, end, timeout);
                match AssertUnwindSafe(work).catch_unwind().await {
                    Ok(Ok(data)) => reply.data(&data),
                    Ok(Err(e)) => {
                        tracing::warn!(layer = %label, file = %name, offset, "{e}");
                        reply.error(Errno::EIO);
                    }
                    Err(panic) => {
                        tracing::error!(layer = %label, file = %name, offset, "read panicked ({}); answered EIO", panic_message(&*panic));
                        reply.error(Errno::EIO);
                    }
                }
            });
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guard("opendir", || {
            let _op = FuseOp::start("opendir");
            match self.table.get(ino.0) {
                Some(n) if n.kind == NodeKind::Dir => reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                ),
                Some(_) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.guard("readdir", || {
            let _op = FuseOp::start("readdir");
            let Some(node) = self.table.get(ino.0).filter(|n| n.kind == NodeKind::Dir) else {
                reply.error(Errno::ENOTDIR);
                return;
            };
            // Entry `i` of the listing (`.`, `..`, then the children) has offset `i + 1`; a
            // later call resumes at `offset` without walking the entries before it.
            let total = node.children.len() + 2;
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(total);
            for i in start..total {
                let (name, child) = match i {
                    0 => (".", ino.0),
                    1 => ("..", node.parent),
                    _ => {
                        let (n, c) = &node.children[i - 2];
                        (&**n, *c)
                    }
                };
                let kind = match self.table.get(child).map(|n| n.kind) {
                    Some(NodeKind::Dir) | None => FileType::Directory,
                    Some(NodeKind::Reg) => FileType::RegularFile,
                    Some(NodeKind::Symlink) => FileType::Symlink,
                    Some(NodeKind::Char | NodeKind::Whiteout) => FileType::CharDevice,
                    Some(NodeKind::Block) => FileType::BlockDevice,
                    Some(NodeKind::Fifo) => FileType::NamedPipe,
                };
                if reply.add(INodeNo(self.base | child), (i + 1) as u64, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.guard("statfs", || {
            let _op = FuseOp::start("statfs");
            // Sizes come from the TOC: their sum may not fit.
            let bytes = self
                .toc
                .entries
                .iter()
                .fold(0u64, |sum, e| sum.saturating_add(e.size));
            reply.statfs(
                bytes.div_ceil(4096),
                0,
                0,
                self.table.len() as u64,
                0,
                4096,
                255,
                4096,
            );
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guard("getxattr", || {
            let _op = FuseOp::start("getxattr");
            let Some(node) = self.table.get(ino.0) else {
                reply.error(Errno::ENOENT);
                return;
            };
            // Never ENOSYS: the kernel would then stop asking for any xattr on this mount.
            match self
                .xattrs(node)
                .into_iter()
                .find(|(k, _)| OsStr::new(k) == name)
            {
                None => reply.error(Errno::ENODATA),
                Some((_, v)) if size == 0 => reply.size(v.len() as u32),
                Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Some((_, v)) => reply.data(&v),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guard("listxattr", || {
            let _op = FuseOp::start("listxattr");
            let Some(node) = self.table.get(ino.0) else {
                reply.error(Errno::ENOENT);
                return;
            };
            let mut names = Vec::new();
            for (k, _) in self.xattrs(node) {
                names.extend_from_slice(k.as_bytes());
                names.push(0);
            }
            if size == 0 {
                reply.size(names.len() as u32);
            } else if names.len() > size as usize {
                reply.error(Errno::ERANGE);
            } else {
                reply.data(&names);
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.guard("access", || {
            let _op = FuseOp::start("access");
            // `default_permissions` makes the kernel check modes itself.
            reply.ok();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makedev_matches_the_kernel_encoding() {
        assert_eq!(makedev(4, 0), 0x400);
        assert_eq!(makedev(7, 9), 0x709);
        assert_eq!(
            makedev(8, 300),
            (8 << 8) | (300 & 0xff) | ((300 & !0xff) << 12)
        );
    }

    #[test]
    fn covering_picks_the_overlapping_chunks() {
        let c = |off: u64, size: u64| Chunk {
            file_offset: off,
            size,
            compressed_start: 0,
            compressed_end: 0,
            inner_offset: 0,
            digest: crate::oci::Digest::of(&off.to_le_bytes()),
            zeros: false,
        };
        let chunks = [c(0, 10), c(10, 10), c(20, 10)];
        let starts = |s, e| {
            covering(&chunks, s, e)
                .iter()
                .map(|c| c.file_offset)
                .collect::<Vec<_>>()
        };
        assert_eq!(starts(0, 10), vec![0]);
        assert_eq!(starts(5, 15), vec![0, 10]);
        assert_eq!(starts(19, 30), vec![10, 20]);
        assert_eq!(starts(29, 30), vec![20]);
    }

    #[test]
    fn a_zero_run_of_a_terabyte_serves_only_the_bytes_asked_for() {
        let run = Chunk {
            file_offset: 0,
            size: 1 << 40,
            compressed_start: 0,
            compressed_end: 0,
            inner_offset: 0,
            digest: crate::oci::Digest::of(b""),
            zeros: true,
        };
        let mut out = Vec::new();
        assert!(copy_piece(&mut out, &run, None, (1 << 40) - 10, 1 << 40));
        assert_eq!(out, vec![0u8; 10]);
        assert!(out.capacity() < 1 << 20);
    }

    #[test]
    fn trusted_and_oversized_xattrs_are_never_served() {
        assert!(!servable_xattr("trusted.overlay.opaque", b"y"));
        assert!(!servable_xattr("trusted.overlay.redirect", b"/x"));
        assert!(!servable_xattr("trusted.anything", b""));
        assert!(servable_xattr("security.capability", &[1, 0, 0, 2]));
        assert!(servable_xattr("user.mime_type", b"text/plain"));
        assert!(!servable_xattr(&"u".repeat(256), b""));
        assert!(!servable_xattr("user.big", &vec![0; (64 << 10) + 1]));
    }

    #[test]
    fn times_the_clock_cannot_hold_are_clamped_not_a_panic() {
        for (s, n) in [
            (i64::MAX, 999_999_999),
            (i64::MIN, 5),
            (0, u32::MAX),
            (-1, 1),
        ] {
            let _ = system_time(s, n);
        }
        assert_eq!(system_time(-1, 0), UNIX_EPOCH - Duration::from_secs(1));
    }

    #[test]
    fn panic_messages_are_found_in_either_payload_type() {
        let a = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*a), "static");
        let b = std::panic::catch_unwind(|| panic!("{}", String::from("owned"))).unwrap_err();
        assert_eq!(panic_message(&*b), "owned");
    }
}

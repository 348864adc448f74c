//! The FUSE file system of one layer: attributes, names and links from the TOC's inode table,
//! file content from a [`ChunkSource`]. The layer is immutable, so the kernel may cache entries,
//! attributes and pages for as long as it likes.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::inode::{InodeTable, Node, NodeKind, ROOT};
use super::passthrough::{Passthrough, FH_FUSE};
use super::ChunkSource;
use crate::format::{Chunk, Toc, TocEntry};
use crate::metrics::FuseOp;

/// Entries and attributes never change while mounted.
const TTL: Duration = Duration::from_secs(24 * 3600);
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

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
        let mtime = entry.map_or(UNIX_EPOCH, |e| {
            if e.mtime >= 0 {
                UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec)
            } else {
                UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
            }
        });
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
        match self.table.get(ROOT) {
            Some(node) => reply.entry(&TTL, &self.attr(ROOT, node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn xattrs(&self, node: &Node) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .entry_of(node)
            .filter(|_| node.kind != NodeKind::Whiteout)
            .map(|e| {
                e.xattrs
                    .iter()
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

impl Filesystem for LayerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = FuseOp::start("lookup");
        let found = name.to_str().and_then(|n| self.table.lookup(parent.0, n));
        match found.and_then(|ino| Some((ino, self.table.get(ino)?))) {
            Some((ino, node)) => reply.entry(&TTL, &self.attr(ino, node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = FuseOp::start("getattr");
        match self.table.get(ino.0) {
            Some(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
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
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
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
        let _op = FuseOp::start("release");
        self.passthrough.release(ino.0, fh);
        reply.ok();
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
        let end = (offset + u64::from(size)).min(entry.size);
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let chunks: Vec<Chunk> = covering(&entry.chunks, offset, end).to_vec();
        let source = self.source.clone();
        let timeout = self.read_timeout;
        let name = entry.name.clone();
        let label = self.label.clone();
        // Answered from a task: the FUSE thread goes straight back to the next request.
        self.runtime.spawn(async move {
            let _op = op;
            let fetches = chunks.iter().map(|c| {
                let source = source.clone();
                let c = c.clone();
                async move {
                    if c.zeros {
                        Ok(Bytes::from(vec![0u8; c.size as usize]))
                    } else {
                        source.read_chunk(&c).await
                    }
                }
            });
            match tokio::time::timeout(timeout, futures_util::future::try_join_all(fetches)).await {
                Ok(Ok(parts)) => {
                    let mut out = Vec::with_capacity((end - offset) as usize);
                    for (c, data) in chunks.iter().zip(&parts) {
                        let from = offset.max(c.file_offset) - c.file_offset;
                        let to = end.min(c.file_offset + c.size) - c.file_offset;
                        match data.get(from as usize..to as usize) {
                            Some(piece) => out.extend_from_slice(piece),
                            None => {
                                tracing::warn!(layer = %label, file = %name, "chunk shorter than the TOC says");
                                reply.error(Errno::EIO);
                                return;
                            }
                        }
                    }
                    reply.data(&out);
                }
                Ok(Err(e)) => {
                    tracing::warn!(layer = %label, file = %name, offset, "read failed: {e}");
                    reply.error(Errno::EIO);
                }
                Err(_) => {
                    tracing::warn!(layer = %label, file = %name, offset, "read not served within {timeout:?}");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = FuseOp::start("opendir");
        match self.table.get(ino.0) {
            Some(n) if n.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = FuseOp::start("readdir");
        let Some(node) = self.table.get(ino.0).filter(|n| n.kind == NodeKind::Dir) else {
            reply.error(Errno::ENOTDIR);
            return;
        };
        let dots = [(".", ino.0), ("..", node.parent)];
        let listing = dots
            .iter()
            .map(|(n, i)| (*n, *i))
            .chain(node.children.iter().map(|(n, i)| (&**n, *i)));
        for (i, (name, child)) in listing.enumerate().skip(offset as usize) {
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
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = FuseOp::start("statfs");
        let bytes: u64 = self.toc.entries.iter().map(|e| e.size).sum();
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
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
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
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
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
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _op = FuseOp::start("access");
        // `default_permissions` makes the kernel check modes itself.
        reply.ok();
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
}

//! One FUSE session serving every layer of a process.
//!
//! A FUSE mount per layer costs its own event-loop threads, their stacks and a 16 MiB request
//! buffer each: measured, 3 threads and ~38 MiB of virtual memory per layer, so a node with 1000
//! lazy layers would run 3000 threads and reserve 38 GiB. Instead a process mounts one session
//! ([`LayerSession`]) at a root-only directory; each layer is a numbered directory at its top
//! (`SESSION/<id>`), bind-mounted wherever the caller wants the layer. Threads, buffers and file
//! descriptors stay fixed however many layers are mounted; a layer costs its inode table and a
//! bind mount.
//!
//! Inode numbers are `id << 32 | local`, where `local` is the layer's own inode number (its root
//! is 1): unique across the session, so overlayfs (`xino=on`) sees distinct inodes in distinct
//! layers, and below 2^62 as overlayfs wants. Ids are never reused within a session, so an inode
//! the kernel still remembers from a removed layer can only miss (ENOENT), never alias another
//! layer's file. The session's own root is inode 1 (`id` 0).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::layer::LayerFs;
use super::passthrough::SessionCaps;
use super::{FsError, MountOptions};

/// The session's root directory.
const ROOT: u64 = 1;
/// Local inode numbers of a layer fit below this bit.
const LOCAL_BITS: u32 = 32;
/// Layer ids stay below 2^(62 - 32): inode numbers then fit in the 62 bits overlayfs's `xino`
/// leaves to the lower file system.
const MAX_ID: u64 = (1 << (62 - LOCAL_BITS)) - 1;
/// The largest inode table a layer may have (local numbers are 32-bit).
pub(super) const MAX_LAYER_INODES: usize = (1 << LOCAL_BITS) - 2;
/// The root directory's listing changes as layers come and go: let the kernel cache it briefly.
const ROOT_TTL: Duration = Duration::from_secs(1);
/// How long dropping a session waits for its threads (see [`super::LayerMount`]).
const UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// The first inode number of layer `id`'s range.
pub(super) fn base_of(id: u64) -> u64 {
    id << LOCAL_BITS
}

/// The layers the session serves, by id.
#[derive(Default)]
struct Layers {
    by_id: RwLock<HashMap<u64, Arc<LayerFs>>>,
}

impl Layers {
    fn get(&self, id: u64) -> Option<Arc<LayerFs>> {
        read(&self.by_id).get(&id).cloned()
    }

    /// The layer and local inode number behind a session inode number.
    fn resolve(&self, ino: INodeNo) -> Option<(Arc<LayerFs>, INodeNo)> {
        let id = ino.0 >> LOCAL_BITS;
        let local = ino.0 & ((1 << LOCAL_BITS) - 1);
        (id != 0 && local != 0)
            .then(|| self.get(id))
            .flatten()
            .map(|fs| (fs, INodeNo(local)))
    }
}

/// A mounted FUSE session that layers can be added to; unmounted when the last
/// [`super::LayerMount`] and the owner's handle are dropped.
pub struct LayerSession {
    dir: PathBuf,
    layers: Arc<Layers>,
    caps: Arc<SessionCaps>,
    next_id: AtomicU64,
    options: MountOptions,
    background: Mutex<Option<fuser::BackgroundSession>>,
}

impl std::fmt::Debug for LayerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSession")
            .field("dir", &self.dir)
            .field("layers", &read(&self.layers.by_id).len())
            .finish()
    }
}

impl LayerSession {
    /// Mounts an empty session at `dir` (created if missing), which should be reachable by root
    /// only: every layer below it is mounted with `dev` and `suid`, as root file systems need.
    pub fn mount(dir: &Path, options: &MountOptions) -> Result<Arc<Self>, FsError> {
        super::limit_allocator_retention();
        let error = |message: String| FsError::Mount {
            path: dir.to_owned(),
            message,
        };
        // A session left by a process that died is a dead mount (ENOTCONN): detach it first.
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        std::fs::create_dir_all(dir).map_err(|e| error(format!("creating it: {e}")))?;
        let layers = Arc::new(Layers::default());
        let caps = Arc::new(SessionCaps::default());
        let filesystem = SessionFs {
            layers: layers.clone(),
            caps: caps.clone(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::RO,
            // A root file system needs device nodes and setuid binaries to work.
            fuser::MountOption::Dev,
            fuser::MountOption::Suid,
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::FSName("lazysnap".into()),
            fuser::MountOption::Subtype("lazysnap".into()),
        ];
        // Containers run as other users; overlayfs reads as the mounter.
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(options.threads.max(1));
        config.clone_fd = options.threads > 1;
        let background =
            fuser::spawn_mount(filesystem, dir, &config).map_err(|e| error(e.to_string()))?;
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            layers,
            caps,
            next_id: AtomicU64::new(1),
            options: options.clone(),
            background: Mutex::new(Some(background)),
        }))
    }

    /// Where the session is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many layers the session serves now.
    pub fn layer_count(&self) -> usize {
        read(&self.layers.by_id).len()
    }

    /// Adds a layer and returns its id; it appears as `DIR/<id>`.
    pub(super) fn add(
        &self,
        make: impl FnOnce(u64, Arc<SessionCaps>) -> LayerFs,
    ) -> Result<u64, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id > MAX_ID {
            return Err(format!(
                "this session has served {MAX_ID} layers; restart the process"
            ));
        }
        let fs = make(id, self.caps.clone());
        write(&self.layers.by_id).insert(id, Arc::new(fs));
        Ok(id)
    }

    /// Stops serving layer `id`: from now on its inodes miss.
    pub(super) fn remove(&self, id: u64) {
        write(&self.layers.by_id).remove(&id);
    }

    pub(super) fn options(&self) -> &MountOptions {
        &self.options
    }
}

impl Drop for LayerSession {
    fn drop(&mut self) {
        let Some(session) = lock(&self.background).take() else {
            return;
        };
        // The session threads end when the kernel drops the connection, which a process still
        // holding a file open (through a lazily detached overlay, say) can delay indefinitely:
        // wait a little, then leave them to end with the process rather than hang shutdown.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(session.umount_and_join());
        });
        match finished.recv_timeout(UNMOUNT_WAIT) {
            Ok(Ok(())) => {
                let _ = std::fs::remove_dir(&self.dir);
            }
            Ok(Err(e)) => {
                let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
                tracing::warn!(dir = %self.dir.display(), "unmounting the FUSE session: {e} (detached instead)");
            }
            Err(_) => {
                tracing::warn!(dir = %self.dir.display(), "FUSE session still in use after unmount; its users will see errors");
            }
        }
    }
}

/// Detaches and removes the sessions below `dir` (named `<pid>-<n>`) whose process is gone: a
/// process that died leaves its session as a dead mount (ENOTCONN).
pub fn remove_dead_sessions(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        match std::fs::remove_dir(&path) {
            Ok(()) => tracing::info!(dir = %path.display(), "removed a dead FUSE session"),
            Err(e) => {
                tracing::warn!(dir = %path.display(), "cannot remove a dead FUSE session: {e}")
            }
        }
    }
}

/// The session's file system: its root lists the layers, everything else goes to one layer.
struct SessionFs {
    layers: Arc<Layers>,
    caps: Arc<SessionCaps>,
}

impl SessionFs {
    fn root_attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o700,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// Sends a request for inode `$ino` to its layer (with the layer's own inode number), or
/// answers `$missing` when no layer has it.
macro_rules! to_layer {
    ($self:ident, $ino:expr, $reply:ident, $missing:expr, |$fs:ident, $local:ident| $call:expr) => {
        match $self.layers.resolve($ino) {
            Some(($fs, $local)) => $call,
            None => $reply.error($missing),
        }
    };
}

impl Filesystem for SessionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.caps.negotiate(config);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return to_layer!(self, parent, reply, Errno::ENOENT, |fs, local| fs
                .lookup(req, local, name, reply));
        }
        let id = name.to_str().and_then(|n| n.parse::<u64>().ok());
        match id.and_then(|id| self.layers.get(id)) {
            Some(fs) => fs.lookup_root(reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&ROOT_TTL, &Self::root_attr());
        }
        to_layer!(self, ino, reply, Errno::ENOENT, |fs, local| fs
            .getattr(req, local, fh, reply))
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        to_layer!(self, ino, reply, Errno::EINVAL, |fs, local| fs
            .readlink(req, local, reply))
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.error(Errno::EISDIR);
        }
        to_layer!(self, ino, reply, Errno::ENOENT, |fs, local| fs
            .open(req, local, flags, reply))
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.layers.resolve(ino) {
            Some((fs, local)) => fs.release(req, local, fh, flags, lock_owner, flush, reply),
            None => reply.ok(),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        to_layer!(self, ino, reply, Errno::EIO, |fs, local| fs
            .read(req, local, fh, offset, size, flags, lock_owner, reply))
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            // The listing changes as layers come and go: no FOPEN_CACHE_DIR here.
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        to_layer!(self, ino, reply, Errno::ENOENT, |fs, local| fs
            .opendir(req, local, flags, reply))
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return to_layer!(self, ino, reply, Errno::ENOTDIR, |fs, local| fs
                .readdir(req, local, fh, offset, reply));
        }
        let mut ids: Vec<u64> = read(&self.layers.by_id).keys().copied().collect();
        ids.sort_unstable();
        let listing = [(".".to_owned(), ROOT), ("..".to_owned(), ROOT)]
            .into_iter()
            .chain(ids.into_iter().map(|id| (id.to_string(), base_of(id) | 1)));
        for (i, (name, child)) in listing.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, FileType::Directory, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.layers.resolve(ino) {
            Some((fs, local)) => fs.statfs(req, local, reply),
            None => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Never ENOSYS: the kernel would then stop asking for any xattr on this mount.
        to_layer!(self, ino, reply, Errno::ENODATA, |fs, local| fs
            .getxattr(req, local, name, size, reply))
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if ino.0 == ROOT {
            return reply.size(0);
        }
        to_layer!(self, ino, reply, Errno::ENOENT, |fs, local| fs
            .listxattr(req, local, size, reply))
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions` makes the kernel check modes itself.
        reply.ok();
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_split_into_layer_and_local() {
        let layers = Layers::default();
        assert!(
            layers.resolve(INodeNo(ROOT)).is_none(),
            "the session root is no layer's"
        );
        assert!(
            layers.resolve(INodeNo(base_of(7) | 3)).is_none(),
            "no layer 7 yet"
        );
        assert_eq!(base_of(MAX_ID) | ((1 << LOCAL_BITS) - 1), (1 << 62) - 1);
    }
}

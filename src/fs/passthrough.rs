//! FUSE passthrough: a regular file whose content is local is opened with a backing file, and
//! the kernel then reads that file itself, at native speed, without a READ reaching us.
//!
//! The kernel does not allow one inode to be open with and without passthrough at once (the
//! second kind of open fails with EIO), and wants the same backing file for every passthrough
//! open of an inode. So each inode's open handles are counted by kind: while any handle is open,
//! new opens take the same kind; only an inode with no open handle may switch. Our counts can only
//! lag the kernel's (it forgets a handle before RELEASE reaches us), which errs towards a plain
//! open, never towards a refused one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, InitFlags, KernelConfig, ReplyOpen};

use super::ChunkSource;
use crate::format::TocEntry;
use crate::metrics::METRICS;

/// The file handle of a plain open (reads come to us).
pub(super) const FH_FUSE: FileHandle = FileHandle(0);
/// The file handle of a passthrough open.
pub(super) const FH_PASSTHROUGH: FileHandle = FileHandle(1);

/// Open handles of one inode.
#[derive(Debug, Default)]
struct Opens {
    fuse: u32,
    passthrough: u32,
    /// Registered with the kernel while `passthrough > 0`; closed when the last one is released.
    backing: Option<BackingId>,
}

/// What the kernel agreed to at the session's INIT, shared by every layer of the session.
#[derive(Debug, Default)]
pub(super) struct SessionCaps {
    passthrough: AtomicBool,
}

impl SessionCaps {
    /// Asks the kernel for passthrough at INIT (used whenever the kernel offers it).
    pub(super) fn negotiate(&self, config: &mut KernelConfig) {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            tracing::info!(
                ?missing,
                "the kernel offers no FUSE passthrough; all reads go through FUSE"
            );
            return;
        }
        // Depth 1: backing files live on a plain file system, and this mount can still be a
        // lower layer of overlayfs (one more level; the kernel allows two in all).
        if let Err(max) = config.set_max_stack_depth(1) {
            tracing::info!(max, "cannot set the FUSE stack depth; no passthrough");
            return;
        }
        self.passthrough.store(true, Ordering::Relaxed);
    }
}

/// Passthrough state of one layer.
#[derive(Debug)]
pub(super) struct Passthrough {
    /// What the session's kernel connection agreed to.
    caps: Arc<SessionCaps>,
    /// The kernel has not refused one of this layer's backing files.
    enabled: AtomicBool,
    opens: Mutex<HashMap<u64, Opens>>,
}

impl Passthrough {
    pub(super) fn new(caps: Arc<SessionCaps>) -> Self {
        Self {
            caps,
            enabled: AtomicBool::new(true),
            opens: Mutex::new(HashMap::new()),
        }
    }

    /// Answers the open of regular file `ino` (TOC entry `entry`): with passthrough when the
    /// inode already has passthrough handles, or has no handles and `source` has its content.
    pub(super) fn open(
        &self,
        ino: u64,
        entry: &TocEntry,
        source: &dyn ChunkSource,
        reply: ReplyOpen,
    ) {
        if !self.caps.passthrough.load(Ordering::Relaxed) {
            reply.opened(FH_FUSE, FopenFlags::FOPEN_KEEP_CACHE);
            return;
        }
        let mut opens = lock(&self.opens);
        let state = opens.entry(ino).or_default();
        if let Some(backing) = &state.backing {
            state.passthrough += 1;
            METRICS.passthrough_opens.inc();
            reply.opened_passthrough(FH_PASSTHROUGH, FopenFlags::empty(), backing);
            return;
        }
        if state.fuse == 0 && self.enabled.load(Ordering::Relaxed) {
            if let Some(file) = source.local_file(entry) {
                match reply.open_backing(&file) {
                    Ok(backing) => {
                        state.passthrough = 1;
                        METRICS.passthrough_opens.inc();
                        reply.opened_passthrough(FH_PASSTHROUGH, FopenFlags::empty(), &backing);
                        state.backing = Some(backing);
                        return;
                    }
                    Err(e) => {
                        // E.g. the cache lives on a stacked file system: depth 1 forbids that.
                        tracing::warn!(
                            file = %entry.name,
                            "the kernel refused a passthrough backing file ({e}); reads of this layer stay in FUSE"
                        );
                        self.enabled.store(false, Ordering::Relaxed);
                    }
                }
            }
        } else if state.fuse > 0 && self.enabled.load(Ordering::Relaxed) {
            // Not now, but let the file be prepared for when every handle is closed.
            drop(source.local_file(entry));
        }
        state.fuse += 1;
        reply.opened(FH_FUSE, FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// Forgets one handle of `ino`; the backing file is closed with the last passthrough handle.
    pub(super) fn release(&self, ino: u64, fh: FileHandle) {
        let mut opens = lock(&self.opens);
        let Some(state) = opens.get_mut(&ino) else {
            return;
        };
        if fh == FH_PASSTHROUGH {
            state.passthrough = state.passthrough.saturating_sub(1);
            if state.passthrough == 0 {
                state.backing = None;
            }
        } else {
            state.fuse = state.fuse.saturating_sub(1);
        }
        if state.passthrough == 0 && state.fuse == 0 {
            opens.remove(&ino);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

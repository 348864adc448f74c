//! Disk usage of a snapshot's own tree, counted like `du`: allocated blocks, hard links once,
//! without crossing into other file systems (a mounted lazy layer is not on this disk).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{SnapshotError, Usage};

/// Usage of the tree at `dir` (zero if it does not exist).
pub(super) fn of_dir(dir: &Path) -> Result<Usage, SnapshotError> {
    let root = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Usage::default()),
        Err(e) => return Err(SnapshotError::io(format!("measuring {}", dir.display()), e)),
    };
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![(dir.to_owned(), root)];
    while let Some((path, meta)) = stack.pop() {
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += (meta.blocks() * 512) as i64;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(|e| SnapshotError::io(format!("measuring {}", path.display()), e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| SnapshotError::io(format!("measuring {}", path.display()), e))?;
                let child = entry.path();
                let m = std::fs::symlink_metadata(&child)
                    .map_err(|e| SnapshotError::io(format!("measuring {}", child.display()), e))?;
                if m.dev() == meta.dev() {
                    stack.push((child, m));
                }
            }
        }
    }
    Ok(usage)
}

/// Whether something is mounted at `path` (its device differs from its parent's).
pub(super) fn is_mount_point(path: &Path) -> bool {
    let (Ok(m), Some(parent)) = (std::fs::symlink_metadata(path), path.parent()) else {
        // A dead FUSE mount fails stat with ENOTCONN: it is a mount point.
        return std::fs::symlink_metadata(path)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(nix::libc::ENOTCONN));
    };
    std::fs::symlink_metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

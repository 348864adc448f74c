//! The mount list containerd gets for a snapshot, as containerd's overlayfs snapshotter builds it:
//!
//! - active without parent: a read-write bind mount of its `fs`;
//! - active with parents: overlay, `upperdir` its `fs`, `workdir` its `work`, `lowerdir` the
//!   parents' `fs` dirs, nearest first;
//! - view of nothing: a read-only bind mount of its (empty) `fs`; view of one parent: a read-only
//!   bind mount of that parent's `fs` (overlayfs refuses a single lower without an upper);
//!   view of a chain: a read-only overlay of the parents.
//!
//! When a lower is a lazily mounted layer (FUSE) the overlay gets `xino=on`: with `auto`,
//! overlayfs turns inode-number translation off for FUSE lowers and `st_dev` then differs per
//! layer inside one container.

use std::collections::HashMap;

use super::{Kind, Mount, Record, SnapshotError, Store};

/// Mounts of the active snapshot or view `key` (present in `records`).
pub(super) fn for_snapshot(
    store: &Store,
    records: &HashMap<String, Record>,
    key: &str,
) -> Result<Vec<Mount>, SnapshotError> {
    let record = records
        .get(key)
        .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))?;
    let mut lowers = Vec::new();
    let mut lazy = false;
    let mut parent = record.parent.as_str();
    while !parent.is_empty() {
        let p = records.get(parent).ok_or_else(|| {
            SnapshotError::FailedPrecondition(format!(
                "snapshot {key}: parent {parent} is missing from the chain"
            ))
        })?;
        lazy |= p.remote.is_some();
        lowers.push(path_option(&store.fs_dir(p.id))?);
        parent = &p.parent;
        if lowers.len() > records.len() {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key}: its parent chain loops"
            )));
        }
    }
    let own = path_option(&store.fs_dir(record.id))?;
    let bind = |source: String, mode: &str| Mount {
        kind: "bind".into(),
        source,
        options: vec![mode.into(), "rbind".into()],
    };
    let mut options = Vec::new();
    let mount = match (record.kind, lowers.len()) {
        (Kind::Active, 0) => bind(own, "rw"),
        (Kind::View, 0) => bind(own, "ro"),
        (Kind::View, 1) => bind(lowers.remove(0), "ro"),
        (kind, _) => {
            options.push("index=off".to_owned());
            if lazy {
                options.push("xino=on".to_owned());
            }
            if kind == Kind::Active {
                let work = path_option(&store.snapshot_dir(record.id).join("work"))?;
                options.push(format!("workdir={work}"));
                options.push(format!("upperdir={own}"));
            }
            options.push(format!("lowerdir={}", lowers.join(":")));
            Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options,
            }
        }
    };
    Ok(vec![mount])
}

/// A path as overlayfs options can carry it (no `,` or `:`).
fn path_option(path: &std::path::Path) -> Result<String, SnapshotError> {
    let text = path.to_string_lossy().into_owned();
    if text.contains([',', ':']) {
        return Err(SnapshotError::InvalidArgument(format!(
            "{text} contains ',' or ':', which overlayfs options cannot carry: choose another --root"
        )));
    }
    Ok(text)
}

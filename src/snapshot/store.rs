//! The snapshot store: containerd's snapshot semantics over records in RocksDB and directories
//! under `ROOT/snapshots/`. Synchronous and free of gRPC, so every rule is unit-tested.
//!
//! Rules, as containerd's overlayfs snapshotter (1.6) has them: keys are unique across kinds;
//! a parent must be committed; only an active snapshot can be committed, and commit replaces it
//! with a committed one of the same id (its directory stays); a snapshot with children cannot be
//! removed; only labels can be updated.
//!
//! One mutex guards the records; the database write of a change happens under it, so memory and
//! disk never disagree. Directory creation and removal happen outside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::db::{Change, Db};
use super::filter::{self, Filter};
use super::verify::Verification;
use super::{mounts, usage, Info, Kind, Mount, Record, RemoteLayer, SnapshotError, Usage};

/// The snapshot store (see the module docs).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    db: Db,
    records: HashMap<String, Record>,
    next_id: u64,
}

impl State {
    fn get(&self, key: &str) -> Result<&Record, SnapshotError> {
        self.records
            .get(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    /// Takes the next id and persists the counter with `changes`.
    fn apply(&mut self, changes: &[Change<'_>]) -> Result<(), SnapshotError> {
        self.db.apply(changes, self.next_id)
    }
}

impl Store {
    /// Opens (or creates) the store under `root/snapshots`.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let dir = root.join("snapshots");
        // Root-only, as containerd's snapshot roots: snapshots hold image content (setuid files,
        // device nodes) and mount lazy layers with suid and dev.
        private_dir(&dir)
            .map_err(|e| SnapshotError::io(format!("creating {} (mode 0700)", dir.display()), e))?;
        let db = Db::open(&dir.join("meta"))?;
        let records: HashMap<String, Record> = db.load()?.into_iter().collect();
        let next_id = db
            .next_id()?
            .max(records.values().map(|r| r.id + 1).max().unwrap_or(1));
        tracing::info!(snapshots = records.len(), dir = %dir.display(), "snapshot store open");
        Ok(Self {
            dir,
            state: Mutex::new(State {
                db,
                records,
                next_id,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `ROOT/snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The directory holding (or mounting) a snapshot's tree.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Creates an active snapshot (`kind` Active) or a view (`kind` View) of `parent` (empty
    /// for none) and returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if kind == Kind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "snapshot {key}: prepare creates active snapshots or views"
            )));
        }
        let id = self.reserve(kind == Kind::Active)?;
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
            verification: Verification::Pending,
        };
        let mut state = self.lock();
        let result = check_new(&state, key, parent).and_then(|()| {
            state.apply(&[Change::Put(key, &record)])?;
            state.records.insert(key.to_owned(), record);
            mounts::for_snapshot(self, &state.records, key)
        });
        drop(state);
        if result.is_err() {
            self.remove_dir(id);
        }
        result
    }

    /// Takes a new id and creates its directories (`fs`, and `work` for a writable snapshot).
    pub(super) fn reserve(&self, writable: bool) -> Result<u64, SnapshotError> {
        let id = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.apply(&[])?;
            id
        };
        // `snapshots/<id>` is 0700; `fs` keeps the umask's mode, as containerd's overlayfs
        // snapshotter makes it 0755: as an upper directory it is the container's `/`.
        let mut dirs = vec![self.fs_dir(id)];
        if writable {
            dirs.push(self.work_dir(id));
        }
        if let Err(e) = private_dir(&self.snapshot_dir(id)) {
            self.remove_dir(id);
            let dir = self.snapshot_dir(id);
            return Err(SnapshotError::io(format!("creating {}", dir.display()), e));
        }
        for dir in dirs {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                self.remove_dir(id);
                return Err(SnapshotError::io(format!("creating {}", dir.display()), e));
            }
        }
        Ok(id)
    }

    /// Records a committed snapshot whose tree is already in place at `fs_dir(id)` (a reserved
    /// id): a lazily mounted layer. Fails like `commit` if `name` exists.
    pub(super) fn insert_committed(
        &self,
        name: &str,
        parent: &str,
        labels: HashMap<String, String>,
        id: u64,
        usage: Usage,
        remote: Option<RemoteLayer>,
    ) -> Result<(), SnapshotError> {
        let now = SystemTime::now();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            remote,
            verification: Verification::Pending,
        };
        let mut state = self.lock();
        check_new(&state, name, parent)?;
        state.apply(&[Change::Put(name, &record)])?;
        state.records.insert(name.to_owned(), record);
        Ok(())
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let state = self.lock();
        let record = state.get(key)?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: only active snapshots and views have mounts"
            )));
        }
        mounts::for_snapshot(self, &state.records, key)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` with `labels`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let (id, parent) = {
            let state = self.lock();
            let record = state.get(key)?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is {}: only an active snapshot can be committed",
                    record.kind.as_str()
                )));
            }
            if state.records.contains_key(name) {
                return Err(SnapshotError::AlreadyExists(name.to_owned()));
            }
            (record.id, record.parent.clone())
        };
        // Measured outside the lock: a large tree takes a while.
        let usage = usage::of_dir(&self.fs_dir(id))?;
        let mut state = self.lock();
        let record = state.get(key)?;
        if record.id != id || state.records.contains_key(name) {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} changed while being committed as {name}"
            )));
        }
        let now = SystemTime::now();
        let committed = Record {
            id,
            kind: Kind::Committed,
            parent,
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            remote: None,
            verification: Verification::Pending,
        };
        state.apply(&[Change::Delete(key), Change::Put(name, &committed)])?;
        state.records.remove(key);
        state.records.insert(name.to_owned(), committed);
        Ok(())
    }

    /// Forgets the snapshot `key` and returns its record; the caller unmounts a lazy layer and
    /// then calls [`Self::remove_dir`]. Fails if another snapshot has it as parent.
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let mut state = self.lock();
        state.get(key)?;
        if let Some(child) = state.records.iter().find(|(_, r)| r.parent == key) {
            return Err(SnapshotError::FailedPrecondition(format!(
                "cannot remove snapshot {key}: snapshot {} depends on it",
                child.0
            )));
        }
        state.apply(&[Change::Delete(key)])?;
        state
            .records
            .remove(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    /// Removes `ROOT/snapshots/<id>`, detaching anything still mounted inside it first so the
    /// removal can never descend into a mounted layer.
    pub fn remove_dir(&self, id: u64) {
        let dir = self.snapshot_dir(id);
        let fs = self.fs_dir(id);
        if usage::is_mount_point(&fs) {
            let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), "cannot remove snapshot directory: {e}");
            }
        }
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(self.lock().get(key)?.info(key))
    }

    /// The record of `key` (for the snapshotter's own bookkeeping).
    pub fn record(&self, key: &str) -> Result<Record, SnapshotError> {
        self.lock().get(key).cloned()
    }

    /// Records the verdict on the lazy layer of `name` (which must still be snapshot `id`).
    /// Returns the record and whether this call changed it from pending (so a verdict is logged
    /// and counted once).
    pub(super) fn set_verification(
        &self,
        name: &str,
        id: u64,
        verification: Verification,
    ) -> Result<(Record, bool), SnapshotError> {
        let mut state = self.lock();
        let mut record = state.get(name)?.clone();
        if record.id != id || !record.verification.is_pending() {
            return Ok((record, false));
        }
        record.verification = verification;
        state.apply(&[Change::Put(name, &record)])?;
        state.records.insert(name.to_owned(), record.clone());
        Ok((record, true))
    }

    /// The names of lazy snapshots whose verdict is still pending.
    pub(super) fn pending_lazy(&self) -> Vec<String> {
        let state = self.lock();
        state
            .records
            .iter()
            .filter(|(_, r)| r.remote.is_some() && r.verification.is_pending())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Updates the labels of `info.name`: all of them without `fieldpaths` or with `labels`,
    /// single ones with `labels.KEY` (an absent or empty value removes the label).
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info, SnapshotError> {
        let mut state = self.lock();
        let mut record = state.get(&info.name)?.clone();
        if fieldpaths.is_empty() {
            record.labels = info.labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = info.labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label).filter(|v| !v.is_empty()) {
                        Some(v) => record.labels.insert(label.to_owned(), v.clone()),
                        None => record.labels.remove(label),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {}: only labels are mutable",
                        info.name
                    )));
                }
            }
        }
        record.updated = SystemTime::now();
        state.apply(&[Change::Put(&info.name, &record)])?;
        let updated = record.info(&info.name);
        state.records.insert(info.name, record);
        Ok(updated)
    }

    /// Disk used by the snapshot itself: measured now for an active snapshot or view, as
    /// recorded at commit for a committed one.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.record(key)?;
        match record.usage {
            Some(u) if record.kind == Kind::Committed => Ok(u),
            _ => usage::of_dir(&self.fs_dir(record.id)),
        }
    }

    /// Every snapshot passing any of `filters` (all of them for none).
    pub fn walk(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filters = filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()?;
        let state = self.lock();
        let mut out: Vec<Info> = state
            .records
            .iter()
            .map(|(k, r)| r.info(k))
            .filter(|i| filter::matches_any(&filters, i))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every record (for restoring lazy layers on start).
    pub fn records(&self) -> Vec<(String, Record)> {
        let state = self.lock();
        state
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    /// Removes snapshot directories no record refers to (left by a crash between creating a
    /// directory and recording it, or by a removal that failed). Returns how many.
    pub fn cleanup(&self) -> Result<usize, SnapshotError> {
        let (known, next_id): (std::collections::HashSet<u64>, u64) = {
            let state = self.lock();
            (
                state.records.values().map(|r| r.id).collect(),
                state.next_id,
            )
        };
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| SnapshotError::io(format!("listing {}", self.dir.display()), e))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            // Ids at or past the counter may be reserved by a prepare in progress.
            if !known.contains(&id) && id < next_id && !self.in_flight(id) {
                tracing::info!(id, "removing orphaned snapshot directory");
                self.remove_dir(id);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether `id` was reserved but is not recorded yet: a lazy mount in progress holds its
    /// `fs` dir mounted, which an orphan left by a crash does not (its mount died with it).
    fn in_flight(&self, id: u64) -> bool {
        let fs = self.fs_dir(id);
        usage::is_mount_point(&fs) && std::fs::metadata(&fs).is_ok()
    }
}

/// `key` must be new and `parent` empty or committed.
fn check_new(state: &State, key: &str, parent: &str) -> Result<(), SnapshotError> {
    if state.records.contains_key(key) {
        return Err(SnapshotError::AlreadyExists(key.to_owned()));
    }
    if !parent.is_empty() {
        let p = state
            .records
            .get(parent)
            .ok_or_else(|| SnapshotError::NotFound(format!("{parent} (parent of {key})")))?;
        if p.kind != Kind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "parent {parent} of {key} is {}, not committed",
                p.kind.as_str()
            )));
        }
    }
    Ok(())
}

/// Creates `path` (and missing parents) mode 0700, and sets `path` to 0700 if it existed.
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

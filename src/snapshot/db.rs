//! Snapshot records in RocksDB: `s/<key>` → JSON [`Record`], and `n/next-id` → the next
//! snapshot id (u64, little-endian).
//!
//! The snapshotter's own database (`ROOT/snapshots/meta`), not the chunk cache's: a commit
//! replaces one record with another, and that must be one atomic write batch.

use std::path::{Path, PathBuf};

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, DB};

use super::{Record, SnapshotError};

const RECORD_PREFIX: &[u8] = b"s/";
const NEXT_ID: &[u8] = b"n/next-id";

/// One change to the records, applied with others in one batch.
#[derive(Debug)]
pub(super) enum Change<'a> {
    Put(&'a str, &'a Record),
    Delete(&'a str),
}

pub(super) struct Db {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

fn record_key(key: &str) -> Vec<u8> {
    [RECORD_PREFIX, key.as_bytes()].concat()
}

impl Db {
    pub(super) fn open(path: &Path) -> Result<Self, SnapshotError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_max_background_jobs(1);
        options.set_write_buffer_size(1 << 20);
        options.set_keep_log_file_num(2);
        let db = DB::open(&options, path).map_err(|e| SnapshotError::Db {
            path: path.to_owned(),
            message: format!("{e} (is another lazysnapd using this --root?)"),
        })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn err(&self, message: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Db {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Every record, by key. A record that does not parse is reported, not skipped: losing a
    /// snapshot silently would break containers that depend on it.
    pub(super) fn load(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(RECORD_PREFIX, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let Some(key) = k.strip_prefix(RECORD_PREFIX) else {
                break;
            };
            let key = String::from_utf8_lossy(key).into_owned();
            let record: Record =
                serde_json::from_slice(&v).map_err(|e| self.err(format!("record {key:?}: {e}")))?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// The next id to hand out (ids are never reused, so a directory name never means two
    /// snapshots).
    pub(super) fn next_id(&self) -> Result<u64, SnapshotError> {
        let value = self.db.get(NEXT_ID).map_err(|e| self.err(e))?;
        Ok(value
            .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map_or(1, u64::from_le_bytes))
    }

    /// Applies `changes` and stores `next_id`, atomically.
    pub(super) fn apply(&self, changes: &[Change<'_>], next_id: u64) -> Result<(), SnapshotError> {
        let mut batch = WriteBatch::default();
        for change in changes {
            match change {
                Change::Put(key, record) => {
                    let value = serde_json::to_vec(record)
                        .map_err(|e| self.err(format!("encoding {key:?}: {e}")))?;
                    batch.put(record_key(key), value);
                }
                Change::Delete(key) => batch.delete(record_key(key)),
            }
        }
        batch.put(NEXT_ID, next_id.to_le_bytes());
        self.db.write(batch).map_err(|e| self.err(e))
    }
}

//! The cache's metadata in RocksDB: chunk sizes and last use (`c/<hex>`), pins
//! (`p/<owner>\0<hex>`), and other modules' records (`r/<namespace>\0<key>`).
//!
//! RocksDB is configured lean (one background job, small write buffers, no block cache): the
//! metadata is small, and the mount process has a memory target.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rocksdb::{BlockBasedOptions, Direction, IteratorMode, Options, WriteBatch, DB};

use super::CacheError;
use crate::oci::Digest;

/// Key and value of one metadata row.
type Row = (Vec<u8>, Vec<u8>);

pub(super) struct Meta {
    db: DB,
    path: PathBuf,
}

impl Meta {
    pub(super) fn open(path: &Path) -> Result<Self, CacheError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_max_background_jobs(1);
        options.set_write_buffer_size(1 << 20);
        options.set_max_write_buffer_number(2);
        options.set_keep_log_file_num(2);
        let mut table = BlockBasedOptions::default();
        table.disable_cache();
        options.set_block_based_table_factory(&table);
        let db = DB::open(&options, path).map_err(|e| CacheError::Meta {
            path: path.to_owned(),
            message: format!("{e} (is another lazysnap process using this --root?)"),
        })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn err(&self, e: rocksdb::Error) -> CacheError {
        CacheError::Meta {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<Row>, CacheError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Every chunk: digest, size, last use.
    pub(super) fn chunks(&self) -> Result<Vec<(Digest, u64, u64)>, CacheError> {
        Ok(self
            .scan(b"c/")?
            .into_iter()
            .filter_map(|(k, v)| {
                let digest = format!("sha256:{}", std::str::from_utf8(&k[2..]).ok()?)
                    .parse()
                    .ok()?;
                let size = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
                let last_use = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
                Some((digest, size, last_use))
            })
            .collect())
    }

    pub(super) fn put_chunk(
        &self,
        digest: &Digest,
        size: u64,
        last_use: u64,
    ) -> Result<(), CacheError> {
        let mut value = size.to_le_bytes().to_vec();
        value.extend_from_slice(&last_use.to_le_bytes());
        self.db
            .put(format!("c/{}", digest.hex()), value)
            .map_err(|e| self.err(e))
    }

    pub(super) fn delete_chunk(&self, digest: &Digest) -> Result<(), CacheError> {
        self.db
            .delete(format!("c/{}", digest.hex()))
            .map_err(|e| self.err(e))
    }

    /// Every pinned digest, once per owner that pins it.
    pub(super) fn pinned(&self) -> Result<Vec<Digest>, CacheError> {
        Ok(self
            .scan(b"p/")?
            .into_iter()
            .filter_map(|(k, _)| {
                let at = k.iter().position(|b| *b == 0)?;
                format!("sha256:{}", std::str::from_utf8(&k[at + 1..]).ok()?)
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Pins `chunks` for `owner`; returns the ones `owner` did not pin already.
    pub(super) fn pin(&self, owner: &str, chunks: &[Digest]) -> Result<Vec<Digest>, CacheError> {
        let mut batch = WriteBatch::default();
        let mut fresh = Vec::new();
        let mut seen = HashSet::new();
        for d in chunks {
            if !seen.insert(*d) {
                continue;
            }
            let key = pin_key(owner, d);
            if self.db.get(&key).map_err(|e| self.err(e))?.is_none() {
                batch.put(&key, b"");
                fresh.push(*d);
            }
        }
        self.db.write(batch).map_err(|e| self.err(e))?;
        Ok(fresh)
    }

    /// Removes `owner`'s pins; returns the digests released.
    pub(super) fn unpin(&self, owner: &str) -> Result<Vec<Digest>, CacheError> {
        let prefix = format!("p/{owner}\0").into_bytes();
        let mut batch = WriteBatch::default();
        let mut released = Vec::new();
        for (k, _) in self.scan(&prefix)? {
            if let Ok(d) = format!("sha256:{}", String::from_utf8_lossy(&k[prefix.len()..])).parse()
            {
                released.push(d);
            }
            batch.delete(&k);
        }
        self.db.write(batch).map_err(|e| self.err(e))?;
        Ok(released)
    }

    pub(super) fn pin_owners(&self) -> Result<Vec<String>, CacheError> {
        let mut owners: Vec<String> = self
            .scan(b"p/")?
            .into_iter()
            .filter_map(|(k, _)| {
                let at = k.iter().position(|b| *b == 0)?;
                Some(String::from_utf8_lossy(&k[2..at]).into_owned())
            })
            .collect();
        owners.dedup();
        Ok(owners)
    }

    pub(super) fn put_record(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(), CacheError> {
        self.db
            .put(record_key(namespace, key), value)
            .map_err(|e| self.err(e))
    }

    pub(super) fn get_record(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        self.db
            .get(record_key(namespace, key))
            .map_err(|e| self.err(e))
    }

    pub(super) fn delete_record(&self, namespace: &str, key: &str) -> Result<(), CacheError> {
        self.db
            .delete(record_key(namespace, key))
            .map_err(|e| self.err(e))
    }

    pub(super) fn records(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, CacheError> {
        let prefix = format!("r/{namespace}\0").into_bytes();
        Ok(self
            .scan(&prefix)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), v))
            .collect())
    }
}

fn pin_key(owner: &str, digest: &Digest) -> Vec<u8> {
    format!("p/{owner}\0{}", digest.hex()).into_bytes()
}

fn record_key(namespace: &str, key: &str) -> Vec<u8> {
    format!("r/{namespace}\0{key}").into_bytes()
}

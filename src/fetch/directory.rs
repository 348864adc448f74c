//! Directory read-ahead: a second miss among a directory's small files fetches the rest of them.
//!
//! Interpreters load modules one file at a time, and each file a start-up needs is a miss of its
//! own, a round trip each (python-import: dozens of `.pyc` files in `__pycache__` directories,
//! read in an order that depends on the program, not on the directory's). Neighbours in the blob
//! ride along with a miss only up to the read-ahead's budget, so most of those files wait their
//! own turn. When reads have missed two different files of one directory, the rest of its small
//! files are fetched at once, in blob order, as a few large requests: the directory's files then
//! arrive together, not one round trip apart.
//!
//! Bounded: only files of at most [`MAX_FILE`] bytes, at most [`MAX_DIRECTORY`] compressed bytes
//! per directory (the first ones in blob order beyond that are left to their reads), each
//! directory once. Two misses, not one: a directory read from once (a program's one
//! configuration file) costs nothing more. Programs and shared objects neither count nor ride
//! along: the loader prefetch fetches what links them, and a directory of libraries (a JVM's
//! `lib/`, where java-hello `dlopen`s two of dozens) is not read whole; reading it whole made
//! java-hello 2 % slower.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::format::{Chunk, EntryKind, Toc};
use crate::oci::Digest;

use super::lock;

/// The largest file (uncompressed) a directory's read-ahead takes.
pub const MAX_FILE: u64 = 256 << 10;
/// The most compressed bytes one directory's read-ahead fetches.
pub const MAX_DIRECTORY: u64 = 4 << 20;
/// Misses of different files in one directory that start its read-ahead.
const MISSES: u8 = 2;

/// One layer's directories, as the read-ahead needs them.
pub(super) struct Directories {
    /// The first chunk of each small file, to its directory.
    heads: HashMap<Digest, u32>,
    /// Each directory's small files' chunks (indices into the fetcher's chunk list), in blob order.
    files: Vec<Vec<u32>>,
    /// Misses so far per directory; [`MISSES`] and beyond: read ahead already.
    misses: Mutex<HashMap<u32, u8>>,
}

impl Directories {
    /// From the layer's TOC; `chunks` is the fetcher's list of distinct chunks in blob order.
    pub(super) fn new(toc: &Toc, chunks: &[Chunk]) -> Self {
        let mut ids: HashMap<&str, u32> = HashMap::new();
        let mut heads = HashMap::new();
        let mut files: Vec<Vec<u32>> = Vec::new();
        for e in &toc.entries {
            if !matches!(e.kind, EntryKind::Reg | EntryKind::Hardlink)
                || e.size > MAX_FILE
                || super::loader::may_be_elf(e)
            {
                continue;
            }
            let Some(first) = e.chunks.first().filter(|c| !c.zeros) else {
                continue;
            };
            let dir = e.name.rsplit_once('/').map_or("", |(d, _)| d);
            let next = ids.len() as u32;
            let id = *ids.entry(dir).or_insert(next);
            if id == next {
                files.push(Vec::new());
            }
            heads.entry(first.digest).or_insert(id);
            for c in e.chunks.iter().filter(|c| !c.zeros) {
                let at = chunks.partition_point(|k| {
                    (k.compressed_start, k.inner_offset) < (c.compressed_start, c.inner_offset)
                });
                if chunks.get(at).is_some_and(|k| k.digest == c.digest) {
                    files[id as usize].push(at as u32);
                }
            }
        }
        for f in &mut files {
            f.sort_unstable();
            f.dedup();
        }
        Self {
            heads,
            files,
            misses: Mutex::new(HashMap::new()),
        }
    }

    /// A read missed `chunk`: when that makes [`MISSES`] files of its directory, the directory's
    /// small files' chunks (indices into the chunk list) to fetch, within [`MAX_DIRECTORY`].
    pub(super) fn missed(&self, chunk: &Chunk, chunks: &[Chunk]) -> Vec<u32> {
        if chunk.file_offset != 0 {
            return Vec::new();
        }
        let Some(&dir) = self.heads.get(&chunk.digest) else {
            return Vec::new();
        };
        {
            let mut misses = lock(&self.misses);
            let n = misses.entry(dir).or_insert(0);
            *n = n.saturating_add(1);
            if *n != MISSES {
                return Vec::new();
            }
        }
        let mut budget = MAX_DIRECTORY;
        self.files[dir as usize]
            .iter()
            .copied()
            .take_while(|&i| {
                let c = &chunks[i as usize];
                let len = c.compressed_end.saturating_sub(c.compressed_start);
                budget = budget.saturating_sub(len);
                budget > 0
            })
            .collect()
    }
}

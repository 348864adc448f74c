//! How far an on-demand miss reads ahead into other files, per layer, from what the last read-
//! ahead was worth.
//!
//! A miss brings along the small files that follow it in the blob (they are often read next: a
//! directory's files, a package's modules). Each neighbour that is read saves a round trip; each
//! one that is not costs its bytes on the link, which the next miss's answer queues behind. Which
//! wins depends on the workload: at 100 Mbit/s and 20 ms RTT, a fixed 512 KiB made python-import
//! (dense reads of the standard library) 5 % faster than 256 KiB and python-hello (a few scattered
//! files) 3 % slower, and 1 MiB was slower for both. So, as the kernel does for a file's
//! read-ahead, the window follows its own use: it doubles after a read-ahead of which at least one
//! chunk per [`BASE`] was read before the next miss, and halves after one of which none was,
//! between [`MIN`] and [`MAX`].

use std::collections::HashSet;
use std::sync::Mutex;

use crate::format::Chunk;
use crate::oci::Digest;

/// One read neighbour per this many bytes of read-ahead is what makes the window grow.
pub const BASE: u64 = 256 << 10;
/// The smallest window: one neighbour or two is nearly free.
pub const MIN: u64 = 128 << 10;
/// The largest window.
pub const MAX: u64 = 1 << 20;
/// The most read-ahead chunks remembered (a window of tiny files).
const MAX_TRACKED: usize = 4096;

/// One layer's read-ahead window.
#[derive(Debug)]
pub struct ReadAhead {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window: u64,
    /// The chunks the last miss brought along, and how many of them were read since.
    ahead: HashSet<Digest>,
    window_used: u64,
    read: u64,
}

impl ReadAhead {
    /// Starts at `window` (the configured read-ahead), kept within [`MIN`, `MAX`] once adapting.
    pub fn new(window: u64) -> Self {
        Self {
            state: Mutex::new(State {
                window,
                ahead: HashSet::new(),
                window_used: 0,
                read: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a read of `digest` (cached, in flight or missing): a hit if the last miss brought it.
    pub fn note_read(&self, digest: &Digest) {
        let mut s = self.lock();
        if s.ahead.remove(digest) {
            s.read += 1;
        }
    }

    /// The window for a new miss, adapted to how much of the last read-ahead was read.
    pub fn window(&self) -> u64 {
        let mut s = self.lock();
        if s.window_used > 0 {
            let wanted = s.window_used.div_ceil(BASE);
            if s.read >= wanted {
                s.window = (s.window * 2).clamp(MIN, MAX);
            } else if s.read == 0 {
                s.window = (s.window / 2).clamp(MIN, MAX);
            }
        }
        s.window
    }

    /// Remembers what a miss of `wanted` brought along in `chunks` (its request's chunks): the
    /// other files' chunks, `used` bytes of them.
    pub fn note_miss(&self, wanted: &Chunk, chunks: &[Chunk]) {
        let mut s = self.lock();
        s.ahead.clear();
        s.read = 0;
        let mut used = 0;
        for c in chunks
            .iter()
            .filter(|c| c.file_offset == 0 && c.digest != wanted.digest)
        {
            if s.ahead.len() >= MAX_TRACKED {
                break;
            }
            used += c.compressed_end - c.compressed_start;
            s.ahead.insert(c.digest);
        }
        s.window_used = used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(i: u64, len: u64) -> Chunk {
        Chunk {
            file_offset: 0,
            size: len,
            compressed_start: i * len,
            compressed_end: (i + 1) * len,
            inner_offset: 0,
            digest: Digest::of(&i.to_le_bytes()),
            zeros: false,
        }
    }

    #[test]
    fn the_window_grows_when_read_ahead_is_read_and_shrinks_when_it_is_not() {
        let r = ReadAhead::new(256 << 10);
        assert_eq!(r.window(), 256 << 10, "nothing to judge yet");
        // A miss brings 8 files of 64 KiB (512 KiB): two are read, one per 256 KiB: grow.
        let files: Vec<Chunk> = (0..9).map(|i| file(i, 64 << 10)).collect();
        r.note_miss(&files[0], &files);
        r.note_read(&files[0].digest); // the missed chunk itself is no hit
        r.note_read(&files[3].digest);
        r.note_read(&files[5].digest);
        r.note_read(&files[5].digest); // read twice, counted once
        assert_eq!(r.window(), 512 << 10);
        // One read of 512 KiB brought along: kept.
        r.note_miss(&files[0], &files);
        r.note_read(&files[2].digest);
        assert_eq!(r.window(), 512 << 10);
        // None read: halved, down to the floor.
        for want in [256 << 10, 128 << 10, 128 << 10] {
            r.note_miss(&files[0], &files);
            assert_eq!(r.window(), want);
        }
        // Up to the ceiling.
        for want in [256 << 10, 512 << 10, 1 << 20, 1 << 20] {
            r.note_miss(&files[0], &files);
            for f in &files[1..] {
                r.note_read(&f.digest);
            }
            assert_eq!(r.window(), want);
        }
        // A miss that brought nothing along says nothing.
        r.note_miss(&files[0], &files[..1]);
        assert_eq!(r.window(), 1 << 20);
    }
}

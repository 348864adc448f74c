//! The layer writer: tar stream in, lazy layer blob out, in one pass with bounded memory.
//!
//! The calling thread parses the tar, cuts it into work items (header runs, and file payload
//! chunks of at most `chunk_size`), hashes the uncompressed stream (diff_id) and whole files, and
//! writes finished frames in order. `threads` scoped workers compress items (one zstd frame or one
//! gzip member each) and hash chunks. At most `2 × threads + 2` items are in flight, so memory is
//! about that many chunks. Each item is compressed on its own, so the output does not depend on
//! which worker compressed what: it is byte-identical whatever `threads` is.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Mutex;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::error::FormatError;
use super::tar::{padding, ustar_file_header, TarItem, TarParser};
use super::{
    footer, Chunk, EntryKind, LayerFormat, TocEntry, WriteOptions, WrittenLayer,
    ANNOTATION_ESTARGZ_TOC_DIGEST, ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE,
    ANNOTATION_LABEL_ZSTD_CHECKSUM, ANNOTATION_LABEL_ZSTD_POSITION, ANNOTATION_ZSTD_CHECKSUM,
    ANNOTATION_ZSTD_POSITION, ESTARGZ_TOC_NAME, MEDIA_TYPE_GZIP, MEDIA_TYPE_ZSTD,
};
use crate::oci::{Digest, Hasher, HashingWriter};

/// How often `progress` is called, in input bytes.
const PROGRESS_STEP: u64 = 1 << 20;

struct Job {
    seq: u64,
    data: Vec<u8>,
    /// A file chunk: hash it and look for zeros.
    chunk: bool,
}

struct Done {
    seq: u64,
    compressed: Vec<u8>,
    digest: Option<Digest>,
    zeros: bool,
}

enum Item {
    Header,
    Chunk {
        entry: usize,
        file_offset: u64,
        size: u64,
        whole_file: bool,
    },
}

/// Compresses one item into one self-contained zstd frame or gzip member.
fn compress(
    format: LayerFormat,
    level: i32,
    zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    match format {
        LayerFormat::ZstdChunked => {
            if zstd.is_none() {
                *zstd = Some(zstd::bulk::Compressor::new(level)?);
            }
            match zstd {
                Some(c) => c.compress(data),
                None => Err(std::io::Error::other("no zstd context")),
            }
        }
        LayerFormat::Estargz => gzip_member(level, data),
    }
}

pub(crate) fn gzip_member(level: i32, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::new(level.clamp(0, 9) as u32),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// True if `data` is all zero bytes (memcmp against a zero block: fast in any build).
fn is_zeros(data: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

fn worker(
    format: LayerFormat,
    level: i32,
    jobs: &Mutex<Receiver<Job>>,
    done: Sender<Result<Done, FormatError>>,
) {
    let mut zstd = None;
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let seq = job.seq;
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Done, FormatError> {
            let compressed = compress(format, level, &mut zstd, &job.data)
                .map_err(|e| FormatError::Compress(e.to_string()))?;
            let (digest, zeros) = if job.chunk {
                let zeros = format == LayerFormat::ZstdChunked && is_zeros(&job.data);
                (Some(Digest::of(&job.data)), zeros)
            } else {
                (None, false)
            };
            Ok(Done {
                seq,
                compressed,
                digest,
                zeros,
            })
        }))
        .unwrap_or_else(|_| {
            Err(FormatError::Compress(format!(
                "worker panicked on item {seq}"
            )))
        });
        if done.send(result).is_err() {
            return;
        }
    }
}

struct Pipeline<'a, W: Write> {
    format: LayerFormat,
    chunk_size: u64,
    out: HashingWriter<W>,
    jobs: Option<SyncSender<Job>>,
    done: &'a Receiver<Result<Done, FormatError>>,
    next_seq: u64,
    next_write: u64,
    items: VecDeque<Item>,
    ready: BTreeMap<u64, Done>,
    max_in_flight: u64,
    entries: Vec<TocEntry>,
    diff: Hasher,
    header: Vec<u8>,
}

impl<W: Write> Pipeline<'_, W> {
    fn dispatch(&mut self, data: Vec<u8>, item: Item) -> Result<(), FormatError> {
        while self.next_seq - self.next_write >= self.max_in_flight {
            self.wait_one()?;
        }
        let chunk = matches!(item, Item::Chunk { .. });
        let seq = self.next_seq;
        let sent = self
            .jobs
            .as_ref()
            .map(|tx| tx.send(Job { seq, data, chunk }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(FormatError::Compress("compression workers stopped".into()));
        }
        self.next_seq += 1;
        self.items.push_back(item);
        while let Ok(r) = self.done.try_recv() {
            let d = r?;
            self.ready.insert(d.seq, d);
        }
        self.write_ready()
    }

    /// Blocks until the next item in order is written.
    fn wait_one(&mut self) -> Result<(), FormatError> {
        let target = self.next_write;
        while !self.ready.contains_key(&target) {
            let d = self
                .done
                .recv()
                .map_err(|_| FormatError::Compress("compression workers stopped".into()))??;
            self.ready.insert(d.seq, d);
        }
        self.write_ready()
    }

    fn write_ready(&mut self) -> Result<(), FormatError> {
        while let Some(done) = self.ready.remove(&self.next_write) {
            let item = self
                .items
                .pop_front()
                .ok_or_else(|| FormatError::Compress("item queue out of step".into()))?;
            let start = self.out.len();
            self.out.write_all(&done.compressed)?;
            let end = self.out.len();
            if let Item::Chunk {
                entry,
                file_offset,
                size,
                whole_file,
            } = item
            {
                let digest = done
                    .digest
                    .ok_or_else(|| FormatError::Compress("chunk without digest".into()))?;
                if let Some(e) = self.entries.get_mut(entry) {
                    if whole_file {
                        e.digest = Some(digest);
                    }
                    e.chunks.push(Chunk {
                        file_offset,
                        size,
                        compressed_start: start,
                        compressed_end: end,
                        inner_offset: 0,
                        digest,
                        zeros: done.zeros,
                    });
                }
            }
            self.next_write += 1;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), FormatError> {
        while self.next_write < self.next_seq {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Appends bytes that belong between payloads (headers, padding, the end-of-archive marker).
    fn push_header(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.diff.update(bytes);
        self.header.extend_from_slice(bytes);
        if self.header.len() as u64 >= self.chunk_size {
            self.flush_header()?;
        }
        Ok(())
    }

    fn flush_header(&mut self) -> Result<(), FormatError> {
        if !self.header.is_empty() {
            let data = std::mem::take(&mut self.header);
            self.dispatch(data, Item::Header)?;
        }
        Ok(())
    }

    fn run<R: Read>(
        &mut self,
        input: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, FormatError> {
        let mut tar = TarParser::new(BufReader::with_capacity(1 << 20, input));
        let mut reported = 0u64;
        let mut count = 0u64;
        let mut report = |tar_offset: u64, force: bool| {
            if force || tar_offset >= reported + PROGRESS_STEP {
                reported = tar_offset;
                progress(tar_offset);
            }
        };
        while let Some(item) = tar.next_item()? {
            let entry = match item {
                TarItem::Global(raw) => {
                    self.push_header(&raw)?;
                    continue;
                }
                TarItem::Entry(e) => e,
            };
            count += 1;
            self.push_header(&entry.raw)?;
            let m = entry.meta;
            // What the TOC cannot hold fails the layer as `Unrepresentable`, before any of its
            // bytes count: the caller may keep the layer plain instead.
            m.check_toc()?;
            let (name, link_name) = (m.toc_name()?.to_owned(), m.toc_link_name()?.to_owned());
            let size = entry.size;
            let idx = self.entries.len();
            let is_reg = m.kind == EntryKind::Reg;
            self.entries.push(TocEntry {
                name,
                kind: m.kind,
                size: if is_reg { size } else { 0 },
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                uname: m.uname,
                gname: m.gname,
                mtime: m.mtime,
                mtime_nsec: m.mtime_nsec,
                link_name,
                dev_major: m.dev_major,
                dev_minor: m.dev_minor,
                xattrs: m.xattrs,
                digest: is_reg.then(|| Digest::of(b"")),
                chunks: Vec::new(),
            });
            if is_reg && size > 0 {
                self.flush_header()?;
                let whole_file = size <= self.chunk_size;
                let mut file_hash = (!whole_file).then(Hasher::new);
                let mut off = 0u64;
                while off < size {
                    let n = self.chunk_size.min(size - off);
                    let mut buf = vec![0u8; n as usize];
                    tar.read_payload(&mut buf)?;
                    self.diff.update(&buf);
                    if let Some(h) = file_hash.as_mut() {
                        h.update(&buf);
                    }
                    self.dispatch(
                        buf,
                        Item::Chunk {
                            entry: idx,
                            file_offset: off,
                            size: n,
                            whole_file,
                        },
                    )?;
                    off += n;
                    report(tar.offset(), false);
                }
                if let (Some(h), Some(e)) = (file_hash, self.entries.get_mut(idx)) {
                    e.digest = Some(h.finish());
                }
            } else {
                // Data of a non-regular entry is passed through with the headers.
                let mut left = size;
                let mut buf = vec![0u8; 64 << 10];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    tar.read_payload(&mut buf[..n])?;
                    self.push_header(&buf[..n])?;
                    left -= n as u64;
                }
            }
            let mut pad = [0u8; 512];
            let p = padding(size);
            tar.read_payload(&mut pad[..p])?;
            self.push_header(&pad[..p])?;
            report(tar.offset(), false);
        }
        report(tar.offset(), true);
        Ok(count)
    }
}

/// See [`super::write_layer`]; `prefetch` names the start-up set the TOC records (zstd:chunked).
pub(crate) fn write_layer<R: Read, W: Write>(
    input: R,
    out: W,
    opts: &WriteOptions,
    prefetch: &[String],
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenLayer, FormatError> {
    if opts.chunk_size == 0 || opts.chunk_size > (1 << 30) {
        return Err(FormatError::Options(format!(
            "chunk_size {} must be between 1 byte and 1 GiB",
            opts.chunk_size
        )));
    }
    let format = opts.format;
    let level = opts.level;
    let workers = opts.threads.max(1);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(workers * 2 + 2);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel();
    let (pipeline, count) = std::thread::scope(|s| {
        for _ in 0..workers {
            let (rx, tx) = (&job_rx, done_tx.clone());
            s.spawn(move || worker(format, level, rx, tx));
        }
        drop(done_tx);
        let mut p = Pipeline {
            format,
            chunk_size: opts.chunk_size,
            out: HashingWriter::new(out),
            jobs: Some(job_tx),
            done: &done_rx,
            next_seq: 0,
            next_write: 0,
            items: VecDeque::new(),
            ready: BTreeMap::new(),
            max_in_flight: workers as u64 * 2 + 2,
            entries: Vec::new(),
            diff: Hasher::new(),
            header: Vec::new(),
        };
        let result = p.run(input, progress).and_then(|count| {
            if format == LayerFormat::ZstdChunked {
                p.push_header(&[0u8; 1024])?;
            }
            p.flush_header()?;
            p.drain()?;
            Ok(count)
        });
        // Stop the workers whatever happened, so the scope can join them.
        p.jobs = None;
        result.map(|count| (p, count))
    })?;
    finish(pipeline, level, count, prefetch)
}

fn finish<W: Write>(
    p: Pipeline<'_, W>,
    level: i32,
    count: u64,
    prefetch: &[String],
) -> Result<WrittenLayer, FormatError> {
    let Pipeline {
        format,
        mut out,
        entries,
        mut diff,
        ..
    } = p;
    let json = super::toc::encode(format, &entries, prefetch)?;
    let mut annotations = BTreeMap::new();
    let toc_digest = match format {
        LayerFormat::ZstdChunked => {
            let compressed = zstd::bulk::compress(&json, level)?;
            let digest = Digest::of(&compressed);
            out.write_all(&footer::skippable_header(compressed.len())?)?;
            let offset = out.len();
            out.write_all(&compressed)?;
            let tail = footer::zstd_footer(offset, compressed.len() as u64, json.len() as u64);
            out.write_all(&footer::skippable_header(tail.len())?)?;
            out.write_all(&tail)?;
            let position = format!("{offset}:{}:{}:1", compressed.len(), json.len());
            for (key, value) in [
                (ANNOTATION_ZSTD_CHECKSUM, digest.to_string()),
                (ANNOTATION_LABEL_ZSTD_CHECKSUM, digest.to_string()),
                (ANNOTATION_ZSTD_POSITION, position.clone()),
                (ANNOTATION_LABEL_ZSTD_POSITION, position),
            ] {
                annotations.insert(key.to_owned(), value);
            }
            digest
        }
        LayerFormat::Estargz => {
            let offset = out.len();
            let mut plain = Vec::with_capacity(json.len() + 2048);
            plain.extend_from_slice(&ustar_file_header(
                ESTARGZ_TOC_NAME,
                json.len() as u64,
                0o444,
            ));
            plain.extend_from_slice(&json);
            plain.resize(plain.len() + padding(json.len() as u64) + 1024, 0);
            diff.update(&plain);
            out.write_all(&gzip_member(level, &plain)?)?;
            out.write_all(&footer::estargz_footer(offset))?;
            Digest::of(&json)
        }
    };
    let uncompressed_size = diff.len();
    if format == LayerFormat::Estargz {
        annotations.insert(
            ANNOTATION_ESTARGZ_TOC_DIGEST.to_owned(),
            toc_digest.to_string(),
        );
        annotations.insert(
            ANNOTATION_ESTARGZ_UNCOMPRESSED_SIZE.to_owned(),
            uncompressed_size.to_string(),
        );
    }
    out.flush()?;
    let (_, digest, size) = out.finish();
    Ok(WrittenLayer {
        media_type: match format {
            LayerFormat::ZstdChunked => MEDIA_TYPE_ZSTD,
            LayerFormat::Estargz => MEDIA_TYPE_GZIP,
        },
        digest,
        size,
        diff_id: diff.finish(),
        uncompressed_size,
        toc_digest,
        annotations,
        entries: count,
    })
}
